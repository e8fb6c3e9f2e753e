"""RoPE extension math and the CPU runtime patches."""
import math

import pytest
import torch

from megatron_ext.rope import RopeConfig, apply_rope, attention_scale_factor, inv_frequencies, rope_angles

METHODS = [RopeConfig(), RopeConfig(scaling="abf", abf_base=5e6), RopeConfig(scaling="linear", factor=50.0),
           RopeConfig(scaling="ntk", factor=50.0), RopeConfig(scaling="yarn", factor=50.0),
           RopeConfig(scaling="llama3", factor=50.0)]
D = 128


def _rotated_dot(q, k, i, j, cfg):
    pos = torch.tensor([i, j])
    x = torch.stack([q, k])[None, :, None, :]  # [1, 2, 1, d]: q at i, k at j
    r = apply_rope(x, pos, cfg)[0, :, 0]
    return (r[0] * r[1]).sum().item()


@pytest.mark.parametrize("cfg", METHODS, ids=lambda c: c.scaling)
def test_rotated_dot_depends_only_on_distance_at_200k(cfg):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(D, generator=g), torch.randn(D, generator=g)
    tol = 1e-5 * q.norm().item() * k.norm().item()
    for dist in (0, 1, 37, 4095, 150_000):
        near = _rotated_dot(q, k, dist, 0, cfg)
        for shift in (1_000, 49_999, 200_000 - dist - 1):
            assert abs(_rotated_dot(q, k, dist + shift, shift, cfg) - near) <= tol, (cfg.scaling, dist, shift)


def test_fp32_products_would_fail_that_tolerance():
    """Why angles are formed in fp64: the plain fp32 product drifts at 2e5."""
    inv = inv_frequencies(D, RopeConfig(scaling="abf", abf_base=5e6))
    exact = (199_999.0 * inv) % (2 * math.pi)
    naive = (torch.tensor(199_999.0) * inv.float()).double() % (2 * math.pi)
    precise = rope_angles(torch.tensor([199_999]), D, RopeConfig(scaling="abf", abf_base=5e6))[0].double()
    wrap = lambda x: torch.remainder(x + math.pi, 2 * math.pi) - math.pi  # noqa: E731
    assert wrap(naive - exact).abs().max() > 1e-3
    assert wrap(precise - exact).abs().max() < 1e-5


def test_frequency_formulas():
    base = inv_frequencies(D, RopeConfig())
    assert torch.allclose(inv_frequencies(D, RopeConfig(scaling="abf", abf_base=5e6)),
                          5e6 ** -(torch.arange(0, D, 2, dtype=torch.float64) / D))
    ntk = inv_frequencies(D, RopeConfig(scaling="ntk", factor=8.0))
    assert torch.allclose(ntk, (10000.0 * 8.0 ** (D / (D - 2))) ** -(torch.arange(0, D, 2, dtype=torch.float64) / D))
    yarn = inv_frequencies(D, RopeConfig(scaling="yarn", factor=8.0))
    assert torch.allclose(yarn[:4], base[:4])           # fast dims kept (extrapolated)
    assert torch.allclose(yarn[-4:], base[-4:] / 8.0)   # slow dims interpolated
    lin = rope_angles(torch.tensor([800]), D, RopeConfig(scaling="linear", factor=8.0))
    assert torch.allclose(lin, rope_angles(torch.tensor([100]), D, RopeConfig()), atol=1e-6)
    assert attention_scale_factor(RopeConfig(scaling="yarn", factor=8.0)) == pytest.approx((0.1 * math.log(8) + 1) ** 2)
    with pytest.raises(ValueError, match="not one of"):
        RopeConfig(scaling="longrope")


