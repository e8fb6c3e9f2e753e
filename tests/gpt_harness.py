"""Tiny GPTModel runs under TP x CP on spawned gloo ranks, for parity tests.

The reference is one rank, CP = TP = 1, with megatron-core's own local attention
(``DotProductAttention``), so our CP path is checked against Megatron's math.
"""
from __future__ import annotations

import importlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel as DDP
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.megatron.batch import cp_masked_loss, get_batch_on_this_cp_rank
from megatron_ext.megatron.cpu import enable_cpu_runtime
from megatron_ext.megatron.model import build_gpt_model
from megatron_ext.rope import RopeConfig
from megatron_ext.sharding import position_ids

SEQ, BATCH, VOCAB = 256, 2, 128


def build_model(tp: int, cp: int, cp_comm_type, spec: str = "cp", rope: RopeConfig = None, num_layers: int = 2,
                **config_overrides) -> GPTModel:
    """spec "cp": our attention and RoPE; "mcore": megatron-core's local layers and RotaryEmbedding;
    "megatron-lm": Megatron-LM's ``--spec megatron_ext.megatron.specs gpt_layer_cp_spec`` route (the
    attribute itself goes to GPTModel, with megatron-core's RotaryEmbedding)."""
    config = TransformerConfig(
        num_layers=num_layers, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        use_cpu_initialization=True, attention_dropout=0.0, hidden_dropout=0.0,
        tensor_model_parallel_size=tp, context_parallel_size=cp, cp_comm_type=cp_comm_type,
        calculate_per_token_loss=True,  # mcore DDP then sums grads over DP x CP, as cp_masked_loss needs
        **config_overrides,
    )
    torch.manual_seed(1234)  # same full weights for every TP/CP layout (CPU init splits a master copy)
    if spec in ("mcore", "megatron-lm"):
        layer_spec = (get_gpt_layer_local_spec() if spec == "mcore" else
                      getattr(importlib.import_module("megatron_ext.megatron.specs"), "gpt_layer_cp_spec"))
        return GPTModel(config, layer_spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                        position_embedding_type="rope", rotary_base=int((rope or RopeConfig()).base))
    return build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ, rope=rope)


def make_batch(masked_cp_rank=None, cp: int = 1):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    loss_mask = (torch.rand(BATCH, SEQ, generator=g) > 0.2).float()
    if masked_cp_rank is not None:  # every token of that CP rank is masked
        loss_mask[:, position_ids(SEQ, masked_cp_rank, cp)] = 0.0
    pos = torch.arange(SEQ).expand(BATCH, -1).contiguous()
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "loss_mask": loss_mask, "position_ids": pos}


def full_grads(model, tp_group) -> dict:
    """Gradients with TP shards gathered back to full tensors (partition_dim)."""
    out = {}
    tp = dist.get_world_size(tp_group)
    for name, p in model.named_parameters():
        g = (p.main_grad if hasattr(p, "main_grad") else p.grad).detach().clone()
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(parts, g.contiguous(), group=tp_group)
            g = torch.cat(parts, dim=p.partition_dim)
        out[name] = g
    return out


def run_step(model, batch, ddp: bool = False) -> dict:
    """One forward/backward; gradients summed over DP x CP by megatron-core's DDP
    (``ddp``) or, for a bare model, by one all-reduce per gradient here."""
    cp_group = parallel_state.get_context_parallel_group()
    local = get_batch_on_this_cp_rank(batch, cp_group)
    dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if ddp:
        model = DDP(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    per_token = model(local["tokens"], local["position_ids"], None, labels=local["labels"])
    loss, reported, count = cp_masked_loss(per_token, local["loss_mask"], dp_cp)
    loss.backward()
    if ddp:
        model.finish_grad_sync()
        model = model.module
    elif dp_cp.size() > 1:
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=dp_cp)
    cp_rank, cp_size = cp_group.rank(), cp_group.size()
    return {"per_token": per_token.detach(), "positions": position_ids(SEQ, cp_rank, cp_size),
            "loss": reported.item(), "count": count.item(),
            "grads": full_grads(model, parallel_state.get_tensor_model_parallel_group())}


def gpt_worker(rank, world_size, tp, cp, comm_types, spec="cp", masked_cp_rank=None, rope=None, save_to=None,
               load_from=None, ddp=False):
    """Run one step per cp_comm_type; returns {comm_type: results}. ``save_to``
    writes the initial model state_dict (rank 0); ``load_from`` loads one first."""
    enable_cpu_runtime()
    hierarchical = [2, cp // 2] if "a2a+p2p" in comm_types else None
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp,
                                             hierarchical_context_parallel_sizes=hierarchical)
    model_parallel_cuda_manual_seed(1)
    try:
        results = {}
        for comm_type in comm_types:
            model = build_model(tp, cp, comm_type if cp > 1 else None, spec, rope)
            if load_from:
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1.0)
                model.load_state_dict(torch.load(load_from, weights_only=False))
            if save_to and rank == 0:
                torch.save(model.state_dict(), save_to)
            results[comm_type] = run_step(model, make_batch(masked_cp_rank, cp), ddp)
        return results
    finally:
        parallel_state.destroy_model_parallel()
