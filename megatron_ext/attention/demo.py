"""Exact context-parallel attention on 4 gloo processes (``python -m megatron_ext.attention.demo``).

Runs ring and all-gather attention over a sequence split zigzag (and
contiguous) across 4 ranks and prints, for out, dq, dk and dv, the worst
absolute error of any rank's shard against a float64 dense reference of the
full sequence. ``make demo`` runs it first.
"""
from __future__ import annotations

import argparse
import time

from ..distributed import spawn_ranks
from .exactness import Case, exactness_worker

TENSORS = ("out", "dq", "dk", "dv")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=4, help="gloo processes (default 4)")
    ap.add_argument("--seq-len", type=int, default=2048, help="global sequence length (default 2048)")
    ap.add_argument("--tolerance", type=float, default=1e-5, help="fp32 pass threshold (default 1e-5)")
    args = ap.parse_args(argv)

    cases = [Case(m, causal=c, h=8, h_kv=2, d=64, b=1, seq_len=args.seq_len, layout=lay)
             for m in ("ring", "allgather") for lay in ("zigzag", "contiguous") for c in (True, False)]
    print(f"CP attention on {args.world_size} gloo ranks: S={args.seq_len}, h=8 over h_kv=2, d=64, fp32; "
          f"reference: float64 dense attention on the full sequence")
    t0 = time.monotonic()
    results = spawn_ranks(exactness_worker, args.world_size, (cases,), timeout_s=600)
    print(f"{'method':<10} {'layout':<11} {'mask':<7} " + " ".join(f"{n:>9}" for n in TENSORS) + "  verdict")
    failed = 0
    for c in cases:
        worst = {n: max(r[c.key][n] for r in results) for n in TENSORS}
        ok = max(worst.values()) <= args.tolerance
        failed += not ok
        print(f"{c.method:<10} {c.layout:<11} {'causal' if c.causal else 'full':<7} "
              + " ".join(f"{worst[n]:9.2e}" for n in TENSORS) + f"  {'PASS' if ok else 'FAIL'}")
    print(f"demo: {len(cases) - failed}/{len(cases)} cases within {args.tolerance:g} abs "
          f"of float64 in {time.monotonic() - t0:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
