"""Megatron ``.idx`` writing without numpy: the pre-tokenizer's start-up skips numpy's
~45 ms import. :mod:`data_tools.indexed` (numpy arrays, reading) uses the same header
and streaming writer, so the bytes have one source.

dtype codes are Megatron's (``indexed_dataset.DType``); arrays are native-endian
(little endian on the machines Megatron runs on), as numpy writes them.
"""
from __future__ import annotations

import array
import itertools
import os
import struct
from typing import Iterator

MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 9 + 8 + 1 + 8 + 8
UINT8, INT32, UINT16 = 1, 4, 8
ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}
TYPECODE = {UINT8: "B", INT32: "i", UINT16: "H"}  # array typecodes of the codes preprocess writes


def token_code(vocab_size: int) -> int:
    """uint16 below 65,500 ids, else int32 (Megatron's rule)."""
    return UINT16 if vocab_size < 65500 else INT32


def header(code: int, n_seq: int) -> bytes:
    """Magic, version 1, dtype code, sequence count, document-index count (n_seq + 1)."""
    return MAGIC + struct.pack("<QBQQ", 1, code, n_seq, n_seq + 1)


def _chunks(path: str, chunk: int) -> Iterator[array.array]:
    """int32 arrays of at most ``chunk`` items, read in order from a raw int32 file."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * chunk), b""):
            lengths = array.array("i")
            lengths.frombytes(block)
            yield lengths


def write_index(path: str, code: int, lengths_path: str, chunk: int = 1 << 20) -> int:
    """Write the .idx for the document lengths in ``lengths_path`` (raw int32) to
    ``path`` and fsync it, ``chunk`` lengths at a time: memory stays flat whatever the
    document count. One sequence per document; returns the token count."""
    n = os.path.getsize(lengths_path) // 4
    itemsize, offset = ITEMSIZE[code], 0
    with open(path, "wb") as out:
        out.write(header(code, n))
        for lengths in _chunks(lengths_path, chunk):
            out.write(lengths)
        for lengths in _chunks(lengths_path, chunk):  # byte pointers: where each document starts
            pointers = array.array("q", itertools.accumulate(map(itemsize.__mul__, lengths), initial=offset))
            offset = pointers.pop()
            out.write(pointers)
        for start in range(0, n + 1, chunk):
            out.write(array.array("q", range(start, min(start + chunk, n + 1))))
        out.flush()
        os.fsync(out.fileno())
    return offset // itemsize
