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
import math
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


def modeled_bytes(method: str, *, b: int, s_local: int, h: int, h_kv: int, d: int, cp_size: int,
                  ulysses_size: int = 1, elem: int = 4, acc_elem: int = 4) -> Dict[str, float]:
    """Analytic bytes sent per rank per layer call, by phase.

    ``elem`` is the input element size, ``acc_elem`` that of fp32 gradient
    accumulators (dK/dV travel or are reduce-scattered in fp32).

    * ring / all-gather forward: 2 * S * d_kv * (P-1)/P, with S = P * s_local and
      d_kv = h_kv * d. Backward: the same K/V again plus dK/dV, (P-1) blocks for
      both: the ring's accumulators make P-1 hops (the first rank to use a slice
      starts one), all-gather does one ring reduce-scatter.
    * Ulysses (degree U): four all-to-alls that each keep 1/U at home: q/k/v and
      out forward, dout and dq/dk/dv backward; KV heads count after replication
      to lcm(h_kv, U).
    * hybrid: Ulysses over U plus a ring over R = P/U on the replicated KV heads.
    """
    kv_local = 2 * b * s_local * h_kv * d
    if method in ("ring", "allgather"):
        p = cp_size
        return {"forward": kv_local * (p - 1) * elem,
                "backward": kv_local * (p - 1) * (elem + acc_elem)}
    if method not in ("ulysses", "hybrid"):
        raise ValueError(f"unknown CP method {method!r}")
    u = cp_size if method == "ulysses" else ulysses_size
    r = cp_size // u
    h_kv_rep = h_kv * (u // math.gcd(h_kv, u))
    keep = (u - 1) / u
    qkv = b * s_local * (h + 2 * h_kv_rep) * d * elem
    o = b * s_local * h * d * elem
    ring_kv = 2 * b * s_local * h_kv_rep * d  # per rank after the all-to-all: U*s_local tokens, h_kv_rep/U heads
    ring_fwd = ring_kv * (r - 1) * elem
    ring_bwd = ring_fwd + ring_kv * (r - 1) * acc_elem
    return {"forward": keep * (qkv + o) + ring_fwd, "backward": keep * (o + qkv) + ring_bwd}
