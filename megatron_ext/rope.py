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
* ``dynamic`` dynamic NTK (Hugging Face's ``dynamic``): the NTK base grows with the
             sequence length once it exceeds original_max_position.
* ``llama3`` Llama 3.1's per-band scaling: long wavelengths / factor, short ones
             kept, a smooth blend between (low/high_freq_factor).

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

SCALINGS = ("none", "abf", "linear", "ntk", "yarn", "dynamic", "llama3")


@dataclass
class RopeConfig:
    """Rotary position embedding and how it is extended to a longer context."""

    base: float = 10000.0
    """Rotary base the model was pretrained with."""
    scaling: str = "none"
    """One of none, abf, linear, ntk, yarn, dynamic, llama3."""
    factor: float = 1.0
    """Extension factor for linear/ntk/yarn/dynamic/llama3: target context / original_max_position."""
    abf_base: float = 5_000_000.0
    """The raised base for ``abf`` (e.g. 5e6 for 4K -> 200K)."""
    original_max_position: int = 4096
    """Context length of the pretrained model (YaRN's ramp uses it)."""
    yarn_beta_fast: float = 32.0
    """YaRN: rotations above which frequencies are kept (extrapolated)."""
    yarn_beta_slow: float = 1.0
    """YaRN: rotations below which frequencies are interpolated."""
    llama3_low_freq_factor: float = 1.0
    """llama3: wavelengths above original_max_position / this are divided by factor."""
    llama3_high_freq_factor: float = 4.0
    """llama3: wavelengths below original_max_position / this are kept."""

    def __post_init__(self):
        if self.scaling not in SCALINGS:
            raise ValueError(f"rope scaling {self.scaling!r} is not one of {SCALINGS}")
        if self.scaling in ("linear", "ntk", "yarn", "dynamic", "llama3") and self.factor < 1.0:
            raise ValueError(f"rope factor must be >= 1 for {self.scaling}, got {self.factor}")


def inv_frequencies(dim: int, cfg: RopeConfig, seq_len: int = 0) -> torch.Tensor:
    """Rotary inverse frequencies, float64 [dim / 2]. ``seq_len`` (the length of the
    sequence being rotated) matters only for ``dynamic``."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    if cfg.scaling == "abf":
        return cfg.abf_base ** -exponents
    if cfg.scaling == "ntk":
        return (cfg.base * cfg.factor ** (dim / (dim - 2))) ** -exponents
    if cfg.scaling == "dynamic":
        grow = max(1.0, cfg.factor * seq_len / cfg.original_max_position - (cfg.factor - 1))
        return (cfg.base * grow ** (dim / (dim - 2))) ** -exponents
    inv = cfg.base ** -exponents
    if cfg.scaling == "llama3":
        return _llama3(inv, cfg)
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


def _llama3(inv: torch.Tensor, cfg: RopeConfig) -> torch.Tensor:
    """Llama 3.1's band-wise scaling of inverse frequencies ``inv`` [dim / 2]."""
    low, high = cfg.llama3_low_freq_factor, cfg.llama3_high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (cfg.original_max_position / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv / cfg.factor + smooth * inv
    out = torch.where(wavelen > cfg.original_max_position / low, inv / cfg.factor, inv)
    middle = (wavelen <= cfg.original_max_position / low) & (wavelen >= cfg.original_max_position / high)
    return torch.where(middle, blended, out)


def rope_angles(positions: torch.Tensor, dim: int, cfg: RopeConfig, seq_len: int = 0) -> torch.Tensor:
    """Angles for ``positions`` (LongTensor [n]) -> fp32 [n, dim / 2] in [0, 2*pi).
    ``dynamic`` scales by ``seq_len``, default max(positions) + 1 (as Hugging Face)."""
    pos = positions.to(torch.float64)
    if cfg.scaling == "linear":
        pos = pos / cfg.factor
    if cfg.scaling == "dynamic" and not seq_len:
        seq_len = int(positions.max()) + 1 if positions.numel() else 0
    angles = torch.outer(pos, inv_frequencies(dim, cfg, seq_len).to(pos.device))
    return torch.remainder(angles, 2 * math.pi).to(torch.float32)


class RopeAngleTable:
    """:func:`rope_angles` of positions ``[0, n)`` computed once and sliced for every later
    request, so a packed batch whose longest document changes each micro-batch costs a
    slice, not a new fp64 pass over up to 200K positions on the host.

    The same per-position fp64 math as :func:`rope_angles`, so a slice equals a direct
    call (a test checks equality). A table grows to the next power of two when a longer
    span is asked for. ``dynamic`` scales its frequencies with the length, so it keeps one
    table per scaling length; at most ``max_tables`` tables are kept (least recently used
    dropped), each [n, dim / 2] fp32 on its device.
    """

    def __init__(self, dim: int, cfg: RopeConfig, max_tables: int = 4):
        self.dim, self.cfg, self.max_tables = dim, cfg, max_tables
        self.tables: dict = {}  # (scaling length or 0, device) -> fp32 [n, dim / 2], most recent last

    def angles(self, start: int, length: int, seq_len: int = 0, device=None) -> torch.Tensor:
        """fp32 [length, dim / 2]: ``rope_angles(arange(start, start + length), dim, cfg, seq_len)``
        on ``device`` (default: host)."""
        stop = start + length
        scaled = (seq_len or stop) if self.cfg.scaling == "dynamic" else 0
        key = (scaled, str(torch.device(device or "cpu")))
        table = self.tables.pop(key, None)
        if table is None or table.shape[0] < stop:
            n = 1 << max(stop - 1, 0).bit_length()
            table = rope_angles(torch.arange(n), self.dim, self.cfg, scaled).to(device or "cpu")
        self.tables[key] = table
        while len(self.tables) > self.max_tables:
            self.tables.pop(next(iter(self.tables)))
        return table[start:stop]


def attention_scale_factor(cfg: RopeConfig) -> float:
    """Multiplier for the softmax scale: YaRN's temperature (0.1 ln s + 1)^2, else 1."""
    if cfg.scaling != "yarn" or cfg.factor <= 1:
        return 1.0
    return (0.1 * math.log(cfg.factor) + 1.0) ** 2


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cfg: RopeConfig) -> torch.Tensor:
    """Rotate x: [b, s, h, d] (non-interleaved halves) at positions [s]; fp32 math, x's dtype out.

    On a CP rank pass ``sharding.position_ids(S, rank, P)`` to rotate a zigzag shard. The
    angles are computed where ``positions`` live (a host tensor keeps the fp64 maths and
    ``dynamic``'s max off the GPU) and then moved to x's device.
    """
    d = x.shape[-1]
    ang = rope_angles(positions, d, cfg).to(x.device)[None, :, None, :]
    cos, sin = torch.cos(ang), torch.sin(ang)
    x1, x2 = x.float()[..., : d // 2], x.float()[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)

