"""CIP, chunk-interleaved pretraining (LongSkywork): K documents cut into
chunks at natural boundaries and interleaved into one long document.

Each sample: ``{"text", "meta": {"task": "cip", "segments": [{"doc", "start",
"end"}...], "separator", "n_tokens"}}`` with ``text == separator.join(
source[doc][start:end] for each segment)``; a document's segments appear in
order and are contiguous (each start is the previous end). ``mode="concat"``
concatenates whole documents instead (the ablation baseline).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence

from .fit import largest_fitting

_BOUNDARY = re.compile(r"[.!?]\s|\n")


@dataclass
class CipConfig:
    """How CIP samples are built."""

    target_tokens: int = 32768
    """Tokens per sample (the last segment is cut to fit; never more)."""
    k: int = 4
    """Documents interleaved at a time; a finished one is replaced from the pool."""
    min_chunk_chars: int = 200
    """Smallest chunk, in characters."""
    max_chunk_chars: int = 2000
    """Largest chunk, in characters."""
    separator: str = "\n\n"
    """Placed between consecutive segments."""
    allow_reuse: bool = False
    """Let documents appear in more than one sample (else each is used once)."""
    mode: str = "cip"
    """"cip" interleaves chunks; "concat" concatenates whole documents."""
    seed: int = 0
    """Seed of the document order and the chunk sizes."""


def split_point(text: str, start: int, rng: random.Random, cfg: CipConfig) -> int:
    """End of the chunk that starts at ``start``: a sentence end or line break in
    the back half of a random-size window, else whitespace, else the hard size."""
    size = rng.randint(cfg.min_chunk_chars, cfg.max_chunk_chars)
    end = start + size
    if end >= len(text):
        return len(text)
    window = text[start + size // 2:end]
    ends = [m.end() for m in _BOUNDARY.finditer(window)]
    if ends:
        return start + size // 2 + ends[-1]
    space = window.rfind(" ")
    return start + size // 2 + space + 1 if space >= 0 else end


class CipBuilder:
    """Draws documents from ``sources`` and yields samples until the pool runs out."""

    def __init__(self, sources: Sequence[str], count_tokens, cfg: CipConfig):
        self.sources, self.count, self.cfg = sources, count_tokens, cfg
        self.rng = random.Random(cfg.seed)
        self.order = list(range(len(sources)))
        self.rng.shuffle(self.order)
        self.next_doc = 0
        self.exhausted = False

    def _draw(self):
        if self.next_doc >= len(self.order):
            if not self.cfg.allow_reuse:
                self.exhausted = True
                return None
            self.rng.shuffle(self.order)
            self.next_doc = 0
        d = self.order[self.next_doc]
        self.next_doc += 1
        return d

    def _segments(self) -> List[Dict[str, int]]:
        """Segments until their estimated tokens pass the target."""
        cfg, segs, est = self.cfg, [], 0
        open_docs: List[List[int]] = []  # [doc, position]
        while est < cfg.target_tokens:
            while len(open_docs) < (cfg.k if cfg.mode == "cip" else 1):
                d = self._draw()
                if d is None:
                    break
                if self.sources[d]:
                    open_docs.append([d, 0])
            if not open_docs:
                break
            slot = self.rng.randrange(len(open_docs)) if cfg.mode == "cip" else 0
            d, pos = open_docs[slot]
            text = self.sources[d]
            end = split_point(text, pos, self.rng, cfg) if cfg.mode == "cip" else len(text)
            segs.append({"doc": d, "start": pos, "end": end})
            est += self.count(text[pos:end]) + 1
            if end >= len(text):
                open_docs.pop(slot)
            else:
                open_docs[slot][1] = end
        return segs

    def render(self, segs) -> str:
        return self.cfg.separator.join(self.sources[s["doc"]][s["start"]:s["end"]] for s in segs)

    def samples(self) -> Iterator[dict]:
        while True:
            segs = self._segments()
            if not segs:
                return
            last = segs[-1]

            def build(n_chars: int, segs=segs, last=last) -> str:
                return self.render(segs[:-1] + [{**last, "end": last["start"] + n_chars}])

            n, text, tokens = largest_fitting(build, self.count, 0, last["end"] - last["start"], self.cfg.target_tokens)
            # (the last segment is at most one chunk, so plain bisection over its length is cheap)
            segs = segs[:-1] + ([{**last, "end": last["start"] + n}] if n else [])
            # A sample cut short because the pool ran out says so (the CLI counts these).
            yield {"text": text, "meta": {"task": "cip", "mode": self.cfg.mode, "segments": segs,
                                          "separator": self.cfg.separator, "n_tokens": tokens,
                                          "partial": self.exhausted}}
