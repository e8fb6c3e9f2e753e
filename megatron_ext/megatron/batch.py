"""Split a batch for this CP rank, and reduce the loss so every CP layout gives
the same number as one rank on the whole sequence.

The loss is ``sum(masked token losses) / count(unmasked tokens)`` over the whole
DP x CP group. The gradients are *summed* (not averaged) over DP x CP and divided
by the global count (megatron-core's ``calculate_per_token_loss``); a rank whose
tokens are all masked contributes 0 to both sums and never divides by its own zero
count (the bug class of Megatron-LM #1764 and torchtitan #3280).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from ..attention.checks import rank_and_size
from ..sharding import shard_sequence

SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def get_batch_on_this_cp_rank(batch: Dict[str, Optional[torch.Tensor]], cp_group, layout: str = "zigzag"):
    """Shard every [b, S] entry of ``batch`` along the sequence for this CP rank.

    Returns a new dict with [b, S / P] tensors; ``attention_mask`` is dropped
    (causal masking happens inside the CP attention, no dense mask is built).
    Unknown keys raise, so nothing is silently left unsharded.
    """
    rank, size = rank_and_size(cp_group)
    out = {}
    for key, value in batch.items():
        if key == "attention_mask" or value is None:
            continue
        if key not in SEQUENCE_KEYS:
            raise KeyError(f"get_batch_on_this_cp_rank: unknown batch key {key!r}; expected {SEQUENCE_KEYS}")
        out[key] = shard_sequence(value, 1, rank, size, layout) if size > 1 else value
    return out


def masked_loss_sum(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's masked loss sum and unmasked-token count: per_token_loss, loss_mask
    [b, s_local] -> (scalar sum in the loss dtype, scalar count). The one place a
    token loss is masked; callers divide by a count reduced over DP x CP."""
    mask = loss_mask.to(per_token_loss.dtype)
    return (per_token_loss * mask).sum(), mask.sum()


def cp_masked_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor, group) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-mean loss over ``group`` (the DP x CP group).

    per_token_loss, loss_mask: [b, s_local]. Returns (loss to backpropagate on
    this rank, the global loss for logging, the global unmasked-token count).
    A global count of 0 gives loss 0, never NaN.
    """
    local_sum, local_count = masked_loss_sum(per_token_loss, loss_mask)
    totals = torch.stack([local_sum.detach(), local_count]).to(torch.float64)
    if rank_and_size(group)[1] > 1:
        dist.all_reduce(totals, group=group)
    count = totals[1].clamp(min=1.0)
    loss = local_sum / count.to(local_sum.dtype)
    return loss, (totals[0] / count).to(per_token_loss.dtype), totals[1]
