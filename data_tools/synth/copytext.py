"""Copy-rich pretraining text: plain documents rearranged so that copying from the context pays.

Three kinds, drawn with configurable weights, each about ``target_tokens`` long:

``span``
    A window of one document in which a span of ``span_tokens`` (30-150) tokens recurs
    later, after a gap of the document's own following text.
``repeat``
    A document (cut to half the target) twice, back to back.
``keys``
    Changelog-style entries that set labelled random strings (digits or letters and digits;
    some labels several words long), the document's own lines, then entries that name each
    label again with its string (in another order).

Nothing here uses the evaluation's wording: a source document holding any of
:data:`EVAL_PHRASES` is skipped, and :func:`eval_hits` lets callers scan any text for them.
Each sample: ``{"text", "meta": {"task": "copy", "kind", "doc", "n_tokens", ...}}``.
"""
from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

from .fit import largest_fitting
from .needle import PASSKEY_FILLER

KINDS = ("span", "repeat", "keys")
EVAL_PHRASES: Tuple[str, ...] = tuple(s.strip() + "." for s in PASSKEY_FILLER.split(".") if s.strip()) + (
    "pass key", "passkey", "magic number", "Remember it.")
"""Distinctive phrases of the passkey and needle templates (data_tools.synth.needle), lower-cased on match."""
LABELS = ("build", "upload tag", "ticket", "mirror sync token", "snapshot", "bug report id", "tarball checksum",
          "signing fingerprint", "release series", "patch queue head")
"""Entry labels of the ``keys`` kind (1-3 words: the multi-token ones are looked up by several pieces)."""
_WORD = re.compile(r"\S+\s*")


@dataclass
class CopyConfig:
    """How copy-rich samples are built."""

    target_tokens: int = 512
    """Tokens per sample (a sample stops at or below this, as closely as its pieces allow)."""
    kinds: Tuple[str, ...] = KINDS
    """Kinds to draw from."""
    weights: Tuple[float, ...] = (1.0, 1.0, 1.0)
    """Relative weight of each of ``kinds``."""
    span_tokens: Tuple[int, int] = (30, 150)
    """Token length range of the recurring span (kind ``span``)."""
    keys_per_sample: Tuple[int, int] = (3, 6)
    """Labelled strings per sample (kind ``keys``)."""
    seed: int = 0
    """Seed of every choice."""


def eval_hits(text: str) -> List[str]:
    """The :data:`EVAL_PHRASES` found in ``text`` (case-insensitive)."""
    low = text.lower()
    return [p for p in EVAL_PHRASES if p.lower() in low]


def random_value(rng: random.Random) -> str:
    """A random string: 4-9 digits, or 6-12 letters and digits."""
    if rng.random() < 0.5:
        return str(rng.randrange(10 ** 3, 10 ** rng.randint(4, 9)))
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(rng.randint(6, 12)))


