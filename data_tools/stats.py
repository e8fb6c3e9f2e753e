"""Document and token counts, and a length histogram, of an indexed dataset.

    python -m data_tools.stats PREFIX [--bins 10]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from .indexed import IndexError_, read_index
from .quiet import add_output_flags, quiet_cli


def stats(prefix: str, bins: int = 10) -> dict:
    idx = read_index(prefix)
    lengths = idx.lengths.astype(np.int64)
    if len(lengths) == 0:
        return {"documents": 0, "tokens": 0, "histogram": []}
    edges = np.unique(np.geomspace(max(1, lengths.min()), lengths.max() + 1, bins + 1).astype(np.int64))
    counts, edges = np.histogram(lengths, bins=edges)
    return {"documents": len(lengths), "tokens": int(lengths.sum()), "min": int(lengths.min()),
            "mean": float(lengths.mean()), "max": int(lengths.max()),
            "histogram": [(int(a), int(b), int(c)) for a, b, c in zip(edges[:-1], edges[1:], counts)]}


def main(argv=None) -> int:
    quiet_cli(argv)
    ap = argparse.ArgumentParser(prog="python -m data_tools.stats", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prefix")
    ap.add_argument("--bins", type=int, default=10)
    add_output_flags(ap)
    args = ap.parse_args(argv)
    try:
        s = stats(args.prefix, args.bins)
    except IndexError_ as e:
        print(f"stats: {e}", file=sys.stderr)
        return 1
    if s["documents"]:
        width = max(c for _, _, c in s["histogram"]) or 1
        print(f"{'tokens':>21}  documents")
        for lo, hi, c in s["histogram"]:
            print(f"[{lo:>9}, {hi:>9})  {c:>9}  {'#' * round(40 * c / width)}")
    print(f"stats: {args.prefix}: {s['documents']} documents, {s['tokens']} tokens"
          + (f", length min/mean/max {s['min']}/{s['mean']:.0f}/{s['max']}" if s["documents"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
