"""``ContextParallelAttention``: megatron-core's CoreAttention protocol on top of
:mod:`megatron_ext.attention`, so Megatron's local (non-TE) layers run context
parallel on CPU or GPU. Megatron's own ``DotProductAttention`` refuses
``context_parallel_size > 1``; this module takes its place in the layer spec.

No dense [s, s] mask is ever built: causal masking is done block-wise by the
CP kernels, and ``attention_mask`` is ignored for the causal and no-mask types.
Packed sequences come as mcore's ``PackedSeqParams(qkv_format="thd")`` with
q/k/v [t_local, h, d]; documents then attend only to themselves (``cu_seqlens``).
Built by :func:`~megatron_ext.megatron.batch.get_thd_batch_on_this_cp_rank`, they carry the
layout on the host (``HostPackedSeqParams.host``), so no layer reads cu_seqlens back from
the device; a plain PackedSeqParams costs one such read per layer and pass.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
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
        """[s_local, b, h, d], [s_local, b, h_kv, d] x2 -> [s_local, b, h * d]; packed (thd):
        [t_local, h, d], [t_local, h_kv, d] x2 -> [t_local, h * d] (mcore adds b = 1)."""
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by ContextParallelAttention")
        causal = self._causal(attn_mask_type)
        cu_seqlens = _packed_cu_seqlens(packed_seq_params, self.layer_number)
        if cu_seqlens is not None:
            if query.dim() != 3:
                raise ValueError(f"packed (thd) core attention takes q [t, h, d]; got {tuple(query.shape)} "
                                 f"(layer {self.layer_number})")
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))  # [t, 1, h, d]
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # sbhd -> bshd views
        extra = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        if self.hierarchical is not None:
            out = hybrid_attention(q, k, v, self.hierarchical[0], self.hierarchical[1], causal=causal,
                                   softmax_scale=self.softmax_scale, **extra)
        else:
            out = _SINGLE_GROUP[self.cp_comm_type](q, k, v, self.cp_group, causal=causal,
                                                   softmax_scale=self.softmax_scale, **extra)
        s, b, h, d = query.shape
        out = out.transpose(0, 1).reshape(s, b, h * d)
        return out if cu_seqlens is None else out.squeeze(1)


def _packed_cu_seqlens(params, layer_number: int):
    """The global padded cu_seqlens of mcore's PackedSeqParams (None when not packed): the
    host :class:`~megatron_ext.sharding.PackedLayout` of a HostPackedSeqParams, else the tensor."""
    if params is None:
        return None
    if params.qkv_format != "thd":
        raise NotImplementedError(f"ContextParallelAttention supports packed_seq_params with qkv_format='thd', "
                                  f"not {params.qkv_format!r} (layer {layer_number})")
    if getattr(params, "host", None) is not None:  # checked once where the batch was built
        return params.host
    cu_q = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
    cu_kv = params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None else params.cu_seqlens_kv
    if cu_q is None or cu_kv is None or not torch.equal(cu_q.cpu(), cu_kv.cpu()):
        raise ValueError(f"packed self-attention needs the same cu_seqlens for q and kv (layer {layer_number})")
    return cu_q
