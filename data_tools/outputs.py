"""Pre-tokenization output: token arrays appended to ``.bin`` temp files, the index
streamed at the end. No numpy (see :mod:`data_tools.idxwrite`): sentencepiece's int32
buffers are joined and narrowed with bytes slicing, other tokenizers' lists go through
one ``array.fromlist`` per document."""
from __future__ import annotations

import array
import os
import sys
from typing import List, Optional, Sequence, Tuple

from . import idxwrite


class Output:
    """One dataset being written: PREFIX.bin.tmp plus a running int32 lengths file."""

    def __init__(self, prefix: str, code: int):
        self.prefix, self.code = prefix, code
        self.bin_tmp, self.len_tmp, self.idx_tmp = prefix + ".bin.tmp", prefix + ".lengths.tmp", prefix + ".idx.tmp"

    def open(self, resume_state=None):
        for path, key in ((self.bin_tmp, "bin_bytes"), (self.len_tmp, "len_bytes")):
            if resume_state is None:
                open(path, "wb").close()
            else:
                with open(path, "r+b") as f:  # drop whatever was appended after the checkpoint
                    f.truncate(resume_state[key])
        self.bin, self.lens = open(self.bin_tmp, "ab"), open(self.len_tmp, "ab")

    def append(self, tokens: array.array, lengths: array.array) -> None:
        self.bin.write(tokens)
        self.lens.write(lengths)

    def sync(self) -> dict:
        for f in (self.bin, self.lens):
            f.flush()
            os.fsync(f.fileno())
        return {"bin_bytes": self.bin.tell(), "len_bytes": self.lens.tell()}

    def write_index(self) -> dict:
        """Close and fsync the .bin, stream the .idx to its temp name; returns the sizes written."""
        state = self.sync()
        self.bin.close()
        self.lens.close()
        idxwrite.write_index(self.idx_tmp, self.code, self.len_tmp)
        return state

    def discard(self) -> None:
        for f in (getattr(self, "bin", None), getattr(self, "lens", None)):
            if f:
                f.close()
        for p in (self.bin_tmp, self.len_tmp, self.idx_tmp):
            if os.path.exists(p):
                os.remove(p)


def encode(tok, texts: Sequence[str]) -> list:
    """``texts`` -> one native int32 buffer of ids per text where the tokenizer gives them
    (sentencepiece: no Python int per token, about 25 ns a token less), else one list each."""
    bufs = tok.encode_batch_int32(texts) if sys.byteorder == "little" else None
    return tok.encode_batch(texts) if bufs is None else bufs


def flatten(ids: list, code: int, eod: Optional[int] = None) -> Tuple[array.array, array.array]:
    """Ids from :func:`encode` -> (flat tokens of dtype ``code``, int32 lengths), an ``eod``
    id after each document when given. Appends ``eod`` to lists (they are ours)."""
    if not ids or isinstance(ids[0], list):
        return _flatten_lists(ids, code, eod)
    lengths = array.array("i", map(len, map(memoryview, ids)))
    sep = b"" if eod is None else array.array("i", [eod]).tobytes()
    if eod is not None:
        lengths = array.array("i", map((1).__add__, lengths))
    data = sep.join(ids) + sep
    if code == idxwrite.UINT16:  # little-endian int32 -> uint16: the low two bytes of each id
        narrow = bytearray(len(data) // 2)
        narrow[0::2], narrow[1::2] = data[0::4], data[1::4]
        data = narrow
    tokens = array.array(idxwrite.TYPECODE[code])
    tokens.frombytes(data)
    return tokens, lengths


def _flatten_lists(ids: List[List[int]], code: int, eod: Optional[int]) -> Tuple[array.array, array.array]:
    tokens = array.array(idxwrite.TYPECODE[code])
    put = tokens.fromlist
    if eod is None:
        for seq in ids:
            put(seq)
    else:
        for seq in ids:
            seq.append(eod)
            put(seq)
    return tokens, array.array("i", map(len, ids))


def flatten_sft(encoded: Sequence[Tuple[List[int], List[int]]], code: int, eod: int):
    """SFT: (ids, 0/1 flags) per record (:func:`data_tools.segments.split_encoded`) -> (tokens,
    uint8 loss mask, int32 lengths); the mask is 1 on trained tokens and on the EOD closing each record."""
    tokens, mask, lengths = array.array(idxwrite.TYPECODE[code]), array.array("B"), array.array("i")
    for ids, flags in encoded:
        tokens.fromlist(ids)
        tokens.append(eod)
        mask.frombytes(bytes(flags))
        mask.append(1)
        lengths.append(len(ids) + 1)
    return tokens, mask, lengths
