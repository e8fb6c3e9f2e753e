"""Ulysses and 2D hybrid (Ulysses x ring) CP attention against the float64
reference (fp32 <= 1e-5 abs on out, dq, dk, dv), the CP mesh, and misuse."""
import itertools

import pytest
import torch

from megatron_ext.attention import build_cp_mesh, hybrid_attention, ulysses_attention
from megatron_ext.attention.exactness import Case, exactness_worker
from megatron_ext.attention.ulysses import kv_replication
from megatron_ext.distributed import spawn_ranks

TENSORS = ("out", "dq", "dk", "dv")


def _assert_exact(cases, results, tol=1e-5):
    failures = []
    for case in cases:
        worst = {n: max(r[case.key][n] for r in results) for n in TENSORS}
        if max(worst.values()) > tol or not all(r[case.key]["dtype_ok"] for r in results):
            failures.append(f"{case.key}: {worst}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ulysses_exact(world_size):
    # h_kv=1 and (at P=4) h_kv=2 are below the Ulysses degree: KV heads get replicated.
    cases = [Case("ulysses", causal=c, h=8, h_kv=hk, d=d, layout=lay, b=2, seq_len=64)
             for c, hk, d, lay in itertools.product((True, False), (8, 2, 1), (64, 80), ("zigzag", "contiguous"))]
    _assert_exact(cases, spawn_ranks(exactness_worker, world_size, (cases,), timeout_s=60))


@pytest.mark.parametrize("world_size,ulysses_sizes", [(4, (1, 2, 4)), (8, (2, 4))])
def test_hybrid_exact_for_every_factorisation(world_size, ulysses_sizes):
    cases = [Case("hybrid", causal=c, h=8, h_kv=hk, d=64, layout=lay, b=1, seq_len=64, ulysses_size=u)
             for c, hk, lay, u in itertools.product((True, False), (8, 2), ("zigzag", "contiguous"), ulysses_sizes)]
    _assert_exact(cases, spawn_ranks(exactness_worker, world_size, (cases,), timeout_s=60))


def test_kv_replication_is_minimal():
    assert kv_replication(8, 8, 4) == 1
    assert kv_replication(8, 2, 4) == 2   # 2 KV heads -> 4, one per rank
    assert kv_replication(8, 1, 8) == 8
    assert kv_replication(12, 6, 4) == 2  # lcm(6, 4) = 12 heads, 3 per rank
    with pytest.raises(ValueError, match="h=6 divisible by the Ulysses degree 4.*ring_attention"):
        kv_replication(6, 2, 4)


def misuse_worker(rank, world_size):
    report = {}
    x = torch.randn(1, 4, 6, 8)  # 6 heads over a Ulysses degree of 4
    for name, call in {"ulysses_heads": lambda: ulysses_attention(x, x, x),
                       "bad_mesh": lambda: build_cp_mesh(None, 3)}.items():
        try:
            call()
            report[name] = "no error"
        except ValueError as e:
            report[name] = str(e)
    mesh = build_cp_mesh(None, 2)
    report["mesh"] = (torch.distributed.get_process_group_ranks(mesh.ulysses_group),
                      torch.distributed.get_process_group_ranks(mesh.ring_group))
    try:
        hybrid_attention(x, x, x, mesh.ulysses_group, mesh.ring_group)
        report["hybrid_ok_6_heads_u2"] = True
    except ValueError:
        report["hybrid_ok_6_heads_u2"] = False
    return report


def test_misuse_and_mesh_layout():
    reports = spawn_ranks(misuse_worker, 4, (), timeout_s=60)
    for rank, rep in enumerate(reports):
        assert "divisible by the Ulysses degree 4" in rep["ulysses_heads"] and "hybrid" in rep["ulysses_heads"]
        assert "Ulysses size 3 must divide the CP size 4" in rep["bad_mesh"]
        uly, ring = rep["mesh"]
        assert uly == [rank // 2 * 2, rank // 2 * 2 + 1]  # adjacent ranks share a Ulysses group
        assert ring == [rank % 2, rank % 2 + 2]
        assert rep["hybrid_ok_6_heads_u2"]  # 6 heads split over U=2, ring over the rest
