"""Megatron indexed-dataset files (``.bin`` tokens + ``.idx`` index), written by us
and read back by ``megatron.core.datasets.indexed_dataset.IndexedDataset``.

.idx layout (little endian): magic ``MMIDIDX\\x00\\x00``, version u64 = 1, dtype
code u8, sequence count u64, document count u64, then int32 lengths, int64
byte pointers, int64 document indices (one more than documents: 0..n).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from .idxwrite import HEADER_BYTES, MAGIC, header, token_code
from .idxwrite import write_index as _write_index
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7,
               np.uint16: 8}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


def token_dtype(vocab_size: int):
    """uint16 below 65,500 ids, else int32 (Megatron's rule, :func:`idxwrite.token_code`)."""
    return CODE_DTYPES[token_code(vocab_size)]


def _header(dtype, n_seq: int) -> bytes:
    return header(DTYPE_CODES[dtype], n_seq)


def index_bytes(dtype, lengths: np.ndarray) -> bytes:
    """The .idx file for one sequence per document with these token counts."""
    lengths = np.asarray(lengths, dtype=np.int32)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    documents = np.arange(len(lengths) + 1, dtype=np.int64)
    return _header(dtype, len(lengths)) + lengths.tobytes() + pointers.tobytes() + documents.tobytes()


def write_index(path: str, dtype, lengths_path: str, chunk: int = 1 << 20) -> int:
    """Stream the .idx for the raw int32 lengths in ``lengths_path`` (see
    :func:`idxwrite.write_index`); same bytes as :func:`index_bytes`; returns the token count."""
    return _write_index(path, DTYPE_CODES[dtype], lengths_path, chunk)


class IndexError_(ValueError):
    """A corrupt or inconsistent .idx/.bin pair; the message names the file."""


@dataclass
class Index:
    """A parsed .idx file."""

    path: str
    dtype: type
    lengths: np.ndarray
    pointers: np.ndarray
    documents: np.ndarray


def read_index(prefix: str) -> Index:
    """Parse PREFIX.idx, checking the header and that the arrays fit the file size; the
    arrays are read-only views of the memory-mapped file."""
    path = prefix + ".idx"
    if not os.path.exists(path):
        raise IndexError_(f"{path}: missing")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES:
            raise IndexError_(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
        if head[:9] != MAGIC:
            raise IndexError_(f"{path}: bad magic {head[:9]!r}, expected {MAGIC!r}")
        version, = struct.unpack("<Q", head[9:17])
        if version != 1:
            raise IndexError_(f"{path}: version {version}, expected 1")
        code = head[17]
        if code not in CODE_DTYPES:
            raise IndexError_(f"{path}: unknown dtype code {code}")
        n_seq, n_doc = struct.unpack("<QQ", head[18:34])
        want = HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8
        if size != want:
            raise IndexError_(f"{path}: {size} bytes, but {n_seq} sequences and {n_doc} document indices "
                              f"need {want} (truncated or corrupt)")
    # mapped, not read: a billion-document index is ~20 GB
    body = np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER_BYTES) if size > HEADER_BYTES else \
        np.zeros(0, np.uint8)
    lengths = body[: 4 * n_seq].view(np.int32)
    pointers = body[4 * n_seq: 12 * n_seq].view(np.int64)
    documents = body[12 * n_seq:].view(np.int64)
    return Index(path, CODE_DTYPES[code], lengths, pointers, documents)
