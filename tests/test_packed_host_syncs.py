"""The packed (thd) path reads nothing back from the device per layer (issue #23 row 4).

No GPU here, so "on the device" is simulated: every tensor the batch builder moves to the
model's device (``.to(device)``), and the tokens it is handed, are :class:`OnDevice`, and so
is everything computed from them. Each host read of such a tensor (``tolist``, ``item``,
``cpu``, ``bool``, ``int``, ``torch.equal``, ...) is what would be a device sync on a GPU.
A forward + backward of a packed GPT (CP = 2, each cp_comm_type; and with full activation
recompute, which reruns each layer's forward in the backward) must do as many of them with
4 layers as with 2: none per layer.
"""
import pytest
import torch

from megatron_ext.distributed import spawn_ranks

DOCS = [37, 5, 60, 1, 90]
SYNCS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
         torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.equal}


def _to_host(args, kwargs) -> bool:
    targets = list(args) + list(kwargs.values())
    return any(str(t) == "cpu" for t in targets if isinstance(t, (str, torch.device)))


class OnDevice(torch.Tensor):
    """A tensor that lives on the accelerator: host reads of it are counted in ``reads``."""

    reads = []
    counting = False

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if cls.counting and (func in SYNCS or (func is torch.Tensor.to and _to_host(args[1:], kwargs))):
            cls.counting = False  # the read's own internals are not reads
            try:
                import traceback
                cls.reads.append((func.__name__, "".join(traceback.format_stack(limit=8)[:-1])))
            finally:
                cls.counting = True
        return super().__torch_function__(func, types, args, kwargs)


def _device_moves(fn, *args, **kwargs):
    """Run ``fn`` with every ``Tensor.to(<device>)`` result marked OnDevice (the batch builder's
    moves to the model's device; dtype-only casts stay as they are)."""
    real_to = torch.Tensor.to

    def to(self, *a, **k):
        out = real_to(self, *a, **k)
        moved = any(isinstance(t, torch.device) for t in list(a) + list(k.values()))
        return out.as_subclass(OnDevice) if moved and not isinstance(out, OnDevice) else out

    torch.Tensor.to = to
    try:
        return fn(*args, **kwargs)
    finally:
        torch.Tensor.to = real_to


def count_worker(rank, world_size, comm_types, layer_counts, config=None):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_ext.megatron.batch import cp_masked_loss, get_thd_batch_on_this_cp_rank
    from megatron_ext.megatron.cpu import enable_cpu_runtime
    from tests.gpt_harness import VOCAB, build_model

    enable_cpu_runtime()
    parallel_state.initialize_model_parallel(1, world_size)
    model_parallel_cuda_manual_seed(1)
    g = torch.Generator().manual_seed(3)
    t = sum(DOCS)
    batch = {"tokens": torch.randint(0, VOCAB, (1, t), generator=g), "labels": torch.randint(0, VOCAB, (1, t), generator=g),
             "loss_mask": torch.ones(1, t)}
    batch = {k: v.as_subclass(OnDevice) for k, v in batch.items()}  # the trainer moved them to the device
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    try:
        counts = {}
        for comm_type in comm_types:
            for layers in layer_counts:
                model = build_model(1, world_size, comm_type, num_layers=layers, **(config or {}))
                local, params = _device_moves(get_thd_batch_on_this_cp_rank, batch, DOCS,
                                              parallel_state.get_context_parallel_group())
                OnDevice.reads.clear()
                OnDevice.counting = True
                try:
                    per_token = model(local["tokens"], local["position_ids"], None, labels=local["labels"],
                                      packed_seq_params=params)
                    loss, _, _ = cp_masked_loss(per_token, local["loss_mask"], group)
                    with torch._C.DisableTorchFunctionSubclass():  # a plain alias: Tensor.backward on an
                        loss = loss.as_subclass(torch.Tensor)      # OnDevice would run with the checks off
                    loss.backward()
                finally:
                    OnDevice.counting = False
                counts[(comm_type, layers)] = list(OnDevice.reads)
        return counts
    finally:
        parallel_state.destroy_model_parallel()


FULL_RECOMPUTE = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}


@pytest.mark.parametrize("config", [None, FULL_RECOMPUTE], ids=["forward-backward", "full-recompute"])
def test_packed_gpt_does_no_host_sync_per_layer(config):
    types = ["p2p", "all_gather", "a2a"]
    for rank, counts in enumerate(spawn_ranks(count_worker, 2, (types, (2, 4), config), timeout_s=120)):
        for t in types:
            two, four = counts[(t, 2)], counts[(t, 4)]
            extra = four[len(two):] if len(four) > len(two) else []
            assert len(four) == len(two), (
                f"rank {rank} {t}: {len(two)} device reads with 2 layers, {len(four)} with 4; "
                f"per-layer reads, e.g.:\n" + "\n".join(f"{name}:\n{where}" for name, where in extra[:3]))
