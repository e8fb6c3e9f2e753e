"""What each activation-recompute choice saves and costs: the memory model's saved bytes
and recomputed moment, and the time model's extra forward work, per pipeline stage.

megatron-core 0.16.1 semantics (transformer_layer.py:379-447, attention.py:381-415,
transformer_block.py _checkpointed_forward):
* full / uniform N: layers are checkpointed in groups of N; each group keeps its input
  [s/SP, b, h]; the backward recomputes a whole group (N layers' activations at once).
* full / block k: the first k layers of the stage are checkpointed one by one; the rest
  keep everything.
* selective: inside every layer, ``core_attn`` (its q/k/v inputs stay saved; with our
  flash-style CP attention only the fp32 LSE goes, while the ring's forward, P2P included,
  runs again), ``mlp`` (fc1 out, activation, fc2 input go; the MLP, with its SP all-gather
  and reduce-scatter, runs again), ``layernorm`` (the two norm outputs, i.e. the QKV and
  fc1 inputs, go; norms are cheap to redo).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from .layouts import Layout
from .model import ModelShape, layer_matrix_params

# parts of memory.saved_per_token that each selective module drops
SELECTIVE_DROPS = {"core_attn": ("attention lse (fp32)",),
                   "mlp": ("MLP: fc1 out, activation, fc2 input",),
                   "layernorm": ("norm outputs = QKV and fc1 inputs (SP-split)",)}


def selective_kept(parts: Dict[str, float], lay: Layout) -> Dict[str, float]:
    """The per-token parts one layer still saves under ``lay.recompute`` (selective)."""
    dropped = {k for m in lay.recompute.modules for k in SELECTIVE_DROPS[m]}
    return {k: v for k, v in parts.items() if k not in dropped}


def recomputed_layers(lay: Layout, layers: int) -> int:
    """Layers of one stage that full recompute checkpoints."""
    rc = lay.recompute
    if rc.granularity != "full":
        return 0
    return min(rc.num_layers, layers) if rc.method == "block" else layers


def activation_bytes(full_layer: float, kept_layer: float, layer_input: float, lay: Layout,
                     layers: int) -> Dict[str, float]:
    """{"saved": bytes a stage keeps for one micro-batch, "moment": the extra bytes alive while
    the last recomputed unit is rebuilt in the backward}. ``full_layer``: one layer's saved
    activations without recompute; ``kept_layer``: with the selective modules dropped;
    ``layer_input``: one layer's input [s/SP, b, h]."""
    rc = lay.recompute
    if rc.granularity == "selective":
        return {"saved": layers * kept_layer, "moment": full_layer - kept_layer}
    if rc.granularity == "full":
        done = recomputed_layers(lay, layers)
        group = 1 if rc.method == "block" else min(rc.num_layers, layers)
        groups = done if rc.method == "block" else -(-layers // group)
        return {"saved": groups * layer_input + (layers - done) * full_layer,
                "moment": group * full_layer if done else 0.0}
    return {"saved": layers * full_layer, "moment": 0.0}


@dataclass(frozen=True)
class ExtraWork:
    """Extra forward work per layer (averaged over a stage's layers) that recompute adds."""

    matrices: float
    """Fraction of a layer's matrix FLOPs run again."""
    attention: float
    """Fraction of a layer's attention FLOPs run again (the core attention's forward)."""
    ring_passes: float
    """Extra CP forward passes (the ring's P2P, all-gather or all-to-all again)."""
    tp_collectives: float
    """Extra SP all-gathers / reduce-scatters."""


def extra_work(shape: ModelShape, lay: Layout, layers: int) -> ExtraWork:
    """The :class:`ExtraWork` of ``lay.recompute`` for a stage of ``layers`` layers."""
    rc = lay.recompute
    if rc.granularity == "full":
        f = recomputed_layers(lay, layers) / layers
        return ExtraWork(f, f, f, 4 * f)
    if rc.granularity == "selective":
        mlp = (3 if shape.swiglu else 2) * shape.hidden_size * shape.ffn_hidden_size / layer_matrix_params(shape)
        core = "core_attn" in rc.modules
        in_mlp = "mlp" in rc.modules
        return ExtraWork(mlp if in_mlp else 0.0, 1.0 if core else 0.0, 1.0 if core else 0.0, 2.0 if in_mlp else 0.0)
    return ExtraWork(0.0, 0.0, 0.0, 0.0)
