"""megatron-core's RotaryEmbedding over :mod:`megatron_ext.rope`'s fp64-reduced angles."""
from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from ..rope import RopeConfig, rope_angles


class LongContextRotaryEmbedding(RotaryEmbedding):
    """megatron-core's RotaryEmbedding with :func:`rope_angles` as its frequencies.

    Same interface (``forward(max_seq_len, offset, packed_seq, cp_group)`` -> emb
    [s_local, 1, 1, d]), so it replaces ``GPTModel.rotary_pos_emb``; the zigzag CP
    slicing stays megatron-core's.
    """

    def __init__(self, kv_channels: int, rope: RopeConfig, rotary_percent: float = 1.0, cp_group=None):
        super().__init__(kv_channels, rotary_percent, rotary_base=int(rope.base), use_cpu_initialization=True,
                         cp_group=cp_group)
        self.rope = rope
        self.rotary_dim = int(kv_channels * rotary_percent)

    def get_freqs_non_repeated(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        positions = torch.arange(offset, offset + max_seq_len, dtype=torch.long)
        return rope_angles(positions, self.rotary_dim, self.rope).to(self.inv_freq.device)
