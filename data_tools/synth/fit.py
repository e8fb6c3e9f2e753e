"""Fit generated text to a token budget with the real tokenizer."""
from __future__ import annotations

from typing import Callable, Optional, Tuple


def largest_fitting(build: Callable[[int], str], count_tokens: Callable[[str], int], lo: int, hi: int,
                    target: int, guess: Optional[int] = None) -> Tuple[int, str, int]:
    """The largest n in [lo, hi] with count_tokens(build(n)) <= target, assuming the
    count grows with n. Returns (n, text, tokens). ``guess`` (a size near the
    answer) bounds the search by doubling, so huge ``hi`` costs nothing. Raises
    ValueError when even ``lo`` does not fit."""
    text = build(lo)
    tokens = count_tokens(text)
    if tokens > target:
        raise ValueError(f"the smallest sample already has {tokens} tokens, over the target of {target}")
    best = (lo, text, tokens)
    if guess is not None:
        probe = max(lo + 1, min(hi, guess))
        while probe < hi:
            text = build(probe)
            tokens = count_tokens(text)
            if tokens > target:
                hi = probe - 1
                break
            lo, best = probe, (probe, text, tokens)
            probe = min(hi, probe * 2)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        text = build(mid)
        tokens = count_tokens(text)
        if tokens <= target:
            lo, best = mid, (mid, text, tokens)
        else:
            hi = mid - 1
    return best
