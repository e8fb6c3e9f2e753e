"""Block kernels: the CPU flash kernel and the math kernel agree with a dense
float64 reference, including the backward fed with a merged (global) lse."""
import pytest
import torch

from megatron_ext.attention.blocks import CpuFlashKernel, MathKernel, select_kernel
from megatron_ext.attention.merge import merge_into
from megatron_ext.attention.reference import reference_attention


def _inputs(h=4, h_kv=2, s=24, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, s, n, d, generator=g).to(dtype) for n in (h, h_kv, h_kv, h)]


@pytest.mark.parametrize("kernel", [CpuFlashKernel, MathKernel])
@pytest.mark.parametrize("causal", [True, False])
def test_block_forward_backward_match_reference(kernel, causal):
    q, k, v, dout = _inputs()
    scale = 0.3
    out, lse = kernel.forward(q, k, v, causal, scale)
    dq, dk, dv = kernel.backward(dout, q, k, v, out, lse, causal, scale)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out = reference_attention(*ref, causal, scale)
    ref_out.backward(dout.double())
    assert out.shape == q.shape and lse.shape == (2, 4, 24) and lse.dtype == torch.float32
    assert dk.shape == k.shape and dv.shape == v.shape
    for got, want in zip((out, dq, dk, dv), (ref_out, *(t.grad for t in ref))):
        assert (got.double() - want).abs().max() < 1e-5


def test_split_keys_merge_and_global_lse_backward():
    """Two key halves merged through lse equal one block; their backwards, fed
    the merged out/lse, sum to the full gradients."""
    q, k, v, dout = _inputs(s=32)
    kern, scale = CpuFlashKernel, 0.25
    full_out, full_lse = kern.forward(q, k, v, False, scale)
    o1, l1 = kern.forward(q, k[:, :16], v[:, :16], False, scale)
    o2, l2 = kern.forward(q, k[:, 16:], v[:, 16:], False, scale)
    out, lse = o1.float().clone(), l1.clone()
    merge_into(out, lse, o2, l2)
    assert (out - full_out).abs().max() < 1e-6 and (lse - full_lse).abs().max() < 1e-5
    g1 = kern.backward(dout, q, k[:, :16], v[:, :16], out, lse, False, scale)
    g2 = kern.backward(dout, q, k[:, 16:], v[:, 16:], out, lse, False, scale)
    gf = kern.backward(dout, q, k, v, full_out, full_lse, False, scale)
    assert (g1[0] + g2[0] - gf[0]).abs().max() < 1e-5
    assert (torch.cat([g1[1], g2[1]], 1) - gf[1]).abs().max() < 1e-5


def test_merge_is_overflow_safe():
    out = torch.ones(1, 2, 1, 4)
    lse = torch.full((1, 1, 2), 1e4)
    merge_into(out, lse, torch.zeros(1, 2, 1, 4), torch.full((1, 1, 2), 1e4))
    assert torch.isfinite(out).all() and torch.allclose(out, torch.full_like(out, 0.5))
    assert torch.allclose(lse, torch.full_like(lse, 1e4 + torch.log(torch.tensor(2.0)).item()))


def test_kernel_selection():
    assert select_kernel(torch.device("cpu"), torch.float32) is CpuFlashKernel
    assert select_kernel(torch.device("meta"), torch.float32) is MathKernel
