"""Exactness harness for context-parallel attention (tests and ``make demo``).

Each rank builds the same full-sequence inputs from a seed, computes its own
float64 dense reference with autograd (:mod:`.reference`, independent of the
block kernels), runs one CP method on its shard, and returns the max abs error
of out, dq, dk and dv on that shard.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import torch

from ..sharding import pad_packed_lengths, shard_packed, shard_sequence
from .allgather import allgather_attention
from .hybrid import build_cp_mesh, hybrid_attention
from .reference import reference_attention
from .ring import ring_attention
from .ulysses import ulysses_attention

METHODS = {"ring": ring_attention, "allgather": allgather_attention, "ulysses": ulysses_attention}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass(frozen=True)
class Case:
    """One exactness check of a CP attention method."""

    method: str
    """Key of ``METHODS``: "ring" or "allgather"."""
    causal: bool = True
    """Causal (decoder) masking, else bidirectional."""
    h: int = 8
    """Query heads."""
    h_kv: int = 8
    """Key/value heads (GQA when < h)."""
    d: int = 64
    """Head dimension."""
    dtype: str = "fp32"
    """Key of ``DTYPES`` for inputs, kernel and output."""
    layout: str = "zigzag"
    """Sequence sharding: "zigzag" or "contiguous"."""
    b: int = 2
    """Batch size."""
    seq_len: int = 96
    """Full (global) sequence length."""
    seed: int = 0
    """Seed of the inputs, identical on every rank."""
    ulysses_size: int = 1
    """Ulysses degree U of method "hybrid" (ring degree = world size / U)."""
    kv_chunks: Optional[int] = None
    """Method "ring" only: K/V waves; None is the ring's default."""
    doc_lengths: Optional[Tuple[int, ...]] = None
    """Packed documents (real lengths; b is 1, seq_len unused): per-document causal via cu_seqlens."""

    @property
    def key(self) -> str:
        return "-".join(f"{k}={v}" for k, v in asdict(self).items())


def make_inputs(case: Case):
    """Full-sequence q, k, v, dout in the case dtype (identical on every rank)."""
    g = torch.Generator().manual_seed(case.seed)
    dt = DTYPES[case.dtype]
    shape_q = (case.b, case.seq_len, case.h, case.d)
    shape_kv = (case.b, case.seq_len, case.h_kv, case.d)
    return [torch.randn(s, generator=g).to(dt) for s in (shape_q, shape_kv, shape_kv, shape_q)]


def run_packed_case(rank: int, world_size: int, case: Case, mesh=None, device: str = "cpu") -> dict:
    """Packed documents: errors at this rank's real (non-pad) rows against a float64
    causal reference run on each document alone. Pads hold random values (and zero
    dout, as a masked loss gives them), so a pad leaking into a real row shows.
    ``device``: where the CP method runs (the reference stays on the CPU)."""
    cu = pad_packed_lengths(case.doc_lengths, world_size)
    full = Case(**{**asdict(case), "b": 1, "seq_len": int(cu[-1]), "doc_lengths": None})
    q, k, v, dout = make_inputs(full)
    real = torch.cat([torch.arange(a, a + n) for a, n in zip(cu[:-1].tolist(), case.doc_lengths)])
    is_real = torch.zeros(int(cu[-1]), dtype=torch.bool)
    is_real[real] = True
    dout = dout * is_real.view(1, -1, 1, 1).to(dout.dtype)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    outs = [reference_attention(*(t[:, a:a + n] for t in ref), True, case.d ** -0.5)
            for a, n in zip(cu[:-1].tolist(), case.doc_lengths)]
    ref_out = torch.zeros(q.shape, dtype=torch.float64)
    ref_out[:, real] = torch.cat(outs, dim=1)
    (ref_out * dout.double()).sum().backward()
    shard = lambda t: shard_packed(t, 1, cu, rank, world_size)  # noqa: E731
    mine = [shard(t).detach().clone().to(device).requires_grad_() for t in (q, k, v)]
    if case.method == "hybrid":
        out = hybrid_attention(*mine, mesh.ulysses_group, mesh.ring_group, cu_seqlens=cu)
    else:
        out = METHODS[case.method](*mine, None, cu_seqlens=cu)
    out.backward(shard(dout).to(device))
    keep = shard_packed(is_real, 0, cu, rank, world_size)
    got = [out] + [t.grad for t in mine]
    want = [ref_out] + [t.grad for t in ref]
    names = ("out", "dq", "dk", "dv")
    errs = {n: (g.cpu().double() - shard(w).detach())[:, keep].abs().max().item()
            for n, g, w in zip(names, got, want)}
    errs.update({f"ref_max_{n}": shard(w).detach()[:, keep].abs().max().item() for n, w in zip(names, want)})
    errs["dtype_ok"] = all(g.dtype == DTYPES[case.dtype] for g in got)
    errs["shape_ok"] = out.shape == mine[0].shape
    return errs


def run_case(rank: int, world_size: int, case: Case, group=None, mesh=None) -> dict:
    """Errors of this rank's shard against the float64 reference (``mesh`` for "hybrid")."""
    if case.doc_lengths is not None:
        return run_packed_case(rank, world_size, case, mesh)
    q, k, v, dout = make_inputs(case)
    scale = case.d ** -0.5
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out = reference_attention(*ref, case.causal, scale)
    ref_out.backward(dout.double())
    shard = lambda t: shard_sequence(t, 1, rank, world_size, case.layout)  # noqa: E731
    mine = [shard(t).detach().clone().requires_grad_() for t in (q, k, v)]
    if case.method == "hybrid":
        out = hybrid_attention(*mine, mesh.ulysses_group, mesh.ring_group, causal=case.causal, layout=case.layout)
    else:
        options = {} if case.kv_chunks is None else {"kv_chunks": case.kv_chunks}
        out = METHODS[case.method](*mine, group, causal=case.causal, layout=case.layout, **options)
    out.backward(shard(dout))
    got = [out] + [t.grad for t in mine]
    want = [ref_out] + [t.grad for t in ref]
    names = ("out", "dq", "dk", "dv")
    errs = {n: (g.double() - shard(w).detach()).abs().max().item() for n, g, w in zip(names, got, want)}
    errs.update({f"ref_max_{n}": w.detach().abs().max().item() for n, w in zip(names, want)})
    errs["dtype_ok"] = all(g.dtype == DTYPES[case.dtype] for g in got)
    errs["shape_ok"] = out.shape == mine[0].shape
    return errs


def exactness_worker(rank: int, world_size: int, cases) -> dict:
    """Run every case on this rank; {case.key: errors}. Hybrid meshes are built once per U."""
    meshes = {u: build_cp_mesh(None, u) for u in sorted({c.ulysses_size for c in cases if c.method == "hybrid"})}
    return {c.key: run_case(rank, world_size, c, mesh=meshes.get(c.ulysses_size)) for c in cases}
