"""Block attention kernels: one (q-block, kv-block) pair -> (out, lse), and its backward.

Every kernel takes bshd tensors, ``q [b, sq, h, d]``, ``k, v [b, sk, h_kv, d]`` with
``h % h_kv == 0``, and returns ``out [b, sq, h, d]`` (q's dtype) and
``lse [b, h, sq]`` (fp32, fp64 for fp64 input). ``causal`` is top-left aligned and
is only used on diagonal blocks (sq == sk).

The backward takes the *global* out and lse of the rows (after merging all
blocks), so the per-block gradients it returns sum to the exact gradients.
Kernels are chosen per device:

* CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``.
* CUDA fp16/bf16: torch's flash SDPA op (flash-attn's private API changes between
  releases, so we call torch's copy of the same FA2 kernels); GQA native, K/V never
  repeated.
* CUDA fp32: torch's memory-efficient op (``aten._efficient_attention_forward`` /
  ``_efficient_attention_backward``, the pair behind SDPA's efficient backend), which
  takes fp32 and returns an LSE; it has no GQA, so K/V heads are repeated per block.
* anything else: :class:`DenseFallbackKernel`, plain torch, refused above a small size
  (it builds the whole score matrix). :class:`MathKernel` is also the test aid.

The two CUDA kernels are UNTESTED ON GPU (no GPU in CI): they are written against the
op schemas of torch 2.13, and CPU tests check their argument plumbing through fake ops.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
_aten = torch.ops.aten  # one handle, so CPU tests can stand in for the CUDA-only ops
MAX_DENSE_SCORES = 1 << 24  # b*h*sq*sk the dense fallback may build (128 MiB at fp64)


class MathKernel:
    """Plain-torch reference kernel: materialises the [sq, sk] block scores."""

    name = "math"

    @staticmethod
    def _probs(q: Tensor, k: Tensor, causal: bool, scale: float, lse=None):
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        groups = q.shape[2] // k.shape[2]
        qh = q.transpose(1, 2).to(acc)  # [b, h, sq, d]
        kh = k.transpose(1, 2).to(acc).repeat_interleave(groups, dim=1)
        scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
        if causal:
            sq, sk = scores.shape[-2:]
            keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        if lse is None:
            lse = torch.logsumexp(scores, dim=-1)
        return torch.exp(scores - lse.unsqueeze(-1)), lse, qh, kh

    @classmethod
    def forward(cls, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tuple[Tensor, Tensor]:
        probs, lse, _, _ = cls._probs(q, k, causal, scale)
        vh = v.transpose(1, 2).to(probs.dtype).repeat_interleave(q.shape[2] // k.shape[2], dim=1)
        out = torch.matmul(probs, vh).transpose(1, 2).to(q.dtype)
        return out, lse

    @classmethod
    def backward(cls, dout, q, k, v, out, lse, causal: bool, scale: float):
        probs, _, qh, kh = cls._probs(q, k, causal, scale, lse=lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32))
        acc = probs.dtype
        groups = q.shape[2] // k.shape[2]
        vh = v.transpose(1, 2).to(acc).repeat_interleave(groups, dim=1)
        do = dout.transpose(1, 2).to(acc)
        delta = (do * out.transpose(1, 2).to(acc)).sum(-1, keepdim=True)
        dscores = probs * (torch.matmul(do, vh.transpose(-1, -2)) - delta)
        dq = torch.matmul(dscores, kh) * scale
        dk = torch.matmul(dscores.transpose(-1, -2), qh) * scale
        dv = torch.matmul(probs.transpose(-1, -2), do)
        b, h, sk, d = dk.shape
        dk = dk.view(b, h // groups, groups, sk, d).sum(2)
        dv = dv.view(b, h // groups, groups, sk, d).sum(2)
        return dq.transpose(1, 2).to(q.dtype), dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype)


class CpuFlashKernel:
    """torch's CPU flash-attention kernel; natively handles GQA."""

    name = "cpu_flash"

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tuple[Tensor, Tensor]:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=scale
        )
        return out.transpose(1, 2), lse

    @staticmethod
    def backward(dout, q, k, v, out, lse, causal: bool, scale: float):
        t = lambda x: x.transpose(1, 2)  # noqa: E731 - bshd <-> bhsd view
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            t(dout), t(q), t(k), t(v), t(out), lse, 0.0, causal, scale=scale
        )
        return t(dq), t(dk), t(dv)


