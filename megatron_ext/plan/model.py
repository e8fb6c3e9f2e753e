"""The one formula for a GPT's parameter count and training FLOPs per token.

Used by the trainer's log (``train.metrics``), the dry run, the planner and the
benchmarks. The shape is megatron-core's local GPT layer as the trainer builds it:
QKV with GQA, output projection, MLP (SwiGLU: three ffn matrices, fc1 being [2f, h]),
two norms per layer, a final norm, the embedding and (untied) the output layer.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """The numbers the memory and time models need from a model config."""

    num_layers: int
    """Transformer layers L."""
    hidden_size: int
    """Model width h."""
    ffn_hidden_size: int
    """MLP width f."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """KV heads (GQA)."""
    vocab_size: int
    """Vocabulary V (the output layer's width)."""
    swiglu: bool
    """Gated SiLU MLP (fc1 is [2f, h])."""
    layernorm: bool
    """LayerNorm (weight and bias) rather than RMSNorm (weight only)."""
    bias: bool
    """Biases in the linear layers."""
    untied: bool
    """Separate embedding and output-layer matrices."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_size(self) -> int:
        """Width of K (or V): query groups x head dim."""
        return self.head_dim * self.num_query_groups


def model_shape(cfg, vocab_size: int = 0) -> ModelShape:
    """ModelShape of a ``TrainConfig``. The vocabulary is ``model.vocab_size``, else
    ``vocab_size`` (the tokenizer's, as the trainer builds it), else 65,536."""
    m = cfg.model
    return ModelShape(num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
                      num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
                      vocab_size=m.vocab_size or vocab_size or 65536, swiglu=m.swiglu,
                      layernorm=m.normalization == "LayerNorm", bias=m.add_bias_linear,
                      untied=m.untie_embeddings)


def layer_matrix_params(s: ModelShape) -> int:
    """Weights of one layer's matrices (what TP splits): QKV, proj, fc1, fc2."""
    h, kv, f = s.hidden_size, s.kv_size, s.ffn_hidden_size
    return h * (h + 2 * kv) + h * h + (3 if s.swiglu else 2) * h * f


def layer_params(s: ModelShape, tp: int = 1) -> float:
    """One layer's parameters on one TP rank: matrices and their biases / TP, norms replicated."""
    h, kv, f = s.hidden_size, s.kv_size, s.ffn_hidden_size
    split = layer_matrix_params(s)
    if s.bias:
        split += (h + 2 * kv) + (2 if s.swiglu else 1) * f  # column-parallel biases are split
    replicated = 2 * h * (2 if s.layernorm else 1)  # two norms
    if s.bias:
        replicated += 2 * h  # row-parallel biases (proj, fc2) are whole on every TP rank
    return split / tp + replicated


def embedding_params(s: ModelShape, tp: int = 1) -> float:
    """The input embedding on one TP rank (vocab parallel)."""
    return s.vocab_size * s.hidden_size / tp


def output_params(s: ModelShape, tp: int = 1) -> float:
    """The final norm plus, when untied, the output layer on one TP rank."""
    norm = s.hidden_size * (2 if s.layernorm else 1)
    return norm + (s.vocab_size * s.hidden_size / tp if s.untied else 0)


def parameter_count(s: ModelShape) -> int:
    """All parameters of the model (TP=1)."""
    return int(s.num_layers * layer_params(s) + embedding_params(s) + output_params(s))


def forward_flops_per_token(s: ModelShape, seq_length: int) -> dict:
    """Forward FLOPs per token, by part: 2 per multiply-add.

    * ``layers``: 2 x the layer matrices, per layer;
    * ``attention``: QK^T and AV, causal, so a query meets seq_length / 2 keys on
      average: 2 x 2 x h x S/2 = 2 h S per layer (flash attention skips the masked half);
    * ``logits``: the output layer, 2 h V.
    """
    h, layers = s.hidden_size, s.num_layers
    return {"layers": 2.0 * layers * layer_matrix_params(s), "attention": 2.0 * layers * seq_length * h,
            "logits": 2.0 * h * s.vocab_size}


def flops_per_token(cfg_or_shape, vocab_size: int = 0, seq_length: int = 0, recompute: bool = False) -> float:
    """Training FLOPs per token: forward + backward = 3 x forward (model FLOPs, what MFU counts).

    With ``recompute=True`` it is the hardware figure: full recomputation runs each
    layer's forward once more (not the logit layer), 4 x the layers' forward.
    Takes a ``TrainConfig`` (its ``data.seq_length``) or a :class:`ModelShape` with ``seq_length``.
    """
    if isinstance(cfg_or_shape, ModelShape):
        shape, seq = cfg_or_shape, seq_length
    else:
        shape, seq = model_shape(cfg_or_shape, vocab_size), seq_length or cfg_or_shape.data.seq_length
    fwd = forward_flops_per_token(shape, seq)
    layers = fwd["layers"] + fwd["attention"]
    return (4.0 if recompute else 3.0) * layers + 3.0 * fwd["logits"]
