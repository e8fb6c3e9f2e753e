"""Bytes sent per rank, as counted by the sending code, match the analytic model."""
import pytest
import torch

from megatron_ext.attention import (allgather_attention, build_cp_mesh, hybrid_attention, record_cp_stats,
                                    ring_attention, ulysses_attention)
from megatron_ext.attention.stats import modeled_bytes
from megatron_ext.distributed import spawn_ranks

SHAPE = dict(b=1, s_local=8, h=8, d=16)


def accounting_worker(rank, world_size, h_kv):
    mesh = build_cp_mesh(None, 2)
    calls = {
        "ring": lambda q, k, v: ring_attention(q, k, v),
        "ring kv_chunks=1": lambda q, k, v: ring_attention(q, k, v, kv_chunks=1),
        "ring kv_chunks=3": lambda q, k, v: ring_attention(q, k, v, kv_chunks=3),
        "allgather": lambda q, k, v: allgather_attention(q, k, v),
        "ulysses": lambda q, k, v: ulysses_attention(q, k, v),
        "hybrid": lambda q, k, v: hybrid_attention(q, k, v, mesh.ulysses_group, mesh.ring_group),
    }
    counted = {}
    for name, call in calls.items():
        q = torch.randn(SHAPE["b"], SHAPE["s_local"], SHAPE["h"], SHAPE["d"], requires_grad=True)
        k, v = (torch.randn(SHAPE["b"], SHAPE["s_local"], h_kv, SHAPE["d"], requires_grad=True) for _ in range(2))
        with record_cp_stats() as stats:
            call(q, k, v).backward(torch.ones_like(q))
        counted[name] = dict(stats.bytes_sent)
    return counted


@pytest.mark.parametrize("h_kv", [8, 2])
def test_counted_bytes_match_model(h_kv):
    world_size = 4
    results = spawn_ranks(accounting_worker, world_size, (h_kv,), timeout_s=60)
    for name in ("ring", "ring kv_chunks=1", "ring kv_chunks=3", "allgather", "ulysses", "hybrid"):
        # cutting K/V into waves changes message sizes, not the volume
        want = modeled_bytes(name.split()[0], h_kv=h_kv, cp_size=world_size, ulysses_size=2, **SHAPE)
        for rank, counted in enumerate(results):
            for phase in ("forward", "backward"):
                assert counted[name][phase] > 0
                assert abs(counted[name][phase] - want[phase]) <= 2, (name, phase, rank, counted[name], want)


def test_model_matches_issue_formula_for_ring():
    # 2 * S * d_kv * (P-1)/P forward, with S = P * s_local, d_kv = h_kv * d, fp32.
    p, s_local, h_kv, d = 4, 1024, 2, 64
    want = 2 * (p * s_local) * (h_kv * d) * (p - 1) / p * 4
    assert modeled_bytes("ring", b=1, s_local=s_local, h=8, h_kv=h_kv, d=d, cp_size=p)["forward"] == want
