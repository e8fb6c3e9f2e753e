"""Host memory of a checkpoint save and load, per rank, measured against the planner's
host-memory model (megatron_ext.plan.host_memory), on CPU gloo ranks.

    python -m bench.checkpoint_memory [--formats fully_reshardable,dp_reshardable] [--layouts dp2,tp2,...]

Each case builds a small GPT with the trainer's own functions (bench.plan_vs_measured's
trainer: init_model_parallel, build_model, wrap_model, build_optimizer), takes one
training step (so Adam's exp_avg / exp_avg_sq exist), then saves synchronously with
``checkpoint.save`` (train/checkpoint.py, the trainer's save without its async queue) and
loads the result back with ``checkpoint.load`` into the same model and optimizer, as
``Trainer.restore`` does.

Measured: the kernel's resident-set high-water mark. Before each save and each load a
rank writes ``5`` to ``/proc/self/clear_refs`` (Linux: resets VmHWM to the current
VmRSS), then reads ``VmHWM`` from ``/proc/self/status`` when the call returns; the
figure is VmHWM minus the VmRSS just before the call: the host bytes the checkpoint
added at its peak, with no sampling gap. glibc's mmap threshold is pinned
(MALLOC_MMAP_THRESHOLD_) so large buffers go back to the kernel when freed, as a
long-running job's allocator would. On CPU every tensor already lives in host memory,
so the bench measures the checkpoint's own buffers (gathers, copies, read buffers);
the device-to-host staging a GPU run adds is modelled, not measured (see
docs/checkpoint-memory.md). Target: the model within 20 % of the fullest rank and of
the node (all ranks of a case are one node).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

from bench.common import BenchLayout, print_table, write_json
from data_tools.sysinfo import peak_rss_bytes, reset_peak_rss

SEQ, VOCAB = 256, 8192
MODEL = dict(num_layers=4, hidden_size=512, ffn_hidden_size=1536, num_attention_heads=8, num_query_groups=8)
FORMATS = ("fully_reshardable", "dp_reshardable")


class Case(BenchLayout):
    """One measured layout."""


CASES = [Case("dp2", dp=2), Case("dp4", dp=4), Case("tp2", tp=2), Case("tp2xdp2", tp=2, dp=2), Case("pp2", pp=2),
         Case("cp2xdp2", cp=2, dp=2)]


def available_formats() -> tuple:
    """The checkpoint formats this checkout's trainer can write: both once
    ``checkpoint.format`` exists, else only the fixed ``fully_reshardable``."""
    from megatron_ext.train.config import CheckpointConfig

    names = {f.name for f in dataclasses.fields(CheckpointConfig)}
    return FORMATS if "format" in names else ("fully_reshardable",)


def train_config(case: Case, fmt: str, save_dir: str):
    """The TrainConfig of ``case`` (fp32, untied SwiGLU/RMSNorm model) saving to ``save_dir`` in ``fmt``."""
    from megatron_ext.train.config import (CheckpointConfig, DataConfig, ModelConfig, OptimConfig, ParallelConfig,
                                           TrainConfig)

    fields = {f.name for f in dataclasses.fields(CheckpointConfig)}
    ckpt = dict(save_dir=save_dir)
    if "format" in fields:
        ckpt["format"] = fmt
    elif fmt != "fully_reshardable":
        raise ValueError(f"checkpoint format {fmt!r}: this checkout has no checkpoint.format key "
                         f"(only fully_reshardable); formats available: {available_formats()}")
    return TrainConfig(
        parallel=ParallelConfig(tensor_model_parallel_size=case.tp, sequence_parallel=False,
                                pipeline_model_parallel_size=case.pp, context_parallel_size=case.cp,
                                use_distributed_optimizer=True),
        model=ModelConfig(**MODEL, vocab_size=VOCAB, swiglu=True, normalization="RMSNorm", add_bias_linear=False,
                          untie_embeddings=True),
        data=DataConfig(seq_length=SEQ), optim=OptimConfig(micro_batch_size=1, global_batch_size=case.dp * case.pp),
        checkpoint=CheckpointConfig(**ckpt), precision="fp32", recompute=False)


def peak_added(fn) -> tuple:
    """(result of ``fn()``, peak resident bytes it added over the RSS at its start)."""
    import gc

    gc.collect()
    before = reset_peak_rss()  # VmHWM := VmRSS
    out = fn()
    return out, peak_rss_bytes() - before


def _save(trainer, fmt: str, save_dir: str) -> str:
    """``checkpoint.save`` of the trainer's model, optimizer and scheduler as step 1 in ``fmt``."""
    import inspect

    from megatron_ext.train import checkpoint as ckpt
    from megatron_ext.train.config import to_dict

    common = {"consumed_samples": 0, "skipped_iterations": 0, "config": to_dict(trainer.cfg),
              "vocab_size": trainer.vocab_size}
    extra = {"fmt": fmt} if "fmt" in inspect.signature(ckpt.save).parameters else {}
    return ckpt.save(save_dir, 1, trainer.model, trainer.optimizer, trainer.scheduler, common, 0, **extra)


