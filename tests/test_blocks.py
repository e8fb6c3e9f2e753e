"""Block kernels: the CPU flash kernel and the math kernel agree with a dense
float64 reference, including the backward fed with a merged (global) lse."""
import pytest
import torch

from megatron_ext.attention import blocks
from megatron_ext.attention.blocks import (CpuFlashKernel, CudaEfficientKernel, CudaFlashKernel, DenseFallbackKernel,
                                           MathKernel, select_kernel)
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
    cuda = torch.device("cuda")
    assert select_kernel(torch.device("cpu"), torch.float32) is CpuFlashKernel
    assert select_kernel(cuda, torch.bfloat16) is CudaFlashKernel and select_kernel(cuda, torch.float16) is CudaFlashKernel
    assert select_kernel(cuda, torch.float32) is CudaEfficientKernel  # was the dense math kernel
    assert select_kernel(cuda, torch.float64) is DenseFallbackKernel
    assert select_kernel(torch.device("meta"), torch.float32) is DenseFallbackKernel


def test_dense_fallback_refuses_large_blocks():
    q, k, v, dout = _inputs()
    out, lse = DenseFallbackKernel.forward(q, k, v, True, 0.3)  # small: allowed, same as MathKernel
    assert torch.equal(out, MathKernel.forward(q, k, v, True, 0.3)[0])
    big_q = torch.empty(1, 24 * 1024, 36, 128, device="meta")
    big_kv = torch.empty(1, 24 * 1024, 4, 128, device="meta")
    with pytest.raises(ValueError, match=r"no memory-efficient attention kernel .* \[b=1, h=36, sq=24576, sk=24576\]"):
        DenseFallbackKernel.forward(big_q, big_kv, big_kv, True, 0.1)


class FakeCudaOps:
    """CPU stand-ins for the CUDA-only aten ops, with those ops' layouts and LSE padding,
    computed by MathKernel; they record the K/V head counts they were handed."""

    def __init__(self):
        self.kv_heads = []

    def _scaled_dot_product_flash_attention(self, q, k, v, dropout, causal, debug, *, scale):
        t = lambda x: x.transpose(1, 2)  # noqa: E731 - bhsd in, bshd for MathKernel
        self.kv_heads.append(k.shape[1])
        out, lse = MathKernel.forward(t(q), t(k), t(v), causal, scale)
        return (t(out), lse) + (None,) * 7

    def _scaled_dot_product_flash_attention_backward(self, dout, q, k, v, out, lse, cq, ck, mq, mk, dropout, causal,
                                                     seed, offset, *, scale):
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        self.kv_heads.append(k.shape[1])
        return tuple(t(g) for g in MathKernel.backward(t(dout), t(q), t(k), t(v), t(out), lse, causal, scale))

    def _efficient_attention_forward(self, q, k, v, bias, cu_q, cu_k, max_q, max_k, dropout, mask_type, want_lse, *,
                                     scale):
        assert q.shape[2] == k.shape[2] == v.shape[2] and want_lse and mask_type in (0, 1)  # no GQA in this kernel
        self.kv_heads.append(k.shape[2])
        out, lse = MathKernel.forward(q, k, v, bool(mask_type), scale)
        pad = -q.shape[1] % 32
        return out, torch.nn.functional.pad(lse, (0, pad), value=float("inf")), None, None, q.shape[1], k.shape[1]

    def _efficient_attention_backward(self, dout, q, k, v, bias, out, cu_q, cu_k, max_q, max_k, lse, dropout, seed,
                                      offset, mask_type, bias_grad, *, scale):
        assert lse.shape[-1] % 32 == 0 and lse.shape[-1] >= max_q and lse.is_contiguous() and max_q == q.shape[1]
        self.kv_heads.append(k.shape[2])
        return MathKernel.backward(dout, q, k, v, out, lse[..., :max_q], bool(mask_type), scale) + (None,)


@pytest.mark.parametrize("kernel,kv_heads_seen", [(CudaFlashKernel, 2), (CudaEfficientKernel, 4)])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_kernels_plumbing_on_fake_ops(monkeypatch, kernel, kv_heads_seen, causal):
    """The CUDA kernels' layouts, LSE trimming/padding and GQA handling (untested on GPU)."""
    fake = FakeCudaOps()
    monkeypatch.setattr(blocks, "_aten", fake)
    q, k, v, dout = _inputs(s=40)  # 40: the efficient kernel's LSE is padded to 64
    out, lse = kernel.forward(q, k, v, causal, 0.3)
    grads = kernel.backward(dout, q, k, v, out, lse, causal, 0.3)
    want_out, want_lse = MathKernel.forward(q, k, v, causal, 0.3)
    want = MathKernel.backward(dout, q, k, v, want_out, want_lse, causal, 0.3)
    assert lse.shape == (2, 4, 40) and torch.allclose(out, want_out) and torch.allclose(lse, want_lse)
    for got, ref, like in zip(grads, want, (q, k, v)):
        assert got.shape == like.shape and torch.allclose(got, ref, atol=1e-6)
    assert fake.kv_heads == [kv_heads_seen] * 2  # flash: GQA native (2 KV heads), never repeated


@pytest.mark.parametrize("kernel", [CudaFlashKernel, CudaEfficientKernel])
def test_cuda_kernels_bind_to_the_real_op_schemas(kernel):
    """Real torch ops on CPU tensors: argument binding passes and dispatch then finds no CPU
    kernel (a wrong argument would raise a schema RuntimeError first)."""
    q, k, v, dout = _inputs(s=40)
    lse = torch.zeros(2, 4, 40)
    for call in (lambda: kernel.forward(q, k, v, True, 0.3), lambda: kernel.backward(dout, q, k, v, q, lse, True, 0.3)):
        with pytest.raises(NotImplementedError, match="CPU' backend"):
            call()
    dtype = torch.bfloat16 if kernel is CudaFlashKernel else torch.float32
    mq, mk = (torch.empty(2, 40, n, 16, device="meta", dtype=dtype) for n in (4, 2))
    out, lse = kernel.forward(mq, mk, mk, True, 0.3)  # torch's meta kernels give the real output shapes
    assert out.shape == mq.shape and lse.shape == (2, 4, 40) and lse.dtype == torch.float32
