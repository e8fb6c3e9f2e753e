"""Hugging Face ``config.json`` <-> our :class:`TrainConfig` (model shape, RoPE).

Reads both spellings of RoPE settings: transformers 4 (``rope_theta`` plus
``rope_scaling`` with ``type`` or ``rope_type``) and transformers 5
(``rope_parameters``). Writes the transformers-4 spelling, which both read.
Anything our GPTModel cannot represent exactly is a :class:`ConversionError`
that names the field and its value.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

from ..rope import RopeConfig
from ..train.config import DataConfig, ModelConfig, TrainConfig

# HF architecture -> does it carry QKV biases.
ARCHITECTURES = {"LlamaForCausalLM": False, "MistralForCausalLM": False, "Qwen2ForCausalLM": True}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class ConversionError(ValueError):
    """Bad input to an import or export (the CLI prints it as one line and exits 2)."""


def _need(hf: Dict[str, Any], key: str, where: str):
    if key not in hf:
        raise ConversionError(f"{where}: missing required field {key!r}")
    return hf[key]


def architecture(hf: Dict[str, Any], where: str) -> str:
    """The one supported architecture named by ``architectures`` (else by ``model_type``)."""
    archs = hf.get("architectures") or ([MODEL_TYPES[hf["model_type"]]] if hf.get("model_type") in MODEL_TYPES else [])
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ConversionError(f"{where}: architectures={archs} is not supported; supported: {sorted(ARCHITECTURES)}")
    return archs[0]


def _hf_rope_params(hf: Dict[str, Any]) -> Dict[str, Any]:
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _yarn_attention_factor(p: Dict[str, Any], factor: float) -> float:
    """HF's YaRN attention factor (multiplies cos and sin), as transformers computes it."""
    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if p.get("attention_factor") is not None:
        return float(p["attention_factor"])
    if p.get("mscale") and p.get("mscale_all_dim"):
        return mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
    return mscale(factor)


def rope_from_hf(hf: Dict[str, Any], where: str) -> RopeConfig:
    """RopeConfig for an HF config's rope_theta / rope_scaling (linear, dynamic, yarn, llama3)."""
    p = _hf_rope_params(hf)
    kind, base = p["rope_type"], float(p["rope_theta"])
    mpe = int(hf.get("max_position_embeddings", 4096))
    if float(p.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConversionError(f"{where}: partial_rotary_factor={p['partial_rotary_factor']} is not supported "
                              f"(RoPE on the whole head only)")
    if kind == "default":
        return RopeConfig(base=base, original_max_position=mpe)
    original = int(p.get("original_max_position_embeddings") or mpe)
    if kind == "linear":  # HF's linear has no original length: max_position_embeddings is taken as the extended one
        factor = float(p["factor"])
        original = int(p.get("original_max_position_embeddings") or round(mpe / factor))
        return RopeConfig(base=base, scaling="linear", factor=factor, original_max_position=original)
    if kind == "dynamic":  # HF scales from max_position_embeddings, whatever else the config says
        return RopeConfig(base=base, scaling="dynamic", factor=float(p["factor"]), original_max_position=mpe)
    if kind == "llama3":
        return RopeConfig(base=base, scaling="llama3", factor=float(p["factor"]), original_max_position=original,
                          llama3_low_freq_factor=float(p["low_freq_factor"]),
                          llama3_high_freq_factor=float(p["high_freq_factor"]))
    if kind == "yarn":
        factor = float(p["factor"]) if p.get("factor") is not None else mpe / original
        rope = RopeConfig(base=base, scaling="yarn", factor=factor, original_max_position=original,
                          yarn_beta_fast=float(p.get("beta_fast") or 32), yarn_beta_slow=float(p.get("beta_slow") or 1))
        wanted, ours = _yarn_attention_factor(p, factor), 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        if abs(wanted - ours) > 1e-12 * ours:
            raise ConversionError(f"{where}: yarn attention factor {wanted} (attention_factor/mscale/mscale_all_dim) "
                                  f"cannot be represented; we use 0.1 ln(factor) + 1 = {ours}")
        if p.get("truncate", True) is False:
            raise ConversionError(f"{where}: yarn truncate=false cannot be represented (we round the ramp ends)")
        return rope
    raise ConversionError(f"{where}: rope_scaling type {kind!r} cannot be represented; supported: "
                          f"default, linear, dynamic, yarn, llama3")


def rope_to_hf(rope: RopeConfig, head_dim: int) -> Tuple[float, Optional[Dict[str, Any]]]:
    """(rope_theta, rope_scaling or None) that make HF rotate exactly as ``rope`` does.
    ABF leaves as its raised base; static NTK as the base it amounts to."""
    if rope.scaling == "none":
        return rope.base, None
    if rope.scaling == "abf":
        return rope.abf_base, None
    if rope.scaling == "ntk":
        return rope.base * rope.factor ** (head_dim / (head_dim - 2)), None
    scaling: Dict[str, Any] = {"rope_type": rope.scaling, "factor": rope.factor}
    if rope.scaling in ("yarn", "llama3"):
        scaling["original_max_position_embeddings"] = rope.original_max_position
    if rope.scaling == "yarn":
        scaling.update(beta_fast=rope.yarn_beta_fast, beta_slow=rope.yarn_beta_slow)
    if rope.scaling == "llama3":
        scaling.update(low_freq_factor=rope.llama3_low_freq_factor, high_freq_factor=rope.llama3_high_freq_factor)
    return rope.base, scaling


def _check_representable(hf: Dict[str, Any], arch: str, where: str) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (SwiGLU with silu only)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConversionError(f"{where}: {key}=true is not supported for {arch}")
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    if window is not None and window < hf.get("max_position_embeddings", 0):
        raise ConversionError(f"{where}: sliding_window={window} < max_position_embeddings: sliding-window "
                              f"attention is not supported (full causal attention only)")
    windowed = [t for t in hf.get("layer_types") or [] if t != "full_attention"]
    if windowed:
        raise ConversionError(f"{where}: layer_types {sorted(set(windowed))} are not supported (full_attention only)")


def train_config_from_hf(hf: Dict[str, Any], where: str) -> TrainConfig:
    """Our TrainConfig for an HF Llama-family config: model shape, RoPE, norm eps,
    embeddings tying, vocab; data.seq_length = max_position_embeddings."""
    arch = architecture(hf, where)
    _check_representable(hf, arch, where)
    hidden, heads = int(_need(hf, "hidden_size", where)), int(_need(hf, "num_attention_heads", where))
    head_dim = hf.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise ConversionError(f"{where}: head_dim={head_dim} x num_attention_heads={heads} != hidden_size={hidden}; "
                              f"a separate head_dim is not supported")
    model = ModelConfig(
        num_layers=int(_need(hf, "num_hidden_layers", where)), hidden_size=hidden,
        ffn_hidden_size=int(_need(hf, "intermediate_size", where)), num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads), vocab_size=int(_need(hf, "vocab_size", where)),
        rope=rope_from_hf(hf, where), init_method_std=float(hf.get("initializer_range", 0.02)), swiglu=True,
        normalization="RMSNorm", add_bias_linear=False, untie_embeddings=not hf.get("tie_word_embeddings", False),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)), add_qkv_bias=ARCHITECTURES[arch])
    return TrainConfig(model=model, data=DataConfig(seq_length=int(hf.get("max_position_embeddings", 4096))))


