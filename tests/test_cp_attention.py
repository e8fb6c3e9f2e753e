"""Ring and all-gather CP attention against a float64 dense reference, on
spawned gloo process groups (each spawn is bounded to 60 s).

Tolerances: fp32 <= 1e-5 absolute on out, dq, dk, dv. bf16 (inputs, kernel
and output in bf16, merge in fp32): <= 2**-6 * max|ref| on out and
<= 2**-5 * max|ref| on gradients, i.e. within a few bf16 ulps of the fp32
result, which itself is within 1e-5 of the reference.
"""
import functools
import itertools

import pytest

from megatron_ext.distributed import spawn_ranks
from megatron_ext.attention.exactness import Case, exactness_worker

TENSORS = ("out", "dq", "dk", "dv")
FP32_TOL = 1e-5


def _matrix(method, seq_len, b):
    return [
        Case(method, causal=c, h=8, h_kv=hk, d=d, layout=lay, b=b, seq_len=seq_len)
        for c, hk, d, lay in itertools.product((True, False), (8, 2), (64, 80), ("zigzag", "contiguous"))
    ]


@functools.lru_cache(maxsize=None)
def _run(world_size, method, seq_len, b):
    cases = _matrix(method, seq_len, b)
    return cases, spawn_ranks(exactness_worker, world_size, (cases,), timeout_s=60)


def _worst(results, case):
    return {n: max(r[case.key][n] for r in results) for n in TENSORS}


@pytest.mark.parametrize("method", ["ring", "allgather"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_fp32_exact_matrix(world_size, method):
    # 96 divides by 2P for P <= 4; P = 8 uses a smaller, still divisible, shape.
    seq_len, b = (96, 2) if world_size <= 4 else (64, 1)
    cases, results = _run(world_size, method, seq_len, b)
    failures = []
    for case in cases:
        worst = _worst(results, case)
        if max(worst.values()) > FP32_TOL:
            failures.append(f"{case.key}: {worst}")
        assert all(r[case.key]["dtype_ok"] and r[case.key]["shape_ok"] for r in results), case.key
    assert not failures, "\n".join(failures)



@pytest.mark.parametrize("world_size", [2, 4])
def test_bf16_within_stated_tolerance(world_size):
    cases = [Case(m, dtype="bf16", h=8, h_kv=2, d=64, seq_len=256, b=1, causal=c)
             for m in ("ring", "allgather") for c in (True, False)]
    results = spawn_ranks(exactness_worker, world_size, (cases,), timeout_s=60)
    for case in cases:
        for r in results:
            e = r[case.key]
            assert e["dtype_ok"], "bf16 in must give bf16 out and grads"
            assert e["out"] <= 2 ** -6 * e["ref_max_out"], (case.key, e)
            for n in ("dq", "dk", "dv"):
                assert e[n] <= 2 ** -5 * e[f"ref_max_{n}"], (case.key, n, e)


@pytest.mark.parametrize("method", ["ring", "allgather"])
def test_error_does_not_grow_with_world_size(method):
    case = Case(method, h=4, h_kv=2, d=64, seq_len=512, b=1)
    worst = {}
    for p in (2, 8):
        results = spawn_ranks(exactness_worker, p, ([case],), timeout_s=60)
        worst[p] = _worst(results, case)
    for n in TENSORS:
        assert worst[8][n] <= FP32_TOL
        assert worst[8][n] <= 2 * worst[2][n], (n, worst)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ring_kv_chunks_exact(world_size):
    # 72 tokens: zigzag halves of 18, 12 or 9 rows. Whole blocks, uneven pieces (5
    # waves) and more waves asked for than rows (clamped to one row each).
    cases = [Case("ring", causal=c, h=8, h_kv=2, d=64, layout=lay, b=2, seq_len=72, kv_chunks=n)
             for c in (True, False) for lay in ("zigzag", "contiguous") for n in (1, 5, 1000)]
    results = spawn_ranks(exactness_worker, world_size, (cases,), timeout_s=60)
    for case in cases:
        worst = _worst(results, case)
        assert max(worst.values()) <= FP32_TOL, (case.key, worst)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_ring_kv_chunks_must_be_positive_int(bad):
    import torch
    from megatron_ext.attention import ring_attention

    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="kv_chunks must be None or a positive int"):
        ring_attention(q, q, q, kv_chunks=bad)


def test_ring_automatic_waves():
    from megatron_ext.attention.ring import kv_waves

    # pieces of a zigzag half stay >= 512 rows, at most 16 waves; explicit counts clamp to rows
    assert kv_waves(16384, "zigzag", None) == 16
    assert kv_waves(4096, "zigzag", None) == 4
    assert kv_waves(4096, "contiguous", None) == 8
    assert kv_waves(1000, "zigzag", None) == 1
    assert kv_waves(24, "zigzag", 1000) == 12
