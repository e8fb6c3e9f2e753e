"""The planner's memory model against measurement: tiny layouts built and stepped by
the trainer's own functions (megatron_ext.train: init_model_parallel, build_model,
wrap_model, build_optimizer, Trainer.step through megatron-core's forward-backward
schedule) on gloo ranks, peak tensor memory per rank.

    python -m bench.plan_vs_measured [--layouts cp1,cp2,...]

Measured: the torch profiler's memory events (every tensor allocation and free on
the CPU allocator, paired by address; on a GPU, torch.cuda.max_memory_allocated), running sum over the
whole run, maximum inside the second training step (forward-backward of every
micro-batch and the optimizer step); the fullest rank (PP: the max over stages);
never process RSS. Predicted: megatron_ext.plan.memory.estimate_memory for the same
layout, fp32, no reserve. Target: within 15 % on every layout.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from bench.common import BenchLayout, print_table, write_json
from megatron_ext.distributed import spawn_ranks

SEQ, VOCAB = 2048, 1024
MODEL = dict(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=8, num_query_groups=4)


@dataclass(frozen=True)
class Case(BenchLayout):
    """One measured layout (pipeline stages run 1F1B; DP = 1)."""

    comm: str = "p2p"
    """cp_comm_type."""
    dist_opt: bool = True
    """Distributed optimizer."""
    recompute: bool = False
    """Full recompute."""
    selective: tuple = ()
    """Selective recompute of these megatron-core recompute_modules (empty: none)."""
    sp: bool = False
    """Sequence parallel (with TP > 1)."""
    micro_batches: int = 1
    """Micro-batches per step (global batch; DP = 1)."""


CASES = [Case("cp1"), Case("cp2", cp=2), Case("cp4", cp=4), Case("cp2-allgather", cp=2, comm="all_gather"),
         Case("cp2-recompute", cp=2, recompute=True), Case("cp2-selective", cp=2, selective=("core_attn", "mlp")),
         Case("cp2-no-distopt", cp=2, dist_opt=False),
         Case("tp2", tp=2), Case("tp2-sp", tp=2, sp=True), Case("pp2", pp=2, micro_batches=2),
         Case("pp2-m4", pp=2, micro_batches=4)]


def train_config(case: Case):
    """The TrainConfig of ``case`` (fp32, untied SwiGLU/RMSNorm GQA model, DP = 1)."""
    from megatron_ext.train.config import DataConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig

    return TrainConfig(
        parallel=ParallelConfig(tensor_model_parallel_size=case.tp, sequence_parallel=case.sp,
                                pipeline_model_parallel_size=case.pp, context_parallel_size=case.cp,
                                cp_comm_type=case.comm, use_distributed_optimizer=case.dist_opt),
        model=ModelConfig(**MODEL, vocab_size=VOCAB, swiglu=True, normalization="RMSNorm", add_bias_linear=False,
                          untie_embeddings=True, recompute_granularity="selective" if case.selective else None,
                          recompute_modules=list(case.selective)),
        data=DataConfig(seq_length=SEQ), optim=OptimConfig(micro_batch_size=1, global_batch_size=case.micro_batches),
        precision="fp32", recompute=case.recompute)


def _name(e) -> str:
    try:
        return e.name
    except UnicodeDecodeError:  # a few profiler names are not UTF-8
        return ""


def _peak_in_window(prof, window: str) -> float:
    """Max of the running sum of CPU tensor allocations inside the ``window`` record_function.

    Allocations and frees are paired by address. The profiler records only frees made on a
    thread it profiles: a gloo collective's staging copy (ProcessGroupGloo clones a
    reduce-scatter's input) is sometimes freed on gloo's worker thread, unrecorded, which
    left a phantom 2 MiB in a plain running sum at random (tp2-sp measured 73.9-79.9 MiB).
    Such a copy, made inside a ``c10d::`` op, is taken as freed when the op that launched
    the collective returns (mcore waits on it there: the autograd function's forward or
    backward), or when its address is handed out again, whichever is first; any other
    allocation whose free went unrecorded, when its address is reused."""
    from torch._C._profiler import _EventType

    allocs, span, stack = [], None, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation:
            if str(e.extra_fields.device).startswith("cpu"):
                allocs.append(e)
        elif _name(e) == window:
            span = (e.start_time_ns, e.end_time_ns)
    allocs.sort(key=lambda e: (e.start_time_ns, e.id))

    def staged_until(a) -> float:
        p = a.parent
        while p is not None and not _name(p).startswith("c10d::"):
            p = p.parent
        if p is None:
            return float("inf")
        return (p.parent or p).end_time_ns

    deltas, live = [], {}
    for a in allocs:
        f = a.extra_fields
        if f.alloc_size > 0:
            if f.ptr in live:  # freed unrecorded, before this reuse
                old = live.pop(f.ptr)
                deltas.append((min(a.start_time_ns, staged_until(old)), -old.extra_fields.alloc_size))
            live[f.ptr] = a
            deltas.append((a.start_time_ns, f.alloc_size))
        elif f.ptr in live:
            live.pop(f.ptr)
            deltas.append((a.start_time_ns, f.alloc_size))
    deltas += [(staged_until(a), -a.extra_fields.alloc_size) for a in live.values()]
    running, peak = 0, 0
    for t, nbytes in sorted(deltas, key=lambda d: d[0]):
        running += nbytes
        if span[0] <= t <= span[1]:
            peak = max(peak, running)
    return float(peak)


def _trainer(cfg, vocab: int = VOCAB):
    """A Trainer built by the same calls as Trainer.__init__, minus the tokenizer and
    data (the bench feeds random tokens of a ``vocab``-token vocabulary)."""
    import torch.distributed as dist
    from megatron.core.distributed import finalize_model_grads

    from megatron_ext.distributed import LaggedVote
    from megatron_ext.train.config import validate
    from megatron_ext.train.loop import RunState, Trainer
    from megatron_ext.train.model import build_model, init_model_parallel, wrap_model
    from megatron_ext.train.optim import build_optimizer

    t = Trainer.__new__(Trainer)
    t.cfg, t.vocab_size, t.state = cfg, vocab, RunState()
    t.sizes = validate(cfg, dist.get_world_size())
    t.ps = init_model_parallel(cfg)
    model, t.bf16 = build_model(cfg, vocab)
    t.model = [wrap_model(cfg, model)]
    t.optimizer, t.scheduler = build_optimizer(cfg, t.model)
    model.config.no_sync_func = t.model[0].no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.grad_scale_func = t.optimizer.scale_loss
    t.stop_requested, t.stop_vote = False, LaggedVote()
    return t


def _worker(rank, world_size, case: Case):
    import gc

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(case.micro_batches):
        tokens = torch.randint(0, VOCAB, (1, SEQ + 1), generator=g)
        batches.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, SEQ),
                        "position_ids": torch.arange(SEQ)[None]})
    gc.disable()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer = _trainer(train_config(case))
        for it in range(2):
            gc.collect()  # free cycles now, not at a random point inside the measured window
            with record_function(f"iteration{it}"):
                out = trainer.step(batches)
    gc.enable()
    peak = _peak_in_window(prof, "iteration1")
    trainer.ps.destroy_model_parallel()
    return {"peak_bytes": peak, "loss": out["loss"]}


def measure(case: Case) -> float:
    """Peak tensor bytes of the fullest rank (any stage) of ``case``'s second step."""
    return max(r["peak_bytes"] for r in spawn_ranks(_worker, case.world, (case,), timeout_s=300))