def _expand(x: Tensor, groups: int) -> Tensor:
    """[b, s, h_kv, d] -> [b, s, h_kv * groups, d], each K/V head once per query head."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def _fold(dx: Tensor, groups: int) -> Tensor:
    """Gradient of :func:`_expand`: [b, s, h, d] -> [b, s, h // groups, d]."""
    if groups == 1:
        return dx
    b, s, h, d = dx.shape
    return dx.reshape(b, s, h // groups, groups, d).sum(3)


class CudaFlashKernel:
    """torch's CUDA flash SDPA op (FA2) for fp16/bf16. Untested on GPU.

    FA2 takes K/V with fewer heads (h % h_kv == 0) and returns dk, dv with h_kv heads,
    so GQA never repeats K/V here."""

    name = "cuda_flash"
    MAX_HEAD_DIM = 256  # FA2's mha_fwd; SDPA pads d to a multiple of 8 first, this direct call does not

    @classmethod
    def forward(cls, q, k, v, causal: bool, scale: float):
        d = q.shape[-1]
        if d % 8 or d > cls.MAX_HEAD_DIM:
            raise ValueError(f"head dim {d} (q {list(q.shape)}): torch's CUDA flash kernel needs a multiple of 8 "
                             f"up to {cls.MAX_HEAD_DIM}; use such a kv_channels, or fp32 (memory-efficient kernel)")
        res = _aten._scaled_dot_product_flash_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, False, scale=scale)
        return res[0].transpose(1, 2), res[1]

    @staticmethod
    def backward(dout, q, k, v, out, lse, causal: bool, scale: float):
        """dout, out: [b, sq, h, d] (q's dtype); lse: [b, h, sq] fp32 -> dq, dk, dv like q, k, v.

        Passes what torch's own derivative of ``_scaled_dot_product_flash_attention`` passes
        (tools/autograd/derivatives.yaml): the forward's cum_seq_q/k, max_q/k and rng state.
        The forward's bookkeeping is rebuilt, not kept, because this backward recomputes from
        the *global* lse and runs per block; at dropout 0 on dense input it is fixed by the
        shapes, see :func:`flash_dense_bookkeeping`."""
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        cum_q, cum_k, max_q, max_k, rng_state, unused = flash_dense_bookkeeping(q, k)
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
            t(dout), t(q), t(k), t(v), t(out), lse.contiguous(),
            cum_q, cum_k, max_q, max_k, 0.0, causal, rng_state, unused, scale=scale,
        )
        return t(dq), t(dk), t(dv)


def flash_dense_bookkeeping(q: Tensor, k: Tensor):
    """What ``aten._scaled_dot_product_flash_attention`` returns besides (out, lse) for
    dense bhsd input at dropout 0, for q [b, sq, h, d], k [b, sk, h_kv, d] (bshd):
    ``(cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused)``.

    * cum_seq_q/k: undefined tensors (None). ``_flash_attention_backward`` takes the
      variable-length branch (``mha_varlen_bwd``: int32 cu_seqlens, 3-D total-token
      layout) whenever cum_seq_q is *defined*, so a placeholder tensor there breaks
      every dense backward.
    * max_q/max_k: the query and key lengths (``query.size(2)``, ``key.size(2)``).
    * rng_state [2] and unused [] uint64 on q's device, uninitialised at dropout 0, as
      FA2's ``mha_fwd`` allocates them; ``mha_bwd`` reads them only when dropout > 0.
    """
    rng_state = torch.empty(2, dtype=torch.uint64, device=q.device)
    unused = torch.empty((), dtype=torch.uint64, device=q.device)
    return None, None, q.shape[1], k.shape[1], rng_state, unused


