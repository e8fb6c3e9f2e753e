"""All-gather context-parallel attention (Llama 3 style).

K and V are gathered in one collective; each rank then attends its own query
chunks against the global keys: a non-causal prefix plus a causal diagonal
block per chunk. The backward re-gathers K/V, recomputes from the global lse,
and reduce-scatters dK/dV in one collective.

Parts: block plan, forward, backward, ``autograd.Function``, public wrapper.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..sharding import (PackedLayout, as_packed_layout, check_packed, local_chunks, owners, packed_index,
                        unshard_packed, unshard_sequence)
from .blocks import select_kernel
from .checks import rank_and_size
from .comm import all_gather_into, reduce_scatter_from
from .function import apply_cp_attention, cp_attention_function
from .merge import accumulator_dtype, merge_into
from .packed import local_docs
from .stats import timed_compute

Tensor = torch.Tensor
# (local q rows, global kv rows, causal)
Piece = Tuple[slice, slice, bool]


def allgather_plan(seq_len: int, rank: int, world_size: int, causal: bool, layout: str) -> List[Piece]:
    """Blocks to compute; the first block of each query chunk covers all its rows."""
    if not causal:
        return [(slice(None), slice(0, seq_len), False)]
    pieces: List[Piece] = []
    for c in local_chunks(seq_len, rank, world_size, layout):
        rows = slice(c.local_start, c.local_end)
        pieces.append((rows, slice(c.global_start, c.global_end), True))
        if c.global_start > 0:
            pieces.append((rows, slice(0, c.global_start), False))
    return pieces


def packed_allgather_plan(cu_seqlens, rank: int, world_size: int) -> List[Piece]:
    """:func:`allgather_plan` per packed document: each local half against its own chunk
    (causal) and the document's earlier rows; nothing crosses a document boundary.
    Kept on a :class:`PackedLayout` per (rank, P)."""
    if isinstance(cu_seqlens, PackedLayout):
        return cu_seqlens.cached(("allgather_plan", rank, world_size),
                                 lambda: _packed_allgather_plan(cu_seqlens, rank, world_size))
    return _packed_allgather_plan(cu_seqlens, rank, world_size)


def _packed_allgather_plan(cu_seqlens, rank: int, world_size: int) -> List[Piece]:
    cu = check_packed(cu_seqlens, world_size)
    pieces: List[Piece] = []
    for start, stop in zip(cu[:-1], cu[1:]):
        c = (stop - start) // (2 * world_size)
        local = start // world_size
        for i, g in enumerate((rank, 2 * world_size - 1 - rank)):
            rows = slice(local + i * c, local + (i + 1) * c)
            pieces.append((rows, slice(start + g * c, start + (g + 1) * c), True))
            if g > 0:
                pieces.append((rows, slice(start, start + g * c), False))
    return pieces


def _plan(seq_len: int, rank: int, world_size: int, causal: bool, layout: str, cu_seqlens) -> List[Piece]:
    if cu_seqlens is None:
        return allgather_plan(seq_len, rank, world_size, causal, layout)
    return packed_allgather_plan(cu_seqlens, rank, world_size)


def _gather_kv(k: Tensor, v: Tensor, group, world_size: int, layout: str, phase: str, cu_seqlens=None) -> Tensor:
    """k, v: [b, s, h_kv, d] -> global kv [2, b, S, h_kv, d], in sequence order."""
    local = torch.stack([k, v])
    gathered = torch.empty((world_size * 2,) + tuple(local.shape[1:]), dtype=local.dtype, device=local.device)
    if world_size == 1:
        gathered.copy_(local)
    else:
        all_gather_into(gathered, local, group, phase)
    shards = list(gathered.view(world_size, *local.shape).unbind(0))
    if cu_seqlens is not None:
        return unshard_packed(shards, 2, cu_seqlens)
    return unshard_sequence(shards, dim=2, layout=layout)


def allgather_forward(q: Tensor, k: Tensor, v: Tensor, group, causal: bool, scale: float, layout: str,
                      cu_seqlens=None):
    """q: [b, s, h, d], k/v: [b, s, h_kv, d] -> out [b, s, h, d] (q dtype), lse [b, h, s] fp32.
    ``cu_seqlens``: global padded cu_seqlens of packed documents."""
    rank, world_size = rank_and_size(group)
    kv = _gather_kv(k, v, group, world_size, layout, "forward", cu_seqlens)
    kernel = select_kernel(q.device, q.dtype)
    acc = accumulator_dtype(q.dtype)
    out = torch.empty(q.shape, dtype=acc, device=q.device)
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=acc, device=q.device)
    covered = set()
    for rows, keys, blk_causal in _plan(kv.shape[2], rank, world_size, causal, layout, cu_seqlens):
        with timed_compute("forward"):
            o_blk, l_blk = kernel.forward(q[:, rows], kv[0][:, keys], kv[1][:, keys], blk_causal, scale)
        if (rows.start, rows.stop) in covered:
            merge_into(out[:, rows], lse[:, :, rows], o_blk, l_blk)
        else:
            out[:, rows] = o_blk
            lse[:, :, rows] = l_blk
            covered.add((rows.start, rows.stop))
    return out.to(q.dtype), lse


def allgather_backward(dout: Tensor, q, k, v, out, lse, group, causal: bool, scale: float, layout: str,
                       cu_seqlens=None):
    """Gradients of :func:`allgather_forward`, fp32 accumulation, input dtype out."""
    rank, world_size = rank_and_size(group)
    kv = _gather_kv(k, v, group, world_size, layout, "backward", cu_seqlens)
    kernel = select_kernel(q.device, q.dtype)
    acc = accumulator_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    # dK/dV accumulate straight into rank order, ready for one reduce-scatter.
    by_rank = torch.zeros((world_size, 2) + tuple(k.shape), dtype=acc, device=k.device)
    seq_len = kv.shape[2]
    # packed: dK/dV accumulate in sequence order, then split by rank (same size as by_rank)
    glob = None if cu_seqlens is None else torch.zeros(kv.shape, dtype=acc, device=k.device)
    for rows, keys, blk_causal in _plan(seq_len, rank, world_size, causal, layout, cu_seqlens):
        with timed_compute("backward"):
            g = kernel.backward(dout[:, rows], q[:, rows], kv[0][:, keys], kv[1][:, keys],
                                out[:, rows], lse[:, :, rows], blk_causal, scale)
        dq[:, rows] += g[0]
        if glob is not None:
            glob[0][:, keys] += g[1]
            glob[1][:, keys] += g[2]
            continue
        for off, n, owner, at in owners(keys.start, keys.stop, seq_len, world_size, layout):
            by_rank[owner, 0, :, at:at + n] += g[1][:, off:off + n]
            by_rank[owner, 1, :, at:at + n] += g[2][:, off:off + n]
        del g
    del kv
    if glob is not None:
        for r in range(world_size):
            by_rank[r] = glob.index_select(2, packed_index(cu_seqlens, r, world_size, glob.device))
        del glob
    mine = torch.empty((2,) + tuple(k.shape), dtype=acc, device=k.device)
    if world_size == 1:
        mine.copy_(by_rank[0])
    else:
        reduce_scatter_from(mine, by_rank.flatten(0, 1), group)
    return dq.to(q.dtype), mine[0].to(k.dtype), mine[1].to(v.dtype)


AllGatherAttentionFunction = cp_attention_function("AllGatherAttentionFunction", allgather_forward, allgather_backward)


def allgather_attention(q: Tensor, k: Tensor, v: Tensor, group=None, *, causal: bool = True,
                        softmax_scale: Optional[float] = None, layout: str = "zigzag", cu_seqlens=None) -> Tensor:
    """Context-parallel attention by all-gathering K/V (GQA sends only h_kv heads).

    q: [b, s_local, h, d]; k, v: [b, s_local, h_kv, d]; returns [b, s_local, h, d]
    in q's dtype. ``group=None`` is the default group; ``softmax_scale`` defaults to d**-0.5.
    ``cu_seqlens``: packed documents (global padded cu_seqlens, q/k/v from ``shard_packed``),
    each attending to itself causally; needs causal=True, layout="zigzag".
    """
    cu_seqlens = as_packed_layout(cu_seqlens)  # read once; forward and backward share what is derived
    if cu_seqlens is not None:
        local_docs(cu_seqlens, rank_and_size(group)[1], q.shape[1], causal, layout)
    return apply_cp_attention(AllGatherAttentionFunction, q, k, v, group, causal, softmax_scale, layout, cu_seqlens)