def test_dynamic_and_llama3_frequencies_float64():
    e = torch.arange(0, D, 2, dtype=torch.float64) / D
    inv = 10000.0 ** -e
    dyn = RopeConfig(scaling="dynamic", factor=4.0, original_max_position=4096)
    assert torch.equal(inv_frequencies(D, dyn, 4096), inv)  # within the original length: the base as is
    grown = (10000.0 * (4.0 * 12288 / 4096 - 3.0) ** (D / (D - 2))) ** -e
    assert torch.allclose(inv_frequencies(D, dyn, 12288), grown, rtol=1e-14, atol=0)
    # rope_angles scales for max(position) + 1 unless a length is given
    assert torch.equal(rope_angles(torch.arange(12288)[-2:], D, dyn),
                       rope_angles(torch.arange(12288)[-2:], D, dyn, seq_len=12288))
    assert not torch.equal(rope_angles(torch.tensor([5000]), D, dyn), rope_angles(torch.tensor([5000]), D, RopeConfig()))
    l3 = RopeConfig(scaling="llama3", factor=8.0, original_max_position=8192)  # low 1, high 4
    got, wavelen = inv_frequencies(D, l3), 2 * math.pi / inv
    long, short = wavelen > 8192, wavelen < 8192 / 4
    mid = ~long & ~short
    assert long.any() and short.any() and mid.any()
    assert torch.equal(got[short], inv[short])
    assert torch.allclose(got[long], inv[long] / 8.0, rtol=1e-15, atol=0)
    smooth = (8192 / wavelen[mid] - 1.0) / (4.0 - 1.0)
    assert torch.allclose(got[mid], (1 - smooth) * inv[mid] / 8.0 + smooth * inv[mid], rtol=1e-15, atol=0)


def test_enable_cpu_runtime_is_idempotent():
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.tensor_parallel import random

    from megatron_ext.megatron.cpu import enable_cpu_runtime

    assert enable_cpu_runtime() is True
    patched = (fused_softmax.get_default_causal_mask, rope_utils.get_pos_emb_on_this_cp_rank,
               random.initialize_rng_tracker)
    assert enable_cpu_runtime() is True
    assert patched == (fused_softmax.get_default_causal_mask, rope_utils.get_pos_emb_on_this_cp_rank,
                       random.initialize_rng_tracker)
    assert fused_softmax.get_default_causal_mask(3).device.type == "cpu"
    assert fused_softmax.get_default_causal_mask(3).tolist() == [[False, True, True], [False, False, True],
                                                                 [False, False, False]]
    random.initialize_rng_tracker(force_reset=True)
    tracker = random.get_cuda_rng_tracker()
    tracker.add("model-parallel-rng", 5)
    with tracker.fork():
        a = torch.rand(3)
    with tracker.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the forked stream advances
    torch.manual_seed(5)
    assert torch.equal(a, torch.rand(3))  # and it is seed 5's stream


def test_rope_table_is_computed_once_and_sliced(monkeypatch):
    """LongContextRotaryEmbedding computes the fp64 angles once per table (not per longest
    document) and returns exactly today's rope_angles (equality, not a tolerance)."""
    import megatron_ext.rope as rope_mod
    from megatron_ext.megatron.rope import LongContextRotaryEmbedding

    cfg = RopeConfig(scaling="abf", abf_base=5e6)
    rot = LongContextRotaryEmbedding(16, cfg)
    calls = []
    real = rope_mod.inv_frequencies
    monkeypatch.setattr(rope_mod, "inv_frequencies", lambda *a, **k: calls.append(a) or real(*a, **k))
    spans = [(100, 0), (37, 0), (90, 5), (64, 0), (100, 28)]  # a new longest document each time
    got = [rot.get_freqs_non_repeated(length, offset) for length, offset in spans]
    assert len(calls) == 1  # one table of 128 positions serves every request
    for g, (length, offset) in zip(got, spans):
        assert torch.equal(g, rope_angles(torch.arange(offset, offset + length), 16, cfg))
    dyn = rope_mod.RopeAngleTable(16, RopeConfig(scaling="dynamic", factor=4.0, original_max_position=64), 2)
    for n in (100, 300, 200, 300):  # dynamic: frequencies depend on the length, one table per length
        assert torch.equal(dyn.angles(0, n), rope_angles(torch.arange(n), 16, dyn.cfg))
    assert len(dyn.tables) == 2  # bounded
