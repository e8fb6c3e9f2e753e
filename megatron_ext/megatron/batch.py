"""Split a batch for this CP rank, and reduce the loss so every CP layout gives
the same number as one rank on the whole sequence.

The loss is ``sum(masked token losses) / count(unmasked tokens)`` over the whole
DP x CP group. The gradients are *summed* (not averaged) over DP x CP and divided
by the global count (megatron-core's ``calculate_per_token_loss``); a rank whose
tokens are all masked contributes 0 to both sums and never divides by its own zero
count (the bug class of Megatron-LM #1764 and torchtitan #3280).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams

from ..attention.checks import rank_and_size
from ..sharding import PackedLayout, pad_packed_lengths, packed_position_ids, shard_packed, shard_sequence

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


def mask_document_ends(loss_mask: torch.Tensor, doc_lengths: Sequence[int]) -> torch.Tensor:
    """Zero the loss at each document's last token, whose label would be the next
    document's first token. loss_mask: [b, t] over documents back to back -> new tensor."""
    ends = torch.tensor(doc_lengths, dtype=torch.long).cumsum(0) - 1
    out = loss_mask.clone()
    out[:, ends.to(out.device)] = 0
    return out


@dataclass
class HostPackedSeqParams(PackedSeqParams):
    """megatron-core's PackedSeqParams plus the micro-batch's packed layout on the host.

    A subclass, not a side object: megatron-core hands ``packed_seq_params`` unchanged from
    GPTModel down to every layer's core attention, so what rides on it reaches
    :class:`~megatron_ext.megatron.core_attention.ContextParallelAttention` with no new
    argument, and code that knows only PackedSeqParams still sees a PackedSeqParams.
    """

    host: Optional[PackedLayout] = None
    """Global padded cu_seqlens as host ints (equal for q and kv); the CP attention reads this
    and keeps its per-document spans on it, so no layer or pass reads cu_seqlens back."""


def get_thd_batch_on_this_cp_rank(batch: Dict[str, Optional[torch.Tensor]], doc_lengths: Sequence[int],
                                  cp_group, tp_size: int = 1, cu_seqlens_device: bool = False
                                  ) -> Tuple[Dict[str, torch.Tensor], HostPackedSeqParams]:
    """Pure-torch stand-in for megatron-core's TE-only ``get_thd_batch_on_this_cp_rank``.

    batch: ``SEQUENCE_KEYS`` entries [1, t] holding documents of ``doc_lengths`` back to
    back (sum == t). Each document is padded to a multiple of 2P x ``tp_size`` (pads: token
    0, label 0, loss 0; x TP so that sequence parallelism can split the local tokens), then
    sharded per document (``shard_packed``). Returns the local batch
    [1, t_pad / P] (position_ids restart per document; the loss is masked on pads and
    on each document's last token) and a :class:`HostPackedSeqParams` with global cu_seqlens.

    Where cu_seqlens live: ``params.host`` always holds the padded ones on the host. The
    int32 tensors in mcore's own fields stay on the host too unless ``cu_seqlens_device``:
    with our core attention their only reader is megatron-core's unfused thd RoPE, which
    calls ``.tolist()`` on them in every layer (a device sync each time on a GPU copy).
    Set ``cu_seqlens_device`` when a TransformerEngine kernel reads them
    (``TransformerConfig.apply_rope_fusion``, or TE's own attention).
    """
    rank, size = rank_and_size(cp_group)
    lengths = [int(n) for n in doc_lengths]
    cu_pad = pad_packed_lengths(lengths, size * tp_size)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    tokens = batch["tokens"]
    if tokens.dim() != 2 or tokens.shape[0] != 1 or tokens.shape[1] != int(cu[-1]):
        raise ValueError(f"get_thd_batch_on_this_cp_rank: tokens must be [1, sum(doc_lengths)={int(cu[-1])}] "
                         f"(packed sequences have micro batch size 1), got {tuple(tokens.shape)}")
    host = PackedLayout(cu_pad)  # built on the host here: no device read, shard indices kept on it
    dest = torch.cat([torch.arange(a, a + n) for a, n in zip(host.cu[:-1], lengths)])
    out = {}
    for key, value in batch.items():
        if key == "attention_mask" or value is None:
            continue
        if key not in SEQUENCE_KEYS:
            raise KeyError(f"get_thd_batch_on_this_cp_rank: unknown batch key {key!r}; expected {SEQUENCE_KEYS}")
        if key == "loss_mask":
            value = mask_document_ends(value, lengths)
        padded = value.new_zeros((1, int(cu_pad[-1])))
        padded[:, dest.to(value.device)] = value
        out[key] = shard_packed(padded, 1, host, rank, size)
    out["position_ids"] = packed_position_ids(host, rank, size).unsqueeze(0).to(tokens.device)
    longest = max(b - a for a, b in zip(host.cu[:-1], host.cu[1:]))
    if cu_seqlens_device:
        cu, cu_pad = cu.to(tokens.device), cu_pad.to(tokens.device)
    params = HostPackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_pad,
                                 cu_seqlens_kv_padded=cu_pad, max_seqlen_q=longest, max_seqlen_kv=longest, host=host)
    return out, params


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
