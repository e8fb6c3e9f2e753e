"""model.transformer_impl (#23 item 2): the TE choice fails in one line naming the extra when
TransformerEngine is missing, and the spec substitution puts our CP core attention into
megatron-core's layer spec (checked on the local spec; TE is not installable here)."""
import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "launch/configs/tiny_cpu_pretrain.yaml")


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None, reason="TE is installed")
def test_transformer_engine_missing_is_one_line_naming_the_extra():
    from megatron_ext.train.config import load_config, validate
    from megatron_ext.train.model import _build_chunk, require_transformer_engine

    with pytest.raises(ImportError) as err:
        require_transformer_engine()
    assert "pip install 'megatron-ext[gpu]'" in str(err.value) and "\n" not in str(err.value)
    cfg = load_config(TINY, ["model.transformer_impl=transformer_engine"])
    validate(cfg, 4)  # the dry run plans it without TE
    with pytest.raises(ImportError, match=r"megatron-ext\[gpu\]"):
        _build_chunk(cfg, None, 64, None)  # refused before anything is built
    with pytest.raises(ValueError, match="model.transformer_impl 'te' is not one of local, transformer_engine"):
        validate(load_config(TINY, ["model.transformer_impl=te"]), 4)


def test_spec_substitution_replaces_core_attention_and_fc2_class():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron.core.tensor_parallel import RowParallelLinear
    from megatron.core.transformer.mlp import MLP

    from megatron_ext.megatron.core_attention import ContextParallelAttention
    from megatron_ext.megatron.mlp import bias_view_linear
    from megatron_ext.megatron.specs import _with_core_attention

    original = get_gpt_layer_local_spec(normalization="RMSNorm")
    assert original.submodules.self_attention.submodules.core_attention is DotProductAttention
    ours = _with_core_attention(original)
    attn = ours.submodules.self_attention.submodules
    assert attn.core_attention is ContextParallelAttention
    assert original.submodules.self_attention.submodules.core_attention is DotProductAttention  # a copy
    before = original.submodules.self_attention.submodules
    assert attn.linear_qkv is before.linear_qkv and attn.linear_proj is before.linear_proj
    # the MLP stays megatron-core's; only linear_fc2 returns a view of its bias (selective mlp recompute, #23)
    mlp, before_mlp = ours.submodules.mlp.submodules, original.submodules.mlp.submodules
    assert ours.submodules.mlp.module is MLP and mlp.linear_fc1 is before_mlp.linear_fc1
    assert mlp.linear_fc2 is bias_view_linear(before_mlp.linear_fc2) and issubclass(mlp.linear_fc2, RowParallelLinear)
    assert before_mlp.linear_fc2 is RowParallelLinear  # a copy
