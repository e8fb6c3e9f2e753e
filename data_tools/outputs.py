"""Pre-tokenization output: token arrays appended to ``.bin`` temp files, the index
streamed at the end. No numpy (see :mod:`data_tools.idxwrite`): token lists become
``array`` buffers with one ``fromlist`` per document."""
from __future__ import annotations

import array
import os
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


def flatten(ids: List[List[int]], code: int, eod: Optional[int] = None) -> Tuple[array.array, array.array]:
    """Token lists -> (flat tokens of dtype ``code``, int32 lengths), an ``eod`` id after each when given.
    Appends ``eod`` to the caller's lists (they are ours)."""
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


def flatten_sft(ids: Sequence[List[int]], records, code: int, eod: int):
    """SFT: segment token lists (in record order) -> (tokens, uint8 loss mask, int32 lengths);
    the mask is 1 on trained segments and on the EOD closing each record."""
    ids = iter(ids)
    tokens, mask, lengths = array.array(idxwrite.TYPECODE[code]), array.array("B"), array.array("i")
    for r in records:
        start = len(tokens)
        for _, trained in r:
            seg = next(ids)
            tokens.fromlist(seg)
            mask.frombytes(bytes([trained]) * len(seg))
        tokens.append(eod)
        mask.append(1)
        lengths.append(len(tokens) - start)
    return tokens, mask, lengths
