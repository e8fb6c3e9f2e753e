"""Hugging Face Llama-family tensors <-> megatron-core GPTModel parameters.

Layouts (h = hidden, d = head dim, nq query heads, ng query groups = KV heads):

* ``linear_qkv.weight`` [(nq/ng + 2) * ng * d, h]: per query group g the rows are
  [the nq/ng query heads of group g, k head g, v head g] (mcore's SelfAttention
  splits it that way); the bias (Qwen2) is laid out the same.
* ``linear_fc1.weight`` [2 * ffn, h] = [gate_proj; up_proj]: mcore's GLU applies the
  activation to the first half.
* RMSNorm weights sit in ``input_layernorm`` / ``pre_mlp_layernorm`` (local spec) or
  in ``layer_norm_weight`` of the fused linear layers (TransformerEngine spec);
  the target model's keys decide.
* RoPE: HF Llama checkpoints rotate halves (``rotate_half``), as mcore does with
  ``rotary_interleaved=False``, so q/k rows are copied unpermuted; a model built
  with interleaved rotary is refused.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Iterator, Tuple

import torch

from ..train.config import ModelConfig
from .hf_config import ConversionError

Shape = Tuple[int, ...]
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers that old .bin checkpoints carry; not weights


def _dims(m: ModelConfig):
    d = m.hidden_size // m.num_attention_heads
    return d, m.num_attention_heads, m.num_query_groups


def expected_hf_shapes(m: ModelConfig) -> Dict[str, Shape]:
    """HF tensor names and shapes for ``m`` (lm_head only when untied)."""
    d, nq, ng = _dims(m)
    h, f = m.hidden_size, m.ffn_hidden_size
    out = {"model.embed_tokens.weight": (m.vocab_size, h), "model.norm.weight": (h,)}
    if m.untie_embeddings:
        out["lm_head.weight"] = (m.vocab_size, h)
    for i in range(m.num_layers):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (nq * d, h), p + "self_attn.k_proj.weight": (ng * d, h),
                    p + "self_attn.v_proj.weight": (ng * d, h), p + "self_attn.o_proj.weight": (h, nq * d),
                    p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f)})
        if m.add_qkv_bias:
            out.update({p + "self_attn.q_proj.bias": (nq * d,), p + "self_attn.k_proj.bias": (ng * d,),
                        p + "self_attn.v_proj.bias": (ng * d,)})
    return out


def check_tensors(found: Dict[str, Shape], expected: Dict[str, Shape], where: str) -> None:
    """One ConversionError listing every missing, unexpected and mis-shaped tensor."""
    found = {k: v for k, v in found.items() if not k.endswith(IGNORED_SUFFIXES)}
    if "lm_head.weight" in found and "lm_head.weight" not in expected:  # tied: some writers keep a copy
        found.pop("lm_head.weight")
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k}: found {tuple(found[k])}, expected {expected[k]}" for k in sorted(set(found) & set(expected))
             if tuple(found[k]) != tuple(expected[k])]
    if missing or unexpected or wrong:
        parts = [f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else "",
                 f"shape mismatches [{'; '.join(wrong)}]" if wrong else ""]
        raise ConversionError(f"{where}: tensors do not match the config ({len(found)} found, {len(expected)} "
                              f"expected): " + "; ".join(p for p in parts if p))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ng: int) -> torch.Tensor:
    """q [nq*d, ...], k/v [ng*d, ...] -> mcore's grouped [(nq/ng + 2) * ng * d, ...]."""
    groups = [t.reshape(ng, -1, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(groups, dim=1).reshape(-1, *q.shape[1:])


def qkv_part(qkv: torch.Tensor, m: ModelConfig, which: int) -> torch.Tensor:
    """Inverse of :func:`fuse_qkv`, one part at a time: q (0) [nq*d, ...], k (1) or v (2)
    [ng*d, ...] from the fused [(nq/ng + 2) * ng * d, ...] rows; copies only that part."""
    d, nq, ng = _dims(m)
    grouped = qkv.reshape(ng, (nq // ng + 2) * d, *qkv.shape[1:])
    return grouped.split([nq // ng * d, d, d], dim=1)[which].reshape(-1, *qkv.shape[1:])


def _norm_keys(target_keys, layer: str) -> Tuple[str, str]:
    fused = f"{layer}self_attention.linear_qkv.layer_norm_weight" in target_keys
    if fused:
        return f"{layer}self_attention.linear_qkv.layer_norm_weight", f"{layer}mlp.linear_fc1.layer_norm_weight"
    return f"{layer}input_layernorm.weight", f"{layer}pre_mlp_layernorm.weight"


def padded_vocab_size(vocab_size: int, divisible_by: int) -> int:
    """``vocab_size`` rounded up to a multiple of ``divisible_by`` (Megatron-LM's
    ``--make-vocab-size-divisible-by``; its trainers also multiply by TP, which 128 covers up to 128)."""
    return -(-vocab_size // divisible_by) * divisible_by


def pad_vocab_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """[v, h] -> [rows, h], the final row repeated as Megatron-LM's checkpoint converters pad:
    a padding row's logit equals the last real token's, and argmax keeps the first (real) one."""
    return t if t.shape[0] == rows else torch.cat([t, t[-1:].expand(rows - t.shape[0], -1)])


def hf_to_mcore(load: Callable[[str], torch.Tensor], m: ModelConfig,
                target_keys: Iterable[str]) -> Iterator[Tuple[str, torch.Tensor]]:
    """(mcore parameter name, tensor) pairs, one at a time so a large model streams;
    ``load(name)`` returns one HF tensor."""
    target_keys = set(target_keys)
    ng = m.num_query_groups
    yield "embedding.word_embeddings.weight", pad_vocab_rows(load("model.embed_tokens.weight"), m.vocab_size)
    for i in range(m.num_layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        norm1, norm2 = _norm_keys(target_keys, mc)
        attn = hf + "self_attn."
        yield norm1, load(hf + "input_layernorm.weight")
        yield mc + "self_attention.linear_qkv.weight", fuse_qkv(*(load(f"{attn}{x}_proj.weight") for x in "qkv"), ng)
        if m.add_qkv_bias:
            yield mc + "self_attention.linear_qkv.bias", fuse_qkv(*(load(f"{attn}{x}_proj.bias") for x in "qkv"), ng)
        yield mc + "self_attention.linear_proj.weight", load(attn + "o_proj.weight")
        yield norm2, load(hf + "post_attention_layernorm.weight")
        gate_up = [load(hf + "mlp.gate_proj.weight"), load(hf + "mlp.up_proj.weight")]
        yield mc + "mlp.linear_fc1.weight", torch.cat(gate_up)
        yield mc + "mlp.linear_fc2.weight", load(hf + "mlp.down_proj.weight")
    yield "decoder.final_layernorm.weight", load("model.norm.weight")
    if m.untie_embeddings:
        yield "output_layer.weight", pad_vocab_rows(load("lm_head.weight"), m.vocab_size)


def mcore_to_hf(params: Dict[str, torch.Tensor], m: ModelConfig) -> Dict[str, Callable[[], torch.Tensor]]:
    """HF name -> a function that makes that tensor from the mcore parameters; the inverse of
    :func:`hf_to_mcore`. Nothing is copied until a function is called, so a writer holds one
    shard at a time; the shapes are :func:`expected_hf_shapes` (the embedding's first
    ``m.vocab_size`` rows: padding rows stay behind)."""
    def take(key: str, chunk: int = -1, qkv: int = -1, rows: int = 0) -> Callable[[], torch.Tensor]:
        def make() -> torch.Tensor:
            t = params[key].detach()
            t = t[:rows] if rows else t
            return t.chunk(2)[chunk] if chunk >= 0 else qkv_part(t, m, qkv) if qkv >= 0 else t
        return make

    out = {"model.embed_tokens.weight": take("embedding.word_embeddings.weight", rows=m.vocab_size),
           "model.norm.weight": take("decoder.final_layernorm.weight")}
    if m.untie_embeddings:
        out["lm_head.weight"] = take("output_layer.weight", rows=m.vocab_size)
    for i in range(m.num_layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        norm1, norm2 = _norm_keys(params, mc)
        out[hf + "input_layernorm.weight"], out[hf + "post_attention_layernorm.weight"] = take(norm1), take(norm2)
        attn = hf + "self_attn."
        for kind in ("weight", "bias") if m.add_qkv_bias else ("weight",):
            for j, x in enumerate("qkv"):
                out[f"{attn}{x}_proj.{kind}"] = take(f"{mc}self_attention.linear_qkv.{kind}", qkv=j)
        out[attn + "o_proj.weight"] = take(mc + "self_attention.linear_proj.weight")
        out[hf + "mlp.gate_proj.weight"] = take(mc + "mlp.linear_fc1.weight", chunk=0)
        out[hf + "mlp.up_proj.weight"] = take(mc + "mlp.linear_fc1.weight", chunk=1)
        out[hf + "mlp.down_proj.weight"] = take(mc + "mlp.linear_fc2.weight")
    return out
