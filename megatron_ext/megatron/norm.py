"""``SequenceParallelNorm``: torch's LayerNorm/RMSNorm for megatron-core's local layers,
usable with sequence parallelism.

megatron-core's ``WrappedTorchNorm`` refuses ``sequence_parallel`` because it does not
mark its weights: under SP each TP rank normalises its own slice of the sequence, so
the norm's weight gradients are partial sums that ``finalize_model_grads`` must
all-reduce over TP, which it does for parameters flagged ``sequence_parallel``. This
builder (same arguments as ``WrappedTorchNorm``) sets that flag.
"""
from __future__ import annotations

import torch


class SequenceParallelNorm:
    """Builds ``torch.nn.LayerNorm`` or ``RMSNorm`` of ``hidden_size`` per ``config.normalization``;
    forward: [s, b, hidden] -> [s, b, hidden]."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        if config.layernorm_zero_centered_gamma or zero_centered_gamma:
            raise ValueError("SequenceParallelNorm: zero-centred gamma is not supported by torch norms")
        kinds = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in kinds:
            raise ValueError(f"SequenceParallelNorm: normalization {config.normalization!r} is not one of {sorted(kinds)}")
        norm = kinds[config.normalization](normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            setattr(param, "sequence_parallel", bool(config.sequence_parallel))
        return norm