class CopyBuilder:
    """Samples from ``sources`` (document texts); ``count_tokens(text) -> int`` is the real tokenizer's."""

    def __init__(self, sources: Sequence[str], count_tokens: Callable[[str], int], cfg: CopyConfig):
        if len(cfg.kinds) != len(cfg.weights) or not cfg.kinds or any(k not in KINDS for k in cfg.kinds):
            raise ValueError(f"kinds {cfg.kinds} / weights {cfg.weights}: expected one weight per kind of {KINDS}")
        lo, hi = cfg.span_tokens
        if not 0 < lo <= hi or 2 * hi >= cfg.target_tokens:
            raise ValueError(f"span_tokens {lo}:{hi} must satisfy 0 < lo <= hi and 2 x hi < target_tokens "
                             f"{cfg.target_tokens}")
        self.docs = [i for i, t in enumerate(sources) if len(_WORD.findall(t)) >= 8 and not eval_hits(t)]
        self.skipped = sum(bool(eval_hits(t)) for t in sources)
        if not self.docs:
            raise ValueError(f"none of the {len(sources)} source documents is usable (8+ words, no evaluation "
                             f"wording; {self.skipped} held evaluation wording)")
        self.sources, self.count, self.cfg = sources, count_tokens, cfg
        self.rng = random.Random(cfg.seed)

    def samples(self) -> Iterator[dict]:
        """Endless samples; kind and document drawn from the seeded generator."""
        while True:
            kind = self.rng.choices(self.cfg.kinds, weights=self.cfg.weights)[0]
            doc = self.rng.choice(self.docs)
            text, extra = getattr(self, f"_{kind}")(_WORD.findall(self.sources[doc]))
            yield {"text": text, "meta": dict(task="copy", kind=kind, doc=doc, n_tokens=self.count(text), **extra)}

    def _fit_words(self, words: List[str], target: int) -> List[str]:
        """The longest prefix of ``words`` within ``target`` tokens (at least one word unless there are none
        or ``target`` is 0)."""
        if not words or target <= 0:
            return []
        if self.count(words[0]) >= target:
            return words[:1]
        n, _, _ = largest_fitting(lambda k: "".join(words[:k]), self.count, 1, len(words), target,
                                  guess=min(len(words), target // 2 + 1))
        return words[:n]

    def _span(self, words: List[str]) -> Tuple[str, Dict]:
        lo, hi = self.cfg.span_tokens
        want = self.rng.randint(lo, hi)
        start = self.rng.randrange(max(1, len(words) // 2))
        span = self._fit_words(words[start:], want)
        if len(span) < 2 or start + len(span) >= len(words):  # a short document: its start is the span
            start, span = 0, self._fit_words(words, want)
        span_tokens = self.count("".join(span))
        budget = self.cfg.target_tokens - 2 * span_tokens
        pre_budget = self.rng.randint(0, max(0, budget // 3))
        pre = self._fit_words(words[max(0, start - 4 * pre_budget):start][::-1], pre_budget)[::-1] if start else []
        rest = words[start + len(span):] or words
        gap = self._fit_words(rest, max(1, budget - self.count("".join(pre)) - 2))
        text = "".join(pre + span + gap) + ("" if gap[-1][-1:].isspace() else " ") + "".join(span)
        return text, {"span_tokens": span_tokens, "span": "".join(span)}

    def _repeat(self, words: List[str]) -> Tuple[str, Dict]:
        half = "".join(self._fit_words(words, self.cfg.target_tokens // 2 - 1)).rstrip()
        return f"{half}\n\n{half}", {"span_tokens": self.count(half)}

    def _keys(self, words: List[str]) -> Tuple[str, Dict]:
        rng = self.rng
        labels = rng.sample(LABELS, rng.randint(*self.cfg.keys_per_sample))
        values = [random_value(rng) for _ in labels]
        lines = [ln.strip() for ln in "".join(words).splitlines() if ln.strip()]
        if len(lines) < 3:  # prose without line breaks: lines of 10 words
            lines = lines[:1] + ["* " + "".join(words[i:i + 10]).strip() for i in range(0, len(words), 10)]
        default = "package (1.0-1) unstable; urgency=medium"
        head, body = (lines[0][:80], lines[1:]) if len(lines) > 1 else (default, lines)
        order = rng.sample(range(len(labels)), len(labels))
        body = [f"  {ln}" for ln in body] or ["  * No other change."]
        for k in range(len(labels), 0, -1):  # fewer keys when even no filler line fits (a small vocabulary)
            sets = [f"  * Set {lab} to {val}." for lab, val in zip(labels[:k], values[:k])]
            checks = [f"  * Checked {labels[i]}: {values[i]}." for i in order if i < k]

            def build(n: int) -> str:
                return "\n".join([head, ""] + sets + body[:n] + checks) + "\n"

            try:
                n, text, _ = largest_fitting(build, self.count, 0, len(body), self.cfg.target_tokens,
                                             guess=min(len(body), 8))
            except ValueError:
                if k == 1:
                    raise
                continue
            return text, {"keys": dict(zip(labels[:k], values[:k])), "filler_lines": n}
