"""Ulysses sequence parallelism (DeepSpeed-Ulysses): all-to-all from
sequence-sharded/all-heads to full-sequence/head-sharded, local attention,
all-to-all back. With an inner ring group this is also the 2D hybrid (USP):
the "local" attention is then a ring over the other factor of the CP group.

Parts: head packing and all-to-all, forward, backward, ``autograd.Function``,
public wrapper. Four all-to-alls per layer: q/k/v and out forward, dout and
dq/dk/dv backward.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from .checks import LOCAL_ONLY, rank_and_size, validate
from .packed import local_docs
from .ring import ring_backward, ring_forward
from .stats import count_sent

Tensor = torch.Tensor


def kv_replication(h: int, h_kv: int, degree: int) -> int:
    """How many copies of each KV head Ulysses needs: the least r with
    (h_kv * r) % degree == 0, so every rank gets whole KV heads. Raises if h
    does not split over ``degree``."""
    if h % degree:
        raise ValueError(
            f"Ulysses needs the query heads h={h} divisible by the Ulysses degree {degree}; "
            f"use ring_attention, or hybrid_attention with a Ulysses degree that divides {h}"
        )
    return degree // math.gcd(h_kv, degree)


def _all_to_all(x: Tensor, group, phase: str) -> Tensor:
    """x: [U, ...] -> [U, ...]; block j goes to rank j, block i of the result came from rank i."""
    world = x.shape[0]
    if world == 1:
        return x
    out = torch.empty_like(x)
    count_sent(phase, [x], (world - 1) / world)
    dist.all_to_all_single(out, x.contiguous(), group=group)
    return out


def packed_order(cu_seqlens, degree: int, cp_size: int, s_local: int) -> Tensor:
    """Packed documents: rows of the gathered [U * s_local] (Ulysses rank major) in the
    order of the ring's per-document zigzag shard: for each document, the front halves
    of ranks 0..U-1, then the back halves of ranks U-1..0. LongTensor [U * s_local]."""
    parts = []
    for doc in local_docs(cu_seqlens, cp_size, s_local):
        front = [u * s_local + doc.start for u in range(degree)]
        back = [u * s_local + doc.start + doc.half for u in reversed(range(degree))]
        parts += [torch.arange(a, a + doc.half) for a in front + back]
    return torch.cat(parts)


def seq_to_heads(x: Tensor, degree: int, group, layout: str, phase: str, order: Optional[Tensor] = None) -> Tensor:
    """x: [b, s, U*c, d] (my tokens, all head groups) -> [b, U*s, c, d] (the group's
    tokens, my head group), ordered as one shard of the ``layout`` over the ring
    (``order``, from :func:`packed_order`, for packed documents)."""
    b, s, hc, d = x.shape
    c = hc // degree
    y = _all_to_all(x.view(b, s, degree, c, d).permute(2, 0, 1, 3, 4).contiguous(), group, phase)
    if order is not None:
        return y.transpose(0, 1).reshape(b, degree * s, c, d).index_select(1, order.to(y.device))
    if layout == "zigzag":
        # Rank u holds chunks (u, 2U-1-u): first chunks ascend with u, second chunks descend.
        y = y.view(degree, b, 2, s // 2, c, d)
        first, second = y[:, :, 0], y[:, :, 1].flip(0)
        return torch.cat([first, second], dim=0).transpose(0, 1).reshape(b, degree * s, c, d)
    return y.transpose(0, 1).reshape(b, degree * s, c, d)


def heads_to_seq(y: Tensor, degree: int, group, layout: str, phase: str, order: Optional[Tensor] = None) -> Tensor:
    """Inverse of :func:`seq_to_heads`: [b, U*s, c, d] -> [b, s, U*c, d]."""
    b, us, c, d = y.shape
    s = us // degree
    if order is not None:
        blocks = torch.empty_like(y).index_copy_(1, order.to(y.device), y).view(b, degree, s, c, d).transpose(0, 1)
    elif layout == "zigzag":
        halves = y.view(b, 2, degree, s // 2, c, d).transpose(0, 2)  # [U, 2, b, s/2, c, d]
        blocks = torch.cat([halves[:, 0], halves[:, 1].flip(0)], dim=2)  # [U, b, s, c, d]
    else:
        blocks = y.view(b, degree, s, c, d).transpose(0, 1)
    x = _all_to_all(blocks.contiguous(), group, phase)
    return x.permute(1, 2, 0, 3, 4).reshape(b, s, degree * c, d)


def _split_heads(x: Tensor, h_q: int, m: int):
    return x[:, :, :h_q], x[:, :, h_q:h_q + m], x[:, :, h_q + m:]


def _pack(q: Tensor, k: Tensor, v: Tensor, degree: int) -> Tensor:
    """[b, s, h, d] + 2 x [b, s, U*m, d] -> [b, s, U*(h/U + 2m), d], grouped by destination rank."""
    b, s, h, d = q.shape
    parts = [t.reshape(b, s, degree, t.shape[2] // degree, d) for t in (q, k, v)]
    return torch.cat(parts, dim=3).reshape(b, s, -1, d)


def _order(cu_seqlens, ulysses_group, ring_group, s_local: int) -> Optional[Tensor]:
    if cu_seqlens is None:
        return None
    degree = rank_and_size(ulysses_group)[1]
    return packed_order(cu_seqlens, degree, degree * rank_and_size(ring_group)[1], s_local)


def ulysses_forward(q, k, v, ulysses_group, ring_group, causal: bool, scale: float, layout: str, cu_seqlens=None):
    """q: [b, s, h, d]; k, v: [b, s, h_kv, d] -> out [b, s, h, d] and the
    head-sharded tensors the backward needs. ``cu_seqlens``: packed documents."""
    _, degree = rank_and_size(ulysses_group)
    order = _order(cu_seqlens, ulysses_group, ring_group, q.shape[1])
    h, h_kv = q.shape[2], k.shape[2]
    rep = kv_replication(h, h_kv, degree)
    k_e, v_e = (k, v) if rep == 1 else (k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2))
    m = h_kv * rep // degree
    x = seq_to_heads(_pack(q, k_e, v_e, degree), degree, ulysses_group, layout, "forward", order)
    q_h, k_h, v_h = (t.contiguous() for t in _split_heads(x, h // degree, m))
    del x
    out_h, lse = ring_forward(q_h, k_h, v_h, ring_group, causal, scale, layout, None, cu_seqlens)
    out = heads_to_seq(out_h, degree, ulysses_group, layout, "forward", order)
    return out, (q_h, k_h, v_h, out_h, lse), rep


def ulysses_backward(dout, saved, rep: int, ulysses_group, ring_group, causal: bool, scale: float, layout: str,
                     cu_seqlens=None):
    """Gradients of :func:`ulysses_forward` (dq [b, s, h, d], dk/dv [b, s, h_kv, d])."""
    q_h, k_h, v_h, out_h, lse = saved
    _, degree = rank_and_size(ulysses_group)
    order = _order(cu_seqlens, ulysses_group, ring_group, dout.shape[1])
    dout_h = seq_to_heads(dout, degree, ulysses_group, layout, "backward", order)
    dq_h, dk_h, dv_h = ring_backward(dout_h, q_h, k_h, v_h, out_h, lse, ring_group, causal, scale, layout,
                                     None, cu_seqlens)
    del dout_h
    grads = heads_to_seq(torch.cat([dq_h, dk_h, dv_h], dim=2), degree, ulysses_group, layout, "backward", order)
    b, s = grads.shape[:2]
    hq, m = q_h.shape[2], k_h.shape[2]
    grads = grads.view(b, s, degree, hq + 2 * m, -1)
    dq, dk, dv = (grads[:, :, :, lo:hi].reshape(b, s, degree * (hi - lo), -1)
                  for lo, hi in ((0, hq), (hq, hq + m), (hq + m, hq + 2 * m)))
    if rep > 1:  # replicated KV heads: their gradients add up
        dk = dk.view(b, s, -1, rep, dk.shape[-1]).sum(3)
        dv = dv.view(b, s, -1, rep, dv.shape[-1]).sum(3)
    return dq, dk, dv


class UlyssesAttentionFunction(torch.autograd.Function):
    """Exact Ulysses (or Ulysses x ring) attention with a hand-written backward."""

    @staticmethod
    def forward(ctx, q, k, v, ulysses_group, ring_group, causal, scale, layout, cu_seqlens=None):
        out, saved, rep = ulysses_forward(q, k, v, ulysses_group, ring_group, causal, scale, layout, cu_seqlens)
        ctx.save_for_backward(*saved)
        ctx.args = (rep, ulysses_group, ring_group, causal, scale, layout, cu_seqlens)
        return out

    @staticmethod
    def backward(ctx, dout):
        dq, dk, dv = ulysses_backward(dout.contiguous(), ctx.saved_tensors, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, group=None, *, causal: bool = True,
                      softmax_scale: Optional[float] = None, layout: str = "zigzag", cu_seqlens=None) -> Tensor:
    """All-to-all sequence-parallel attention.

    q: [b, s_local, h, d]; k, v: [b, s_local, h_kv, d]; returns [b, s_local, h, d]
    in q's dtype. Needs h divisible by the group size U; when U > h_kv the KV heads
    are replicated just enough (to lcm(h_kv, U)). ``group=None`` is the default group.
    ``cu_seqlens``: packed documents (global padded cu_seqlens, q/k/v from ``shard_packed``),
    each attending to itself causally; needs causal=True, layout="zigzag".
    """
    if cu_seqlens is not None:
        local_docs(cu_seqlens, rank_and_size(group)[1], q.shape[1], causal, layout)
    validate(q, k, v, group, causal, layout)
    kv_replication(q.shape[2], k.shape[2], rank_and_size(group)[1])
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return UlyssesAttentionFunction.apply(q, k, v, group, LOCAL_ONLY, causal, scale, layout, cu_seqlens)
