"""Sequence sharding for context parallelism.

Two layouts split a sequence of length S over P ranks:

* ``zigzag`` cuts the sequence into 2P equal chunks; rank r holds chunk r followed
  by chunk 2P-1-r. Under causal masking every rank then does the same work.
* ``contiguous`` gives rank r the r-th of P equal pieces.

A length that does not divide raises ``ValueError``; nothing is padded or dropped.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

LAYOUTS = ("zigzag", "contiguous")


class LocalChunk(NamedTuple):
    """One contiguous run of a rank's shard: local rows [local_start, local_end)
    hold global positions [global_start, global_end)."""

    local_start: int
    local_end: int
    global_start: int
    global_end: int


def _num_chunks(world_size: int, layout: str) -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    return 2 * world_size if layout == "zigzag" else world_size


def check_divisible(seq_len: int, world_size: int, layout: str) -> int:
    """Return the chunk length, or raise ValueError naming length, P and layout."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    n = _num_chunks(world_size, layout)
    if seq_len % n != 0:
        need = "2P" if layout == "zigzag" else "P"
        raise ValueError(
            f"sequence length {seq_len} is not divisible by {need}={n} "
            f"(P={world_size}, layout={layout!r}); pad or pack the batch to a multiple of {n}"
        )
    return seq_len // n


def chunk_order(rank: int, world_size: int, layout: str) -> List[int]:
    """Global chunk indices held by ``rank``, in local order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    if _num_chunks(world_size, layout) == world_size:
        return [rank]
    return [rank, 2 * world_size - 1 - rank]


def local_chunks(seq_len: int, rank: int, world_size: int, layout: str) -> List[LocalChunk]:
    """Map this rank's local rows to global positions, one entry per chunk."""
    c = check_divisible(seq_len, world_size, layout)
    return [
        LocalChunk(i * c, (i + 1) * c, g * c, (g + 1) * c)
        for i, g in enumerate(chunk_order(rank, world_size, layout))
    ]


