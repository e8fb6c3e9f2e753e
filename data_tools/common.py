"""Shared pieces of the data tools: input reading, tokenizer loading, atomic writes."""
from __future__ import annotations

import gzip
import io
import json
import os
import sys
from typing import Iterator, List, Sequence, Tuple

from .tokenizing import Tokenizer, load_tokenizer  # noqa: F401  (the one place tools get a tokenizer)


class DataError(Exception):
    """Bad input, with its place: ``FILE:LINE: reason``."""

    def __init__(self, path: str, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = path, line, reason


COMPRESSED = (".gz", ".zst")


def open_binary(path: str):
    """Open a plain, ``.gz`` (gzip) or ``.zst`` (Zstandard, every frame) file for binary
    reading; compressed streams seek forward only (resume does)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".zst"):
        import zstandard  # only when a .zst input is given

        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True, closefd=True)
        return io.BufferedReader(raw, 1 << 20)  # lines and whole reads; not seekable (see skip_to)
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def input_stamp(path: str) -> list:
    """What says an input changed: [path, size, mtime], and for a folder (a ``datasets``
    save) the same for every file under it, in name order."""
    if not os.path.isdir(path):
        st = os.stat(path)
        return [path, st.st_size, st.st_mtime_ns]
    files = sorted(os.path.join(root, n) for root, _, names in os.walk(path) for n in names)
    return [path, [[os.path.relpath(f, path), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]]


def skip_to(f, offset: int) -> None:
    """Move an :func:`open_binary` stream from its start to ``offset`` (decompressing up to
    there where it cannot seek)."""
    if f.seekable():
        f.seek(offset)
        return
    while offset > 0:
        got = len(f.read(min(offset, 1 << 20)))
        if not got:
            raise ValueError(f"{getattr(f, 'name', 'input')}: shorter than the resume offset {offset}")
        offset -= got


def iter_lines(paths: Sequence[str]) -> Iterator[Tuple[str, int, bytes]]:
    """(path, 1-based line number, raw line without newline) across files, in order."""
    for path in paths:
        with open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                yield path, lineno, raw.rstrip(b"\r\n")


def iter_texts(paths: Sequence[str], key: str = "text") -> Iterator[Tuple[int, str]]:
    """(document index across files, text) from JSONL (``key``) or plain text files
    (``.txt``/``.txt.gz``/``changelog*``: each file is one document)."""
    doc = 0
    for path in paths:
        if path.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst", ".json")):
            for _, lineno, raw in iter_lines([path]):
                if not raw.strip():
                    continue
                try:
                    text = json.loads(raw)[key]
                except (ValueError, KeyError, TypeError) as e:
                    raise DataError(path, lineno, f"need a JSON object with a string {key!r} ({e})") from None
                if not isinstance(text, str):
                    raise DataError(path, lineno, f"{key!r} is not a string")
                yield doc, text
                doc += 1
        else:
            with open_binary(path) as f:
                yield doc, f.read().decode("utf-8", errors="replace")
            doc += 1


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp name and rename."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class JsonlWriter:
    """Write JSON lines to a temp file; ``commit()`` renames it into place."""

    def __init__(self, path: str):
        self.path, self.tmp = path, f"{path}.tmp.{os.getpid()}"
        self.f = io.open(self.tmp, "w", encoding="utf-8")
        self.count = 0

    def write(self, obj) -> None:
        self.f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.count += 1

    def commit(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


class _Silent:
    """The progress bar off a terminal: no tqdm import (it costs ~20 ms of start-up)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


def progress(total=None, unit="doc", desc="", unit_scale=False):
    """A tqdm bar on a terminal (stderr), silent otherwise."""
    if not sys.stderr.isatty():
        return _Silent()
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, unit_scale=unit_scale)


def parse_int_list(text: str) -> List[int]:
    """'1k,2k,200k' or '1000,2000' -> [1000, 2000, ...] (k = 1000, K/Ki = 1024 not used)."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        mult = 1000 if item.endswith("k") else 1
        out.append(int(float(item.rstrip("k")) * mult))
    return out
