"""Rules for the model choices megatron-core takes from us (recompute, transformer_impl);
split from config.py, which holds the dataclasses and the loader."""
from __future__ import annotations

from ..plan.layouts import RECOMPUTE_MODULES

TRANSFORMER_IMPLS = ("local", "transformer_engine")


def check_model_choices(cfg) -> None:
    """Raise ValueError naming the key for a bad model.transformer_impl or recompute setting."""
    m = cfg.model
    if m.transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"model.transformer_impl {m.transformer_impl!r} is not one of {', '.join(TRANSFORMER_IMPLS)}")
    _check_recompute(cfg)


def _check_recompute(cfg) -> None:
    m, g = cfg.model, cfg.model.recompute_granularity
    if g not in (None, "full", "selective"):
        raise ValueError(f"model.recompute_granularity {g!r} is not one of full, selective (or unset)")
    if cfg.recompute and g == "selective":
        raise ValueError("recompute: true (the old switch, = full) contradicts model.recompute_granularity selective; "
                         "drop recompute")
    full = g == "full" or (g is None and cfg.recompute)
    if m.recompute_modules and g != "selective":
        raise ValueError(f"model.recompute_modules {m.recompute_modules} needs model.recompute_granularity selective")
    bad = sorted(set(m.recompute_modules) - set(RECOMPUTE_MODULES))
    if bad:
        raise ValueError(f"model.recompute_modules {bad}: this dense local layer has {', '.join(RECOMPUTE_MODULES)} "
                         f"(megatron-core's moe, moe_act, shared_experts, mla_up_proj need MoE/MLA)")
    if "layernorm" in m.recompute_modules and m.transformer_impl != "transformer_engine":
        raise ValueError("model.recompute_modules layernorm needs model.transformer_impl transformer_engine "
                         "(megatron-core 0.16.1's CheckpointWithoutOutput reads TransformerEngine's FP8 state)")
    for key in ("recompute_method", "recompute_num_layers"):
        if getattr(m, key) is not None and not full:
            raise ValueError(f"model.{key} applies to model.recompute_granularity full only")
    if m.recompute_method not in (None, "uniform", "block"):
        raise ValueError(f"model.recompute_method {m.recompute_method!r} is not one of uniform, block")
    n = m.recompute_num_layers
    if n is not None:
        pp = cfg.parallel.pipeline_model_parallel_size
        vp = cfg.parallel.virtual_pipeline_model_parallel_size or 1
        per_chunk = m.num_layers // (pp * vp)
        if not 1 <= n <= per_chunk:
            raise ValueError(f"model.recompute_num_layers {n} must be between 1 and the layers per pipeline chunk, "
                             f"num_layers / (PP x VP) = {m.num_layers} / {pp * vp} = {per_chunk}")
