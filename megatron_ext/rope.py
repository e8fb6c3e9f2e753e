"""RoPE with context extension, precise at 200K positions, and CP-aware.

Methods, chosen by :class:`RopeConfig.scaling`:

* ``none``   the pretrained base.
* ``abf``    adjusted base frequency: a new, larger base (LongSkywork-style
             extension raises it; 200K recipes use bases in the millions).
* ``linear`` position interpolation: positions / factor.
* ``ntk``    NTK-aware scaling: base * factor ** (d / (d - 2)).
* ``yarn``   NTK-by-parts frequencies (megatron-core's YaRN ramp, reused) plus
             the attention temperature, returned by :func:`attention_scale_factor`
             for the softmax scale.

Why not megatron-core's embedding as is: it multiplies fp32 positions by fp32
frequencies, so at position 2e5 an angle is off by up to ~1e-2 rad. Here angles
are formed in fp64 and reduced mod 2*pi before the fp32 cast, so cos/sin are
fp32-exact at any length. This module is pure math (no megatron-core import);
the mcore module over it, ``megatron_ext.megatron.rope.LongContextRotaryEmbedding``,
is a drop-in for ``GPTModel.rotary_pos_emb``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCALINGS = ("none", "abf", "linear", "ntk", "yarn")


@dataclass
class RopeConfig:
    """Rotary position embedding and how it is extended to a longer context."""

    base: float = 10000.0
    """Rotary base the model was pretrained with."""
    scaling: str = "none"
    """One of none, abf, linear, ntk, yarn."""
    factor: float = 1.0
    """Extension factor for linear/ntk/yarn: target context / original_max_position."""
    abf_base: float = 5_000_000.0
    """The raised base for ``abf`` (e.g. 5e6 for 4K -> 200K)."""
    original_max_position: int = 4096
    """Context length of the pretrained model (YaRN's ramp uses it)."""
    yarn_beta_fast: float = 32.0
    """YaRN: rotations above which frequencies are kept (extrapolated)."""
    yarn_beta_slow: float = 1.0
    """YaRN: rotations below which frequencies are interpolated."""

    def __post_init__(self):
        if self.scaling not in SCALINGS:
            raise ValueError(f"rope scaling {self.scaling!r} is not one of {SCALINGS}")
        if self.scaling in ("linear", "ntk", "yarn") and self.factor < 1.0:
            raise ValueError(f"rope factor must be >= 1 for {self.scaling}, got {self.factor}")


def inv_frequencies(dim: int, cfg: RopeConfig) -> torch.Tensor:
    """Rotary inverse frequencies, float64 [dim / 2]."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    if cfg.scaling == "abf":
        return cfg.abf_base ** -exponents
    if cfg.scaling == "ntk":
        return (cfg.base * cfg.factor ** (dim / (dim - 2))) ** -exponents
    inv = cfg.base ** -exponents
    if cfg.scaling == "yarn":
        keep = yarn_keep_mask(dim, cfg)
        inv = inv / cfg.factor * (1 - keep) + inv * keep
    return inv


def yarn_keep_mask(dim: int, cfg: RopeConfig) -> torch.Tensor:
    """YaRN's NTK-by-parts ramp, float64 [dim / 2]: 1 keeps a frequency, 0 interpolates it.

    The same formula and float32 ramp as megatron-core's yarn_rotary_pos_embedding (a
    test checks equality); written here because this layer never imports megatron-core.
    """
    def correction_dim(rotations: float) -> float:
        return dim * math.log(cfg.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(cfg.base))

    low = max(math.floor(correction_dim(cfg.yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.yarn_beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return 1.0 - ramp.double()


def rope_angles(positions: torch.Tensor, dim: int, cfg: RopeConfig) -> torch.Tensor:
    """Angles for ``positions`` (LongTensor [n]) -> fp32 [n, dim / 2] in [0, 2*pi)."""
    pos = positions.to(torch.float64)
    if cfg.scaling == "linear":
        pos = pos / cfg.factor
    angles = torch.outer(pos, inv_frequencies(dim, cfg).to(pos.device))
    return torch.remainder(angles, 2 * math.pi).to(torch.float32)


def attention_scale_factor(cfg: RopeConfig) -> float:
    """Multiplier for the softmax scale: YaRN's temperature (0.1 ln s + 1)^2, else 1."""
    if cfg.scaling != "yarn" or cfg.factor <= 1:
        return 1.0
    return (0.1 * math.log(cfg.factor) + 1.0) ** 2


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cfg: RopeConfig) -> torch.Tensor:
    """Rotate x: [b, s, h, d] (non-interleaved halves) at positions [s]; fp32 math, x's dtype out.

    On a CP rank pass ``sharding.position_ids(S, rank, P)`` to rotate a zigzag shard.
    """
    d = x.shape[-1]
    ang = rope_angles(positions, d, cfg)[None, :, None, :]
    cos, sin = torch.cos(ang), torch.sin(ang)
    x1, x2 = x.float()[..., : d // 2], x.float()[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)

