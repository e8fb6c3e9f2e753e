"""Tokenize a prompt and its response as one text (the suffix rule).

Encoding a prompt and its response apart is wrong for byte-level BPE
(Llama-3, Qwen2, GPT-2 style ``tokenizer.json``): the space before the answer
belongs to the answer's first token (``' 51252'``), and a tokenizer given the
answer alone makes ``'51252'``, another token. sentencepiece hid this by adding
its word-start marker to every text it encodes.

The rule, used by the evaluation, ``synth needle`` and ``preprocess --sft``:

* The text is ``prompt + separator + response``. The separator is what the
  prompt implies: one space when neither side has whitespace at the seam
  (``"... The pass key is"`` + ``"51252"``), else nothing. For sentencepiece
  this is what encoding apart did (its word-start marker is a space).
* The full text is tokenized once. Its tokens split at the **longest common
  prefix** of ``tokenize(full)`` and ``tokenize(prompt)``: that prefix is the
  prompt part, every later token the response part. When the prompt's last
  token merges with the response's first (a prompt ending in ``" "`` or
  mid-word), the merged token is a response token and the model is given the
  shorter prompt part, exactly as it would read the full text.

So ``prompt_ids + response_ids == tokenize(full)`` always holds.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

Segments = Sequence[Tuple[str, bool]]


def implied_separator(prompt: str, response: str) -> str:
    """" " when neither side has whitespace at the seam (and both are non-empty), else ""."""
    if not prompt or not response or prompt[-1].isspace() or response[0].isspace():
        return ""
    return " "


def common_prefix(a: Sequence[int], b: Sequence[int], step: int = 4096) -> int:
    """Length of the longest common prefix of two token lists. Whole ``step``-token slices are
    compared first (in C), so a 100K-token prefix costs a few dozen comparisons, not a loop
    of 100K Python steps (preprocess avoids numpy's import)."""
    a, b = (x if isinstance(x, list) else list(x) for x in (a, b))  # slices compare as lists
    n, i = min(len(a), len(b)), 0
    while i < n and a[i:i + step] == b[i:i + step]:
        i += step
    for j in range(i, min(i + step, n)):
        if a[j] != b[j]:
            return j
    return n


def pair_segments(prompt: str, response: str, separator=None) -> List[Tuple[str, bool]]:
    """[(prompt, False), (separator + response, True)]; ``separator`` None = :func:`implied_separator`."""
    sep = implied_separator(prompt, response) if separator is None else separator
    return [(prompt, False), (sep + response, True)]


def _runs(segments: Segments) -> List[Tuple[str, bool]]:
    """Adjacent segments with the same flag joined: only a change of flag needs a cut."""
    runs: List[Tuple[str, bool]] = []
    for text, flag in segments:
        if runs and runs[-1][1] == bool(flag):
            runs[-1] = (runs[-1][0] + text, runs[-1][1])
        elif text:
            runs.append((text, bool(flag)))
    return runs


def texts_to_encode(segments: Segments) -> List[str]:
    """[full text, then the text up to each change of flag]: what :func:`split_encoded` needs, in order."""
    runs = _runs(segments)
    prefixes, at = [], ""
    for text, _ in runs[:-1]:
        at += text
        prefixes.append(at)
    return ["".join(t for t, _ in runs)] + prefixes


def split_encoded(segments: Segments, encoded: Sequence[Sequence[int]]) -> Tuple[List[int], List[int]]:
    """(tokens of the full text, 0/1 flag per token) from the ids of :func:`texts_to_encode`.

    Each cut is the longest common prefix of the full tokens and that prefix's tokens;
    tokens after the cut take the next run's flag. Raises ValueError when a cut would
    fall before an earlier one (the tokenizer rewrote text already assigned)."""
    runs = _runs(segments)
    full = list(encoded[0])
    if len(encoded) != len(runs):
        raise ValueError(f"need {len(runs)} encodings (texts_to_encode), got {len(encoded)}")
    flags, start = [], 0
    for (text, flag), prefix in zip(runs, list(encoded[1:]) + [None]):
        cut = len(full) if prefix is None else common_prefix(full, prefix)
        if cut < start:
            raise ValueError(f"the tokens of {text[-40:]!r} merge back past the previous segment boundary")
        flags += [int(flag)] * (cut - start)
        start = cut
    return full, flags


def encode_segments(tok, segments: Segments) -> Tuple[List[int], List[int]]:
    """tok (data_tools Tokenizer) over ``segments`` [(text, trained)] -> (ids, 0/1 flags), by the suffix rule."""
    return split_encoded(segments, tok.encode_batch(texts_to_encode(segments)))


def encode_pair(tok, prompt: str, response: str, separator=None) -> Tuple[List[int], List[int]]:
    """(prompt_ids, response_ids) with prompt_ids + response_ids == tok.encode(prompt + sep + response).

    The cut is the longest common prefix with ``tok.encode(prompt)``; raises ValueError
    when either part would be empty."""
    ids, flags = encode_segments(tok, pair_segments(prompt, response, separator))
    cut = flags.index(1) if 1 in flags else len(ids)
    if cut == 0 or cut == len(ids):
        raise ValueError(f"prompt {prompt[-40:]!r} and response {response[:40]!r} leave an empty "
                         f"{'prompt' if cut == 0 else 'response'} part after tokenization")
    return ids[:cut], ids[cut:]
