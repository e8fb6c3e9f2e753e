"""The ring's automatic wave count, decided per call: whole blocks for forward-only calls
and on CUDA, pieces sized by bytes and kernel work on CPU; and the calls stay exact."""
import pytest
import torch

from megatron_ext.attention.ring import auto_waves, kv_waves, ring_memory_model
from megatron_ext.distributed import spawn_ranks

FP32_TOL = 1e-5


def _peak(phase, waves, s_local, h, h_kv, d):
    return sum(ring_memory_model(phase, waves, s_local * h * d, 2 * s_local * h_kv * d, 4).values())


@pytest.mark.parametrize("phase", ["forward_only", "forward", "backward"])
def test_cuda_default_is_whole_blocks(phase):
    # issue 18.4: on CUDA the automatic count is 1 whatever the size (CPU: many waves)
    assert auto_waves("cuda", phase, 16384, 4, 4, 64, 2, "zigzag") == 1
    assert auto_waves("cpu", "backward", 16384, 4, 4, 64, 2, "zigzag") > 1


def test_cpu_waves_follow_bytes_and_work():
    # the memory figure's case (N=65536, P=4, h=4): 16 waves, as before
    assert auto_waves("cpu", "backward", 16384, 4, 4, 64, 4, "zigzag") == 16
    # N=16384, P=2: fewer heads -> less work per row -> bigger pieces, fewer waves
    assert auto_waves("cpu", "backward", 8192, 4, 4, 64, 4, "zigzag") == 4
    assert auto_waves("cpu", "backward", 8192, 2, 2, 64, 4, "zigzag") == 2
    # a forward-only call sends whole blocks
    assert auto_waves("cpu", "forward_only", 16384, 4, 4, 64, 4, "zigzag") == 1
    # a forward with grad: the fewest waves whose modeled peak stays below the backward's
    for s_local, h, h_kv in ((16384, 4, 4), (8192, 2, 2), (16384, 8, 2)):
        bwd = auto_waves("cpu", "backward", s_local, h, h_kv, 64, 4, "zigzag")
        fwd = auto_waves("cpu", "forward", s_local, h, h_kv, 64, 4, "zigzag")
        assert fwd <= bwd
        assert _peak("forward", fwd, s_local, h, h_kv, 64) <= _peak("backward", bwd, s_local, h, h_kv, 64)
        if fwd > 1:
            assert _peak("forward", fwd - 1, s_local, h, h_kv, 64) > _peak("backward", bwd, s_local, h, h_kv, 64)
    assert auto_waves("cpu", "forward", 16384, 4, 4, 64, 4, "zigzag") == 2


def per_call_worker(rank, world_size, seq_len, layout):
    from megatron_ext.attention import ring as ring_mod
    from megatron_ext.attention.reference import reference_attention
    from megatron_ext.sharding import shard_sequence

    # tiny thresholds: the automatic count becomes one wave per row, so the per-call choice shows
    ring_mod.MIN_SLICE_BYTES = ring_mod.MIN_CALL_WORK = 1
    seen = []
    plan = ring_mod.plan_waves

    def spy(q, k, layout_, kv_chunks, phase):
        seen.append((phase, plan(q, k, layout_, kv_chunks, phase)))
        return seen[-1][1]

    ring_mod.plan_waves = spy
    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(1, seq_len, 4, 16, generator=g, dtype=torch.float64) for _ in range(4))
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = reference_attention(*ref, True, 16 ** -0.5)
    ref_out.backward(dout)
    shard = lambda t: shard_sequence(t, 1, rank, world_size, layout)  # noqa: E731
    mine = [shard(t).float().requires_grad_() for t in (q, k, v)]
    with torch.no_grad():
        out_nograd = ring_mod.ring_attention(*mine, layout=layout)
    out = ring_mod.ring_attention(*mine, layout=layout)
    out.backward(shard(dout).float())
    errs = [(out_nograd.double() - shard(ref_out)).abs().max().item(), (out.double() - shard(ref_out)).abs().max().item()]
    errs += [(t.grad.double() - shard(r.grad)).abs().max().item() for t, r in zip(mine, ref)]
    return {"seen": seen, "err": max(errs)}


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_per_call_waves_exact(layout):
    seq_len, p = 48, 2
    results = spawn_ranks(per_call_worker, p, (seq_len, layout), timeout_s=60)
    seg = seq_len // p // (2 if layout == "zigzag" else 1)
    for r in results:
        assert r["err"] <= FP32_TOL, r
        phases = dict(r["seen"])
        assert phases["forward_only"] == 1  # no grad: whole blocks
        assert phases["backward"] == kv_waves(seq_len // p, layout, None, 1) == min(16, seg)
        assert 1 <= phases["forward"] <= phases["backward"]
