"""``--dry-run``: validate a config without GPUs and print the layout, the
parameter count and an activation-memory estimate per GPU."""
from __future__ import annotations

from .config import TrainConfig, validate


def parameter_count(cfg: TrainConfig, vocab_size: int) -> int:
    """GPT with GQA; SwiGLU has three ffn matrices; norms included, biases ignored."""
    m = cfg.model
    h, kv = m.hidden_size, m.hidden_size // m.num_attention_heads * m.num_query_groups
    mlp = (3 if m.swiglu else 2) * h * m.ffn_hidden_size
    per_layer = h * (h + 2 * kv) + h * h + mlp + 4 * h
    embeddings = (2 if m.untie_embeddings else 1) * vocab_size * h
    return m.num_layers * per_layer + embeddings + 2 * h


def activation_bytes_per_gpu(cfg: TrainConfig) -> float:
    """Korthikanti et al. (2022) per layer, without the s*s attention term (flash
    attention keeps none): 34 * s * b * h bytes at 16-bit, split by TP * CP; with
    full recomputation only each layer's 16-bit input is kept: 2 * s * b * h."""
    m, p = cfg.model, cfg.parallel
    sbh = cfg.data.seq_length * cfg.optim.micro_batch_size * m.hidden_size
    per_layer = (2 if cfg.recompute else 34) * sbh / (p.tensor_model_parallel_size * p.context_parallel_size)
    return per_layer * m.num_layers / p.pipeline_model_parallel_size


def dry_run(cfg: TrainConfig, world_size: int, vocab_size: int) -> str:
    sizes = validate(cfg, world_size)
    p = cfg.parallel
    n = parameter_count(cfg, vocab_size)
    act = activation_bytes_per_gpu(cfg)
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    state = n * (2 + 4 + 4 + 4) / model_parallel
    zero1 = n * (2 + 4 + 12 / sizes["dp"]) / model_parallel
    lines = [
        f"dry run: stage={cfg.stage} world={world_size}: TP={p.tensor_model_parallel_size} PP={p.pipeline_model_parallel_size} "
        f"CP={p.context_parallel_size} ({p.cp_comm_type}) DP={sizes['dp']} grad_accum={sizes['grad_accum']}",
        f"  sequence {cfg.data.seq_length} tokens -> {cfg.data.seq_length // p.context_parallel_size} per CP rank; "
        f"rope {cfg.model.rope.scaling} (base {cfg.model.rope.base:g}"
        + (f", abf_base {cfg.model.rope.abf_base:g}" if cfg.model.rope.scaling == "abf" else "") + ")",
        f"  parameters: {n / 1e9:.2f} B ({n:,}); weights+grads+Adam per GPU: {state / 2**30:.1f} GiB "
        f"(bf16 weights, fp32 grads/master/m/v), {zero1 / 2**30:.1f} GiB with the optimizer state sharded over DP",
        f"  activations: {act / 2**30:.1f} GiB per GPU ({'full recompute' if cfg.recompute else 'no recompute'}, "
        f"micro batch {cfg.optim.micro_batch_size})",
    ]
    if cfg.expected:
        lines.append(f"  expect: {cfg.expected.strip()}")
    return "\n".join(lines)
