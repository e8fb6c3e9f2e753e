"""Packed documents (``cu_seqlens``) for the CP attention algorithms.

q/k/v are per-document zigzag shards (:func:`megatron_ext.sharding.shard_packed`):
document i occupies local rows ``[cu[i] / P, cu[i + 1] / P)`` on every rank, its
front half (chunk r) then its back half (chunk 2P-1-r), each ``(cu[i+1]-cu[i]) / 2P``
rows. Every document attends only to itself, causally; pads sit at each
document's end, so no real query ever sees one.

Kernels run once per (document, half) piece: there is no t x t mask. On CUDA
the pieces go through torch's flash SDPA op (:mod:`.blocks`), one call per piece;
that path is not exercised by CPU CI, and flash-attn's varlen kernels (one call for
all documents) are not wired in yet: their private API differs between releases.
"""
from __future__ import annotations

from typing import List, NamedTuple

import torch

from ..sharding import PackedLayout, check_packed

Tensor = torch.Tensor


class LocalDoc(NamedTuple):
    """One document in a rank's local rows: [start, start + 2 * half), front half first."""

    start: int
    half: int


def local_docs(cu_seqlens, world_size: int, s_local: int, causal: bool = True,
               layout: str = "zigzag") -> List[LocalDoc]:
    """The local layout ``cu_seqlens / P`` as LocalDocs; raises ValueError on misuse.

    cu_seqlens: the *global padded* cu_seqlens (int [n_docs + 1], from
    ``pad_packed_lengths``), identical on every rank, or its :class:`PackedLayout`
    (then built once per (P, s_local) and kept); s_local: local rows. Do not modify the list.
    """
    if not causal:
        raise ValueError("cu_seqlens needs causal=True: pads sit at each document's end and would be "
                         "attended by bidirectional attention")
    if layout != "zigzag":
        raise ValueError(f"cu_seqlens needs layout='zigzag' (per-document zigzag from shard_packed), got {layout!r}")
    if isinstance(cu_seqlens, PackedLayout):
        return cu_seqlens.cached(("local_docs", world_size, s_local),
                                 lambda: _local_docs(cu_seqlens, world_size, s_local))
    return _local_docs(cu_seqlens, world_size, s_local)


def _local_docs(cu_seqlens, world_size: int, s_local: int) -> List[LocalDoc]:
    cu = check_packed(cu_seqlens, world_size, s_local * world_size)
    return [LocalDoc(a // world_size, (b - a) // (2 * world_size)) for a, b in zip(cu[:-1], cu[1:])]


def diagonal_forward(kernel, q: Tensor, k: Tensor, v: Tensor, docs: List[LocalDoc], scale: float, acc):
    """Each document's local rows against its own local K/V, causal (top-left: the front
    half precedes the back half in the global order). q: [b, s, h, d] -> out [b, s, h, d]
    in ``acc``, lse [b, h, s]."""
    out = torch.empty(q.shape, dtype=acc, device=q.device)
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=acc, device=q.device)
    for doc in docs:
        rows = slice(doc.start, doc.start + 2 * doc.half)
        o, l = kernel.forward(q[:, rows], k[:, rows], v[:, rows], True, scale)
        out[:, rows] = o
        lse[:, :, rows] = l
    return out, lse


def diagonal_backward(kernel, dout, q, k, v, out, lse, docs: List[LocalDoc], scale: float, acc):
    """Gradients of :func:`diagonal_forward` from the global out/lse: dq, dk, dv in ``acc``."""
    dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=t.device) for t in (q, k, v))
    for doc in docs:
        rows = slice(doc.start, doc.start + 2 * doc.half)
        g = kernel.backward(dout[:, rows], q[:, rows], k[:, rows], v[:, rows], out[:, rows], lse[:, :, rows],
                            True, scale)
        dq[:, rows], dk[:, rows], dv[:, rows] = g
    return dq, dk, dv


def stream_spans(docs: List[LocalDoc], lo: int, hi: int):
    """Documents met by rows [lo, hi) of the *half stream* (all front halves back to back,
    which the back halves mirror). Yields (doc, x0, x1, offset): rows [x0, x1) of the
    doc's halves travel at packed-slice rows [offset, offset + 2 (x1 - x0)), front piece
    then back piece."""
    base = offset = 0
    for doc in docs:
        x0, x1 = max(lo - base, 0), min(hi - base, doc.half)
        if x0 < x1:
            yield doc, x0, x1, offset
            offset += 2 * (x1 - x0)
        base += doc.half
        if base >= hi:
            return
