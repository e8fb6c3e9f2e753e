"""What a checkpoint holds, as megatron-core sharded state dicts: the model chunks, the
distributed optimizer in one of two formats, and every rank's RNG states.

Formats of the optimizer state (``checkpoint.format``):

- ``dp_reshardable`` (Megatron-LM's default): each rank writes its own slice of the
  distributed optimizer's flat buckets, with no gather and no copy; it loads at any DP x CP
  but only at the TP, PP and VP it was saved with.
- ``fully_reshardable``: a canonical per-parameter state that loads at any layout; DP rank
  0 of each model-parallel rank gathers its TP shard's fp32 params and Adam moments
  over gloo (``mem_efficient``), so it costs host memory and time at scale.
"""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch

FORMATS = ("dp_reshardable", "fully_reshardable")
# mem_efficient gathers over gloo, without .cuda() copies (distrib_optimizer.py:1443)
OPTIMIZER_METADATA = {
    "dp_reshardable": {"distrib_optim_sharding_type": "dp_reshardable"},
    "fully_reshardable": {"distrib_optim_sharding_type": "fully_reshardable",
                          "distrib_optim_fully_reshardable_mem_efficient": True},
}
RNG_KEY = "rng_state"


def chunks_of(model) -> list:
    """The bare GPTModels of ``model``: one module (DDP-wrapped or bare) or a list of chunks."""
    from .model import unwrap

    return unwrap(list(model) if isinstance(model, (list, tuple)) else [model])


def model_keys(chunks) -> list:
    """State dict keys of the chunks: ``model`` alone, ``model0`` .. ``modelN`` interleaved."""
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def layout() -> dict:
    """This run's parallel layout (megatron-core's parallel_state must be initialised)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "vp": ps.get_virtual_pipeline_model_parallel_world_size(), "cp": ps.get_context_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(), "world": dist.get_world_size()}


def sharded_state(model, optimizer, is_loading: bool, fmt: str, with_rng: bool) -> dict:
    """The sharded state dict of the model chunks, the optimizer (in ``fmt``) and, with
    ``with_rng``, this rank's RNG states."""
    if fmt not in FORMATS:
        raise ValueError(f"checkpoint.format {fmt!r} is not one of {', '.join(FORMATS)}")
    chunks = chunks_of(model)
    # GPTModel names, as Megatron-LM saves them
    state = {key: chunk.sharded_state_dict() for key, chunk in zip(model_keys(chunks), chunks)}
    if optimizer is not None:
        if is_loading:
            _init_optimizer_state(optimizer)
        # the optimizer finds its params' sharded tensors anywhere in the model states
        model_sd = state["model"] if len(chunks) == 1 else dict(state)
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                          metadata=OPTIMIZER_METADATA[fmt])
    if with_rng:
        state[RNG_KEY] = _rng_object()
    return state


def _rng_object():
    """This rank's RNG states as a ShardedObject with one entry per global rank, so every
    rank writes and reads its own (as Megatron-LM's ``rng_state``, but per rank)."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(RNG_KEY, rng_states(), (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def rng_states() -> dict:
    """This rank's generators: Python, NumPy, torch CPU, CUDA (when this process computes on
    CUDA) and megatron-core's model-parallel tracker (``get_cuda_rng_tracker().get_states()``:
    CUDA generator states on a GPU, CPU ones under the CPU patches), with the device type."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from ..distributed import compute_device

    device = compute_device().type
    return {"random": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if device == "cuda" else None,
            "tracker": get_cuda_rng_tracker().get_states(), "device": device}


def set_rng_states(states: dict) -> None:
    """Restore what :func:`rng_states` returned. The CUDA and tracker states only on the device
    type they were saved on (a CPU generator state does not fit a CUDA generator): a run saved
    on CPU and resumed on a GPU keeps its fresh tracker seeds."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from ..distributed import compute_device

    random.setstate(states["random"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["cpu"])
    if states.get("device", "cpu") != compute_device().type:
        return
    if states.get("cuda") is not None:
        torch.cuda.set_rng_state(states["cuda"])
    get_cuda_rng_tracker().set_states(states["tracker"])


def _init_optimizer_state(optimizer) -> None:
    """A fresh torch Adam has no ``step``/``exp_avg`` entries to load into: create them
    with a zero-grad step (megatron-core's own helper where it has one); the load
    then overwrites parameters and states."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()
            continue
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        inner.step()
        inner.zero_grad()


def load_optimizer(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict``, with two megatron-core 0.16 defects of the torch-AdamW
    path (no TE/apex) worked around: ``load_state_dict`` puts ONE ``step`` tensor into
    every parameter's state (distrib_optimizer.py:818-825), which AdamW then increments
    in place once per parameter, so the resumed bias correction is wrong; and the
    parameter-state loaders copy every state key, ``step`` included, which the checkpoint
    does not hold per parameter (KeyError 'step' at distrib_optimizer.py:940, or the
    loading run's dummy step for dp_reshardable). So the parameter state is loaded with
    ``step`` set aside, and each parameter gets its own copy of the checkpoint's step."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    inner = chained[0]
    param_state = state.get("param_state") if len(chained) == 1 else None
    loader = {"fully_reshardable": "load_parameter_state_from_fully_reshardable",
              "dp_reshardable": "load_parameter_state_from_dp_reshardable"}.get(state.get("param_state_sharding_type"))
    if param_state is None or loader is None:
        optimizer.load_state_dict(state)
        return
    rest = {k: v for k, v in state.items() if k not in ("param_state", "param_state_sharding_type")}
    inner.load_state_dict(rest)
    steps = {p: st.pop("step") for p, st in inner.optimizer.state.items() if "step" in st}
    with torch.no_grad():  # the dp_reshardable loader copies into views of leaf params without it
        getattr(inner, loader)(param_state)
    for p, step in steps.items():
        inner.optimizer.state[p]["step"] = step.detach().clone()


def layout_mismatch(saved: Optional[dict], fmt: str) -> Optional[str]:
    """Why an optimizer state of format ``fmt`` saved at layout ``saved`` cannot load at this
    run's layout, or None when it can (dp_reshardable: same TP, PP and VP)."""
    if fmt != "dp_reshardable" or saved is None:
        return None
    now = layout()
    keys = ("tp", "pp", "vp")
    if all(saved.get(k) == now[k] for k in keys):
        return None
    show = lambda d: " ".join(f"{k.upper()}={d.get(k)}" for k in keys)  # noqa: E731
    return f"saved at {show(saved)}, this run is {show(now)}"
