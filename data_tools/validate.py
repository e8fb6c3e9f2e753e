"""Check a Megatron indexed dataset for corruption.

    python -m data_tools.validate PREFIX [--tokenizer-model M]

Checks the .idx header (magic, version, dtype), that its arrays fit its size,
that the .bin size matches the pointers and lengths, that document indices
are monotonic, and, given a tokenizer, that every id is below its vocabulary.
Exits 1 with a message naming the file on any problem.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from .common import load_tokenizer
from .quiet import add_output_flags, quiet_cli
from .indexed import IndexError_, read_index

CHUNK_TOKENS = 1 << 24


def validate(prefix: str, vocab_size: int = None) -> dict:
    """Return {"documents", "tokens"} or raise IndexError_ naming the problem."""
    idx = read_index(prefix)
    bin_path = prefix + ".bin"
    if not os.path.exists(bin_path):
        raise IndexError_(f"{bin_path}: missing")
    itemsize = np.dtype(idx.dtype).itemsize
    n, offset = len(idx.lengths), 0
    for start in range(0, n, CHUNK_TOKENS):  # chunks: the arrays are memory-mapped, maybe billions long
        lengths = idx.lengths[start:start + CHUNK_TOKENS].astype(np.int64)
        if (lengths < 0).any():
            raise IndexError_(f"{idx.path}: negative sequence length at {start + int(np.argmax(lengths < 0))}")
        expected = offset + np.concatenate([[0], np.cumsum(lengths[:-1] * itemsize)])
        bad = np.nonzero(idx.pointers[start:start + CHUNK_TOKENS] != expected)[0]
        if len(bad):
            k = start + int(bad[0])
            raise IndexError_(f"{idx.path}: pointer of sequence {k} is {idx.pointers[k]}, lengths say {expected[bad[0]]}")
        offset = int(expected[-1]) + int(lengths[-1]) * itemsize
    total = offset
    size = os.path.getsize(bin_path)
    if size != total:
        raise IndexError_(f"{bin_path}: {size} bytes, the index describes {total} (truncated or extra data)")
    docs = idx.documents
    rising = all(not (np.diff(docs[s:s + CHUNK_TOKENS + 1]) < 0).any() for s in range(0, len(docs), CHUNK_TOKENS))
    if len(docs) == 0 or docs[0] != 0 or docs[-1] != n or not rising:
        raise IndexError_(f"{idx.path}: document indices must rise from 0 to {n}; got "
                          f"{docs[:3].tolist()}...{docs[-3:].tolist()}")
    if vocab_size is not None:
        data = np.memmap(bin_path, dtype=idx.dtype, mode="r")
        for start in range(0, len(data), CHUNK_TOKENS):
            block = data[start:start + CHUNK_TOKENS]
            over = np.nonzero((block >= vocab_size) | (block < 0))[0]
            if len(over):
                pos = start + int(over[0])
                raise IndexError_(f"{bin_path}: token {pos} is id {int(data[pos])}, outside vocabulary {vocab_size}")
    return {"documents": len(docs) - 1, "tokens": total // itemsize}


def main(argv=None) -> int:
    quiet_cli(argv)
    ap = argparse.ArgumentParser(prog="python -m data_tools.validate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prefix", help="dataset prefix (PREFIX.bin / PREFIX.idx)")
    ap.add_argument("--tokenizer-model", help="also check ids against this vocabulary: PATH.model (sentencepiece) or hf:DIR (a Hugging Face tokenizer.json)")
    add_output_flags(ap)
    args = ap.parse_args(argv)
    try:
        vocab = load_tokenizer(args.tokenizer_model).vocab_size() if args.tokenizer_model else None
        res = validate(args.prefix, vocab)
    except (IndexError_, FileNotFoundError, ValueError) as e:
        print(f"validate: FAILED: {e}", file=sys.stderr)
        return 1
    print(f"validate: OK {args.prefix}: {res['documents']} documents, {res['tokens']} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
