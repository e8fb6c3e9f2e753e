"""Evaluate layouts with the memory and time models, rank them, and format the
answer; shared by ``python -m megatron_ext.plan`` and the trainer's ``--dry-run``."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List

from .layouts import (RECOMPUTE_CHOICES, Layout, PlanError, Recompute, RunShape, enumerate_layouts,
                      layout_problem)
from .memory import GIB, MemoryEstimate, estimate_memory
from .model import ModelShape, model_shape, parameter_count
from .time import Hardware, estimate_time


@dataclass
class Evaluation:
    """One layout's memory and time."""

    layout: Layout
    """The layout."""
    memory: MemoryEstimate
    """Per-GPU memory on its fullest stage."""
    time: Dict[str, float]
    """Seconds per step by part, step_s, tokens_per_s_per_gpu, mfu."""
    budget_gib: float
    """GPU memory budget."""

    @property
    def gib(self) -> float:
        return self.memory.total_bytes / GIB

    @property
    def fits(self) -> bool:
        return self.gib <= self.budget_gib

    def as_dict(self) -> dict:
        lay = self.layout
        return {"tp": lay.tp, "pp": lay.pp, "cp": lay.cp, "dp": lay.dp, "cp_comm_type": lay.cp_comm_type,
                "ulysses": lay.ulysses, "micro_batch": lay.micro_batch, "recompute": lay.recompute.label(),
                "memory_gib": self.gib, "budget_gib": self.budget_gib, "fits": self.fits,
                "memory_parts_gib": {k: v / GIB for k, v in self.memory.parts.items()},
                "reserve_gib": self.memory.reserve_bytes / GIB, "peak_moment": self.memory.peak_moment,
                "stage": self.memory.stage, "time_s": {k: v for k, v in self.time.items()
                                                       if k not in ("tokens_per_s_per_gpu", "mfu")},
                "tokens_per_s_per_gpu": self.time["tokens_per_s_per_gpu"], "mfu": self.time["mfu"]}


def run_shape(cfg) -> RunShape:
    """RunShape of a TrainConfig; precision auto plans bf16 (what a GPU run uses)."""
    p = cfg.parallel
    return RunShape(seq_length=cfg.data.seq_length, global_batch_size=cfg.optim.global_batch_size,
                    bf16=cfg.precision != "fp32",
                    distributed_optimizer=bool(getattr(p, "use_distributed_optimizer", True)),
                    overlap_grad_reduce=bool(getattr(p, "overlap_grad_reduce", False)),
                    virtual_pp=int(getattr(p, "virtual_pipeline_model_parallel_size", None) or 1),
                    sequence_parallel=p.tensor_model_parallel_size > 1 if getattr(p, "sequence_parallel", None) is None
                    else bool(p.sequence_parallel))


