"""Parse and check one JSONL line for pre-tokenization.

A line becomes a list of (text, trained) segments: plain documents are one
segment per JSON key; SFT samples are prompt (not trained) then response
(trained, after the separator the prompt implies: :mod:`data_tools.segments`),
or chat ``messages`` rendered as ``role: content`` lines with only assistant
contents trained. Segments are tokenized as one text (the suffix rule). Any
problem raises :class:`BadRecord` with a short reason that the caller reports
as ``FILE:LINE: reason``.
"""
from __future__ import annotations

import json
from typing import List, Sequence, Tuple

from .segments import pair_segments

try:  # optional: about 3x faster than json on small lines
    import orjson as _fast_json
except ImportError:  # pragma: no cover
    _fast_json = None

Segments = List[Tuple[str, bool]]
REASONS = ("invalid UTF-8", "invalid JSON", "not a JSON object", "missing key", "not a string", "empty text",
           "NUL byte", "bad SFT record")


class BadRecord(ValueError):
    """One bad input line; ``kind`` is one of REASONS."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}{': ' + detail if detail else ''}")
        self.kind = kind


def _text(obj: dict, key: str) -> str:
    if key not in obj:
        raise BadRecord("missing key", repr(key))
    value = obj[key]
    if not isinstance(value, str):
        raise BadRecord("not a string", f"{key!r} is {type(value).__name__}")
    if "\x00" in value:
        raise BadRecord("NUL byte", f"in {key!r}")
    return value


def _load(raw: bytes) -> dict:
    if _fast_json:  # orjson checks UTF-8 itself: decode only to name the error
        try:
            obj = _fast_json.loads(raw)
        except ValueError as e:
            _decode(raw)
            raise BadRecord("invalid JSON", str(e)) from None
    else:
        try:
            obj = json.loads(_decode(raw))
        except ValueError as e:
            raise BadRecord("invalid JSON", str(e)) from None
    if not isinstance(obj, dict):
        raise BadRecord("not a JSON object", type(obj).__name__)
    return obj


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord("invalid UTF-8", f"byte {e.start}") from None


def document_segments(raw, keys: Sequence[str]) -> List[str]:
    """One text per key, each non-empty."""
    obj = raw if isinstance(raw, dict) else _load(raw)  # a table row (data_tools.tables) is a dict
    texts = [_text(obj, k) for k in keys]
    for k, t in zip(keys, texts):
        if not t or t.isspace():
            raise BadRecord("empty text", repr(k))
    return texts


def sft_segments(raw) -> Segments:
    """[(prompt, False), (separator + response, True)] or the rendered chat turns."""
    obj = raw if isinstance(raw, dict) else _load(raw)  # a table row (data_tools.tables) is a dict
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise BadRecord("bad SFT record", "'messages' must be a non-empty list")
        out: Segments = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise BadRecord("bad SFT record", f"message {i} needs a string 'role'")
            content = _text(m, "content")
            trained = m["role"] == "assistant"
            out.append((f"{m['role']}: ", False))
            out.append((content + "\n", trained))
        if not any(t for _, t in out):
            raise BadRecord("bad SFT record", "no assistant message to train on")
        return out
    prompt, response = _text(obj, "prompt"), _text(obj, "response")
    if not response.strip():
        raise BadRecord("empty text", "'response'")
    return pair_segments(prompt, response)
