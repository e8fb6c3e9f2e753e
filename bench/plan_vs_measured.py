"""The planner's memory model against measurement: tiny layouts through megatron-core's
GPTModel, DDP and optimizer on gloo ranks, peak tensor memory per rank.

    python -m bench.plan_vs_measured [--layouts cp1,cp2,...] [--no-optimizer]

Measured: the torch profiler's memory events (every tensor allocation and free on
the CPU allocator; on a GPU, torch.cuda.max_memory_allocated), running sum over the
whole run, maximum inside the second training iteration; never process RSS.
Predicted: megatron_ext.plan.memory.estimate_memory for the same layout, fp32, no
reserve. Target: within 15 % on every layout.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from bench.common import print_table, write_json
from megatron_ext.distributed import spawn_ranks

SEQ, VOCAB = 2048, 1024
MODEL = dict(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=8, num_query_groups=4)


@dataclass(frozen=True)
class Case:
    """One measured layout."""

    name: str
    """Row label."""
    tp: int = 1
    """Tensor parallel."""
    pp: int = 1
    """Pipeline stages."""
    cp: int = 1
    """Context parallel."""
    comm: str = "p2p"
    """cp_comm_type."""
    dist_opt: bool = True
    """Distributed optimizer."""
    recompute: bool = False
    """Full recompute."""

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp


CASES = [Case("cp1"), Case("cp2", cp=2), Case("cp4", cp=4), Case("cp2-allgather", cp=2, comm="all_gather"),
         Case("cp2-recompute", cp=2, recompute=True), Case("cp2-no-distopt", cp=2, dist_opt=False),
         Case("tp2", tp=2)]


def _peak_in_window(prof, window: str) -> float:
    """Max of the running sum of CPU allocation events inside the ``window`` record_function."""
    events = prof.profiler.kineto_results.events()
    spans = [(e.start_ns(), e.start_ns() + e.duration_ns()) for e in events if e.name() == window]
    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"
                 and str(e.device_type()).endswith("CPU"))
    lo, hi = spans[-1]
    live, peak = 0, 0
    for t, nbytes in mem:
        live += nbytes
        if lo <= t <= hi:
            peak = max(peak, live)
    return float(peak)


def _worker(rank, world_size, case: Case, optimizer: bool):
    import gc

    import torch
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig
    from torch.profiler import ProfilerActivity, profile, record_function

    from megatron_ext.megatron.batch import get_batch_on_this_cp_rank
    from megatron_ext.megatron.cpu import enable_cpu_runtime
    from megatron_ext.megatron.model import build_gpt_model
    from megatron_ext.megatron.specs import get_gpt_layer_cp_spec

    enable_cpu_runtime()
    parallel_state.initialize_model_parallel(case.tp, case.pp, context_parallel_size=case.cp)
    model_parallel_cuda_manual_seed(1)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (1, SEQ + 1), generator=g)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, SEQ),
             "position_ids": torch.arange(SEQ)[None]}
    local = get_batch_on_this_cp_rank(batch, parallel_state.get_context_parallel_group())
    gc.disable()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        config = TransformerConfig(**MODEL, use_cpu_initialization=True, attention_dropout=0.0, hidden_dropout=0.0,
                                   tensor_model_parallel_size=case.tp, context_parallel_size=case.cp,
                                   cp_comm_type=case.comm if case.cp > 1 else None, calculate_per_token_loss=True,
                                   gated_linear_unit=True, activation_func=torch.nn.functional.silu,
                                   bias_activation_fusion=False, normalization="RMSNorm", add_bias_linear=False,
                                   recompute_granularity="full" if case.recompute else None,
                                   recompute_method="uniform" if case.recompute else None,
                                   recompute_num_layers=1 if case.recompute else None)
        model = build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ,
                                layer_spec=get_gpt_layer_cp_spec(normalization="RMSNorm"),
                                share_embeddings_and_output_weights=False)
        ddp = DDP(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                        use_distributed_optimizer=case.dist_opt), model)
        opt = None
        if optimizer:
            from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

            opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, clip_grad=1.0,
                                                         use_distributed_optimizer=case.dist_opt), [ddp])
        for it in range(2):
            gc.collect()  # free cycles now, not at a random point inside the measured window
            with record_function(f"iteration{it}"):
                ddp.zero_grad_buffer()
                per_token = ddp(local["tokens"], local["position_ids"], None, labels=local["labels"])
                (per_token * local["loss_mask"]).sum().backward()
                del per_token
                ddp.finish_grad_sync()
                if opt is not None:
                    opt.step()
    gc.enable()
    peak = _peak_in_window(prof, "iteration1")
    parallel_state.destroy_model_parallel()
    return {"peak_bytes": peak}


def measure(case: Case, optimizer: bool) -> float:
    """Peak tensor bytes of the fullest rank of ``case``'s second iteration."""
    return max(r["peak_bytes"] for r in spawn_ranks(_worker, case.world, (case, optimizer), timeout_s=300))


def predicted(case: Case, optimizer: bool) -> float:
    from megatron_ext.attention.ring import kv_waves
    from megatron_ext.plan.layouts import Layout, RunShape
    from megatron_ext.plan.memory import estimate_memory
    from megatron_ext.plan.model import ModelShape

    shape = ModelShape(MODEL["num_layers"], MODEL["hidden_size"], MODEL["ffn_hidden_size"],
                       MODEL["num_attention_heads"], MODEL["num_query_groups"], VOCAB, True, False, False, True)
    run = RunShape(SEQ, 1, bf16=False, distributed_optimizer=case.dist_opt, overlap_grad_reduce=False,
                   sequence_parallel=False, fused_rms_norm=False)
    lay = Layout(case.tp, case.pp, case.cp, 1, case.comm, 1, 1, case.recompute)
    est = estimate_memory(shape, run, lay, ring_waves=kv_waves(SEQ // case.cp, "zigzag", None), reserve_gib=0.0)
    opt_part = sum(v for k, v in est.parts.items() if k.startswith("optimizer"))
    return est.peak_bytes - (0.0 if optimizer else opt_part)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default=",".join(c.name for c in CASES))
    ap.add_argument("--no-optimizer", action="store_true", help="measure model + DDP only (no optimizer states)")
    args = ap.parse_args(argv)
    chosen = [c for c in CASES if c.name in args.layouts.split(",")]
    rows, report = [], {}
    for case in chosen:
        measured = measure(case, not args.no_optimizer)
        pred = predicted(case, not args.no_optimizer)
        err = pred / measured - 1
        rows.append([case.name, case.tp, case.pp, case.cp, case.comm, case.dist_opt, case.recompute,
                     pred / 2 ** 20, measured / 2 ** 20, f"{100 * err:+.1f}%"])
        report[case.name] = {"predicted_bytes": pred, "measured_bytes": measured, "rel_err": err,
                             "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print_table(f"Peak tensor memory per rank: planner vs torch profiler memory events (fp32, CPU gloo, "
                f"seq {SEQ}, {MODEL}, vocab {VOCAB}); target |err| <= 15%",
                ["layout", "TP", "PP", "CP", "comm", "dist opt", "recompute", "predicted MiB", "measured MiB", "err"],
                rows)
    print(f"bench: wrote {write_json('plan_vs_measured', report)}")
    return report


if __name__ == "__main__":
    main()
