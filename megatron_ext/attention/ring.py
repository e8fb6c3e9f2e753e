"""Ring attention: K/V blocks rotate around the group by P2P while every rank
keeps its queries (Liu et al. 2023; zigzag balancing as in ring-flash-attention).

Parts: step plan, forward, backward, ``autograd.Function``, public wrapper.
The next K/V block is in flight while the current one is computed (double
buffer); in backward the travelling dK/dV accumulators come home after P hops.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .blocks import select_kernel
from .checks import rank_and_size
from .comm import TAG_DKV, TAG_KV, RingComm, wait_all
from .function import apply_cp_attention, cp_attention_function
from .merge import accumulator_dtype, merge_into
from .stats import timed_compute

Tensor = torch.Tensor
# (q rows, kv rows, causal) of one block; ``None`` means the block is fully masked.
BlockPlan = Optional[Tuple[slice, slice, bool]]
_ALL = slice(None)


def ring_step_plan(rank: int, source: int, world_size: int, s_local: int, causal: bool, layout: str) -> BlockPlan:
    """Which part of the block (my q, kv from ``source``) is unmasked.

    zigzag: rank r holds chunks (r, 2P-1-r). KV from an earlier rank only meets
    our queries in its first chunk; from a later rank only our second chunk of
    queries sees it, but sees all of it. Both are half a block: equal work.
    """
    if not causal:
        return _ALL, _ALL, False
    if source == rank:
        return _ALL, _ALL, True
    if layout == "contiguous":
        return (_ALL, _ALL, False) if source < rank else None
    half = s_local // 2
    if source < rank:
        return _ALL, slice(0, half), False
    return slice(half, None), _ALL, False


class _Ring:
    """Per-call state: the group, its comm and the rotation buffers."""

    def __init__(self, group):
        self.rank, self.world_size = rank_and_size(group)
        self.comm = RingComm(group) if self.world_size > 1 else None
        self._spare: List[List[Tensor]] = []

    def rotate(self, tensors: List[Tensor], tag: int, phase: str):
        """Start sending ``tensors`` on; returns (works, receive buffers)."""
        if not self._spare:
            self._spare.append([torch.empty_like(t) for t in tensors])
        recv = self._spare.pop()
        return self.comm.exchange(tensors, recv, tag, phase), recv

    def recycle(self, buffers: List[Tensor]) -> None:
        """Hand back buffers whose send has completed."""
        self._spare.append(buffers)


def ring_forward(q: Tensor, k: Tensor, v: Tensor, group, causal: bool, scale: float, layout: str):
    """q: [b, s, h, d], k/v: [b, s, h_kv, d] -> out [b, s, h, d] (q dtype), lse [b, h, s] fp32."""
    ring = _Ring(group)
    kernel = select_kernel(q.device, q.dtype)
    out = lse = None
    kv, owned = [k.contiguous(), v.contiguous()], False
    for step in range(ring.world_size):
        works, nxt = ring.rotate(kv, TAG_KV, "forward") if step < ring.world_size - 1 else (None, None)
        plan = ring_step_plan(ring.rank, (ring.rank - step) % ring.world_size, ring.world_size, q.shape[1], causal, layout)
        if plan is not None:
            qs, ks, blk_causal = plan
            with timed_compute("forward"):
                o_blk, l_blk = kernel.forward(q[:, qs], kv[0][:, ks], kv[1][:, ks], blk_causal, scale)
            if out is None:  # step 0 is the diagonal block: it covers every row
                out, lse = o_blk.to(accumulator_dtype(q.dtype)), l_blk.to(accumulator_dtype(q.dtype))
            else:
                merge_into(out[:, qs], lse[:, :, qs], o_blk, l_blk)
        wait_all(works)
        if owned:
            ring.recycle(kv)
        if nxt is not None:
            kv, owned = nxt, True
    return out.to(q.dtype), lse


def ring_backward(dout: Tensor, q, k, v, out, lse, group, causal: bool, scale: float, layout: str):
    """Gradients of :func:`ring_forward`; dq/dk/dv accumulate in fp32, return in input dtype."""
    ring = _Ring(group)
    kernel = select_kernel(q.device, q.dtype)
    acc = accumulator_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dkv = [torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device)]
    dkv_ring = _Ring(group)
    kv, owned = [k.contiguous(), v.contiguous()], False
    dkv_works = dkv_sent = dkv_next = None  # the dK/dV hop in flight (none at P = 1)
    for step in range(ring.world_size):
        works, nxt = ring.rotate(kv, TAG_KV, "backward") if step < ring.world_size - 1 else (None, None)
        plan = ring_step_plan(ring.rank, (ring.rank - step) % ring.world_size, ring.world_size, q.shape[1], causal, layout)
        grads = None
        if plan is not None:
            qs, ks, blk_causal = plan
            with timed_compute("backward"):
                grads = kernel.backward(dout[:, qs], q[:, qs], kv[0][:, ks], kv[1][:, ks], out[:, qs], lse[:, :, qs], blk_causal, scale)
            dq[:, qs] += grads[0]
        if dkv_works is not None:  # the accumulator for this step's kv block arrives
            wait_all(dkv_works)
            dkv_ring.recycle(dkv_sent)
            dkv = dkv_next
        if grads is not None:
            dkv[0][:, ks] += grads[1]
            dkv[1][:, ks] += grads[2]
        if ring.world_size > 1:
            dkv_works, dkv_next = dkv_ring.rotate(dkv, TAG_DKV, "backward")
            dkv_sent = dkv
        wait_all(works)
        if owned:
            ring.recycle(kv)
        if nxt is not None:
            kv, owned = nxt, True
    if dkv_works is not None:  # last hop brings our own block's dK/dV home
        wait_all(dkv_works)
        dkv = dkv_next
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


RingAttentionFunction = cp_attention_function("RingAttentionFunction", ring_forward, ring_backward)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, group=None, *, causal: bool = True,
                   softmax_scale: Optional[float] = None, layout: str = "zigzag") -> Tensor:
    """Context-parallel attention by KV rotation.

    q: [b, s_local, h, d]; k, v: [b, s_local, h_kv, d] with h % h_kv == 0, each
    this rank's ``layout`` shard of the sequence. Returns [b, s_local, h, d] in q's
    dtype. ``group=None`` is the default group; ``softmax_scale`` defaults to d**-0.5.
    """
    return apply_cp_attention(RingAttentionFunction, q, k, v, group, causal, softmax_scale, layout)
