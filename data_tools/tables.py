"""Pre-tokenization input from tables: Parquet files and Hugging Face ``datasets`` folders.

A path ending in ``.parquet`` is read with pyarrow, a row group at a time in slices
of about ``--batch-bytes`` (memory stays flat whatever the file size). A directory is
a dataset saved with ``Dataset.save_to_disk`` and is opened with the ``datasets``
library's ``load_from_disk`` (memory-mapped Arrow; its indices mapping, if any, is
honoured). ``--json-keys`` names the columns, as Megatron-LM users expect; with
``--sft`` the ``prompt``/``response`` or ``messages`` columns are read. Each row goes
through the same checks as a JSON line (:mod:`data_tools.records`), a null cell
counting as a missing key, and a bad row is reported as ``FILE: row N: reason`` with
N the 0-based row index. pyarrow and ``datasets`` are imported only here, so JSON
lines runs never load them.
"""
from __future__ import annotations

import os
from typing import Iterator, List, Optional, Sequence

SFT_COLUMNS = ("prompt", "response", "messages")
MAX_ROWS = 65536  # rows per batch at most, whatever the row size


def is_table(path: str) -> bool:
    """A Parquet file or a ``datasets`` folder (read by this module), not JSON lines."""
    return path.endswith(".parquet") or os.path.isdir(path)


class _Source:
    """One table: its row count, the columns read, average bytes per row, and row slices."""

    num_rows: int
    columns: List[str]
    row_bytes: float

    def slices(self, start: int, rows: int) -> Iterator:
        """pyarrow Tables of at most ``rows`` rows each, from row ``start`` to the end."""
        raise NotImplementedError


def _pick(path: str, names: Sequence[str], columns: Optional[Sequence[str]], what: str) -> List[str]:
    """The columns to read; a missing one is an error naming the file and what it has."""
    if columns is None:  # SFT: whichever of its columns the table has
        picked = [c for c in SFT_COLUMNS if c in names]
        if not picked:
            raise SystemExit(f"{path}: --sft needs a 'messages' column or 'prompt' and 'response' columns; "
                             f"the {what} has {', '.join(names) or 'no columns'}")
        return picked
    missing = [c for c in columns if c not in names]
    if missing:
        raise SystemExit(f"{path}: no column {', '.join(map(repr, missing))} (the {what} has "
                         f"{', '.join(names) or 'no columns'}); --json-keys names the columns to tokenize")
    return list(columns)


class _Parquet(_Source):
    def __init__(self, path: str, columns: Optional[Sequence[str]]):
        import pyarrow.parquet as pq

        try:
            self.file = pq.ParquetFile(path)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise SystemExit(f"{path}: not a readable Parquet file ({e})") from None
        meta = self.file.metadata
        self.columns = _pick(path, self.file.schema_arrow.names, columns, "file")
        self.num_rows = meta.num_rows
        groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
        self.group_rows = [g.num_rows for g in groups]
        size = sum(g.column(i).total_uncompressed_size for g in groups for i in range(g.num_columns)
                   if g.column(i).path_in_schema.split(".")[0] in self.columns)  # nested: "messages.list..."
        self.row_bytes = size / max(1, self.num_rows)

    def slices(self, start: int, rows: int) -> Iterator:
        import pyarrow as pa

        first, before = 0, 0  # the first row group holding `start`, and the rows before it
        while first < len(self.group_rows) and before + self.group_rows[first] <= start:
            before += self.group_rows[first]
            first += 1
        if first == len(self.group_rows):
            return
        skip = start - before
        groups = range(first, len(self.group_rows))
        for rb in self.file.iter_batches(batch_size=rows, row_groups=groups, columns=self.columns, use_threads=False):
            if skip >= rb.num_rows:
                skip -= rb.num_rows
                continue
            yield pa.Table.from_batches([rb.slice(skip)])
            skip = 0


class _HFDataset(_Source):
    def __init__(self, path: str, columns: Optional[Sequence[str]]):
        import datasets

        try:
            ds = datasets.load_from_disk(path)
        except FileNotFoundError as e:
            raise SystemExit(f"{path}: not a dataset saved with save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            raise SystemExit(f"{path}: a DatasetDict with splits {', '.join(ds)}; give one split's folder "
                             f"(e.g. {os.path.join(path, next(iter(ds), 'train'))})")
        self.columns = _pick(path, ds.column_names, columns, "dataset")
        self.ds = ds.select_columns(self.columns).with_format("arrow")
        self.num_rows = len(self.ds)
        self.row_bytes = self.ds.data.nbytes / max(1, self.num_rows)

    def slices(self, start: int, rows: int) -> Iterator:
        for i in range(start, self.num_rows, rows):
            yield self.ds[i:i + rows]  # a pyarrow Table (format "arrow"), after any indices mapping


def open_table(path: str, columns: Optional[Sequence[str]]) -> _Source:
    """``path`` (Parquet or a ``datasets`` folder) -> its source; ``columns`` None = the SFT columns."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    return _HFDataset(path, columns) if os.path.isdir(path) else _Parquet(path, columns)


def row_batches(path: str, start: int, batch_bytes: int, columns: Optional[Sequence[str]]):
    """(first row index, pyarrow Table) of about ``batch_bytes`` each, from row ``start``."""
    src = open_table(path, columns)
    rows = int(max(1, min(MAX_ROWS, batch_bytes // max(1.0, src.row_bytes))))
    row = start
    for table in src.slices(start, rows):
        yield row, table
        row += table.num_rows


def row_dicts(table) -> list:
    """A pyarrow Table -> one dict per row, null cells left out (a null is a missing key)."""
    return [{k: v for k, v in row.items() if v is not None} for row in table.to_pylist()]


def columns_as_lists(table, keys: Sequence[str]) -> list:
    """A pyarrow Table -> one Python list per key (nulls as None)."""
    return [table.column(k).to_pylist() for k in keys]
