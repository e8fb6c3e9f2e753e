"""Build megatron-core's GPTModel with context-parallel attention and extended RoPE."""
from __future__ import annotations

from typing import Optional

from megatron.core.models.gpt import GPTModel

from ..rope import RopeConfig, attention_scale_factor
from .rope import LongContextRotaryEmbedding
from .specs import get_gpt_block_cp_spec, get_gpt_layer_cp_spec


def build_gpt_model(config, *, vocab_size: int, max_sequence_length: int, rope: Optional[RopeConfig] = None,
                    layer_spec=None, use_transformer_engine: bool = False, **gpt_kwargs) -> GPTModel:
    """GPTModel whose layers use :class:`ContextParallelAttention` and whose rotary
    embedding is :class:`LongContextRotaryEmbedding` (fp64-reduced angles, any
    extension in ``rope``). ``use_transformer_engine``: ``layer_spec`` is (or, when None,
    becomes) megatron-core's TE layer spec, and the final norm is ``TENorm``. Other keyword
    arguments go to ``GPTModel``.

    YaRN also scales attention logits: set ``config.softmax_scale`` to
    ``attention_scale_factor(rope) / sqrt(kv_channels)``; a mismatch raises.
    """
    rope = rope or RopeConfig()
    factor = attention_scale_factor(rope)
    if factor != 1.0:
        want = factor / config.kv_channels ** 0.5
        if config.softmax_scale is None or abs(config.softmax_scale - want) > 1e-9 * want:
            raise ValueError(f"YaRN with factor {rope.factor} needs TransformerConfig.softmax_scale={want:.6g} "
                             f"(temperature {factor:.4f} / sqrt(kv_channels)); got {config.softmax_scale}")
    # a block spec, so that the final norm matches the layers and works under sequence parallelism
    te = use_transformer_engine
    block = get_gpt_block_cp_spec(config, layer_spec or get_gpt_layer_cp_spec(use_transformer_engine=te),
                                  vp_stage=gpt_kwargs.get("vp_stage"), use_transformer_engine=te)
    model = GPTModel(config, block, vocab_size=vocab_size,
                     max_sequence_length=max_sequence_length, position_embedding_type="rope",
                     rotary_base=int(rope.base), **gpt_kwargs)
    # GPTModel builds its rotary module in __init__ with no hook to choose the class; swap in ours,
    # on the same CP group.
    model.rotary_pos_emb = LongContextRotaryEmbedding(config.kv_channels, rope, cp_group=model.rotary_pos_emb.cp_group)
    return model
