"""Ring / all-gather CP attention on CPU gloo: efficiency, load balance, memory, 200K.

    python -m bench.ring_attention [--sections efficiency,waves,balance,memory,200k] [--heads 2,4] [--quick]

Every figure is measured side by side in this one run and written to
bench/results/ring_attention.json. Every time is the minimum over --reps runs
(after one warm-up), each started together on every rank, max over ranks.
Definitions:

* efficiency  T_full / (P * T_cp), causal, N=16384, P=2, d=64, fp32, one thread
              per rank, for each h of --heads (h_kv = h). T_full is the CPU flash
              kernel on the full sequence in one process with one thread.
              "fwd" is a forward with grad enabled (the training forward);
              "fwd no grad" is a forward-only call (prefill), beside torch's
              private ring `_templated_ring_attention` (no grad, zigzag load
              balance on, the same shards and kernel). The last row is
              T_torch / T_ours(no grad): >= 1 means our prefill is at least as
              fast. Targets: fwd+bwd >= 0.95, T_torch / T_ours >= 1.
* waves       fwd+bwd efficiency (as above) of the ring at kv_chunks = 1, 2, 4, 8,
              16 and at its default, for each h of --heads, beside the modeled
              backward peak of each wave count (ratio*P at P=4, MHA, see memory):
              the trade-off between the waves' fixed costs and memory.
* balance     max/min over ranks of block-kernel CPU time (fwd+bwd), causal, P=4,
              zigzag vs contiguous. Target zigzag <= 1.05.
* memory      peak RSS growth per rank during fwd+bwd (inputs, outputs, grads and
              buffers) at N=65536, P=4, h=4, vs one process on the full sequence;
              the ring at its default kv_chunks (16 here) and at 1 (whole blocks).
              Target <= 1.3/P. Run with MALLOC_MMAP_THRESHOLD_=131072 (as `make
              bench` does) so RSS tracks live tensors, not glibc's retained heap.
* 200k        one 196,608-token sequence, fwd+bwd over 8 ranks (h=2, d=32),
              64 sampled query rows checked (out, dq) against all keys in float64.
              Target <= 10 min, error <= 1e-4.
"""
from __future__ import annotations

import argparse
import functools
import time

import torch
import torch.distributed as dist

from bench.common import print_table, synced_time, write_json
from megatron_ext.attention import allgather_attention, ring_attention
from megatron_ext.attention.blocks import CpuFlashKernel
from megatron_ext.attention.reference import reference_rows
from megatron_ext.attention.ring import auto_waves, ring_memory_model as library_model
from megatron_ext.attention.stats import record_cp_stats
from megatron_ext.distributed import spawn_ranks
from megatron_ext.sysinfo import peak_rss_bytes as peak_rss, reset_peak_rss
from megatron_ext.sharding import position_ids, shard_sequence

# "ring" runs with its default (automatic) kv_chunks; whole blocks show the trade.
RING_VARIANTS = (1,)
METHODS = {"ring": ring_attention,
           **{f"ring kv_chunks={c}": functools.partial(ring_attention, kv_chunks=c) for c in RING_VARIANTS},
           "allgather": allgather_attention}


def _local_inputs(n_local, h, d, seed, grad=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(1, n_local, h, d, generator=g) for _ in range(4))
    return [t.requires_grad_(grad) for t in (q, k, v)] + [dout]


def _torch_templated_forward(q, k, v):
    """torch's private ring attention forward (zigzag 'load balance' on), bhsd."""
    from torch.distributed.tensor.experimental import _attention as tattn

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return tattn._templated_ring_attention(dist.group.WORLD, 2, op, q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)[0]