def hf_config_from_train(cfg: TrainConfig, vocab_size: int, dtype: str) -> Dict[str, Any]:
    """config.json for ``cfg``'s model: LlamaForCausalLM, or Qwen2ForCausalLM with QKV
    biases; max_position_embeddings = the trained data.seq_length (dynamic NTK:
    its original length, which HF scales from)."""
    m = cfg.model
    if not (m.swiglu and m.normalization == "RMSNorm" and not m.add_bias_linear):
        raise ConversionError(f"model (swiglu={m.swiglu}, normalization={m.normalization}, add_bias_linear="
                              f"{m.add_bias_linear}) is not Llama-family; export needs swiglu, RMSNorm, "
                              f"no linear biases")
    head_dim = m.hidden_size // m.num_attention_heads
    theta, scaling = rope_to_hf(m.rope, head_dim)
    mpe = m.rope.original_max_position if m.rope.scaling == "dynamic" else cfg.data.seq_length
    arch, model_type = ("Qwen2ForCausalLM", "qwen2") if m.add_qkv_bias else ("LlamaForCausalLM", "llama")
    out = {"architectures": [arch], "model_type": model_type, "vocab_size": vocab_size, "hidden_size": m.hidden_size,
           "intermediate_size": m.ffn_hidden_size, "num_hidden_layers": m.num_layers,
           "num_attention_heads": m.num_attention_heads, "num_key_value_heads": m.num_query_groups,
           "head_dim": head_dim, "hidden_act": "silu", "max_position_embeddings": mpe, "rms_norm_eps": m.norm_epsilon,
           "rope_theta": theta, "rope_scaling": scaling, "tie_word_embeddings": not m.untie_embeddings,
           "initializer_range": m.init_method_std, "torch_dtype": dtype, "use_cache": True}
    if m.add_qkv_bias:
        out.update(use_sliding_window=False, sliding_window=None)
    else:
        out.update(attention_bias=False, mlp_bias=False)
    return out