class CudaEfficientKernel:
    """torch's CUDA memory-efficient attention for fp32 (no [sq, sk] matrix). Untested on GPU.

    The ops work in bshd ("BMHK") directly. Their LSE is [b, h, sq rounded up to 32];
    the forward returns the first sq columns, and the backward pads the global LSE back.
    The kernel has no GQA: K/V heads are repeated per block and dk, dv folded back.
    Both calls match torch's own (``_scaled_dot_product_efficient_attention_cuda`` and the
    derivative of ``_efficient_attention_forward``): no bias, no cu_seqlens (dense), mask
    type 1 = causal from the top left, ``bias_requires_grad`` False."""

    name = "cuda_efficient"
    LSE_ALIGN = 32  # the kernel's LSE row padding (kAlignLSE)

    @staticmethod
    def forward(q, k, v, causal: bool, scale: float):
        g = q.shape[2] // k.shape[2]
        res = _aten._efficient_attention_forward(
            q, _expand(k, g), _expand(v, g), None, None, None, None, None, 0.0, int(causal), True, scale=scale)
        return res[0], res[1][..., : q.shape[1]].contiguous()

    @classmethod
    def backward(cls, dout, q, k, v, out, lse, causal: bool, scale: float):
        """dout, out: [b, sq, h, d]; lse: [b, h, sq] -> dq, dk, dv like q, k, v."""
        g, sq = q.shape[2] // k.shape[2], q.shape[1]
        lse = F.pad(lse.float(), (0, -sq % cls.LSE_ALIGN)).contiguous()
        # The forward's philox seed/offset at dropout 0 outside graph capture: int64 scalars
        # on the host, uninitialised; the backward reads them only when dropout > 0.
        seed, offset = (torch.empty((), dtype=torch.int64) for _ in range(2))
        dq, dk, dv, _ = _aten._efficient_attention_backward(
            dout, q, _expand(k, g), _expand(v, g), None, out.to(q.dtype), None, None, sq, k.shape[1], lse, 0.0,
            seed, offset, int(causal), False, scale=scale)
        return dq, _fold(dk, g), _fold(dv, g)


class DenseFallbackKernel(MathKernel):
    """:class:`MathKernel` as the automatic choice where no memory-efficient kernel
    exists: it refuses blocks above :data:`MAX_DENSE_SCORES` score entries instead of
    running out of memory (a 24K-token fp32 block with 36 heads would need ~87 GB)."""

    name = "dense_fallback"

    @staticmethod
    def _check(q: Tensor, k: Tensor) -> None:
        b, sq, h, _ = q.shape
        n = b * h * sq * k.shape[1]
        if n > MAX_DENSE_SCORES:
            raise ValueError(
                f"no memory-efficient attention kernel for {q.dtype} on {q.device.type}: the dense fallback would "
                f"build a [b={b}, h={h}, sq={sq}, sk={k.shape[1]}] score matrix ({n * 8 / 2**30:.1f} GiB at fp64), "
                f"above its limit of {MAX_DENSE_SCORES} entries; use fp16/bf16/fp32 on CUDA, or run on CPU")

    @classmethod
    def forward(cls, q, k, v, causal: bool, scale: float):
        cls._check(q, k)
        return super().forward(q, k, v, causal, scale)

    @classmethod
    def backward(cls, dout, q, k, v, out, lse, causal: bool, scale: float):
        cls._check(q, k)
        return super().backward(dout, q, k, v, out, lse, causal, scale)


def select_kernel(device: torch.device, dtype: torch.dtype):
    """The block kernel for tensors on ``device`` with ``dtype``; never the dense
    math kernel without its size limit."""
    if device.type == "cpu":
        return CpuFlashKernel
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return CudaFlashKernel
    if device.type == "cuda" and dtype == torch.float32:
        return CudaEfficientKernel
    return DenseFallbackKernel
