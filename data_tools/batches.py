"""Pre-tokenization input: JSONL (plain, ``.gz``, ``.zst``) read in blocks of whole lines,
or table rows (Parquet, ``datasets`` folders: :mod:`data_tools.tables`), parsed into batches.

The main thread only cuts the input into blocks (one ``read`` and one ``split`` per
block, no per-line Python work); a worker parses a block with :func:`parse`. Its fast
path decodes every line with one ``map`` and checks the texts with C-level passes
(``any(map(str.isspace, ...))``, ``all``, one substring search for NUL escapes); if
anything is off it falls back to the line-by-line checks of :mod:`data_tools.records`,
which name the line and reason, so both paths accept and reject exactly the same lines.
Table rows take the same two paths, with column lists in place of decoded lines.
"""
from __future__ import annotations

import json
from itertools import repeat
from typing import Iterator, List, Optional, Sequence

from .common import open_binary, skip_to
from .records import BadRecord, document_segments, sft_segments
from .tables import columns_as_lists, is_table, row_batches, row_dicts

try:  # the same decoder records.py uses
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    def _loads(raw: bytes):
        return json.loads(raw.decode("utf-8"))


class Batch:
    """A block of whole lines (or of table rows) of one input file, and what parsing made of it.

    ``position`` is the resume point just past the block: (file index, byte offset,
    lines before it), for tables (file index, row, row); (number of files, 0, 0) marks
    the end of the input. ``rows`` is a pyarrow Table for table input (``first_line``
    is then its first 0-based row index), else None."""

    __slots__ = ("file", "first_line", "lines", "data", "size", "position", "records", "rejects", "rows")

    def __init__(self, file: int, first_line: int, data: bytes, lines: List[bytes], position, rows=None):
        self.file, self.first_line, self.data, self.lines, self.rows = file, first_line, data, lines, rows
        self.size, self.position = len(data) + (1 if lines else 0), position  # input bytes, newline included
        if rows is not None:
            self.size = rows.nbytes
        self.records, self.rejects = None, []

    def has_input(self) -> bool:
        """False for the final (empty) batch: nothing to parse."""
        return bool(self.lines) or self.rows is not None


def read_batches(paths: Sequence[str], start, batch_bytes: int,
                 columns: Optional[Sequence[str]] = ("text",)) -> Iterator[Batch]:
    """Blocks of about ``batch_bytes`` of whole lines (or table rows), from the resume point
    ``start`` (file index, byte offset, lines before it); the last batch is empty and final.
    ``columns``: what tables read (None: the SFT columns); JSON lines ignore it."""
    for fi in range(start[0], len(paths)):
        offset, lineno = (start[1], start[2]) if fi == start[0] else (0, 0)
        if is_table(paths[fi]):
            for row, table in row_batches(paths[fi], offset, batch_bytes, columns):
                end = row + table.num_rows
                yield Batch(fi, row, b"", [], (fi, end, end), rows=table)
            continue
        with open_binary(paths[fi]) as f:
            if offset:
                skip_to(f, offset)
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
    """One list of texts per key when every line (or row) is a clean document, else None."""
    try:
        if batch.rows is not None:
            columns = columns_as_lists(batch.rows, keys)
            if any(any(map(str.__contains__, texts, repeat("\x00"))) for texts in columns):  # nulls: TypeError
                return None
        elif b"\\u0000" in batch.data:  # a NUL escape (or a look-alike): the checks per line decide
            return None
        else:
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
    ``batch.rejects``. A bad line raises SystemExit("PATH:LINE: reason") (a bad row:
    "PATH: row N: reason") unless ``skip_invalid``."""
    if not sft:
        batch.records = _fast_documents(batch, keys)
        if batch.records is not None:
            return
    rows = batch.rows is not None
    items = row_dicts(batch.rows) if rows else [raw.rstrip(b"\r") for raw in batch.lines]
    records = []
    for i, item in enumerate(items):
        if not rows and not item.strip():
            continue  # a blank line holds no record (concatenated files often have them); iter_texts skips them too
        try:
            records.append(sft_segments(item) if sft else document_segments(item, keys))
        except BadRecord as e:
            n = batch.first_line + i
            if not skip_invalid:
                raise SystemExit(f"{path}: row {n}: {e}" if rows else f"{path}:{n}: {e}") from None
            batch.rejects.append({"file": path, "row" if rows else "line": n, "reason": str(e), "kind": e.kind})
    batch.records = records if sft else [list(texts) for texts in zip(*records)] or [[] for _ in keys]
