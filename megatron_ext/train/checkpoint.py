"""Checkpoints with torch.distributed.checkpoint (DCP).

``save_dir/step-N`` holds the model, optimizer, scheduler, RNG state, consumed
samples and the config. It counts only once ``step-N/COMPLETE`` exists, which
rank 0 writes (atomically) after every rank finished saving, so a partial save
is never loaded. The last ``keep_last`` complete folders are kept.

Parameters are replicated across DP and CP, so a checkpoint loads at any DP or
CP size. TP-sharded checkpoints are not supported yet (TP > 1 raises).
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict, StateDictOptions

from data_tools.common import atomic_write

MARKER = "COMPLETE"
_STEP = re.compile(r"^step-(\d+)$")


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


def _check_tp(tp_size: int) -> None:
    if tp_size > 1:
        raise NotImplementedError("checkpoints with tensor_model_parallel_size > 1 are not supported yet; "
                                  "train with TP=1 (CP and DP of any size are fine)")


def save(save_dir: str, iteration: int, model, optimizer, scheduler, extra: dict, keep_last: int, tp_size: int) -> str:
    _check_tp(tp_size)
    path = os.path.join(save_dir, f"step-{iteration}")
    if dist.get_rank() == 0 and os.path.exists(path):
        shutil.rmtree(path)  # an earlier partial attempt at this step
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "scheduler": scheduler.state_dict(),
             "rng": torch.get_rng_state(), **extra}
    dcp.save(state, checkpoint_id=path)
    dist.barrier()
    if dist.get_rank() == 0:
        atomic_write(os.path.join(path, MARKER), f"{iteration}\n".encode())
        for old in complete_steps(save_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(os.path.join(save_dir, f"step-{old}"), ignore_errors=True)
    dist.barrier()
    return path


def load(path: str, model, optimizer=None, scheduler=None, tp_size: int = 1, weights_only: bool = False) -> dict:
    """Load a complete checkpoint in place; returns the extra entries (iteration, ...)."""
    _check_tp(tp_size)
    if not os.path.exists(os.path.join(path, MARKER)):
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
    if weights_only:
        state = {"model": get_state_dict(model, [])[0]}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={},
                       options=StateDictOptions(strict=True))
        return {}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
             "iteration": 0, "consumed_samples": 0, "skipped_iterations": 0, "config_yaml": ""}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return {k: state[k] for k in ("iteration", "consumed_samples", "skipped_iterations", "config_yaml")}
