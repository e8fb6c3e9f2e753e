"""Peak memory per GPU of one training layout, part by part, as the trainer allocates it.

The trainer (``megatron_ext.train``): megatron-core GPTModel with local layers and
ContextParallelAttention; bf16 = bf16 params under Float16Module, mcore DDP with a
contiguous fp32 grad buffer (grad_reduce_in_fp32), the distributed optimizer's fp32
main params + Adam exp_avg + exp_avg_sq (12 B/param) sharded over DP x CP (replicated
without it). fp32 = 4 B params, 4 B grads, 8 B Adam (the params are the main params).

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models", Sec. 4), tensor by tensor for this layer (SwiGLU, GQA,
no dropout, flash attention: no s x s term), all split by TP (sequence parallel) and CP.
The peak is the static state plus the saved activations plus the larger of two
moments: the loss (logits alive, into the output layer's backward: its dgrad and wgrad)
and the last layer's backward (its recomputed
activations and the CP attention's buffers). A ``*_bytes`` figure is per GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import gcd
from typing import Dict, List

from .layouts import Layout, RunShape
from .model import ModelShape, embedding_params, layer_params, output_params
from .recompute import activation_bytes, selective_kept

GIB = 2 ** 30
# CUDA context (~0.5 GiB on Hopper), NCCL communicator buffers (~1-2 GiB for a few groups,
# NCCL_BUFFSIZE 4 MiB x channels x peers) and caching-allocator fragmentation. Not tensor memory;
# added to the GPU figure only. Override with --constant reserve_gib=...
RESERVE_GIB = 4.0
# Ring K/V waves on CUDA: whole blocks (kv_chunks=1), as megatron_ext.attention.ring defaults there.
CUDA_RING_WAVES = 1


@dataclass
class MemoryEstimate:
    """Per-GPU memory of one layout on its fullest pipeline stage."""

    parts: Dict[str, float]
    """Bytes by part, in print order (the two moments' parts are both listed)."""
    peak_bytes: float
    """Tensor memory at the peak: static + saved activations + the larger moment."""
    reserve_bytes: float
    """Non-tensor memory added to the GPU figure (context, NCCL, fragmentation)."""
    stage: str
    """Which pipeline stage this is (the fullest)."""
    peak_moment: str
    """'loss' or 'last-layer backward'."""
    notes: List[str] = field(default_factory=list)
    """One-line explanations for the report."""

    @property
    def total_bytes(self) -> float:
        return self.peak_bytes + self.reserve_bytes


def state_bytes_per_param(run: RunShape, lay: Layout) -> Dict[str, float]:
    """Bytes per local parameter of weights, grads and the optimizer shard."""
    shard = lay.dp * lay.cp if run.distributed_optimizer else 1
    if run.bf16:
        return {"weights": 2.0, "grads": 4.0, "optimizer": 12.0 / shard}
    return {"weights": 4.0, "grads": 4.0, "optimizer": 8.0 / shard}


def kv_replication(shape: ModelShape, lay: Layout) -> int:
    """Copies of each KV head Ulysses makes (megatron_ext.attention.ulysses.kv_replication)."""
    if lay.cp_comm_type not in ("a2a", "a2a+p2p"):
        return 1
    groups_local = shape.num_query_groups // lay.tp
    return lay.ulysses // gcd(groups_local, lay.ulysses)


def _sp(run: RunShape, lay: Layout) -> int:
    """How many ways the sequence-parallel tensors (norm and layer inputs) are split."""
    return lay.tp if run.sequence_parallel else 1


def saved_per_token(shape: ModelShape, run: RunShape, lay: Layout, act: int) -> Dict[str, float]:
    """Bytes one layer saves for backward per local token, before the TP split (elements x act bytes).

    ring / all_gather: the QKV linear's output stays alive (V is a view of it), plus
    the RoPE'd Q and K copies; Ulysses/hybrid save their head-sharded q, k, v, out
    instead. cos/sin of RoPE are saved per call ([s, 1, 1, d]: not split by TP).
    SwiGLU (mcore's unfused glu): fc1 out [2f], silu out, x_linear + glu_linear_offset
    (a new tensor even at offset 0) and the product (fc2's input): 5f; GELU: 2f.
    """
    h, kv, f, d = shape.hidden_size, shape.kv_size, shape.ffn_hidden_size, shape.head_dim
    heads = shape.num_attention_heads
    if lay.cp_comm_type in ("a2a", "a2a+p2p"):
        rep = kv_replication(shape, lay)
        attn = h + 2 * kv * rep + h  # q_h, k_h, v_h, out_h
    else:
        attn = (h + 2 * kv) + (h + kv)  # mixed QKV (held by V's view), RoPE'd Q and K
    norm_copies = 1 if shape.layernorm or run.fused_rms_norm else 2
    return {"norm inputs (SP-split)": 2 * norm_copies * h * act * lay.tp / _sp(run, lay),
            "norm outputs = QKV and fc1 inputs (SP-split)": 2 * h * act * lay.tp / _sp(run, lay),
            "attention q/k/v kept for backward": attn * act,
            "attention output (proj input)": h * act,
            "attention lse (fp32)": heads * 4.0,
            "MLP: fc1 out, activation, fc2 input": ((5 if shape.swiglu else 2) * f) * act,
            "RoPE cos/sin (not TP-split)": 4 * d * act * lay.tp}


def layer_saved_bytes(shape: ModelShape, run: RunShape, lay: Layout, tokens: float, act: int) -> float:
    """One layer's saved activations on one GPU for ``tokens`` local tokens (b x s / CP)."""
    return tokens * sum(saved_per_token(shape, run, lay, act).values()) / lay.tp


def attention_buffers(shape: ModelShape, run: RunShape, lay: Layout, tokens: float, act: int,
                      ring_waves: int) -> float:
    """Extra bytes of one layer's attention backward (the CP algorithm's buffers), one GPU.

    Qn, KVn: elements of this GPU's q and of its k (= v). fp32 accumulators as in
    megatron_ext.attention: ring = own dq/dk/dv fp32, K/V slices in flight (2 whole
    blocks at 1 wave, 3 slices otherwise), dK/dV accumulators being built/sent/arriving
    (fp32), kernel temporaries (dQ of half the queries, dK/dV of a slice);
    all_gather = the gathered K/V of the whole sequence, its rank-ordered fp32 dK/dV,
    fp32 dq; a2a = three staging copies of the packed q/k/v plus the local backward.
    """
    rep = kv_replication(shape, lay)
    qn = tokens * shape.hidden_size / lay.tp
    kvn = tokens * shape.kv_size / lay.tp * rep

    def ring(size: int, waves: int) -> float:
        own = (qn + 2 * kvn) * (4 + (act if act < 4 else 0))  # fp32 dq/dk/dv, and their act-dtype casts
        if size == 1:
            return own
        slice_ = 2 * kvn / waves
        return own + (2 if waves == 1 else 3) * slice_ * act + 3 * slice_ * 4 + 0.5 * qn * act + slice_ * act

    if lay.cp_comm_type == "p2p":
        return ring(lay.cp, ring_waves)
    if lay.cp_comm_type == "all_gather":
        return 2 * kvn * lay.cp * (2 * act + 4) + qn * (4 + act / 2)
    staging = 3 * (qn + 2 * kvn) * act
    inner = lay.cp // lay.ulysses
    return staging + ring(inner, ring_waves if inner > 1 else 1) + qn * act


def layer_backward_extra(shape: ModelShape, lay: Layout, tokens: float, act: int, attn: float) -> float:
    """Bytes a layer's backward adds on top of its saved activations, one GPU. The MLP's
    backward runs first: its output grad and d fc2-in [f] on top of everything saved.
    The attention's backward runs after the MLP's saved tensors (5f SwiGLU, 2f GELU) are
    freed, so its buffers ``attn`` count only beyond those."""
    f = shape.ffn_hidden_size
    mlp_saved = tokens * (5 * f if shape.swiglu else 2 * f) / lay.tp * act
    mlp_first = tokens * f / lay.tp * act + tokens * shape.hidden_size * act
    return max(mlp_first, attn - mlp_saved)


def output_layer_backward(shape: ModelShape, run: RunShape, lay: Layout, tokens: float, act: int) -> float:
    """Bytes the output layer's backward allocates while the logits' grad [s, b, v/TP] is
    alive, one GPU (megatron/core/tensor_parallel/layers.py, LinearWithGradAccumulation...
    backward, mcore 0.16.1): its dgrad of the whole local sequence [s, b, h] (:493, before
    SP's reduce-scatter or TP's all-reduce), under SP the reduce-scatter's output
    [s/TP, b, h] (:548), and its wgrad [v/TP, h] (:614; the trainer does not fuse wgrad
    accumulation). ``tokens``: local tokens b x s / CP."""
    h = shape.hidden_size
    sp = tokens * h * act / lay.tp if lay.tp > 1 and run.sequence_parallel else 0.0
    return tokens * h * act + sp + shape.vocab_size / lay.tp * h * act


def in_flight(run: RunShape, lay: Layout) -> float:
    """Micro-batches of activations the first pipeline stage holds (1F1B: min(PP, m));
    interleaved: PP x (1 + (PP-1)/(PP x v)) (Korthikanti et al. Sec. 4.2.3)."""
    if lay.pp == 1:
        return 1.0
    m = lay.micro_batches(run)
    if run.virtual_pp > 1:
        return lay.pp * (1 + (lay.pp - 1) / (lay.pp * run.virtual_pp))
    return float(min(lay.pp, m))


def stage_params(shape: ModelShape, lay: Layout, first: bool, last: bool) -> float:
    """Parameters one GPU of a pipeline stage holds: its layers / TP, the embedding on the
    first stage, the final norm and output layer on the last (a tied embedding is
    duplicated there when PP > 1, as megatron-core does)."""
    n = shape.num_layers // lay.pp * layer_params(shape, lay.tp)
    if first:
        n += embedding_params(shape, lay.tp)
    if last:
        n += output_params(shape, lay.tp) + (embedding_params(shape, lay.tp) if not shape.untied and not first else 0)
    return n


def estimate_memory(shape: ModelShape, run: RunShape, lay: Layout, *, ring_waves: int = CUDA_RING_WAVES,
                    reserve_gib: float = RESERVE_GIB) -> MemoryEstimate:
    """Peak bytes per GPU of ``lay`` (the fuller of the first and the last pipeline stage)."""
    stages = [_stage(shape, run, lay, first, last, ring_waves, reserve_gib)
              for first, last in ([(True, True)] if lay.pp == 1 else [(True, False), (False, True)])]
    return max(stages, key=lambda e: e.peak_bytes)


def _stage(shape, run, lay, first, last, ring_waves, reserve_gib) -> MemoryEstimate:
    act = 2 if run.bf16 else 4
    layers = shape.num_layers // lay.pp
    tokens = lay.micro_batch * run.seq_length / lay.cp  # local tokens of one micro-batch
    n_params = stage_params(shape, lay, first, last)
    per_param = state_bytes_per_param(run, lay)
    parts = {k: n_params * v for k, v in (("weights", per_param["weights"]), ("grads (fp32 buffer)",
             per_param["grads"]), ("optimizer shard" if run.distributed_optimizer else "optimizer",
                                   per_param["optimizer"]))}
    full_layer = layer_saved_bytes(shape, run, lay, tokens, act)
    kept_layer = tokens * sum(selective_kept(saved_per_token(shape, run, lay, act), lay).values()) / lay.tp
    acts = activation_bytes(full_layer, kept_layer, tokens * shape.hidden_size / _sp(run, lay) * act, lay, layers)
    flights = in_flight(run, lay) if first else 1.0
    parts["activations saved"] = acts["saved"] * flights
    if last:  # final norm input (and normalised input, unfused) and output (the output layer's input)
        copies = 2 if shape.layernorm or run.fused_rms_norm else 3
        parts["activations saved"] += copies * tokens * shape.hidden_size / _sp(run, lay) * act
    logits = tokens * shape.vocab_size / lay.tp * (4 + (act if act < 4 else 0)) if last else 0.0
    parts["logits + loss (fp32 copy)"] = logits
    parts["output layer backward (dgrad, wgrad)"] = output_layer_backward(shape, run, lay, tokens, act) if last else 0.0
    loss_moment = logits + parts["output layer backward (dgrad, wgrad)"]
    attn = attention_buffers(shape, run, lay, tokens, act, ring_waves)
    extra = layer_backward_extra(shape, lay, tokens, act, attn)
    sp = lay.tp > 1 and run.sequence_parallel
    # SP all-gathers each column-parallel GEMM's input into megatron-core's GlobalMemoryBuffer
    # (tensor_parallel/layers.py:482): one [s, b, h] tensor that stays allocated for the run
    parts["SP all-gather buffer (persistent)"] = tokens * shape.hidden_size * act if sp else 0.0
    parts["recomputed layer (backward)"] = acts["moment"]  # the last recomputed unit, rebuilt
    # SP backward: the reduce-scatter's output [s/TP, h] beside the full dgrad (layers.py:548)
    parts[f"layer backward temporaries ({lay.cp_comm_type} attention)"] = \
        extra + (tokens * shape.hidden_size * act / lay.tp if sp else 0.0)
    static = parts["weights"] + parts["grads (fp32 buffer)"] + parts["SP all-gather buffer (persistent)"] + \
        sum(v for k, v in parts.items() if k.startswith("optim"))
    layer_moment = parts["recomputed layer (backward)"] + parts[f"layer backward temporaries ({lay.cp_comm_type} attention)"]
    moment = "loss" if loss_moment >= layer_moment else "last-layer backward"
    peak = static + parts["activations saved"] + max(loss_moment, layer_moment)
    stage = "only stage" if lay.pp == 1 else ("first stage" if first else "last stage")
    notes = [f"{n_params / 1e9:.3f} B params on this GPU; {layers} layers x {flights:g} micro-batch(es) in flight",
             f"peak at the {moment}: the other moment's parts are listed but not added"]
    return MemoryEstimate(parts, peak, reserve_gib * GIB, stage, moment, notes)