def config_layout(cfg, world: int) -> Layout:
    """The layout a config asks for at ``world`` GPUs."""
    p = cfg.parallel
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    comm = p.cp_comm_type if p.context_parallel_size > 1 else "p2p"
    ulysses = p.context_parallel_size if comm == "a2a" else (p.ulysses_size if comm == "a2a+p2p" else 1)
    return Layout(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size,
                  world // model_parallel, comm, ulysses, cfg.optim.micro_batch_size, config_recompute(cfg))


def config_recompute(cfg) -> Recompute:
    """The Recompute a TrainConfig asks for: model.recompute_* (megatron-core's names), or the
    old top-level ``recompute: true`` (full, every layer), resolved the way the trainer does."""
    m = cfg.model
    granularity = getattr(m, "recompute_granularity", None) or ("full" if getattr(cfg, "recompute", False) else None)
    if granularity == "full":
        return Recompute("full", (), getattr(m, "recompute_method", None) or "uniform",
                         getattr(m, "recompute_num_layers", None) or 1)
    if granularity == "selective":
        return Recompute("selective", tuple(getattr(m, "recompute_modules", None) or ("core_attn",)))
    return Recompute()


def recompute_lines(shape: ModelShape, run: RunShape, lay: Layout, hw: Hardware, gpus_per_node: int,
                    budget_gib: float) -> List[str]:
    """Memory and step time of ``lay`` under each recompute choice (the planner's, plus the
    layout's own), for the dry run: one memory model and one FLOP formula for all of them."""
    choices = list(RECOMPUTE_CHOICES) + ([lay.recompute] if lay.recompute not in RECOMPUTE_CHOICES else [])
    lines = ["  recompute choices at this layout (memory per GPU, step time):"]
    for rc in choices:
        ev = evaluate(shape, run, replace(lay, recompute=rc), hw, gpus_per_node, budget_gib)
        mine = "  <- this config" if rc == lay.recompute else ""
        lines.append(f"    {rc.label():<34} {ev.gib:8.1f} GiB {'fits' if ev.fits else 'does not fit':>12} "
                     f"{ev.time['step_s']:9.2f} s/step{mine}")
    return lines


def evaluate(shape: ModelShape, run: RunShape, lay: Layout, hw: Hardware, gpus_per_node: int,
             budget_gib: float) -> Evaluation:
    mem = estimate_memory(shape, run, lay, reserve_gib=hw.reserve_gib)
    return Evaluation(lay, mem, estimate_time(shape, run, lay, hw, gpus_per_node), budget_gib)


def check_gpus(shape: ModelShape, run: RunShape, gpus: int, gpus_per_node: int) -> None:
    """Raise PlanError for a GPU count or sequence length no layout can use."""
    if gpus < 1 or gpus_per_node < 1:
        raise PlanError(f"--gpus {gpus} and --gpus-per-node {gpus_per_node} must be positive")
    if gpus > gpus_per_node and gpus % gpus_per_node:
        raise PlanError(f"--gpus {gpus} is not a whole number of {gpus_per_node}-GPU nodes")
    if run.seq_length % 2:
        raise PlanError(f"seq_length {run.seq_length} divides by 2 x CP for no CP size (zigzag needs an even length)")


def plan(shape: ModelShape, run: RunShape, gpus: int, gpus_per_node: int, hw: Hardware,
         budget_gib: float) -> List[Evaluation]:
    """Every valid layout, evaluated; fitting ones first, fastest first."""
    check_gpus(shape, run, gpus, gpus_per_node)
    evals = [evaluate(shape, run, lay, hw, gpus_per_node, budget_gib)
             for lay in enumerate_layouts(shape, run, gpus, gpus_per_node)]
    if not evals:
        raise PlanError(f"no valid layout for {gpus} GPUs: TP must divide the heads and groups, PP the layers, "
                        f"2 x CP the seq_length {run.seq_length}, and micro-batch x DP the global batch "
                        f"{run.global_batch_size}")
    # throughput to 3 significant figures (the model is not finer than that), then less memory
    return sorted(evals, key=lambda e: (not e.fits, -float(f"{e.time['tokens_per_s_per_gpu']:.3g}"), e.gib))


def best_line(ev: Evaluation) -> str:
    lay = ev.layout
    comm = lay.cp_comm_type + (f" ulysses={lay.ulysses}" if lay.cp_comm_type == "a2a+p2p" else "")
    return (f"best: TP={lay.tp} PP={lay.pp} CP={lay.cp} DP={lay.dp} (cp_comm_type {comm}) memory "
            f"{ev.gib:.1f} GiB of {ev.budget_gib:g} GiB, ~{ev.time['tokens_per_s_per_gpu']:.0f} tokens/s/GPU")


def table(evals: List[Evaluation], top: int) -> List[str]:
    head = f"{'#':>3}  {'layout':<62} {'GiB/GPU':>8} {'fits':>5} {'tok/s/GPU':>10} {'MFU':>6}"
    rows = [head, "-" * len(head)]
    for i, ev in enumerate(evals[:top], 1):
        rows.append(f"{i:>3}  {ev.layout.label():<62} {ev.gib:>8.1f} {'yes' if ev.fits else 'no':>5} "
                    f"{ev.time['tokens_per_s_per_gpu']:>10.0f} {100 * ev.time['mfu']:>5.1f}%")
    return rows


def memory_lines(ev: Evaluation) -> List[str]:
    """The memory parts of one layout, one per line, then the time parts."""
    mem = ev.memory
    lines = [f"  memory per GPU ({mem.stage}, peak at the {mem.peak_moment}):"]
    for name, nbytes in mem.parts.items():
        lines.append(f"    {name:<48} {nbytes / GIB:8.2f} GiB")
    lines.append(f"    {'tensor memory at the peak':<48} {mem.peak_bytes / GIB:8.2f} GiB")
    lines.append(f"    {'CUDA context / NCCL / allocator reserve':<48} {mem.reserve_bytes / GIB:8.2f} GiB")
    lines += [f"    ({n})" for n in mem.notes]
    t = ev.time
    lines.append("  time per step: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()
                                                 if k not in ("step_s", "tokens_per_s_per_gpu", "mfu"))
                 + f"; step {t['step_s']:.2f} s, ~{t['tokens_per_s_per_gpu']:.0f} tokens/s/GPU, "
                   f"MFU {100 * t['mfu']:.1f}%")
    return lines


def explain(ev: Evaluation, shape: ModelShape, run: RunShape, gpus: int, gpus_per_node: int) -> List[str]:
    """Why one layout does or does not fit."""
    problem = layout_problem(shape, run, ev.layout, gpus, gpus_per_node)
    lines = [f"layout: {ev.layout.label()}", f"  model: {parameter_count(shape) / 1e9:.2f} B parameters, "
             f"seq_length {run.seq_length}, global batch {run.global_batch_size}, "
             f"{'bf16' if run.bf16 else 'fp32'}, distributed optimizer {'on' if run.distributed_optimizer else 'off'}"]
    if problem:
        lines.append(f"  invalid: {problem}")
    lines += memory_lines(ev)
    parts = ev.memory.parts
    biggest = max(parts, key=parts.get)
    verdict = "fits" if ev.fits else "does not fit"
    lines.append(f"  {verdict}: {ev.gib:.1f} GiB of {ev.budget_gib:g} GiB; the largest part is "
                 f"{biggest} ({parts[biggest] / GIB:.1f} GiB)")
    return lines


def shape_and_run(cfg, vocab_size: int = 0):
    return model_shape(cfg, vocab_size), run_shape(cfg)