def full_times(n, h, d, reps):
    """T_full (fwd, fwd+bwd) of the CPU flash kernel on one thread."""
    torch.set_num_threads(1)
    q, k, v, dout = _local_inputs(n, h, d, 0, grad=False)
    scale = d ** -0.5
    fwd = lambda: CpuFlashKernel.forward(q, k, v, True, scale)  # noqa: E731

    def fwd_bwd():
        out, lse = CpuFlashKernel.forward(q, k, v, True, scale)
        CpuFlashKernel.backward(dout, q, k, v, out, lse, True, scale)

    return synced_time(fwd, reps), synced_time(fwd_bwd, reps)


def efficiency_worker(rank, world_size, n, h, d, reps):
    q, k, v, dout = _local_inputs(n // world_size, h, d, rank)
    res = {}
    for name, fn in METHODS.items():
        res[name] = (synced_time(lambda: fn(q, k, v), reps, dist.barrier),
                     synced_time(lambda: fn(q, k, v).backward(dout), reps, dist.barrier))
    with torch.no_grad():  # forward-only calls: prefill, ours beside torch's
        res["ring, no grad"] = (synced_time(lambda: ring_attention(q, k, v), reps, dist.barrier), None)
        res["torch_templated, no grad"] = (synced_time(lambda: _torch_templated_forward(q, k, v), reps,
                                                       dist.barrier), None)
    return res


def waves_worker(rank, world_size, n, h, d, reps, chunks):
    q, k, v, dout = _local_inputs(n // world_size, h, d, rank)
    return {c: synced_time(lambda: ring_attention(q, k, v, kv_chunks=c).backward(dout), reps, dist.barrier)
            for c in chunks}


def balance_worker(rank, world_size, n, h, d):
    q, k, v, dout = _local_inputs(n // world_size, h, d, rank)
    res = {}
    for layout in ("zigzag", "contiguous"):
        ring_attention(q, k, v, layout=layout).backward(dout)  # warm-up
        with record_cp_stats() as stats:
            ring_attention(q, k, v, layout=layout).backward(dout)
        res[layout] = stats.compute_s["forward"] + stats.compute_s["backward"]
    return res


def _fwd_bwd(method, q, k, v, dout):
    if method == "full":
        out, lse = CpuFlashKernel.forward(q.detach(), k.detach(), v.detach(), True, q.shape[-1] ** -0.5)
        return CpuFlashKernel.backward(dout, q.detach(), k.detach(), v.detach(), out, lse, True, q.shape[-1] ** -0.5)
    METHODS[method](q, k, v).backward(dout)


def memory_worker(rank, world_size, n, h, d, method):
    _fwd_bwd(method, *_local_inputs(64, h, d, rank))  # one-off runtime set-up is not attention memory
    base = reset_peak_rss()
    _fwd_bwd(method, *_local_inputs(n // world_size, h, d, rank))
    return peak_rss() - base


def long_worker(rank, world_size, n, h, d, n_rows):
    g = torch.Generator().manual_seed(7)
    q, k, v, dout = (torch.randn(n, h, d, generator=g) for _ in range(4))
    mine = [shard_sequence(t, 0, rank, world_size).unsqueeze(0) for t in (q, k, v, dout)]
    for t in mine[:3]:
        t.requires_grad_()
    dist.barrier()
    t0 = time.perf_counter()
    out = ring_attention(*mine[:3])
    out.backward(mine[3])
    dist.barrier()
    wall = time.perf_counter() - t0
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(11))[:n_rows]
    pos = position_ids(n, rank, world_size)
    local = {int(p): i for i, p in enumerate(pos.tolist())}
    held = torch.tensor([int(r) for r in rows if int(r) in local], dtype=torch.long)
    err = 0.0
    if len(held):
        ref_out, ref_dq = reference_rows(held, q, k, v, dout, True, d ** -0.5)
        idx = torch.tensor([local[int(r)] for r in held])
        err = max((out[0, idx].double() - ref_out).abs().max().item(),
                  (mine[0].grad[0, idx].double() - ref_dq).abs().max().item())
    return {"wall_s": wall, "rows_checked": len(held), "max_err": err}


def run_efficiency(args, report):
    n, d, p = (4096 if args.quick else 16384), 64, 2
    report["efficiency"] = {"n": n, "p": p, "d": d}
    for h in args.heads:
        t_fwd, t_fb = full_times(n, h, d, args.reps)
        res = spawn_ranks(efficiency_worker, p, (n, h, d, args.reps), timeout_s=1800)
        rows, out = [["full (1 proc)", t_fwd, t_fb, 1.0, 1.0]], {}
        for name in res[0]:
            f = max(r[name][0] for r in res)
            fb = None if res[0][name][1] is None else max(r[name][1] for r in res)
            eff = (t_fwd / (p * f), None if fb is None else t_fb / (p * fb))
            rows.append([name, f, "-" if fb is None else fb, eff[0], "-" if fb is None else eff[1]])
            out[name] = {"t_fwd_s": f, "t_fwd_bwd_s": fb, "eff_fwd": eff[0], "eff_fwd_bwd": eff[1]}
        speed = out["torch_templated, no grad"]["t_fwd_s"] / out["ring, no grad"]["t_fwd_s"]
        rows.append(["T_torch / T_ring (no grad)", "-", "-", speed, "-"])
        print_table(f"CPU efficiency T_full/(P*T), causal, N={n}, P={p}, h={h}, d={d}, fp32, 1 thread/rank, "
                    f"min of {args.reps} (targets: fwd+bwd >= 0.95; T_torch / T_ring >= 1)",
                    ["method", "T fwd s", "T fwd+bwd s", "eff fwd", "eff fwd+bwd"], rows)
        report["efficiency"][f"h={h}"] = {"t_full_fwd_s": t_fwd, "t_full_fwd_bwd_s": t_fb,
                                          "torch_over_ring_no_grad": speed, **out}


def run_waves(args, report):
    n, d, p = (4096 if args.quick else 16384), 64, 2
    chunks = (1, 2, 4, 8, 16, None)
    report["waves"] = {"n": n, "p": p, "d": d}
    for h in args.heads:
        t_fb = full_times(n, h, d, args.reps)[1]
        res = spawn_ranks(waves_worker, p, (n, h, d, args.reps, chunks), timeout_s=1800)
        rows, out = [], {}
        for c in chunks:
            t = max(r[c] for r in res)
            waves = c if c is not None else auto_waves("cpu", "backward", n // p, h, h, d, 4, "zigzag")
            mem = ring_memory_model(waves)["total (ratio*P = total / 8)"] / 8
            name = f"default ({waves})" if c is None else str(c)
            rows.append([name, t, t_fb / (p * t), mem])
            out[name] = {"t_fwd_bwd_s": t, "eff_fwd_bwd": t_fb / (p * t), "modeled_ratio_times_p": mem}
        print_table(f"Waves trade-off: ring fwd+bwd, causal, N={n}, P={p}, h={h}, d={d}, min of {args.reps}; "
                    f"modeled backward peak ratio*P (MHA, fp32)",
                    ["kv_chunks", "T fwd+bwd s", "eff fwd+bwd", "modeled ratio*P"], rows)
        report["waves"][f"h={h}"] = out


def run_balance(args, report):
    n, h, d, p = (4096 if args.quick else 16384), 4, 64, 4
    res = spawn_ranks(balance_worker, p, (n, h, d), timeout_s=1800)
    rows, out = [], {}
    for layout in ("zigzag", "contiguous"):
        t = [r[layout] for r in res]
        out[layout] = {"per_rank_s": t, "max_over_min": max(t) / min(t)}
        rows.append([layout, " ".join(f"{x:.2f}" for x in t), max(t) / min(t)])
    print_table(f"Load balance: block-kernel CPU s per rank, causal fwd+bwd, N={n}, P={p} (target zigzag <= 1.05)",
                ["layout", "per-rank s", "max/min"], rows)
    report["balance"] = {"n": n, "p": p, **out}


def run_memory(args, report):
    n, h, d, p = (16384 if args.quick else 65536), 4, 64, 4
    full = spawn_ranks(memory_worker, 1, (n, h, d, "full"), timeout_s=3600)[0]
    rows, out = [["full (1 proc)", full / 2**20, 1.0, "-"]], {"full_bytes": full}
    for name in METHODS:
        per_rank = max(spawn_ranks(memory_worker, p, (n, h, d, name), timeout_s=3600))
        ratio = per_rank / full
        rows.append([name, per_rank / 2**20, ratio, ratio * p])
        out[name] = {"per_rank_bytes": per_rank, "ratio": ratio, "ratio_times_p": ratio * p}
    print_table(f"Peak memory growth per rank, fwd+bwd, causal, N={n}, P={p}, h={h}, d={d} (target ratio*P <= 1.3)",
                ["method", "peak MiB", "ratio vs full", "ratio*P"], rows)
    unit = n // p * h * d * 4
    chunks = (auto_waves("cpu", "backward", n // p, h, h, d, 4, "zigzag"), *RING_VARIANTS)
    models = {c: ring_memory_model(c) for c in chunks}
    measured = [out["ring"]["per_rank_bytes"]] + [out[f"ring kv_chunks={c}"]["per_rank_bytes"] for c in RING_VARIANTS]
    table = [[part] + [models[c][part] for c in chunks] for part in models[chunks[0]]]
    table.append(["measured (U)"] + [m / unit for m in measured])
    print_table(f"Ring backward peak per rank, modeled in U = one rank's q in fp32 ({unit / 2**20:.0f} MiB); "
                f"the full process holds 8U x P, so ratio*P = total / 8",
                ["part"] + [f"kv_chunks={c}" for c in chunks], table)
    report["memory"] = {"n": n, "p": p, **out, "ring_model_units": {str(c): m for c, m in models.items()},
                        "unit_bytes": unit}


def ring_memory_model(kv_chunks: int) -> dict:
    """The ring's backward peak (MHA, fp32, zigzag, a foreign hop) by part, in units U of
    one rank's q: the library's model (megatron_ext.attention.ring) plus q, k, v."""
    parts = {"q, k, v": 3.0, **{name: b / 4 for name, b in library_model("backward", kv_chunks, 1, 2, 4).items()}}
    parts["total (ratio*P = total / 8)"] = sum(parts.values())
    return parts


def run_200k(args, report):
    n, h, d, p = (24576 if args.quick else 196608), 2, 32, 8
    t0 = time.perf_counter()
    res = spawn_ranks(long_worker, p, (n, h, d, 64), timeout_s=1800)
    total = time.perf_counter() - t0
    wall = max(r["wall_s"] for r in res)
    err = max(r["max_err"] for r in res)
    checked = sum(r["rows_checked"] for r in res)
    print_table(f"Long sequence: N={n}, P={p}, h={h}, d={d}, ring zigzag causal fwd+bwd on this machine "
                f"(target <= 600 s, err <= 1e-4)",
                ["fwd+bwd s", "incl. spawn s", "rows checked", "max err (out, dq)"], [[wall, total, checked, err]])
    report["long_200k"] = {"n": n, "p": p, "h": h, "d": d, "fwd_bwd_s": wall, "total_s": total,
                           "rows_checked": checked, "max_err": err}


SECTIONS = {"efficiency": run_efficiency, "waves": run_waves, "balance": run_balance, "memory": run_memory, "200k": run_200k}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma list of " + ", ".join(SECTIONS))
    ap.add_argument("--heads", default="2,4", type=lambda x: [int(h) for h in x.split(",")],
                    help="comma list of head counts for efficiency and waves (h_kv = h)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions after one warm-up (minimum)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = ap.parse_args(argv)
    report = {}
    for name in args.sections.split(","):
        SECTIONS[name](args, report)
        list(report.values())[-1]["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    path = write_json("ring_attention" + ("_quick" if args.quick else ""), report, merge=True)
    print(f"\nbench: wrote {path}")


if __name__ == "__main__":
    main()
