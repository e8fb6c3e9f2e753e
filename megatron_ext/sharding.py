"""Sequence sharding for context parallelism.

Two layouts split a sequence of length S over P ranks:

* ``zigzag`` cuts the sequence into 2P equal chunks; rank r holds chunk r followed
  by chunk 2P-1-r. Under causal masking every rank then does the same work.
* ``contiguous`` gives rank r the r-th of P equal pieces.

A length that does not divide raises ``ValueError``; nothing is padded or dropped.
"""
from __future__ import annotations

from typing import List, NamedTuple, Sequence, Tuple

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
