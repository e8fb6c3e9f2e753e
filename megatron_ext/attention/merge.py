"""Overflow-safe merge of partial attention results through their log-sum-exp.

For two partial results over disjoint key sets, with ``lse_a``/``lse_b`` the
log-sum-exp of their scores,

    out = out_a - sigmoid(lse_b - lse_a) * (out_a - out_b)
    lse = lse_a - logsigmoid(lse_a - lse_b)

which never exponentiates a large number. All arithmetic is fp32 (or fp64).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def merge_into(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_blk: torch.Tensor, lse_blk: torch.Tensor) -> None:
    """Fold one block into the running result, in place.

    out_acc: [b, s, h, d] fp32 (may be a view); lse_acc: [b, h, s] fp32 (may be a view)
    out_blk: [b, s, h, d] any float dtype; lse_blk: [b, h, s].
    ``lse_acc`` must already be finite: start from the first block, not from -inf.
    """
    lse_blk = lse_blk.to(lse_acc.dtype)
    weight = torch.sigmoid(lse_blk - lse_acc).transpose(1, 2).unsqueeze(-1)  # [b, s, h, 1]
    out_acc.lerp_(out_blk.to(out_acc.dtype), weight)  # one pass: the ring merges many small blocks
    lse_acc.sub_(F.logsigmoid(lse_acc - lse_blk))


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; fp64 stays fp64 (used by references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
