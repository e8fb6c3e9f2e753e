"""Ring, all-gather, Ulysses and hybrid side by side at P=4 on CPU gloo.

    python -m bench.cp_methods [--n 16384] [--reps 5]

Causal, fp32, h=8 over h_kv=2, d=64, zigzag, one thread per rank. Per method:
fwd+bwd wall time (max over ranks, min over reps), peak RSS growth per rank
during one fwd+bwd, bytes sent per rank (counted by the sending code) with the
analytic model beside it, and the efficiency T_full / (P * T), where T_full is
the CPU flash kernel fwd+bwd on the full sequence in one process, one thread
(with fewer cores than ranks, T_full / (cores * T) is shown too). Run with
MALLOC_MMAP_THRESHOLD_=131072 (as `make bench` does) so RSS tracks live tensors.
Writes bench/results/cp_methods.json.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from bench.common import print_table, synced_time, write_json
from megatron_ext.attention import (allgather_attention, build_cp_mesh, hybrid_attention, record_cp_stats,
                                    ring_attention, ulysses_attention)
from megatron_ext.attention.blocks import CpuFlashKernel
from megatron_ext.attention.stats import modeled_bytes
from megatron_ext.distributed import spawn_ranks
from megatron_ext.sysinfo import peak_rss_bytes as peak_rss, reset_peak_rss

H, H_KV, D, P, U = 8, 2, 64, 4, 2
CORES = os.cpu_count() or 1


def _inputs(n_local, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, n_local, H, D, generator=g)
    k, v = (torch.randn(1, n_local, H_KV, D, generator=g) for _ in range(2))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), torch.randn(1, n_local, H, D, generator=g)


def methods_worker(rank, world_size, n, reps):
    mesh = build_cp_mesh(None, U)
    calls = {
        "ring": ring_attention,
        "allgather": allgather_attention,
        "ulysses": ulysses_attention,
        f"hybrid {U}x{P // U}": lambda q, k, v: hybrid_attention(q, k, v, mesh.ulysses_group, mesh.ring_group),
    }
    q, k, v, dout = _inputs(n // world_size, rank)
    res = {}
    for name, fn in calls.items():
        t = synced_time(lambda: fn(q, k, v).backward(dout), reps, dist.barrier)
        with record_cp_stats() as stats:
            base = reset_peak_rss()
            fn(q, k, v).backward(dout)
            mem = peak_rss() - base
        res[name] = {"t_fwd_bwd_s": t, "peak_bytes": mem, "sent": dict(stats.bytes_sent)}
    return res


def full_time(n, reps):
    torch.set_num_threads(1)
    q, k, v, dout = (t.detach() for t in _inputs(n, 0))
    scale = D ** -0.5

    def fwd_bwd():
        out, lse = CpuFlashKernel.forward(q, k, v, True, scale)
        CpuFlashKernel.backward(dout, q, k, v, out, lse, True, scale)

    return synced_time(fwd_bwd, reps)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384, help="global sequence length")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions after one warm-up (min)")
    args = ap.parse_args(argv)
    t_full = full_time(args.n, args.reps)
    results = spawn_ranks(methods_worker, P, (args.n, args.reps), timeout_s=3600)
    rows, report = [], {"n": args.n, "p": P, "h": H, "h_kv": H_KV, "d": D, "t_full_fwd_bwd_s": t_full, "methods": {}}
    for name in results[0]:
        t = max(r[name]["t_fwd_bwd_s"] for r in results)
        mem = max(r[name]["peak_bytes"] for r in results)
        sent = max(sum(r[name]["sent"].values()) for r in results)
        model = modeled_bytes(name.split()[0], b=1, s_local=args.n // P, h=H, h_kv=H_KV, d=D, cp_size=P, ulysses_size=U)
        eff = t_full / (P * t)
        per_core = t_full / (min(P, CORES) * t)
        rows.append([name, t, mem / 2**20, sent / 2**20, sum(model.values()) / 2**20, eff, per_core])
        report["methods"][name] = {"t_fwd_bwd_s": t, "peak_bytes_per_rank": mem, "sent_bytes_per_rank": sent,
                                   "modeled_bytes_per_rank": model, "efficiency": eff, "per_core_efficiency": per_core}
    print_table(f"CP methods, causal fwd+bwd, N={args.n}, P={P}, h={H}, h_kv={H_KV}, d={D}, fp32, gloo, "
                f"1 thread/rank; T_full={t_full:.2f}s",
                ["method", "fwd+bwd s", "peak MiB/rank", "sent MiB/rank", "model MiB", "T_full/(P*T)",
                 f"T_full/({min(P, CORES)}*T)"], rows)
    if CORES < P:
        print(f"({P} single-thread ranks share {CORES} cores, so T_full/(P*T) is at most {CORES / P:.2f} here; "
              f"the last column divides by the cores instead)")
    print(f"\nbench: wrote {write_json('cp_methods', report)}")


if __name__ == "__main__":
    main()
