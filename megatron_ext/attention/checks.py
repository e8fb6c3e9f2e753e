"""Input validation shared by every context-parallel attention entry point.

The cross-rank check runs first, as one tiny all-reduce, so that a rank with a
bad shape makes *every* rank raise instead of leaving the others blocked in a
ring. It is a blocking collective plus a host sync, so it runs once per distinct
(shapes, dtypes, causal, layout, group) signature and the agreement is cached: three
identical calls (or recompute) cost one check. The price: when only some ranks change
their inputs to a signature the others have already agreed on, the changed ranks enter
the check alone and wait for the group's timeout instead of raising at once.
Set ``MEGATRON_EXT_SKIP_SHAPE_CHECK=1`` to skip the collective altogether once a
setup is known to be consistent.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from ..distributed import collective_tensor
from ..sharding import LAYOUTS

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_FIELDS = ("ndim_ok", "b", "s_q", "h", "d", "b_k", "s_k", "h_kv", "d_k", "v_shape_ok", "dtype", "causal", "layout")


_AGREED: dict = {}  # signature key -> True once every rank of its group agreed on it
_MAX_AGREED = 4096  # bound for ever-changing shapes; every rank sees the same calls, so clears agree


def _signature(q, k, v, causal: bool, layout: str) -> list:
    ok = q.dim() == 4 and k.dim() == 4 and v.dim() == 4
    qs = list(q.shape) if ok else [-1] * 4
    ks = list(k.shape) if ok else [-1] * 4
    dtype = _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1
    lay = LAYOUTS.index(layout) if layout in LAYOUTS else -1
    return [int(ok), *qs, *ks, int(ok and v.shape == k.shape), dtype, int(causal), lay]


def _agreement_key(q, k, v, group, causal: bool, layout: str) -> tuple:
    ranks = tuple(dist.get_process_group_ranks(dist.group.WORLD if group is None else group))
    return (tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, k.dtype, v.dtype, causal, layout, ranks)


def check_ranks_agree(q, k, v, group, causal: bool, layout: str) -> None:
    """Raise RuntimeError on every rank if any two ranks called with different shapes.

    Runs the all-reduce once per signature (see the module docstring)."""
    if os.environ.get("MEGATRON_EXT_SKIP_SHAPE_CHECK") == "1" or rank_and_size(group)[1] == 1:
        return
    key = _agreement_key(q, k, v, group, causal, layout)
    if key in _AGREED:
        return
    sig = _signature(q, k, v, causal, layout)
    both = collective_tensor(sig + [-x for x in sig], torch.int64, group)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    both = both.cpu()
    hi, lo = both[: len(sig)], -both[len(sig):]
    differ = [f"{n} in [{int(a)}, {int(b)}]" for n, a, b in zip(_FIELDS, lo, hi) if a != b]
    if differ:
        rank = dist.get_rank(group)
        raise RuntimeError(
            f"context-parallel attention: ranks called with different inputs ({', '.join(differ)}); "
            f"rank {rank} has q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if len(_AGREED) >= _MAX_AGREED:
        _AGREED.clear()
    _AGREED[key] = True


def check_inputs(q, k, v, world_size: int, layout: str, rank: Optional[int] = None) -> None:
    """Local shape rules. q: [b, s_local, h, d]; k, v: [b, s_local, h_kv, d]."""
    where = f"rank {rank}: " if rank is not None else ""
    if layout not in LAYOUTS:
        raise ValueError(f"{where}unknown layout {layout!r}; expected one of {LAYOUTS}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{where}expected bshd 4-D q, k, v; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{where}k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    b, s, h, d = q.shape
    if k.shape[0] != b or k.shape[1] != s:
        raise ValueError(
            f"{where}q, k and v must have the same batch and local length; q has [b={b}, s_local={s}], "
            f"k has [b={k.shape[0]}, s_local={k.shape[1]}]"
        )
    if k.shape[3] != d:
        raise ValueError(f"{where}q head dim {d} != k head dim {k.shape[3]}")
    h_kv = k.shape[2]
    if h_kv == 0 or h % h_kv != 0:
        raise ValueError(f"{where}query heads h={h} must be a multiple of key/value heads h_kv={h_kv}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"{where}q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if layout == "zigzag" and s % 2 != 0:
        raise ValueError(
            f"{where}sequence length {s * world_size} is not divisible by 2P={2 * world_size} "
            f"(P={world_size}, layout='zigzag'): each rank needs an even local length, got {s}"
        )


def validate(q, k, v, group, causal: bool, layout: str, cp_size: Optional[int] = None) -> None:
    """Cross-rank agreement first (so every rank raises together), then local rules.

    ``cp_size`` is the whole CP degree when ``group`` is one factor of it (hybrid).
    """
    check_ranks_agree(q, k, v, group, causal, layout)
    rank, world_size = rank_and_size(group)
    check_inputs(q, k, v, cp_size or world_size, layout, rank if world_size > 1 else None)


class _LocalOnly:
    """A group of one: this rank alone, no communication (e.g. the ring inside pure Ulysses)."""

    def __repr__(self) -> str:
        return "LOCAL_ONLY"


LOCAL_ONLY = _LocalOnly()


def rank_and_size(group) -> tuple:
    """(rank, world_size) in ``group``; (0, 1) for LOCAL_ONLY or without torch.distributed."""
    if group is LOCAL_ONLY or (group is None and not dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)
