"""2D hybrid context parallelism (USP): Ulysses inside ``ulysses_group``
(intra-node, all-to-all), ring across ``ring_group`` (P2P between nodes).

The CP rank is ``ring_rank * U + ulysses_rank``. After the Ulysses all-to-all
a rank holds its Ulysses group's tokens for its head group; under the global
zigzag over P = U*R ranks those tokens are exactly one zigzag shard over R
ranks, so the ring runs unchanged on them. The algorithm parts live in
:mod:`.ulysses` (forward, backward, Function); this file adds the public
wrapper and the process-group mesh.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..sharding import as_packed_layout
from .checks import rank_and_size, validate
from .packed import local_docs
from .ulysses import UlyssesAttentionFunction, kv_replication

Tensor = torch.Tensor


@dataclass
class CPMesh:
    """The two factors of a context-parallel group."""

    ulysses_group: Optional[dist.ProcessGroup]
    """Adjacent CP ranks (same node): all-to-all over heads."""
    ring_group: Optional[dist.ProcessGroup]
    """Ranks with the same Ulysses index across Ulysses groups: P2P ring."""
    ulysses_size: int
    """U, the Ulysses degree."""
    ring_size: int
    """R, the ring degree; U * R is the CP size."""


def build_cp_mesh(cp_group: Optional[dist.ProcessGroup], ulysses_size: int) -> CPMesh:
    """Split ``cp_group`` (size P) into U x R subgroups, Ulysses on adjacent ranks.

    Collective over the default group: every rank of the job calls it, each with
    its own CP group (CP groups are learned with one all_gather_object), because
    ``new_group`` must be called by all ranks for every subgroup.
    """
    _, cp_size = rank_and_size(cp_group)
    if ulysses_size < 1 or cp_size % ulysses_size:
        raise ValueError(f"Ulysses size {ulysses_size} must divide the CP size {cp_size} "
                         f"(valid: {[u for u in range(1, cp_size + 1) if cp_size % u == 0]})")
    mine = dist.get_process_group_ranks(cp_group) if cp_group is not None else list(range(dist.get_world_size()))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    ring_size = cp_size // ulysses_size
    found = {}
    for ranks in sorted({tuple(r) for r in every}):
        for i in range(ring_size):  # consecutive blocks of U: one Ulysses group each
            found.setdefault(("u", ranks[i * ulysses_size:(i + 1) * ulysses_size]), None)
        for j in range(ulysses_size):  # stride U: one ring each
            found.setdefault(("r", ranks[j::ulysses_size]), None)
    me = dist.get_rank()
    uly = ring = None
    for kind, ranks in found:  # same order on every rank
        g = dist.new_group(list(ranks))
        if me in ranks:
            uly, ring = (g, ring) if kind == "u" else (uly, g)
    return CPMesh(uly, ring, ulysses_size, ring_size)


def hybrid_attention(q: Tensor, k: Tensor, v: Tensor, ulysses_group, ring_group, *, causal: bool = True,
                     softmax_scale: Optional[float] = None, layout: str = "zigzag", cu_seqlens=None) -> Tensor:
    """Ulysses x ring attention, exact for every factorisation U x R of the CP size.

    q: [b, s_local, h, d]; k, v: [b, s_local, h_kv, d], sharded with ``layout`` over
    the CP rank ``ring_rank * U + ulysses_rank``. Returns [b, s_local, h, d] in q's
    dtype. Needs h divisible by U; KV heads are replicated just enough when U > h_kv.
    ``cu_seqlens``: packed documents (global padded cu_seqlens over the whole CP group,
    q/k/v from ``shard_packed`` at the CP rank), each attending to itself causally.
    """
    u_size, r_size = rank_and_size(ulysses_group)[1], rank_and_size(ring_group)[1]
    cu_seqlens = as_packed_layout(cu_seqlens)  # read once; forward and backward share what is derived
    if cu_seqlens is not None:
        local_docs(cu_seqlens, u_size * r_size, q.shape[1], causal, layout)
    validate(q, k, v, ulysses_group, causal, layout, cp_size=u_size * r_size)
    validate(q, k, v, ring_group, causal, layout, cp_size=u_size * r_size)
    kv_replication(q.shape[2], k.shape[2], u_size)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return UlyssesAttentionFunction.apply(q, k, v, ulysses_group, ring_group, causal, scale, layout, cu_seqlens)
