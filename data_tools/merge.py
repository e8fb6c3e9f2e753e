"""Concatenate indexed datasets into one (int64 pointers: no overflow past 4 GB).

    python -m data_tools.merge --inputs P1 P2 ... --output-prefix P

Inputs must share a dtype; each is validated first. Output is written to
temp names, fsynced and renamed, .idx last; the index streams (memory stays flat
whatever the document count).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np

from .quiet import add_output_flags, quiet_cli
from .indexed import IndexError_, read_index, write_index
from .validate import validate

CHUNK = 1 << 22


def merge(inputs, output_prefix: str) -> dict:
    indexes = []
    for prefix in inputs:
        validate(prefix)
        indexes.append(read_index(prefix))
    dtypes = {ix.dtype for ix in indexes}
    if len(dtypes) != 1:
        raise IndexError_(f"inputs have different dtypes: {[(p, ix.dtype.__name__) for p, ix in zip(inputs, indexes)]}")
    tmp = f"{output_prefix}.bin.tmp.{os.getpid()}"
    lengths_tmp, idx_tmp = f"{output_prefix}.lengths.tmp.{os.getpid()}", f"{output_prefix}.idx.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as out, open(lengths_tmp, "wb") as lens:
            for prefix, ix in zip(inputs, indexes):
                with open(prefix + ".bin", "rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
                for start in range(0, len(ix.lengths), CHUNK):  # the index streams: memory stays flat
                    lens.write(np.ascontiguousarray(ix.lengths[start:start + CHUNK], dtype=np.int32).tobytes())
            out.flush()
            os.fsync(out.fileno())
        tokens = write_index(idx_tmp, dtypes.pop(), lengths_tmp)
        if os.path.exists(output_prefix + ".idx"):  # never leave the new .bin beside an old .idx
            os.remove(output_prefix + ".idx")
        os.replace(tmp, output_prefix + ".bin")
        os.replace(idx_tmp, output_prefix + ".idx")
    finally:
        for path in (tmp, lengths_tmp, idx_tmp):
            if os.path.exists(path):
                os.remove(path)
    return {"documents": sum(len(ix.lengths) for ix in indexes), "tokens": tokens}


def main(argv=None) -> int:
    quiet_cli(argv)
    ap = argparse.ArgumentParser(prog="python -m data_tools.merge", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", nargs="+", required=True)
    ap.add_argument("--output-prefix", required=True)
    add_output_flags(ap)
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    try:
        res = merge(args.inputs, args.output_prefix)
    except IndexError_ as e:
        print(f"merge: {e}", file=sys.stderr)
        return 1
    print(f"merge: {len(args.inputs)} inputs -> {args.output_prefix}: {res['documents']} documents, "
          f"{res['tokens']} tokens in {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