def _worker(rank, world_size, case: Case, fmt: str, save_dir: str):
    import torch
    import torch.distributed as dist

    from bench.plan_vs_measured import _trainer
    from megatron_ext.train import checkpoint as ckpt

    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (1, SEQ + 1), generator=g)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, SEQ),
             "position_ids": torch.arange(SEQ)[None]}
    trainer = _trainer(train_config(case, fmt, save_dir), VOCAB)
    trainer.step([batch] * (trainer.sizes["grad_accum"]))
    dist.barrier()
    path, save_peak = peak_added(lambda: _save(trainer, fmt, save_dir))
    dist.barrier()
    _, load_peak = peak_added(lambda: ckpt.load(path, trainer.model, trainer.optimizer, trainer.scheduler))
    trainer.ps.destroy_model_parallel()
    return {"save_bytes": save_peak, "load_bytes": load_peak}


def measure(case: Case, fmt: str) -> list:
    """Per-rank {save_bytes, load_bytes} of ``case`` in checkpoint format ``fmt``."""
    import tempfile

    from megatron_ext.distributed import spawn_ranks

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))  # inherited by the spawned ranks
    with tempfile.TemporaryDirectory(prefix="ckpt-mem-") as tmp:
        # spawn: glibc reads the threshold when a process starts; a forkserver child would keep its server's
        return spawn_ranks(_worker, case.world, (case, fmt, tmp), timeout_s=600, start_method="spawn")


def predicted(case: Case, fmt: str) -> dict:
    """The host-memory model's per-rank figures for ``case`` (fp32 on CPU: no device staging)."""
    from megatron_ext.plan.host_memory import checkpoint_host_memory
    from megatron_ext.plan.layouts import Layout, RunShape
    from megatron_ext.plan.model import ModelShape

    shape = ModelShape(MODEL["num_layers"], MODEL["hidden_size"], MODEL["ffn_hidden_size"],
                       MODEL["num_attention_heads"], MODEL["num_query_groups"], VOCAB, True, False, False, True)
    run = RunShape(SEQ, case.dp * case.pp, bf16=False, distributed_optimizer=True, overlap_grad_reduce=False,
                   sequence_parallel=False)
    lay = Layout(case.tp, case.pp, case.cp, case.dp, "p2p", 1, 1, False)
    return checkpoint_host_memory(shape, run, lay, fmt, on_device=False).as_dict()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=",".join(available_formats()))
    ap.add_argument("--layouts", default=",".join(c.name for c in CASES))
    args = ap.parse_args(argv)
    chosen = [c for c in CASES if c.name in args.layouts.split(",")]
    rows, report = [], {}
    for fmt in args.formats.split(","):
        for case in chosen:
            ranks, pred = measure(case, fmt), predicted(case, fmt)
            entry = {"ranks": ranks, "predicted": pred, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            for op in ("save", "load"):
                meas, node = max(r[f"{op}_bytes"] for r in ranks), sum(r[f"{op}_bytes"] for r in ranks)
                err = pred[f"{op}_rank_bytes"] / meas - 1
                entry[f"{op}_rel_err"] = err
                entry[f"{op}_node_rel_err"] = pred[f"{op}_node_bytes"] / node - 1
                rows.append([fmt, case.name, op, pred[f"{op}_rank_bytes"] / 2 ** 20, meas / 2 ** 20,
                             " ".join(f"{r[f'{op}_bytes'] / 2 ** 20:.0f}" for r in ranks), f"{100 * err:+.1f}%",
                             pred[f"{op}_node_bytes"] / 2 ** 20, node / 2 ** 20,
                             f"{100 * entry[f'{op}_node_rel_err']:+.1f}%"])
            report[f"{fmt}/{case.name}"] = entry
    print_table(f"Host memory added by a checkpoint, fullest rank: planner vs VmHWM (trainer-built, fp32, CPU gloo, "
                f"{MODEL}, vocab {VOCAB}); target |err| <= 20%",
                ["format", "layout", "op", "predicted MiB", "measured MiB", "per rank MiB", "err",
                 "node predicted MiB", "node measured MiB", "node err"], rows)
    print(f"bench: wrote {write_json('checkpoint_memory', report, merge=True)}")
    return report


if __name__ == "__main__":
    main()
