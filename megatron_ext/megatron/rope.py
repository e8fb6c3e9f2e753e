"""megatron-core's RotaryEmbedding over :mod:`megatron_ext.rope`'s fp64-reduced angles."""
from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from ..rope import RopeAngleTable, RopeConfig


class LongContextRotaryEmbedding(RotaryEmbedding):
    """megatron-core's RotaryEmbedding with :func:`rope_angles` as its frequencies.

    Same interface (``forward(max_seq_len, offset, packed_seq, cp_group)`` -> emb
    [s_local, 1, 1, d]), so it replaces ``GPTModel.rotary_pos_emb``; the zigzag CP
    slicing stays megatron-core's. ``scaling_length`` (0: the rotated length) is
    the sequence length ``dynamic`` scales for, so a caller that pads can keep it.
    Angles come from a :class:`RopeAngleTable` (computed once, sliced per call): megatron-core
    caches ``forward`` per length, and a packed batch brings a new longest document each time.
    """

    def __init__(self, kv_channels: int, rope: RopeConfig, rotary_percent: float = 1.0, cp_group=None):
        super().__init__(kv_channels, rotary_percent, rotary_base=int(rope.base), use_cpu_initialization=True,
                         cp_group=cp_group)
        self.rope = rope
        self.rotary_dim = int(kv_channels * rotary_percent)
        self.scaling_length = 0
        self.angle_table = RopeAngleTable(self.rotary_dim, rope)

    def get_freqs_non_repeated(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        """fp32 [max_seq_len, rotary_dim / 2] angles of positions offset .. offset + max_seq_len - 1."""
        return self.angle_table.angles(offset, max_seq_len, self.scaling_length, self.inv_freq.device)
