"""How long before a kill the trainer must be told to stop: the SLURM ``--signal`` lead
time and the Kubernetes ``terminationGracePeriodSeconds``.

After the signal the trainer finishes the iteration it is in, then saves a checkpoint and
exits, so the lead time must cover one iteration plus one save:

    grace = ceil(MARGIN x (iteration + save) + SLACK)

``iteration``: the planner's step time of the config's layout on the job's GPUs
(megatron_ext.plan.time); ``save``: the planned checkpoint save time, the bytes the
busiest node writes over the per-node filesystem bandwidth (megatron_ext.plan.host_memory).
CPU jobs have no GPU plan and keep the fixed DEFAULT_S.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# x1.25 on the planned figures: the time model is good to ~15-20 %, and a save on a busy
# filesystem runs slower than the bandwidth figure.
MARGIN = 1.25
# Fixed seconds on top: SLURM delivers --signal with up to 60 s jitter (its event
# resolution), plus signal propagation, the final barrier, COMPLETE marker and exit.
SLACK_S = 60
# CPU jobs (no GPU plan): the lead time the sbatch template always had.
DEFAULT_S = 120
# SLURM's --signal sig_time is at most 65535 s.
SLURM_MAX_S = 65535


@dataclass
class Grace:
    """The derived lead time and what it is made of."""

    seconds: int
    """Signal lead / termination grace period, whole seconds."""
    iteration_s: float
    """Planned seconds of one iteration (0 for CPU jobs)."""
    save_s: float
    """Planned seconds of one checkpoint save (0 for CPU jobs)."""
    why: str
    """One line: the formula with its numbers."""


def grace_period(cfg, world: int, gpus_per_node: int, device: str = "cuda", gpu: str = "H100",
                 write_gib_s: float = 0.0) -> Grace:
    """The lead time for ``cfg`` (a TrainConfig) on ``world`` ranks, ``gpus_per_node`` per node."""
    if device != "cuda":
        return Grace(DEFAULT_S, 0.0, 0.0, f"{DEFAULT_S} s (device {device}: no GPU plan, fixed default)")
    from megatron_ext.plan.host_memory import DEFAULT_WRITE_GIB_S, checkpoint_host_memory, config_format
    from megatron_ext.plan.planner import config_layout, shape_and_run
    from megatron_ext.plan.time import estimate_time, hardware

    bw = write_gib_s or DEFAULT_WRITE_GIB_S
    shape, run = shape_and_run(cfg)
    lay = config_layout(cfg, world)
    step = estimate_time(shape, run, lay, hardware(gpu, {}), gpus_per_node)["step_s"]
    fmt = config_format(cfg)
    save = checkpoint_host_memory(shape, run, lay, fmt, gpus_per_node, True, bw).save_s
    seconds = math.ceil(MARGIN * (step + save) + SLACK_S)
    if seconds > SLURM_MAX_S:
        raise ValueError(f"grace period {seconds} s (iteration {step:.0f} s + save {save:.0f} s) exceeds "
                         f"SLURM's --signal limit of {SLURM_MAX_S} s")
    why = (f"{seconds} s = {MARGIN:g} x (iteration {step:.0f} s + {fmt} save {save:.0f} s at {bw:g} GiB/s "
           f"per node) + {SLACK_S} s, planned for {world} x {gpu}")
    return Grace(seconds, step, save, why)
