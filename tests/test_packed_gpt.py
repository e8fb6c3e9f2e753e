"""A packed batch (thd) through megatron-core's GPTModel with our CP attention and RoPE:
CP = 2 (every cp_comm_type) equals CP = 1, and CP = 1 equals each document run alone
with megatron-core's own attention, losses summed. Tolerances: loss within 1e-5
relative; each parameter's gradient within 1e-5 of its largest reference gradient."""
import torch

from megatron_ext.distributed import spawn_ranks

DOCS = [37, 5, 60, 1, 90]  # 193 tokens: a length-1 document, one shorter than 2P


def _packed_batch():
    g = torch.Generator().manual_seed(11)
    from tests.gpt_harness import VOCAB

    docs = [torch.randint(0, VOCAB, (n + 1,), generator=g) for n in DOCS]
    masks = [(torch.rand(n, generator=g) > 0.2).float() for n in DOCS]
    return docs, masks


def _grads(model):
    return {n: (p.main_grad if hasattr(p, "main_grad") else p.grad).detach().clone()
            for n, p in model.named_parameters()}


def packed_worker(rank, world_size, comm_types, alone=False):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_ext.megatron.batch import cp_masked_loss, get_thd_batch_on_this_cp_rank
    from megatron_ext.megatron.cpu import enable_cpu_runtime
    from tests.gpt_harness import build_model

    enable_cpu_runtime()
    parallel_state.initialize_model_parallel(1, world_size, hierarchical_context_parallel_sizes=None)
    model_parallel_cuda_manual_seed(1)
    docs, masks = _packed_batch()
    try:
        results = {}
        for comm_type in comm_types:
            model = build_model(1, world_size, comm_type if world_size > 1 else None, "mcore" if alone else "cp")
            group = parallel_state.get_data_parallel_group(with_context_parallel=True)
            if alone:  # each document by itself, megatron-core's attention; loss = sum / all counted tokens
                total = sum(float(m[:-1].sum()) for m in masks)
                loss_sum = 0.0
                for d, m in zip(docs, masks):
                    per_token = model(d[None, :-1], torch.arange(len(d) - 1)[None], None, labels=d[None, 1:])
                    mask = m.clone()
                    mask[-1] = 0  # the last token's label belongs to no document
                    part = (per_token * mask[None]).sum()
                    (part / total).backward()
                    loss_sum += part.item()
                results[comm_type] = {"loss": loss_sum / total, "grads": _grads(model)}
                continue
            batch = {"tokens": torch.cat([d[:-1] for d in docs])[None],
                     "labels": torch.cat([d[1:] for d in docs])[None], "loss_mask": torch.cat(masks)[None]}
            local, params = get_thd_batch_on_this_cp_rank(batch, DOCS, parallel_state.get_context_parallel_group())
            per_token = model(local["tokens"], local["position_ids"], None, labels=local["labels"],
                              packed_seq_params=params)
            loss, reported, count = cp_masked_loss(per_token, local["loss_mask"], group)
            loss.backward()
            if group.size() > 1:  # a bare model: sum gradients over DP x CP, as cp_masked_loss needs
                for p in model.parameters():
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad, group=group)
            results[comm_type] = {"loss": reported.item(), "count": count.item(), "grads": _grads(model)}
        return results
    finally:
        parallel_state.destroy_model_parallel()


def _assert_close(ref, res, what):
    assert abs(res["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (what, res["loss"], ref["loss"])
    for name, g_ref in ref["grads"].items():
        err = (res["grads"][name] - g_ref).abs().max().item()
        assert err <= 1e-5 * g_ref.abs().max().item(), (what, name, err)


def test_packed_gpt_cp2_equals_cp1_equals_documents_alone():
    alone = spawn_ranks(packed_worker, 1, (["ref"], True), timeout_s=60)[0]["ref"]
    cp1 = spawn_ranks(packed_worker, 1, (["p2p"],), timeout_s=60)[0]["p2p"]
    assert cp1["count"] == sum(float(m[:-1].sum()) for m in _packed_batch()[1])  # pads and document ends masked
    _assert_close(alone, cp1, "cp1 vs documents alone")
    types = ["p2p", "all_gather", "a2a"]
    for rank, res in enumerate(spawn_ranks(packed_worker, 2, (types,), timeout_s=90)):
        for t in types:
            _assert_close(cp1, res[t], f"cp2 {t} rank {rank}")


class _Group:
    """Stands in for a CP process group: mcore's thd RoPE only asks size() and rank()."""

    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def test_packed_rope_restarts_per_document_exactly_at_200k():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_thd

    from megatron_ext.megatron.cpu import enable_cpu_runtime
    from megatron_ext.megatron.rope import LongContextRotaryEmbedding
    from megatron_ext.rope import RopeConfig, apply_rope
    from megatron_ext.sharding import pad_packed_lengths, packed_position_ids

    enable_cpu_runtime()
    cfg = RopeConfig(scaling="abf", abf_base=5e6)
    cu = pad_packed_lengths([200_001, 7, 1000], 2)
    rot = LongContextRotaryEmbedding(16, cfg)
    emb = rot(int((cu[1:] - cu[:-1]).max()), packed_seq=True, cp_group=_Group(1, 2))  # mcore's thd call
    x = torch.randn(int(cu[-1]) // 2, 1, 16)
    got = _apply_rotary_pos_emb_thd(x, cu, emb, cp_group=_Group(1, 2))
    want = apply_rope(x.unsqueeze(0), packed_position_ids(cu, 1, 2), cfg)[0]  # fp64-reduced angles
    assert (got - want).abs().max().item() <= 1e-5
