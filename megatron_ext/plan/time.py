"""Step time of one layout: compute at a stated fraction of peak, TP/CP/DP/PP traffic
over NVLink inside a node and InfiniBand across nodes, the ring's P2P overlapped with
attention compute, and the pipeline bubble.

Every constant is a field of :class:`Hardware` with its source; ``--constant name=value``
overrides any of them. Ranks are placed in megatron-core's default order (TP, CP, DP, PP
from the innermost), which decides whether a group's traffic stays on NVLink.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict

from .layouts import Layout, RunShape
from .memory import RESERVE_GIB, kv_replication, stage_params
from .model import ModelShape, forward_flops_per_token
from .recompute import extra_work

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    """One GPU type and the efficiency assumptions (all overridable)."""

    name: str
    """GPU model."""
    peak_tflops_bf16: float
    """Dense bf16 tensor-core peak, TFLOP/s (NVIDIA datasheets: H100/H800/H200 SXM 989, A100 312)."""
    peak_tflops_fp32: float
    """Dense fp32 (non-tensor-core) peak, TFLOP/s (datasheets: H100/H800/H200 SXM 67, A100 19.5)."""
    memory_gib: float
    """Memory per GPU, GiB (80 GB parts; H200 141 GB = 143,771 MiB in nvidia-smi)."""
    nvlink_gbps: float
    """NVLink bandwidth per GPU per direction, GB/s (H100/H200 900 bidirectional, H800 400, A100 600)."""
    ib_gbps: float
    """InfiniBand per GPU per direction, GB/s (one 400 Gb/s NDR NIC per GPU; A100 DGX: 200 Gb/s HDR).
    DeepSeek-V3 report (2024) Sec. 3.2.2 quotes 50 GB/s IB per H800."""
    compute_efficiency: float = 0.5
    """Achieved fraction of peak for GEMMs and flash attention in a training step; Megatron-LM
    reports 41-56 % MFU end to end (Narayanan et al. 2021; Korthikanti et al. 2022 Table 5)."""
    nvlink_efficiency: float = 0.8
    """Achieved fraction of NVLink bandwidth by NCCL (nccl-tests busbw ~360 of 450 GB/s on H100)."""
    ib_efficiency: float = 0.8
    """Achieved fraction of IB bandwidth by NCCL (nccl-tests ~40 of 50 GB/s per NIC)."""
    nvlink_latency_us: float = 10.0
    """Per collective / P2P hop inside a node (NCCL small-message latency)."""
    ib_latency_us: float = 25.0
    """Per collective / P2P hop across nodes."""
    dp_overlap_exposed: float = 0.2
    """Fraction of gradient-reduction time left exposed when overlap_grad_reduce is on
    (the last bucket and the parameter all-gather of the distributed optimizer)."""
    reserve_gib: float = RESERVE_GIB
    """Non-tensor memory per GPU: CUDA context, NCCL buffers, allocator fragmentation."""


GPUS: Dict[str, Hardware] = {
    "H100": Hardware("H100", 989.0, 67.0, 80.0, 450.0, 50.0),
    "H800": Hardware("H800", 989.0, 67.0, 80.0, 200.0, 50.0),
    "H200": Hardware("H200", 989.0, 67.0, 140.0, 450.0, 50.0),
    "A100": Hardware("A100", 312.0, 19.5, 80.0, 300.0, 25.0),
}


def hardware(gpu: str, overrides: Dict[str, float]) -> Hardware:
    """The named GPU with ``name=value`` overrides of its constants; unknown names raise ValueError."""
    if gpu.upper() not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    hw = GPUS[gpu.upper()]
    known = {f.name for f in dataclasses.fields(Hardware)} - {"name"}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown constant(s) {bad}; known: {', '.join(sorted(known))}")
    return dataclasses.replace(hw, **overrides)


@dataclass(frozen=True)
class _Link:
    gbps: float
    latency_s: float


def _link(hw: Hardware, span: int, gpus_per_node: int, members_per_node: int = 1) -> _Link:
    """The bottleneck link of a group spanning ``span`` consecutive ranks. Across nodes, a
    collective's traffic is spread over the NICs of the members sharing a node (rail-optimised)."""
    if span <= gpus_per_node:
        return _Link(hw.nvlink_gbps * hw.nvlink_efficiency * GB, hw.nvlink_latency_us * 1e-6)
    ib = hw.ib_gbps * hw.ib_efficiency * GB * max(1, members_per_node)
    return _Link(min(ib, hw.nvlink_gbps * hw.nvlink_efficiency * GB), hw.ib_latency_us * 1e-6)


