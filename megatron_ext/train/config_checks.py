"""Rules that validate() applies to a config: heads and CP/TP splits, the virtual pipeline,
the learning-rate schedule, and the model choices megatron-core takes from us (recompute,
transformer_impl). Split from config.py, which holds the dataclasses, the loader and validate()."""
from __future__ import annotations

from typing import Optional

from ..plan.layouts import RECOMPUTE_MODULES

TRANSFORMER_IMPLS = ("local", "transformer_engine")


def check_model_choices(cfg) -> None:
    """Raise ValueError naming the key for a bad model.transformer_impl or recompute setting."""
    m = cfg.model
    if m.transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"model.transformer_impl {m.transformer_impl!r} is not one of {', '.join(TRANSFORMER_IMPLS)}")
    _check_recompute(cfg)


def sequence_parallel(cfg) -> bool:
    """``parallel.sequence_parallel``; unset means on exactly when TP > 1."""
    sp = cfg.parallel.sequence_parallel
    return cfg.parallel.tensor_model_parallel_size > 1 if sp is None else bool(sp)


def check_vocab_size(vocab_size: int, cfg, source: str = "model.vocab_size") -> None:
    """ValueError unless the embedding's ``vocab_size`` rows split evenly over TP (megatron-core's
    vocab-parallel embedding and output layer divide them; tensor_parallel/utils.py asserts).
    ``source`` names where the size came from (the key, or the tokenizer)."""
    tp = cfg.parallel.tensor_model_parallel_size
    if vocab_size % tp:
        padded = -(-vocab_size // (128 * tp)) * 128 * tp
        raise ValueError(f"{source} gives {vocab_size} vocabulary rows, which do not divide by "
                         f"tensor_model_parallel_size {tp}: set model.vocab_size to a multiple of {tp} at least "
                         f"{vocab_size} (Megatron-LM pads to a multiple of 128 x TP: {padded}); for a model from "
                         f"import-hf, import it again with --make-vocab-size-divisible-by 128")


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


def check_heads(cfg) -> None:
    """TP splits heads and query groups; Ulysses splits this TP rank's heads."""
    p, m = cfg.parallel, cfg.model
    tp, cp = p.tensor_model_parallel_size, p.context_parallel_size
    if p.cp_comm_type not in ("p2p", "all_gather", "a2a", "a2a+p2p"):
        raise ValueError(f"parallel.cp_comm_type {p.cp_comm_type!r} is not one of p2p, all_gather, a2a, a2a+p2p")
    if m.num_attention_heads % m.num_query_groups:
        raise ValueError(f"model.num_query_groups {m.num_query_groups} must divide "
                         f"model.num_attention_heads {m.num_attention_heads}")
    for key, n in (("num_attention_heads", m.num_attention_heads), ("num_query_groups", m.num_query_groups)):
        if n % tp:
            raise ValueError(f"parallel.tensor_model_parallel_size {tp} must divide model.{key} {n}")
    heads = m.num_attention_heads // tp
    ulysses = {"a2a": cp, "a2a+p2p": p.ulysses_size}.get(p.cp_comm_type, 1) if cp > 1 else 1
    if p.cp_comm_type == "a2a+p2p" and cp % p.ulysses_size:
        raise ValueError(f"parallel.ulysses_size {p.ulysses_size} must divide CP {cp}")
    if heads % ulysses:
        raise ValueError(f"Ulysses size {ulysses} ({p.cp_comm_type}) must divide the heads per TP rank: "
                         f"num_attention_heads / TP = {m.num_attention_heads} / {tp} = {heads}")
    if p.sequence_parallel and tp == 1:
        raise ValueError("parallel.sequence_parallel needs tensor_model_parallel_size > 1")


def virtual_pipeline_size(cfg) -> Optional[int]:
    """Model chunks per pipeline rank for megatron-core: None without interleaving (VP unset or 1)."""
    vp = cfg.parallel.virtual_pipeline_model_parallel_size
    return None if vp in (None, 1) else vp


def check_virtual_pipeline(cfg) -> None:
    """Interleaved 1F1B: each of the PP x VP chunks gets an equal share of the layers."""
    vp, pp, layers = virtual_pipeline_size(cfg), cfg.parallel.pipeline_model_parallel_size, cfg.model.num_layers
    if vp is None:
        return
    if vp < 1:
        raise ValueError(f"parallel.virtual_pipeline_model_parallel_size {vp} must be unset or >= 1")
    if pp == 1:
        raise ValueError(f"parallel.virtual_pipeline_model_parallel_size {vp} needs "
                         f"parallel.pipeline_model_parallel_size > 1 (got 1)")
    if layers % (pp * vp):
        raise ValueError(f"parallel.pipeline_model_parallel_size x virtual_pipeline_model_parallel_size = {pp} x {vp} "
                         f"= {pp * vp} must divide model.num_layers {layers}")


LR_DECAY_STYLES = ("cosine", "linear", "constant", "WSD")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")


def check_lr_schedule(o) -> None:
    """optim.lr_decay_style and its WSD settings, as megatron-core's scheduler accepts them."""
    if o.lr_decay_style not in LR_DECAY_STYLES:
        raise ValueError(f"optim.lr_decay_style {o.lr_decay_style!r} is not one of {', '.join(LR_DECAY_STYLES)}")
    if o.lr_decay_style != "WSD":
        return
    if o.lr_wsd_decay_style not in WSD_DECAY_STYLES:
        raise ValueError(f"optim.lr_wsd_decay_style {o.lr_wsd_decay_style!r} is not one of "
                         f"{', '.join(WSD_DECAY_STYLES)}")
    if not 0 < o.lr_wsd_decay_iters <= o.train_iters - o.warmup_iters:
        raise ValueError(f"optim.lr_wsd_decay_iters {o.lr_wsd_decay_iters} must be in 1..train_iters - warmup_iters "
                         f"= {o.train_iters - o.warmup_iters} with lr_decay_style WSD")
