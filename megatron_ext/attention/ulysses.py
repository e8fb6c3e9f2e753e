"""Ulysses sequence parallelism (DeepSpeed-Ulysses): all-to-all from
sequence-sharded/all-heads to full-sequence/head-sharded, local attention,
all-to-all back. With an inner ring group this is also the 2D hybrid (USP):
the "local" attention is then a ring over the other factor of the CP group.

Parts: all-to-all with packing, forward, backward, ``autograd.Function``,
public wrapper. Four all-to-alls per layer: q/k/v and out forward, dout and
dq/dk/dv backward. Tensors are packed straight into the all-to-all's send buffer
and unpacked straight out of its receive buffer (one copy each way).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from ..sharding import as_packed_layout
from .checks import LOCAL_ONLY, rank_and_size, validate
from .comm import check_backend_device
from .packed import LocalDoc, local_docs
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
    check_backend_device(group, [x])
    out = torch.empty_like(x)
    count_sent(phase, [x], (world - 1) / world)
    dist.all_to_all_single(out, x, group=group)
    return out


def _spans(s: int, degree: int, layout: str, docs: Optional[List[LocalDoc]] = None):
    """For each rank u: (rows of u's block, rows of the group's sequence) pairs. zigzag:
    rank u holds chunks (u, 2U-1-u), so first halves ascend with u, second halves descend.
    ``docs``: packed documents (local layout, :func:`.packed.local_docs`), each zigzag on
    its own: document i's rows of every rank gather to [U * start, U * (start + 2 half))."""
    if layout != "zigzag":
        return [[(slice(0, s), slice(u * s, (u + 1) * s))] for u in range(degree)]
    spans = [[] for _ in range(degree)]
    for doc in docs if docs is not None else [LocalDoc(0, s // 2)]:
        base, n, mid = degree * doc.start, doc.half, doc.start + doc.half
        for u in range(degree):
            spans[u] += [(slice(doc.start, mid), slice(base + u * n, base + (u + 1) * n)),
                         (slice(mid, mid + n), slice(base + (2 * degree - 1 - u) * n, base + (2 * degree - u) * n))]
    return spans


def seq_to_heads(parts: List[Tuple[Tensor, int]], degree: int, group, layout: str, phase: str,
                 docs: Optional[List[LocalDoc]] = None) -> List[Tensor]:
    """parts: (x [b, s, H, d], rep), my tokens and all heads -> [b, U*s, H*rep/U, d] each:
    the group's tokens (ordered as one ``layout`` shard over the ring; per document for
    packed ``docs``) of my head group, where each head is used ``rep`` times (KV
    replication). Every part is copied once into the all-to-all's send buffer
    [U, b, s, sum c, d] and once out of its receive buffer: no staging copies."""
    b, s, _, d = parts[0][0].shape
    widths = [x.shape[2] * rep // degree for x, rep in parts]
    send = parts[0][0].new_empty((degree, b, s, sum(widths), d))
    off = 0
    for (x, rep), c in zip(parts, widths):
        if rep == 1:
            send[:, :, :, off:off + c].copy_(x.view(b, s, degree, c, d).permute(2, 0, 1, 3, 4))
        else:  # expanded head e is head e // rep
            for e in range(degree * c):
                send[e // c, :, :, off + e % c].copy_(x[:, :, e // rep])
        off += c
    recv = _all_to_all(send, group, phase)
    del send
    outs, off = [], 0
    for c in widths:
        y = recv.new_empty((b, degree * s, c, d))
        for u, spans in enumerate(_spans(s, degree, layout, docs)):
            for mine, seq in spans:
                y[:, seq].copy_(recv[u, :, mine, off:off + c])
        outs.append(y)
        off += c
    return outs


def heads_to_seq(parts: List[Optional[Tensor]], reps: List[int], degree: int, group, layout: str,
                 phase: str, docs: Optional[List[LocalDoc]] = None) -> List[Tensor]:
    """Inverse of :func:`seq_to_heads`: parts [b, U*s, c, d] -> [b, s, U*c/rep, d] each,
    the gradients of replicated heads summed. Consumes ``parts`` (each entry is dropped
    once copied into the send buffer, so its memory goes back early)."""
    b, us, _, d = parts[0].shape
    s = us // degree
    widths = [y.shape[2] for y in parts]
    send = parts[0].new_empty((degree, b, s, sum(widths), d))
    off = 0
    for i, c in enumerate(widths):
        for u, spans in enumerate(_spans(s, degree, layout, docs)):
            for mine, seq in spans:
                send[u, :, mine, off:off + c].copy_(parts[i][:, seq])
        parts[i] = None
        off += c
    recv = _all_to_all(send, group, phase)
    del send
    outs, off = [], 0
    for c, rep in zip(widths, reps):
        x = recv[:, :, :, off:off + c].permute(1, 2, 0, 3, 4).reshape(b, s, degree * c, d)  # one copy
        if rep > 1:  # expanded head e is head e // rep: its replicas' gradients add up
            x = x.view(b, s, -1, rep, d).sum(3)
        outs.append(x)
        off += c
    return outs


def _docs(cu_seqlens, ulysses_group, ring_group, s_local: int) -> Optional[List[LocalDoc]]:
    """Packed documents in the local layout over the whole CP group (U x ring), or None."""
    if cu_seqlens is None:
        return None
    cp_size = rank_and_size(ulysses_group)[1] * rank_and_size(ring_group)[1]
    return local_docs(cu_seqlens, cp_size, s_local)


def ulysses_forward(q, k, v, ulysses_group, ring_group, causal: bool, scale: float, layout: str, cu_seqlens=None):
    """q: [b, s, h, d]; k, v: [b, s, h_kv, d] -> out [b, s, h, d] and the
    head-sharded tensors the backward needs. ``cu_seqlens``: packed documents."""
    _, degree = rank_and_size(ulysses_group)
    docs = _docs(cu_seqlens, ulysses_group, ring_group, q.shape[1])
    rep = kv_replication(q.shape[2], k.shape[2], degree)
    q_h, k_h, v_h = seq_to_heads([(q, 1), (k, rep), (v, rep)], degree, ulysses_group, layout, "forward", docs)
    out_h, lse = ring_forward(q_h, k_h, v_h, ring_group, causal, scale, layout, cu_seqlens=cu_seqlens)
    out, = heads_to_seq([out_h], [1], degree, ulysses_group, layout, "forward", docs)
    return out, (q_h, k_h, v_h, out_h, lse), rep


def ulysses_backward(dout, saved, rep: int, ulysses_group, ring_group, causal: bool, scale: float, layout: str,
                     cu_seqlens=None):
    """Gradients of :func:`ulysses_forward` (dq [b, s, h, d], dk/dv [b, s, h_kv, d])."""
    q_h, k_h, v_h, out_h, lse = saved
    _, degree = rank_and_size(ulysses_group)
    docs = _docs(cu_seqlens, ulysses_group, ring_group, dout.shape[1])
    dout_h, = seq_to_heads([(dout, 1)], degree, ulysses_group, layout, "backward", docs)
    grads = list(ring_backward(dout_h, q_h, k_h, v_h, out_h, lse, ring_group, causal, scale, layout,
                               cu_seqlens=cu_seqlens))
    del dout_h
    return tuple(heads_to_seq(grads, [1, rep, rep], degree, ulysses_group, layout, "backward", docs))


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
    cu_seqlens = as_packed_layout(cu_seqlens)  # read once; forward and backward share what is derived
    if cu_seqlens is not None:
        local_docs(cu_seqlens, rank_and_size(group)[1], q.shape[1], causal, layout)
    validate(q, k, v, group, causal, layout)
    kv_replication(q.shape[2], k.shape[2], rank_and_size(group)[1])
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return UlyssesAttentionFunction.apply(q, k, v, group, LOCAL_ONLY, causal, scale, layout, cu_seqlens)
