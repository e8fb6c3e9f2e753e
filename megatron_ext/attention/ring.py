"""Ring attention: K/V slices rotate around the group by P2P while every rank
keeps its queries (Liu et al. 2023; zigzag balancing as in ring-flash-attention).

Parts: slicing plan, K/V stream, forward, backward, ``autograd.Function``,
public wrapper. Each rank computes its own (diagonal) block first, from its own
K/V. Foreign K/V then travel in ``kv_chunks`` waves: wave w carries slice w of
every rank's block (piece w of each zigzag half, so every step stays balanced)
P-1 hops round the ring. A rank holds a few slices at a time, never a whole
foreign block, so the extra memory is O(block / kv_chunks). The next slice is
in flight while the current one is computed (double buffer); in backward each
slice's dK/dV accumulator follows it one hop behind and comes home after P-1 hops.
The waves exist for the backward's memory: ``plan_waves`` picks their number per call
(whole blocks for a forward-only call).
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

import torch

from ..sharding import as_packed_layout
from .blocks import select_kernel
from .checks import rank_and_size
from .comm import TAG_DKV, TAG_KV, RingComm, wait_all
from .function import apply_cp_attention, cp_attention_function
from .merge import accumulator_dtype, merge_into
from .packed import diagonal_backward, diagonal_forward, local_docs, stream_spans
from .stats import timed_compute

Tensor = torch.Tensor
# One kernel call on a foreign slice: (rows of my q, rows of the packed slice).
Call = Tuple[slice, slice]
_ALL = slice(None)
# kv_chunks=None, per call: a forward-only call (no grad) and any call on CUDA (until a GPU
# benchmark says otherwise) send whole blocks. Otherwise the backward takes as many waves as
# keep each piece worth its fixed costs (min_piece_rows), at most MAX_AUTO_CHUNKS, and the
# forward the fewest waves whose peak stays below that backward's (ring_memory_model).
# 16 waves hold the ring at 1.18/P of the single-process peak at N=65536, P=4, MHA fp32.
MAX_AUTO_CHUNKS = 16
MIN_PIECE_ROWS = 512
# A slice (k and v of every segment) carries >= 1 MiB, so a P2P message's latency is small
# beside its transfer; a kernel call on a piece does >= 2**30 multiply-adds (half my query
# rows x piece rows x h x d), so its call, merge and accumulate costs are small beside its
# work. bench.ring_attention --sections waves shows the trade-off (eff 0.96 at 2**29).
MIN_SLICE_BYTES = 1 << 20
MIN_CALL_WORK = 1 << 30


def foreign_calls(rank: int, source: int, s_local: int, piece: int, causal: bool, layout: str) -> List[Call]:
    """The unmasked kernel calls of my q against a slice of ``source``'s K/V.

    A packed slice holds ``piece`` rows of each half of the source block (zigzag)
    or ``piece`` rows of it (contiguous). zigzag: K/V from an earlier rank only
    meet our queries in its first half; from a later rank only our second half
    of queries sees it, but sees all of it: equal work on every rank. Queries
    are split in halves so a call's dQ temporary is at most half of q.
    """
    half = s_local // 2
    q_halves = [slice(0, half), slice(half, None)] if half else [_ALL]
    if not causal:
        return [(qs, _ALL) for qs in q_halves]
    if layout == "contiguous":
        return [(qs, _ALL) for qs in q_halves] if source < rank else []
    if source < rank:
        return [(qs, slice(0, piece)) for qs in q_halves]
    return [(slice(half, None), _ALL)]


def kv_waves(s_local: int, layout: str, kv_chunks: Optional[int], min_rows: int = MIN_PIECE_ROWS) -> int:
    """How many waves a block of ``s_local`` rows travels in for ``kv_chunks`` (None: as
    many as keep pieces of a segment >= ``min_rows``, at most MAX_AUTO_CHUNKS)."""
    seg_len = s_local // (2 if layout == "zigzag" else 1)
    if kv_chunks is None:
        kv_chunks = min(MAX_AUTO_CHUNKS, seg_len // max(1, min_rows))
    return max(1, min(kv_chunks, seg_len))


def min_piece_rows(s_local: int, h: int, h_kv: int, d: int, itemsize: int, layout: str) -> int:
    """Fewest rows of a segment's piece whose slice carries >= MIN_SLICE_BYTES (k and v
    [rows, h_kv, d] of every segment) and whose kernel call does >= MIN_CALL_WORK
    (s_local / 2 query rows x rows x h x d): the waves' fixed costs then stay small."""
    segments = 2 if layout == "zigzag" else 1
    by_bytes = -(-MIN_SLICE_BYTES // (2 * segments * h_kv * d * itemsize))
    by_work = -(-MIN_CALL_WORK // (max(1, s_local // 2) * h * d))
    return max(1, by_bytes, by_work)


def ring_memory_model(phase: str, waves: int, q_numel: int, kv_numel: int, itemsize: int) -> Dict[str, float]:
    """Bytes a rank holds at the ring's peak in ``phase`` beyond its q, k, v (zigzag, a
    foreign hop), by part. q_numel: elements of q; kv_numel: of k and v together; inputs
    of ``itemsize`` bytes, accumulators fp32 (fp64 for fp64)."""
    acc = max(4, itemsize)
    q_in, kv_in, q_acc, kv_acc = q_numel * itemsize, kv_numel * itemsize, q_numel * acc, kv_numel * acc
    slices = {"K/V slices: computed on, arriving, own one starting the next wave": 3 * kv_in / waves}
    if phase == "forward":
        return {"out accumulator": q_acc, **slices, "kernel output of half the queries": q_in / 2}
    return {"out and dout, held through the backward": 2 * q_in, "dq, dk, dv accumulators": q_acc + kv_acc,
            **slices, "dK/dV slice accumulators: being built, sent, arriving": 3 * kv_acc / waves,
            "kernel temporaries: dQ of half the queries, dK/dV of a slice": q_in / 2 + kv_in / waves}


def plan_waves(q: Tensor, k: Tensor, layout: str, kv_chunks: Optional[int], phase: str) -> int:
    """Waves of one call on q: [b, s, h, d], k: [b, s, h_kv, d]: an explicit ``kv_chunks``
    is kept, None is decided per call by :func:`auto_waves`."""
    if kv_chunks is not None:
        return kv_waves(q.shape[1], layout, kv_chunks)
    _, s_local, h, d = q.shape
    return auto_waves(q.device.type, phase, s_local, h, k.shape[2], d, k.element_size(), layout)


def auto_waves(device_type: str, phase: str, s_local: int, h: int, h_kv: int, d: int, itemsize: int,
               layout: str) -> int:
    """The automatic wave count. ``phase``: "backward", "forward" (a backward follows) or
    "forward_only" (no grad). Whole blocks on CUDA (until a GPU benchmark says otherwise)
    and for forward-only calls; on CPU the backward takes as many waves as keep pieces
    >= :func:`min_piece_rows` (at most MAX_AUTO_CHUNKS), the forward the fewest waves
    whose modeled peak stays below that backward's."""
    if phase == "forward_only" or device_type == "cuda":
        return 1
    bwd = kv_waves(s_local, layout, None, min_piece_rows(s_local, h, h_kv, d, itemsize, layout))
    if phase == "backward":
        return bwd
    sizes = (s_local * h * d, 2 * s_local * h_kv * d, itemsize)  # b cancels out
    budget = sum(ring_memory_model("backward", bwd, *sizes).values())
    return next(w for w in range(1, bwd + 1)
                if sum(ring_memory_model("forward", kv_waves(s_local, layout, w), *sizes).values()) <= budget)


class _Ring:
    """Per-call state: the group, its comm, and how a K/V block is cut into slices."""

    def __init__(self, group, s_local: int, layout: str, waves: int):
        self.rank, self.world_size = rank_and_size(group)
        self.comm = RingComm(group) if self.world_size > 1 else None
        self.segments = 2 if layout == "zigzag" else 1
        seg_len = s_local // self.segments
        # piece w of every segment; pieces differ by at most one row
        self.pieces = [(seg_len * w // waves, seg_len * (w + 1) // waves) for w in range(waves)]
        self.seg_len, self.s_local, self.layout = seg_len, s_local, layout

    def hops(self) -> int:
        return len(self.pieces) * (self.world_size - 1)

    def _spans(self, wave: int) -> List[Tuple[slice, slice]]:
        """(rows of the local block, rows of the packed slice) for each segment's piece ``wave``."""
        lo, hi = self.pieces[wave]
        n = hi - lo
        return [(slice(seg * self.seg_len + lo, seg * self.seg_len + hi), slice(seg * n, (seg + 1) * n))
                for seg in range(self.segments)]

    def pack(self, k: Tensor, v: Tensor, wave: int):
        """Slice ``wave`` of k, v [b, s, h_kv, d] -> one buffer [2, b, segments * piece, h_kv, d];
        whole blocks travel as they are, [k, v], with no copy."""
        if len(self.pieces) == 1:
            return [k.contiguous(), v.contiguous()]
        lo, hi = self.pieces[wave]
        buf = k.new_empty((2, k.shape[0], self.segments * (hi - lo)) + tuple(k.shape[2:]))
        for block_rows, slice_rows in self._spans(wave):
            buf[0][:, slice_rows] = k[:, block_rows]
            buf[1][:, slice_rows] = v[:, block_rows]
        return buf

    def add_home(self, dk: Tensor, dv: Tensor, grads: Tensor, wave: int) -> None:
        """Add a returned slice accumulator [2, b, segments * piece, h_kv, d] into dk, dv."""
        for block_rows, slice_rows in self._spans(wave):
            dk[:, block_rows] += grads[0][:, slice_rows]
            dv[:, block_rows] += grads[1][:, slice_rows]

    def calls(self, source: int, wave: int, causal: bool) -> List[Call]:
        lo, hi = self.pieces[wave]
        return foreign_calls(self.rank, source, self.s_local, hi - lo, causal, self.layout)

    def diagonal_forward(self, kernel, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, acc):
        """My queries against my own K/V: (out, lse) in ``acc``."""
        out, lse = kernel.forward(q, k, v, causal, scale)
        return out.to(acc), lse.to(acc)

    def diagonal_backward(self, kernel, dout, q, k, v, out, lse, causal: bool, scale: float, acc):
        return tuple(t.to(acc) for t in kernel.backward(dout, q, k, v, out, lse, causal, scale))

    def kv_stream(self, k: Tensor, v: Tensor, phase: str) -> Iterator[Tuple[int, int, int, object]]:
        """Yield (wave, hop in wave 1..P-1, source rank, slice) for every foreign slice; a
        slice is a [2, b, rows, h_kv, d] buffer, or [k, v] for whole blocks.

        The first hop is posted at once, so the caller's diagonal block overlaps it;
        hop h+1 is posted before slice h is handed out, so it overlaps slice h's compute.
        Each hop sends one slice and receives one: the order is the same on every rank.
        """
        if self.hops() == 0:
            return iter(())
        pending = self.post(self.pack(k, v, 0), phase)
        return self._stream(pending, k, v, phase)

    def _stream(self, pending, k, v, phase):
        p = self.world_size
        for hop in range(self.hops()):
            wave, step = divmod(hop, p - 1)
            step += 1
            works, recv = pending
            wait_all(works)
            del works, pending  # the slice just sent goes back now (the caller drops its own)
            if hop + 1 < self.hops():  # forward this slice on, or start the next wave with my own
                pending = self.post(recv if step < p - 1 else self.pack(k, v, wave + 1), phase)
            yield wave, step, (self.rank - step) % p, recv

    def post(self, send, phase: str, tag: int = TAG_KV):
        """Send ``send`` (a tensor, or a list of them) to the next rank, receive its like from
        the previous: (works, receive buffer of the same kind)."""
        sends = send if isinstance(send, list) else [send]
        recvs = [torch.empty_like(t) for t in sends]
        return self.comm.exchange(sends, recvs, tag, phase), (recvs if isinstance(send, list) else recvs[0])


class _PackedRing(_Ring):
    """The ring over packed documents (``cu_seqlens``). The local layout is the same on
    every rank, so nothing but K/V travels. Waves cut the *half stream* (every
    document's front half, back to back) into pieces and carry the mirrored rows
    of the back halves with them: each wave is as large as in the unpacked ring.
    Plan: step 0 per-document causal; from an earlier rank all my queries of a
    document against the front piece of that document; from a later rank the back
    half of my queries of a document against its front and back pieces."""

    def __init__(self, group, s_local: int, waves: int, cu_seqlens):
        super().__init__(group, s_local, "zigzag", waves)
        self.docs = local_docs(cu_seqlens, self.world_size, s_local)

    def _doc_pieces(self, wave: int):
        """(doc, x0, x1, offset in the slice) per document met by ``wave``; whole blocks
        travel unpacked as [k, v], so there a document's pieces sit where it does."""
        if len(self.pieces) == 1:
            return [(doc, 0, doc.half, doc.start) for doc in self.docs]
        return stream_spans(self.docs, *self.pieces[wave])

    def _spans(self, wave: int) -> List[Tuple[slice, slice]]:
        spans = []
        for doc, x0, x1, off in self._doc_pieces(wave):
            n, front, back = x1 - x0, doc.start + x0, doc.start + doc.half + x0
            spans += [(slice(front, front + n), slice(off, off + n)),
                      (slice(back, back + n), slice(off + n, off + 2 * n))]
        return spans

    def calls(self, source: int, wave: int, causal: bool) -> List[Call]:
        calls = []
        for doc, x0, x1, off in self._doc_pieces(wave):
            n, mid, end = x1 - x0, doc.start + doc.half, doc.start + 2 * doc.half
            if source < self.rank:
                calls += [(slice(doc.start, mid), slice(off, off + n)), (slice(mid, end), slice(off, off + n))]
            else:
                calls.append((slice(mid, end), slice(off, off + 2 * n)))
        return calls

    def diagonal_forward(self, kernel, q, k, v, causal, scale, acc):
        return diagonal_forward(kernel, q, k, v, self.docs, scale, acc)

    def diagonal_backward(self, kernel, dout, q, k, v, out, lse, causal, scale, acc):
        return diagonal_backward(kernel, dout, q, k, v, out, lse, self.docs, scale, acc)


def _make_ring(group, s_local: int, layout: str, waves: int, cu_seqlens) -> _Ring:
    if cu_seqlens is None:
        return _Ring(group, s_local, layout, waves)
    return _PackedRing(group, s_local, waves, cu_seqlens)


def ring_forward(q: Tensor, k: Tensor, v: Tensor, group, causal: bool, scale: float, layout: str,
                 kv_chunks: Optional[int] = None, grad: bool = True, cu_seqlens=None):
    """q: [b, s, h, d], k/v: [b, s, h_kv, d] -> out [b, s, h, d] (q dtype), lse [b, h, s] fp32.
    ``grad``: a backward follows (else the call is forward-only and sends whole blocks).
    ``cu_seqlens``: global padded cu_seqlens of packed documents (see :mod:`.packed`)."""
    waves = plan_waves(q, k, layout, kv_chunks, "forward" if grad else "forward_only")
    ring = _make_ring(group, q.shape[1], layout, waves, cu_seqlens)
    kernel = select_kernel(q.device, q.dtype)
    acc = accumulator_dtype(q.dtype)
    stream = ring.kv_stream(k, v, "forward")
    with timed_compute("forward"):
        out, lse = ring.diagonal_forward(kernel, q, k, v, causal, scale, acc)
    for wave, _, source, kv in stream:
        for qs, ks in ring.calls(source, wave, causal):
            with timed_compute("forward"):
                o_blk, l_blk = kernel.forward(q[:, qs], kv[0][:, ks], kv[1][:, ks], False, scale)
            merge_into(out[:, qs], lse[:, :, qs], o_blk, l_blk)
        del kv  # before the stream posts the next hop: at most 3 slices live
    return out.to(q.dtype), lse


def ring_backward(dout: Tensor, q, k, v, out, lse, group, causal: bool, scale: float, layout: str,
                  kv_chunks: Optional[int] = None, grad: bool = True, cu_seqlens=None):
    """Gradients of :func:`ring_forward`; dq/dk/dv accumulate in fp32, return in input dtype."""
    ring = _make_ring(group, q.shape[1], layout, plan_waves(q, k, layout, kv_chunks, "backward"), cu_seqlens)
    kernel = select_kernel(q.device, q.dtype)
    acc = accumulator_dtype(q.dtype)
    stream = ring.kv_stream(k, v, "backward")
    with timed_compute("backward"):
        dq, dk, dv = ring.diagonal_backward(kernel, dout, q, k, v, out, lse, causal, scale, acc)
    relay = None  # the dK/dV hop in flight: (works, accumulator arriving)
    for wave, step, source, kv in stream:
        grads = torch.zeros((2,) + tuple(kv[0].shape), dtype=acc, device=q.device)
        for qs, ks in ring.calls(source, wave, causal):
            with timed_compute("backward"):
                g_q, g_k, g_v = kernel.backward(dout[:, qs], q[:, qs], kv[0][:, ks], kv[1][:, ks], out[:, qs],
                                                lse[:, :, qs], False, scale)
            dq[:, qs] += g_q
            grads[0][:, ks] += g_k
            grads[1][:, ks] += g_v
            del g_q, g_k, g_v
        del kv  # before the stream posts the next hop: at most 3 slices live
        if relay is not None:
            works, arrived = relay
            wait_all(works)
            del works, relay  # the accumulator sent goes back before the next is posted
            if step == 1:  # the previous wave's accumulator of my own slice is home
                ring.add_home(dk, dv, arrived, wave - 1)
            else:  # the same slice's accumulator from the ranks before me
                grads += arrived
            del arrived
        relay = ring.post(grads, "backward", TAG_DKV)
        del grads
    if relay is not None:
        wait_all(relay[0])
        ring.add_home(dk, dv, relay[1], len(ring.pieces) - 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


RingAttentionFunction = cp_attention_function("RingAttentionFunction", ring_forward, ring_backward)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, group=None, *, causal: bool = True,
                   softmax_scale: Optional[float] = None, layout: str = "zigzag",
                   kv_chunks: Optional[int] = None, cu_seqlens=None) -> Tensor:
    """Context-parallel attention by K/V rotation.

    q: [b, s_local, h, d]; k, v: [b, s_local, h_kv, d] with h % h_kv == 0, each
    this rank's ``layout`` shard of the sequence. Returns [b, s_local, h, d] in q's
    dtype. ``group=None`` is the default group; ``softmax_scale`` defaults to d**-0.5.
    ``kv_chunks`` is how many waves a K/V block travels in (at most one per row of
    a zigzag half): the backward holds about 7 x (k + v) / kv_chunks in fp32 beyond
    the local tensors and their gradients, plus half of q. 1 sends whole blocks, as
    ring-flash-attention does. None (default) decides per call: a forward-only call
    (no grad) sends whole blocks, and so does every call on CUDA (until a GPU benchmark
    says otherwise); on CPU the backward takes up to 16 waves while each piece carries
    >= 1 MiB and gives the kernel >= 2**30 multiply-adds, and the forward the fewest
    waves whose peak stays below the backward's.
    ``cu_seqlens``: packed documents, the *global padded* int cu_seqlens [n_docs + 1] from
    ``sharding.pad_packed_lengths`` (same on every rank), with q/k/v from ``shard_packed``;
    each document attends to itself, causally. Needs causal=True and layout="zigzag".
    """
    if kv_chunks is not None and (not isinstance(kv_chunks, int) or isinstance(kv_chunks, bool) or kv_chunks < 1):
        raise ValueError(f"kv_chunks must be None or a positive int, got {kv_chunks!r}")
    cu_seqlens = as_packed_layout(cu_seqlens)  # read once; forward and backward share what is derived
    if cu_seqlens is not None:
        local_docs(cu_seqlens, rank_and_size(group)[1], q.shape[1], causal, layout)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return apply_cp_attention(RingAttentionFunction, q, k, v, group, causal, softmax_scale, layout, kv_chunks, grad,
                              cu_seqlens)
