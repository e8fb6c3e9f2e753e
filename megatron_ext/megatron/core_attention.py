"""``ContextParallelAttention``: megatron-core's CoreAttention protocol on top of
:mod:`megatron_ext.attention`, so Megatron's local (non-TE) layers run context
parallel on CPU or GPU. Megatron's own ``DotProductAttention`` refuses
``context_parallel_size > 1``; this module takes its place in the layer spec.

No dense [s, s] mask is ever built: causal masking is done block-wise by the
CP kernels, and ``attention_mask`` is ignored for the causal and no-mask types.
"""
from __future__ import annotations

import math
from typing import Optional

from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from ..attention import allgather_attention, hybrid_attention, ring_attention, ulysses_attention

# Megatron's cp_comm_type -> our algorithm.
CP_COMM_TYPES = {"p2p": "ring", "all_gather": "allgather", "a2a": "ulysses", "a2a+p2p": "hybrid"}
_SINGLE_GROUP = {"p2p": ring_attention, "all_gather": allgather_attention, "a2a": ulysses_attention}


def _cp_group(pg_collection):
    if pg_collection is not None and hasattr(pg_collection, "cp"):
        return pg_collection.cp
    group = parallel_state.get_context_parallel_group(check_initialized=False)
    if group is None:  # never fall back to the world group: that would shard over the wrong ranks
        raise RuntimeError("ContextParallelAttention needs a CP group: initialise megatron.core.parallel_state "
                           "(initialize_model_parallel(context_parallel_size=...)) or pass pg_collection.cp")
    return group


def _hierarchical_groups(pg_collection):
    groups = getattr(pg_collection, "hcp", None) if pg_collection is not None else None
    if groups is None:
        groups = parallel_state.get_hierarchical_context_parallel_groups(check_initialized=False)
    if not groups or len(groups) != 2:
        raise ValueError("cp_comm_type='a2a+p2p' needs two-level hierarchical CP groups: initialise "
                         "parallel_state with hierarchical_context_parallel_sizes=[ulysses, ring] "
                         "(or pass pg_collection.hcp)")
    return groups


class ContextParallelAttention(MegatronModule):
    """Exact core attention over a context-parallel group.

    forward: query [s_local, b, h, d], key/value [s_local, b, h_kv, d] (this TP
    rank's heads, this CP rank's zigzag shard) -> [s_local, b, h * d].
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"ContextParallelAttention has no attention dropout; set attention_dropout=0 "
                             f"(got {dropout}) in the TransformerConfig")
        if config.apply_query_key_layer_scaling:
            raise ValueError("ContextParallelAttention does not support apply_query_key_layer_scaling")
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.cp_comm_type = cp_comm_type or "p2p"
        if self.cp_comm_type not in CP_COMM_TYPES:
            raise ValueError(f"cp_comm_type {self.cp_comm_type!r} is not one of {sorted(CP_COMM_TYPES)}")
        self.cp_group = _cp_group(pg_collection)
        self.hierarchical = _hierarchical_groups(pg_collection) if self.cp_comm_type == "a2a+p2p" else None
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def _causal(self, attn_mask_type: Optional[AttnMaskType]) -> bool:
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if mask_type == AttnMaskType.causal:
            return True
        if mask_type == AttnMaskType.no_mask:
            return False
        raise NotImplementedError(f"ContextParallelAttention supports causal and no_mask attention, "
                                  f"not {mask_type} (layer {self.layer_number})")

    def forward(self, query, key, value, attention_mask, /, *, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """[s_local, b, h, d], [s_local, b, h_kv, d] x2 -> [s_local, b, h * d]."""
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences (thd) are not supported by ContextParallelAttention yet")
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by ContextParallelAttention")
        causal = self._causal(attn_mask_type)
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # sbhd -> bshd views
        if self.hierarchical is not None:
            out = hybrid_attention(q, k, v, self.hierarchical[0], self.hierarchical[1], causal=causal,
                                   softmax_scale=self.softmax_scale)
        else:
            out = _SINGLE_GROUP[self.cp_comm_type](q, k, v, self.cp_group, causal=causal,
                                                   softmax_scale=self.softmax_scale)
        s, b, h, d = query.shape
        return out.transpose(0, 1).reshape(s, b, h * d)