def predicted(case: Case) -> float:
    from megatron_ext.attention.ring import kv_waves
    from megatron_ext.plan.layouts import Layout, Recompute, RunShape
    from megatron_ext.plan.memory import estimate_memory
    from megatron_ext.plan.model import ModelShape

    shape = ModelShape(MODEL["num_layers"], MODEL["hidden_size"], MODEL["ffn_hidden_size"],
                       MODEL["num_attention_heads"], MODEL["num_query_groups"], VOCAB, True, False, False, True)
    run = RunShape(SEQ, case.micro_batches, bf16=False, distributed_optimizer=case.dist_opt,
                   overlap_grad_reduce=False, sequence_parallel=case.sp, fused_rms_norm=False)
    lay = Layout(case.tp, case.pp, case.cp, 1, case.comm, 1, 1,
                 Recompute("selective", case.selective) if case.selective else case.recompute)
    return estimate_memory(shape, run, lay, ring_waves=kv_waves(SEQ // case.cp, "zigzag", None),
                           reserve_gib=0.0).peak_bytes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default=",".join(c.name for c in CASES))
    args = ap.parse_args(argv)
    chosen = [c for c in CASES if c.name in args.layouts.split(",")]
    rows, report = [], {}
    for case in chosen:
        measured, pred = measure(case), predicted(case)
        err = pred / measured - 1
        rows.append([case.name, case.tp, case.pp, case.cp, case.comm, case.sp, case.micro_batches, case.dist_opt,
                     "selective " + "+".join(case.selective) if case.selective else case.recompute,
                     pred / 2 ** 20, measured / 2 ** 20, f"{100 * err:+.1f}%"])
        report[case.name] = {"predicted_bytes": pred, "measured_bytes": measured, "rel_err": err,
                             "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print_table(f"Peak tensor memory per rank: planner vs torch profiler memory events (trainer-built, fp32, CPU gloo, "
                f"seq {SEQ}, {MODEL}, vocab {VOCAB}); target |err| <= 15%",
                ["layout", "TP", "PP", "CP", "comm", "SP", "micro-batches", "dist opt", "recompute", "predicted MiB",
                 "measured MiB", "err"],
                rows)
    print(f"bench: wrote {write_json('plan_vs_measured', report)}")
    return report


if __name__ == "__main__":
    main()
