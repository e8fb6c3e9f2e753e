"""Layer specs that put :class:`ContextParallelAttention` into megatron-core's GPT layers.

Megatron-LM: ``--spec megatron_ext.megatron.specs gpt_layer_cp_spec``. Megatron-LM's
``import_module`` returns the named attribute itself and hands it to GPTModel as
``transformer_layer_spec``, so that name must be a ModuleSpec, not a function.
"""
from __future__ import annotations

import dataclasses

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from .core_attention import ContextParallelAttention
from .mlp import bias_view_linear
from .norm import SequenceParallelNorm


def _sp_norms(submodules):
    """``submodules`` with every ``WrappedTorchNorm`` (which refuses sequence parallelism)
    replaced by :class:`SequenceParallelNorm`; other norms (apex, TE) support SP already."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    changes = {f.name: SequenceParallelNorm for f in dataclasses.fields(submodules)
               if getattr(submodules, f.name) is WrappedTorchNorm}
    return dataclasses.replace(submodules, **changes)


def _recomputable_mlp(mlp):
    """``mlp`` (a ModuleSpec or class) with the dense MLP's ``linear_fc2`` returning a view of its
    bias (:func:`~megatron_ext.megatron.mlp.bias_view_linear`: selective ``mlp`` recompute with
    biases); MoE and other MLPs stay as they are."""
    from megatron.core.transformer.mlp import MLP

    if not (isinstance(mlp, ModuleSpec) and mlp.module is MLP and isinstance(mlp.submodules.linear_fc2, type)):
        return mlp
    fc2 = bias_view_linear(mlp.submodules.linear_fc2)
    return dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules, linear_fc2=fc2))


def _with_core_attention(layer_spec: ModuleSpec) -> ModuleSpec:
    """A copy of ``layer_spec`` whose self-attention uses ContextParallelAttention, whose dense
    MLP's output linear returns a view of its bias, and whose torch norms work under sequence
    parallelism."""
    attn = layer_spec.submodules.self_attention
    attn_subs = _sp_norms(dataclasses.replace(attn.submodules, core_attention=ContextParallelAttention))
    layer_subs = _sp_norms(dataclasses.replace(layer_spec.submodules,
                                               self_attention=dataclasses.replace(attn, submodules=attn_subs),
                                               mlp=_recomputable_mlp(layer_spec.submodules.mlp)))
    return dataclasses.replace(layer_spec, submodules=layer_subs)


def get_gpt_block_cp_spec(config, layer_spec: ModuleSpec, vp_stage=None, pp_rank=None,
                          use_transformer_engine: bool = False):
    """megatron-core TransformerBlockSubmodules for this pipeline stage: ``layer_spec``
    repeated for the layers this stage builds, and the final norm that matches the layers:
    ``TENorm`` for the TE layer spec, else :class:`SequenceParallelNorm` (torch's LayerNorm or
    RMSNorm, sequence-parallel aware). Chosen from ``use_transformer_engine``, not from what is
    installed: megatron-core's ``LayerNormImpl`` is apex's FusedLayerNorm whenever apex imports,
    and that refuses RMSNorm (fused_layer_norm.py:66-68)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = SequenceParallelNorm
    layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * layers, layer_norm=final_norm)


def get_gpt_layer_cp_spec(num_experts=None, moe_grouped_gemm=False, qk_layernorm=False,
                          normalization=None, use_transformer_engine=False, **kwargs) -> ModuleSpec:
    """megatron-core's local GPT layer spec with context-parallel core attention.

    ``use_transformer_engine=True`` starts from the TE layer spec instead (TE
    linears and norms, our attention); it needs TransformerEngine and is not
    exercised by CI. Other keyword arguments go to the underlying spec builder.
    """
    args = dict(num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, qk_layernorm=qk_layernorm, **kwargs)
    if use_transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return _with_core_attention(get_gpt_layer_with_transformer_engine_spec(**args))
    return _with_core_attention(get_gpt_layer_local_spec(normalization=normalization, **args))


# The Megatron-LM ``--spec`` target: the default local layer spec with our core attention.
gpt_layer_cp_spec: ModuleSpec = get_gpt_layer_cp_spec()
