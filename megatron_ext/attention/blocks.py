"""Block attention kernels: one (q-block, kv-block) pair -> (out, lse), and its backward.

Every kernel takes bshd tensors, ``q [b, sq, h, d]``, ``k, v [b, sk, h_kv, d]`` with
``h % h_kv == 0``, and returns ``out [b, sq, h, d]`` (q's dtype) and
``lse [b, h, sq]`` (fp32, fp64 for fp64 input). ``causal`` is top-left aligned and
is only used on diagonal blocks (sq == sk).

The backward takes the *global* out and lse of the rows (after merging all
blocks), so the per-block gradients it returns sum to the exact gradients.
Kernels are chosen per device:

* CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``.
* CUDA: torch's flash SDPA op for fp16/bf16 (flash-attn's private API changes
  between releases, so we call torch's copy of the same FA2 kernels).
* anything else: :class:`MathKernel`, plain torch, also the test aid.
"""
from __future__ import annotations

from typing import Tuple

import torch

Tensor = torch.Tensor


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


class CudaFlashKernel:
    """torch's CUDA flash SDPA op (FA2) for fp16/bf16. Not exercised on CPU CI."""

    name = "cuda_flash"

    @staticmethod
    def _expand(x: Tensor, groups: int) -> Tensor:
        return x if groups == 1 else x.repeat_interleave(groups, dim=2)

    @classmethod
    def forward(cls, q, k, v, causal: bool, scale: float):
        g = q.shape[2] // k.shape[2]
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            q.transpose(1, 2), cls._expand(k, g).transpose(1, 2), cls._expand(v, g).transpose(1, 2),
            0.0, causal, False, scale=scale,
        )
        return res[0].transpose(1, 2), res[1]

    @classmethod
    def backward(cls, dout, q, k, v, out, lse, causal: bool, scale: float):
        g = q.shape[2] // k.shape[2]
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        empty = torch.empty(0, device=q.device, dtype=torch.int64)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            t(dout), t(q), t(cls._expand(k, g)), t(cls._expand(v, g)), t(out), lse,
            empty, empty, q.shape[1], k.shape[1], 0.0, causal, empty, empty, scale=scale,
        )
        dk, dv = t(dk), t(dv)
        if g > 1:
            b, s, h, d = dk.shape
            dk = dk.reshape(b, s, h // g, g, d).sum(3)
            dv = dv.reshape(b, s, h // g, g, d).sum(3)
        return t(dq), dk, dv


def select_kernel(device: torch.device, dtype: torch.dtype):
    """The block kernel for tensors on ``device`` with ``dtype``."""
    if device.type == "cpu":
        return CpuFlashKernel
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return CudaFlashKernel
    return MathKernel