def _cp_comm(shape, run, lay, hw, gpn, act, t_attn_fwd, passes_fwd) -> Dict[str, float]:
    """Seconds of CP traffic left exposed per layer per micro-batch (fwd incl. recompute, bwd)."""
    if lay.cp == 1:
        return {"cp": 0.0}
    tokens = lay.micro_batch * run.seq_length / lay.cp
    rep = kv_replication(shape, lay)
    qb = tokens * shape.hidden_size / lay.tp * act
    kvb = 2 * tokens * shape.kv_size / lay.tp * rep * act  # k and v
    t_attn_bwd = 2 * t_attn_fwd

    def ring(size: int, stride: int) -> float:
        if size == 1:
            return 0.0
        link = _link(hw, size * stride, gpn)
        hop_f = link.latency_s + kvb / link.gbps
        hop_b = link.latency_s + (kvb + kvb / act * 4) / link.gbps  # K/V, then fp32 dK/dV
        per_f, per_b = t_attn_fwd / size, t_attn_bwd / size  # the diagonal block hides the first hop
        return passes_fwd * (size - 1) * max(0.0, hop_f - per_f) + (size - 1) * max(0.0, hop_b - per_b)

    def a2a(size: int, stride: int, nbytes: float) -> float:
        span = size * stride
        inside = min(size, max(1, gpn // stride)) if span > gpn else size
        nv, ib = _link(hw, 1, gpn), _link(hw, span, gpn)
        return (nbytes * (inside - 1) / size / nv.gbps + nbytes * (size - inside) / size / ib.gbps
                + (ib.latency_s if span > gpn else nv.latency_s))

    if lay.cp_comm_type == "p2p":
        return {"cp": ring(lay.cp, lay.tp)}
    if lay.cp_comm_type == "all_gather":
        link = _link(hw, lay.cp * lay.tp, gpn, gpn // lay.tp)
        frac = (lay.cp - 1)
        gather = link.latency_s + frac * kvb / link.gbps
        scatter = link.latency_s + frac * kvb / act * 4 / link.gbps
        return {"cp": passes_fwd * gather + gather + scatter}
    u = lay.ulysses
    fwd = a2a(u, lay.tp, qb + kvb) + a2a(u, lay.tp, qb)
    bwd = a2a(u, lay.tp, qb) + a2a(u, lay.tp, qb + kvb)
    return {"cp": passes_fwd * fwd + bwd + ring(lay.cp // u, lay.tp * u)}


def estimate_time(shape: ModelShape, run: RunShape, lay: Layout, hw: Hardware, gpus_per_node: int) -> Dict[str, float]:
    """Seconds per optimizer step by part, plus ``step_s``, ``tokens_per_s_per_gpu`` and ``mfu``."""
    act = 2 if run.bf16 else 4
    peak = (hw.peak_tflops_bf16 if run.bf16 else hw.peak_tflops_fp32) * 1e12 * hw.compute_efficiency
    m = lay.micro_batches(run)
    tokens_mb = lay.micro_batch * run.seq_length  # one replica's micro-batch
    fwd = forward_flops_per_token(shape, run.seq_length)
    split = lay.tp * lay.cp
    layers_stage = shape.num_layers / lay.pp
    t_mat_fwd = tokens_mb * fwd["layers"] / shape.num_layers / split / peak
    t_attn_fwd = tokens_mb * fwd["attention"] / shape.num_layers / split / peak
    extra = extra_work(shape, lay, int(layers_stage))  # what the recompute choice runs again
    passes_fwd = 1 + extra.ring_passes
    per_layer = 3 * (t_mat_fwd + t_attn_fwd) + extra.matrices * t_mat_fwd + extra.attention * t_attn_fwd
    compute = layers_stage * per_layer + 3 * tokens_mb * fwd["logits"] / split / peak
    out = {"compute": compute * m}
    # TP with SP: all-gather + reduce-scatter around attention and MLP, each way (and in recompute)
    tp_s = 0.0
    if lay.tp > 1:
        link = _link(hw, lay.tp, gpus_per_node)
        nbytes = tokens_mb / lay.cp * shape.hidden_size * act
        one = link.latency_s + (lay.tp - 1) / lay.tp * nbytes / link.gbps
        tp_s = ((8 + extra.tp_collectives) * layers_stage + 2) * one
    out["tp comm"] = tp_s * m
    out["cp comm (exposed)"] = _cp_comm(shape, run, lay, hw, gpus_per_node, act, t_attn_fwd, passes_fwd)["cp"] * layers_stage * m
    pp_s = 0.0
    if lay.pp > 1:
        link = _link(hw, lay.tp * lay.cp * lay.dp * 2, gpus_per_node)
        nbytes = tokens_mb / lay.cp / lay.tp * shape.hidden_size * act
        pp_s = 2 * (link.latency_s + nbytes / link.gbps) * m
    out["pp comm"] = pp_s
    per_mb = (out["compute"] + out["tp comm"] + out["cp comm (exposed)"] + pp_s) / m
    out["pipeline bubble"] = (lay.pp - 1) / run.virtual_pp * per_mb if lay.pp > 1 else 0.0
    n_local = max(stage_params(shape, lay, True, lay.pp == 1), stage_params(shape, lay, lay.pp == 1, True))
    group = lay.dp * lay.cp
    dp_s = 0.0
    if group > 1:
        link = _link(hw, lay.tp * group, gpus_per_node, gpus_per_node // lay.tp)
        frac = (group - 1) / group
        grad_b = 4.0  # grad_reduce_in_fp32 (bf16) or fp32 grads
        param_b = act if run.bf16 else 4.0
        moved = n_local * frac * (grad_b + param_b if run.distributed_optimizer else 2 * grad_b)
        dp_s = 2 * link.latency_s + moved / link.gbps
        if run.overlap_grad_reduce:
            dp_s *= hw.dp_overlap_exposed
    out["dp comm"] = dp_s
    step = sum(out.values())
    tokens_gpu = run.global_batch_size * run.seq_length / lay.world
    model_flops = 3.0 * sum(fwd.values())
    out.update(step_s=step, tokens_per_s_per_gpu=tokens_gpu / step,
               mfu=model_flops * tokens_gpu / step / ((hw.peak_tflops_bf16 if run.bf16 else hw.peak_tflops_fp32) * 1e12))
    return out