def shard_sequence(x: torch.Tensor, dim: int, rank: int, world_size: int, layout: str = "zigzag") -> torch.Tensor:
    """This rank's shard of ``x`` along ``dim``.

    x: [..., S, ...] with S at ``dim`` -> [..., S / P, ...] (a new tensor for zigzag,
    a view for contiguous).
    """
    seq_len = x.shape[dim]
    c = check_divisible(seq_len, world_size, layout)
    pieces = [x.narrow(dim, g * c, c) for g in chunk_order(rank, world_size, layout)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def unshard_sequence(shards: Sequence[torch.Tensor], dim: int, layout: str = "zigzag") -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: all ranks' shards (rank order) -> full tensor.

    shards: P tensors [..., S / P, ...] -> [..., S, ...].
    """
    world_size = len(shards)
    n = _num_chunks(world_size, layout)
    s_local = shards[0].shape[dim]
    for r, s in enumerate(shards):
        if s.shape != shards[0].shape:
            raise ValueError(f"shard {r} has shape {tuple(s.shape)}, shard 0 has {tuple(shards[0].shape)}")
    per_rank = n // world_size
    if s_local % per_rank:
        raise ValueError(f"shard length {s_local} along dim {dim} is odd; a {layout} shard holds 2 equal chunks")
    c = s_local // per_rank
    chunks: List[torch.Tensor] = [None] * n  # type: ignore[list-item]
    for r, s in enumerate(shards):
        for i, g in enumerate(chunk_order(r, world_size, layout)):
            chunks[g] = s.narrow(dim, i * c, c)
    return torch.cat(chunks, dim=dim)


def position_ids(seq_len: int, rank: int, world_size: int, layout: str = "zigzag") -> torch.Tensor:
    """Global positions of this rank's tokens: LongTensor [S / P]."""
    return shard_sequence(torch.arange(seq_len, dtype=torch.long), 0, rank, world_size, layout)


def owners(start: int, stop: int, seq_len: int, world_size: int, layout: str) -> List[Tuple[int, int, int, int]]:
    """Split global positions [start, stop) by owning rank.

    Returns (offset, length, rank, local_start): positions start+offset ...
    start+offset+length-1 live on ``rank`` at local rows local_start ... .
    """
    c = check_divisible(seq_len, world_size, layout)
    where = {g: (r, i) for r in range(world_size) for i, g in enumerate(chunk_order(r, world_size, layout))}
    pieces = []
    pos = start
    while pos < stop:
        g = pos // c
        end = min(stop, (g + 1) * c)
        rank, slot = where[g]
        pieces.append((pos - start, end - pos, rank, slot * c + pos - g * c))
        pos = end
    return pieces


# ---------------------------------------------------------------------------
# Packed documents (thd): per-document zigzag. Every document is padded to a
# multiple of 2P (pads at its end) and rank r keeps chunk r then chunk 2P-1-r
# of each document, in document order. The local layout is then the same on
# every rank, cu_seqlens_padded / P, so K/V can travel with no metadata.


def pad_packed_lengths(doc_lengths, world_size: int) -> torch.Tensor:
    """Global padded cu_seqlens: int32 [n_docs + 1], each document rounded up to a multiple of 2P.

    doc_lengths: ints (list or 1-D tensor) of real document lengths, each >= 1.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    lengths = [int(n) for n in (doc_lengths.tolist() if torch.is_tensor(doc_lengths) else doc_lengths)]
    if not lengths:
        raise ValueError("pad_packed_lengths: no documents (doc_lengths is empty)")
    for i, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"pad_packed_lengths: document {i} has length {n}; every document needs >= 1 token")
    m = 2 * world_size
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + -(-n // m) * m)
    return torch.tensor(cu, dtype=torch.int32)


class PackedLayout:
    """One micro-batch's global padded cu_seqlens (:func:`pad_packed_lengths`) on the host.

    Built once where the batch is built, then handed to every layer and pass instead of a
    cu_seqlens tensor: :func:`check_packed` validates it once per world size, and what the
    CP attention derives from it (per-document spans, index tensors) is kept in ``memo``,
    so no layer reads a device tensor back (no ``.cpu()`` / ``.tolist()``) or rebuilds spans.

    cu_seqlens_padded: int [n_docs + 1], a tensor (read once, here) or ints.
    """

    def __init__(self, cu_seqlens_padded):
        src = cu_seqlens_padded.tolist() if torch.is_tensor(cu_seqlens_padded) else cu_seqlens_padded
        self.cu: Tuple[int, ...] = tuple(int(c) for c in src)
        self.memo: dict = {}  # (what, *key) -> derived metadata; read-only once stored

    def cached(self, key: tuple, build):
        """``memo[key]``, built by ``build()`` on first use."""
        if key not in self.memo:
            self.memo[key] = build()
        return self.memo[key]

    def __repr__(self) -> str:
        return f"PackedLayout({list(self.cu[:8])}{'...' if len(self.cu) > 8 else ''}, n_docs={len(self.cu) - 1})"


def as_packed_layout(cu_seqlens_padded) -> Optional[PackedLayout]:
    """``cu_seqlens_padded`` as a :class:`PackedLayout` (None stays None; a layout is returned as is)."""
    if cu_seqlens_padded is None or isinstance(cu_seqlens_padded, PackedLayout):
        return cu_seqlens_padded
    return PackedLayout(cu_seqlens_padded)


def check_packed(cu_seqlens_padded, world_size: int, total: Optional[int] = None) -> List[int]:
    """Validate global padded cu_seqlens (starts at 0, every document a positive multiple
    of 2P, ends at ``total`` when given) and return it as a list of ints (do not modify it).
    A :class:`PackedLayout` is validated once per world size; a tensor is read each call."""
    if isinstance(cu_seqlens_padded, PackedLayout):
        cu = cu_seqlens_padded.cached(("checked", world_size), lambda: _check_cu(cu_seqlens_padded.cu, world_size))
    else:
        cu = _check_cu(cu_seqlens_padded.tolist() if torch.is_tensor(cu_seqlens_padded) else cu_seqlens_padded,
                       world_size)
    if total is not None and cu[-1] != total:
        raise ValueError(f"cu_seqlens_padded ends at {cu[-1]} but the packed sequence has {total} tokens")
    return cu


def _check_cu(values, world_size: int) -> List[int]:
    cu = [int(c) for c in values]
    m = 2 * world_size
    if len(cu) < 2 or cu[0] != 0:
        raise ValueError(f"cu_seqlens_padded must start at 0 and hold >= 1 document, got {cu[:8]}")
    for i in range(len(cu) - 1):
        n = cu[i + 1] - cu[i]
        if n < 1 or n % m:
            raise ValueError(f"cu_seqlens_padded: document {i} has padded length {n}, not a positive multiple "
                             f"of 2P={m} (P={world_size}); build it with pad_packed_lengths")
    return cu


def packed_index(cu_seqlens_padded, rank: int, world_size: int, device=None) -> torch.Tensor:
    """Global rows held by ``rank``: LongTensor [t / P] on ``device`` (default: host), chunk r
    then 2P-1-r of each document. Kept per (rank, P, device) on a :class:`PackedLayout`."""
    if isinstance(cu_seqlens_padded, PackedLayout):
        key = ("index", rank, world_size, str(torch.device(device or "cpu")))
        return cu_seqlens_padded.cached(key, lambda: _packed_index(cu_seqlens_padded, rank, world_size, device))
    return _packed_index(cu_seqlens_padded, rank, world_size, device)


def _packed_index(cu_seqlens_padded, rank: int, world_size: int, device) -> torch.Tensor:
    cu = check_packed(cu_seqlens_padded, world_size)
    order = chunk_order(rank, world_size, "zigzag")
    parts = []
    for start, stop in zip(cu[:-1], cu[1:]):
        c = (stop - start) // (2 * world_size)
        parts += [torch.arange(start + g * c, start + (g + 1) * c) for g in order]
    index = torch.cat(parts)
    return index if device is None else index.to(device)


def shard_packed(x: torch.Tensor, dim: int, cu_seqlens_padded, rank: int, world_size: int) -> torch.Tensor:
    """This rank's per-document zigzag shard: x [..., t, ...] at ``dim`` -> [..., t / P, ...]."""
    check_packed(cu_seqlens_padded, world_size, x.shape[dim])
    return x.index_select(dim, packed_index(cu_seqlens_padded, rank, world_size, x.device))


def unshard_packed(shards: Sequence[torch.Tensor], dim: int, cu_seqlens_padded) -> torch.Tensor:
    """Inverse of :func:`shard_packed`: P shards [..., t / P, ...] (rank order) -> [..., t, ...]."""
    world_size = len(shards)
    cu = check_packed(cu_seqlens_padded, world_size)
    for r, s in enumerate(shards):
        if s.shape[dim] * world_size != cu[-1]:
            raise ValueError(f"shard {r} has {s.shape[dim]} rows along dim {dim}; cu_seqlens_padded needs "
                             f"{cu[-1]} / {world_size} = {cu[-1] / world_size}")
    out_shape = list(shards[0].shape)
    out_shape[dim] = cu[-1]
    out = shards[0].new_empty(out_shape)
    for r, s in enumerate(shards):
        out.index_copy_(dim, packed_index(cu_seqlens_padded, r, world_size, s.device), s)
    return out


def packed_position_ids(cu_seqlens_padded, rank: int, world_size: int) -> torch.Tensor:
    """Positions of this rank's tokens, restarting at 0 in every document: LongTensor [t / P]."""
    cu = torch.tensor(check_packed(cu_seqlens_padded, world_size), dtype=torch.long)
    idx = packed_index(cu, rank, world_size)
    doc = torch.searchsorted(cu, idx, right=True) - 1
    return idx - cu[doc]
