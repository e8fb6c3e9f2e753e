"""Opt-in accounting for CP attention: bytes each rank sends and the CPU time
its block kernels take, per phase ("forward"/"backward").

Counted by the code that sends (P2P sizes, or a collective's per-rank share of
a ring algorithm), never estimated afterwards. Off unless a recorder is open::

    with record_cp_stats() as stats:
        out = ring_attention(q, k, v); out.backward(g)
    stats.bytes_sent["forward"], stats.compute_s["backward"]
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List

import torch

_RECORDERS: List["CPStats"] = []


@dataclass
class CPStats:
    """Totals since the recorder opened, on this rank."""

    bytes_sent: Dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})
    """Bytes this rank put on the wire, by phase."""
    compute_s: Dict[str, float] = field(default_factory=lambda: {"forward": 0.0, "backward": 0.0})
    """Thread CPU seconds inside block kernels, by phase (immune to oversubscribed cores)."""


@contextlib.contextmanager
def record_cp_stats():
    """Collect :class:`CPStats` for the calls made inside the block."""
    stats = CPStats()
    _RECORDERS.append(stats)
    try:
        yield stats
    finally:
        _RECORDERS.remove(stats)


def count_sent(phase: str, tensors: Iterable[torch.Tensor], times: float = 1.0) -> None:
    """Add ``times`` x the bytes of ``tensors`` to this rank's sent total."""
    if _RECORDERS:
        n = int(times * sum(t.numel() * t.element_size() for t in tensors))
        for r in _RECORDERS:
            r.bytes_sent[phase] += n


@contextlib.contextmanager
def timed_compute(phase: str):
    """Charge the enclosed kernel work to ``phase``."""
    if not _RECORDERS:
        yield
        return
    t0 = time.thread_time()
    try:
        yield
    finally:
        dt = time.thread_time() - t0
        for r in _RECORDERS:
            r.compute_s[phase] += dt
