"""Checkpoints through megatron-core's ``dist_checkpointing`` (``torch_dist`` format).

``save_dir/step-N`` holds the model's ``sharded_state_dict`` (TP shards as global
tensors), the optimizer (the distributed optimizer with ``fully_reshardable``
sharding), and common entries rank 0 writes: iteration, consumed samples, the
scheduler, the config and the RNG state. A checkpoint saved at one (TP, PP, CP, DP)
layout loads at any other. With an interleaved pipeline each model chunk's state
sits under ``model0`` .. ``modelN`` (as Megatron-LM saves it), else under ``model``;
the sharded keys number the layers globally, so chunks load at any PP x VP.

A save goes to ``step-N.partial``; once every rank finished, rank 0 writes
``COMPLETE`` into it and renames it to ``step-N``, so a folder named ``step-N``
is always complete and a complete folder is never overwritten or deleted,
except by the ``keep_last`` rotation.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from data_tools.common import atomic_write

MARKER = "COMPLETE"
FORMAT = "megatron_ext/torch_dist/1"
_STEP = re.compile(r"^step-(\d+)$")
# fully_reshardable: a canonical per-parameter optimizer state that loads at any TP/DP x CP;
# mem_efficient gathers over gloo, without .cuda() copies (distrib_optimizer.py:1443)
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                      "distrib_optim_fully_reshardable_mem_efficient": True}
# model fields a checkpoint must agree with (the vocabulary is checked separately)
SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "swiglu", "normalization", "add_bias_linear", "untie_embeddings")


def complete_steps(save_dir: str):
    """Sorted iterations with a complete checkpoint in ``save_dir``."""
    if not os.path.isdir(save_dir):
        return []
    steps = []
    for name in os.listdir(save_dir):
        m = _STEP.match(name)
        if m and os.path.exists(os.path.join(save_dir, name, MARKER)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_checkpoint(path: str) -> Optional[str]:
    """``path`` itself if it is a complete step folder, else its newest complete step-N."""
    if os.path.exists(os.path.join(path, MARKER)):
        return path
    steps = complete_steps(path)
    return os.path.join(path, f"step-{steps[-1]}") if steps else None


def read_common(path: str) -> dict:
    """The common (non-sharded) entries of complete checkpoint ``path``: iteration,
    consumed_samples, config, vocab_size, ... Reads files only (no collective), so
    every rank can check a checkpoint before the first collective."""
    from megatron.core import dist_checkpointing

    if not os.path.exists(os.path.join(path, MARKER)):
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
    common = dist_checkpointing.load_common_state_dict(path)
    if common.get("format") != FORMAT:
        raise ValueError(f"{path}: not a megatron_ext {FORMAT} checkpoint (format {common.get('format')!r}); "
                         f"checkpoints from before the dist_checkpointing trainer cannot be loaded")
    return common


def read_checkpoint_config(path: str) -> dict:
    """The TrainConfig (as a dict) stored in checkpoint ``path`` (save_dir or step folder)."""
    step = latest_checkpoint(path)
    if step is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint (a step-N folder with a {MARKER} marker)")
    return read_common(step)["config"]


def check_compatible(path: str, common: dict, model_cfg, vocab_size: int) -> None:
    """Raise ValueError naming every model key in which checkpoint ``path`` differs."""
    stored = common["config"]["model"]
    wrong = [f"model.{k}: checkpoint {stored.get(k)!r}, config {getattr(model_cfg, k)!r}"
             for k in SHAPE_KEYS if stored.get(k) != getattr(model_cfg, k)]
    if common.get("vocab_size") != vocab_size:
        wrong.append(f"vocab size: checkpoint {common.get('vocab_size')}, this run {vocab_size}")
    if wrong:
        raise ValueError(f"{path}: checkpoint of another model shape: " + "; ".join(wrong))


def _chunks(model) -> list:
    """The bare GPTModels of ``model``: one module (DDP-wrapped or bare) or a list of chunks."""
    from .model import unwrap

    return unwrap(list(model) if isinstance(model, (list, tuple)) else [model])


def _model_keys(chunks) -> list:
    """State dict keys of the chunks: ``model`` alone, ``model0`` .. ``modelN`` interleaved."""
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def _sharded_state(model, optimizer, is_loading: bool) -> dict:
    chunks = _chunks(model)
    # GPTModel names, as Megatron-LM saves them
    state = {key: chunk.sharded_state_dict() for key, chunk in zip(_model_keys(chunks), chunks)}
    if optimizer is not None:
        if is_loading:
            _init_optimizer_state(optimizer)
        # the optimizer finds its params' sharded tensors anywhere in the model states
        model_sd = state["model"] if len(chunks) == 1 else dict(state)
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                          metadata=OPTIMIZER_METADATA)
    return state


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


def save(save_dir: str, iteration: int, model, optimizer, scheduler, common: dict, keep_last: int) -> str:
    """Save ``model`` (DDP-wrapped or bare GPTModel, or a list of model chunks) and, if
    given, the optimizer and scheduler as ``save_dir/step-{iteration}``; returns the
    folder. Collective: every rank calls."""
    from megatron.core import dist_checkpointing

    final = os.path.join(save_dir, f"step-{iteration}")
    if os.path.exists(os.path.join(final, MARKER)):
        return final  # this step is saved already; a complete folder is never rewritten
    partial = final + ".partial"
    if dist.get_rank() == 0:
        for stale in (partial, final):  # an earlier attempt that never completed
            if os.path.exists(stale):
                shutil.rmtree(stale)
        os.makedirs(partial)
    dist.barrier()
    state = _sharded_state(model, optimizer, is_loading=False)
    state.update(common, format=FORMAT, iteration=iteration, rng=torch.get_rng_state(),
                 scheduler=scheduler.state_dict() if scheduler is not None else None)
    dist_checkpointing.save(state, partial)
    dist.barrier()
    if dist.get_rank() == 0:
        atomic_write(os.path.join(partial, MARKER), f"{iteration}\n".encode())
        os.replace(partial, final)
        for old in complete_steps(save_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(os.path.join(save_dir, f"step-{old}"), ignore_errors=True)
    dist.barrier()
    return final


def load(path: str, model, optimizer=None, scheduler=None) -> dict:
    """Load complete checkpoint ``path`` into ``model`` (a module or a list of model chunks;
    and the optimizer/scheduler when given) at this run's layout; returns the common
    entries. Collective."""
    from megatron.core import dist_checkpointing

    common = read_common(path)
    state = dist_checkpointing.load(_sharded_state(model, optimizer, is_loading=True), path)
    chunks = _chunks(model)
    for key, chunk in zip(_model_keys(chunks), chunks):
        chunk.load_state_dict(state[key], strict=True)
    if optimizer is not None:
        _load_optimizer(optimizer, state["optimizer"])
        if scheduler is not None and common.get("scheduler") is not None:
            scheduler.load_state_dict(common["scheduler"])
        torch.set_rng_state(common["rng"])
    return common


def _load_optimizer(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict``, with two megatron-core 0.16 defects of the torch-AdamW
    path (no TE/apex) worked around: ``load_state_dict`` puts ONE ``step`` tensor into
    every parameter's state (distrib_optimizer.py:818-825), which AdamW then increments
    in place once per parameter, so the resumed bias correction is wrong; and the
    fully-reshardable parameter load copies *every* state key from the checkpoint, which
    holds no per-parameter ``step`` (KeyError 'step', distrib_optimizer.py:940). So the
    parameter state is loaded with ``step`` set aside, and each parameter gets its own copy."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    inner = chained[0]
    param_state = state.get("param_state") if len(chained) == 1 else None
    if param_state is None or state.get("param_state_sharding_type") != "fully_reshardable":
        optimizer.load_state_dict(state)
        return
    rest = {k: v for k, v in state.items() if k not in ("param_state", "param_state_sharding_type")}
    inner.load_state_dict(rest)
    steps = {p: st.pop("step") for p, st in inner.optimizer.state.items() if "step" in st}
    inner.load_parameter_state_from_fully_reshardable(param_state)
    for p, step in steps.items():
        inner.optimizer.state[p]["step"] = step.detach().clone()


def save_model_checkpoint(save_dir: str, iteration: int, model, config: dict) -> str:
    """Weights-only checkpoint ``save_dir/step-N`` of ``model`` (e.g. an imported Hugging
    Face model) with its TrainConfig dict; training starts from it with
    ``checkpoint.init_from``. Needs torch.distributed and parallel_state initialised."""
    vocab = _chunks(model)[0].vocab_size
    common = {"config": config, "vocab_size": vocab, "consumed_samples": 0, "skipped_iterations": 0}
    return save(save_dir, iteration, model, None, None, common, keep_last=0)


def load_model_weights(path: str, model) -> dict:
    """Load only the weights of the newest complete checkpoint under ``path`` (save_dir or
    step folder) into ``model`` at its current layout; returns the common entries."""
    step = latest_checkpoint(path)
    if step is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint (a step-N folder with a {MARKER} marker)")
    return load(step, model)
