"""Needle-in-a-haystack and passkey samples, for evaluation and retrieval SFT.

``needle``: haystack text cut to a token length, a needle sentence inserted at
a sentence boundary at a depth percentage, the question after it. ``passkey``:
the usual repeated filler with "The pass key is N." as the needle. Each
sample: ``{"prompt", "response", "meta": {"task", "length", "depth", "needle",
"answer", "n_tokens"}}``, and the prompt fits ``length`` tokens; with
``fit_response`` (the SFT data of ``synth needle``) the whole sample does, as
``preprocess --sft`` tokenizes it: prompt + implied separator + response
(:mod:`data_tools.segments`), counted in ``meta["sample_tokens"]``.
"""
from __future__ import annotations

import random
import re
from typing import List, Tuple

from ..common import iter_texts
from ..segments import implied_separator
from .fit import largest_fitting

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def read_haystack(paths) -> str:
    """Every document of ``paths`` (JSONL key ``text``, or plain text files), space-joined."""
    return " ".join(text for _, text in iter_texts(paths, "text"))


def needle_for(kind: str, rng: random.Random) -> Tuple[str, str, str]:
    """(needle sentence, question, answer)."""
    if kind == "passkey":
        key = str(rng.randrange(10000, 100000))
        return (f"The pass key is {key}. Remember it. {key} is the pass key. ",
                "What is the pass key? The pass key is", key)
    number = str(rng.randrange(1_000_000, 10_000_000))
    return (f"The special magic number is {number}. ",
            "What is the special magic number mentioned in the text above? The special magic number is", number)


def insert_at_depth(haystack: str, needle: str, depth: float) -> str:
    """Put ``needle`` at the sentence boundary closest to ``depth`` percent of the text."""
    if not haystack:
        return needle
    target = len(haystack) * depth / 100.0
    cuts = [0] + [m.end() for m in _SENTENCE_END.finditer(haystack)] + [len(haystack)]
    cut = min(cuts, key=lambda c: abs(c - target))
    glue = "" if cut == 0 or haystack[cut - 1].isspace() else " "
    return haystack[:cut] + glue + needle + haystack[cut:]


def make_prompt(context: str, question: str) -> str:
    return f"{context.strip()}\n\n{question}"


def needle_sample(haystack: str, kind: str, length: int, depth: float, count_tokens, rng: random.Random,
                  fit_response: bool = False) -> dict:
    """One sample of at most ``length`` tokens (the prompt; with ``fit_response`` the prompt,
    its implied separator and the response, tokenized as one text), as much haystack as fits."""
    needle, question, ans = needle_for(kind, rng)
    whole = lambda p: p + implied_separator(p, ans) + ans  # noqa: E731 - what preprocess --sft tokenizes
    source = haystack if kind == "needle" else PASSKEY_FILLER
    reps = 1 + (length * 8) // max(1, len(source))  # enough text: > 8 chars per token is rare
    text = (source * reps) if kind == "passkey" or len(source) < length * 8 else source

    def build(n_chars: int) -> str:
        return make_prompt(insert_at_depth(text[:n_chars], needle, depth), question)

    counter = (lambda p: count_tokens(whole(p))) if fit_response else count_tokens
    n, prompt, tokens = largest_fitting(build, counter, 0, len(text), length, guess=length * 3)
    meta = {"task": kind, "length": length, "depth": depth, "needle": needle, "answer": ans,
            "n_tokens": count_tokens(prompt) if fit_response else tokens, "haystack_chars": n}
    if fit_response:
        meta["sample_tokens"] = tokens
    return {"prompt": prompt, "response": ans, "meta": meta}


def parse_depths(text: str) -> List[float]:
    """'0:100:10' -> 0, 10, ..., 100 (stop included); '0,50,100' -> those."""
    if ":" in text:
        start, stop, step = (float(x) for x in text.split(":"))
        out, v = [], start
        while v <= stop + 1e-9:
            out.append(round(v, 6))
            v += step
        return out
    return [float(x) for x in text.split(",")]
