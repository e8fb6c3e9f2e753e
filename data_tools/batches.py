"""Pre-tokenization input: JSONL read in blocks of whole lines and parsed into batches.

The main thread only cuts the input into blocks (one ``read`` and one ``split`` per
block, no per-line Python work); a worker parses a block with :func:`parse`. Its fast
path decodes every line with one ``map`` and checks the texts with C-level passes
(``any(map(str.isspace, ...))``, ``all``, one substring search for NUL escapes); if
anything is off it falls back to the line-by-line checks of :mod:`data_tools.records`,
which name the line and reason, so both paths accept and reject exactly the same lines.
"""
from __future__ import annotations

import json
from itertools import repeat
from typing import Iterator, List, Optional, Sequence

from .common import open_binary
from .records import BadRecord, document_segments, sft_segments

try:  # the same decoder records.py uses
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    def _loads(raw: bytes):
        return json.loads(raw.decode("utf-8"))


class Batch:
    """A block of whole lines of one input file, and what parsing made of it.

    ``position`` is the resume point just past the block: (file index, byte offset,
    lines before it); (number of files, 0, 0) marks the end of the input."""

    __slots__ = ("file", "first_line", "lines", "data", "size", "position", "records", "rejects")

    def __init__(self, file: int, first_line: int, data: bytes, lines: List[bytes], position):
        self.file, self.first_line, self.data, self.lines = file, first_line, data, lines
        self.size, self.position = len(data) + (1 if lines else 0), position  # input bytes, newline included
        self.records, self.rejects = None, []


def read_batches(paths: Sequence[str], start, batch_bytes: int) -> Iterator[Batch]:
    """Blocks of about ``batch_bytes`` of whole lines, from the resume point ``start``
    (file index, byte offset, lines before it); the last batch is empty and final."""
    for fi in range(start[0], len(paths)):
        offset, lineno = (start[1], start[2]) if fi == start[0] else (0, 0)
        with open_binary(paths[fi]) as f:
            if offset:
                f.seek(offset)
            pending: List[bytes] = []  # a line not yet ended (longer than a block): joined once
            while True:
                chunk = f.read(batch_bytes)
                if not chunk:
                    break
                cut = chunk.rfind(b"\n")
                if cut < 0:
                    pending.append(chunk)
                    continue
                data = b"".join(pending + [chunk[:cut]]) if pending else chunk[:cut]
                pending = [chunk[cut + 1:]] if cut + 1 < len(chunk) else []
                lines = data.split(b"\n")
                offset, lineno = offset + len(data) + 1, lineno + len(lines)
                yield Batch(fi, lineno - len(lines) + 1, data, lines, (fi, offset, lineno))
            if pending:
                data = b"".join(pending)
                offset, lineno = offset + len(data), lineno + 1
                batch = Batch(fi, lineno, data, [data], (fi, offset, lineno))
                batch.size -= 1  # no newline after the last line
                yield batch
    yield Batch(len(paths), 0, b"", [], (len(paths), 0, 0))


def _fast_documents(batch: Batch, keys: Sequence[str]) -> Optional[List[List[str]]]:
    """One list of texts per key when every line is a clean document, else None."""
    if b"\\u0000" in batch.data:  # a NUL escape (or a look-alike): the checks per line decide
        return None
    try:
        objs = list(map(_loads, batch.lines))  # raw control characters (NUL too) are invalid JSON
        columns = [list(map(dict.__getitem__, objs, repeat(k))) for k in keys]  # non-dicts: TypeError
        for texts in columns:
            if any(map(str.isspace, texts)) or not all(texts):  # non-strings: TypeError
                return None
    except (ValueError, TypeError, KeyError):
        return None
    return columns


def parse(batch: Batch, path: str, keys: Sequence[str], sft: bool, skip_invalid: bool) -> None:
    """Fill ``batch.records`` (one list of texts per key, or SFT segments per line) and
    ``batch.rejects``. A bad line raises SystemExit("PATH:LINE: reason") unless ``skip_invalid``."""
    if not sft:
        batch.records = _fast_documents(batch, keys)
        if batch.records is not None:
            return
    records = []
    for i, raw in enumerate(batch.lines):
        try:
            records.append(sft_segments(raw.rstrip(b"\r")) if sft else document_segments(raw.rstrip(b"\r"), keys))
        except BadRecord as e:
            line = batch.first_line + i
            if not skip_invalid:
                raise SystemExit(f"{path}:{line}: {e}") from None
            batch.rejects.append({"file": path, "line": line, "reason": str(e), "kind": e.kind})
    batch.records = records if sft else [list(texts) for texts in zip(*records)] or [[] for _ in keys]
