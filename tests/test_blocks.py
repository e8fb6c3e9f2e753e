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


def bind(op_name: str, args: tuple, kwargs: dict) -> dict:
    """Bind a call to the REAL operator schema ``aten::<op_name>`` as torch's binder does:
    positional then keyword-only arguments, defaults filled, each value checked against its
    declared type (a plain ``Tensor`` also takes None: an undefined tensor). Raises TypeError."""
    schema = getattr(torch.ops.aten, op_name).default._schema
    positional = [a for a in schema.arguments if not a.kwarg_only]
    if len(args) > len(positional):
        raise TypeError(f"{op_name}: {len(args)} positional arguments, the schema takes {len(positional)}")
    bound = {a.name: val for a, val in zip(positional, args)}
    names = {a.name for a in schema.arguments}
    for name, val in kwargs.items():
        if name not in names or name in bound or not next(a for a in schema.arguments if a.name == name).kwarg_only:
            raise TypeError(f"{op_name}: unexpected or repeated keyword {name!r}")
        bound[name] = val
    for a in schema.arguments:
        if a.name not in bound:
            if not a.has_default_value():
                raise TypeError(f"{op_name}: missing argument {a.name!r}")
            bound[a.name] = a.default_value
        _check_type(op_name, a, bound[a.name])
    return bound


def _check_type(op_name, arg, val):
    kind = str(arg.type)
    optional = kind.startswith("Optional[")
    base = kind[len("Optional["):-1] if optional else kind
    is_num = lambda x, t: isinstance(x, t) and not isinstance(x, bool)  # noqa: E731
    if base == "Tensor":
        ok = val is None or isinstance(val, torch.Tensor)  # None binds as an undefined Tensor
    elif val is None:
        ok = optional
    elif base == "int":  # int and SymInt
        ok = is_num(val, int)
    elif base == "float":
        ok = is_num(val, (int, float))
    elif base == "bool":
        ok = isinstance(val, bool)
    elif base == "List[bool]":
        ok = isinstance(val, (list, tuple)) and all(isinstance(x, bool) for x in val) and len(val) == (arg.N or len(val))
    else:
        raise NotImplementedError(f"{op_name}: the test binder does not know schema type {kind} ({arg.name})")
    if not ok:
        raise TypeError(f"{op_name}: argument {arg.name!r} is {kind}, got {type(val).__name__} {val!r}")


def _meta(x):
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta") if isinstance(x, torch.Tensor) else x


def _real_meta_call(op_name, bound):
    """The real op (its own binder and meta kernel) on meta copies of the bound arguments."""
    schema = getattr(torch.ops.aten, op_name).default._schema
    args = [_meta(bound[a.name]) for a in schema.arguments if not a.kwarg_only]
    kwargs = {a.name: _meta(bound[a.name]) for a in schema.arguments  # defaulted ones left out, as callers do
              if a.kwarg_only and not (a.has_default_value() and bound[a.name] == a.default_value)}
    return getattr(torch.ops.aten, op_name)(*args, **kwargs)


def _same_kind(got, want, what):
    """``got`` is what the real forward returned in this slot: None, an int, or a tensor of that dtype/shape."""
    if want is None or not isinstance(want, torch.Tensor):
        assert got is None if want is None else got == want, (what, got, want)
    else:
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape, (what, got, want)


class SchemaBoundCudaOps:
    """CPU stand-ins for the CUDA-only aten ops. Every call is bound to the real operator schema
    (count, order, Tensor / Tensor? / SymInt / float / bool), run through the real op's meta
    kernel, and checked against the rules of torch's CUDA sources (attention_backward.cu,
    flash_api.cpp); the numbers come from MathKernel. The backward must receive what the
    real forward returns (``forwards`` keeps the meta forward outputs)."""

    def __init__(self):
        self.kv_heads = []
        self.forwards = {}

    def _scaled_dot_product_flash_attention(self, *args, **kwargs):
        a = bind("_scaled_dot_product_flash_attention", args, kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        assert q.dtype in (torch.float16, torch.bfloat16) and a["dropout_p"] == 0.0 and not a["return_debug_mask"]
        meta = _real_meta_call("_scaled_dot_product_flash_attention", a)
        self.forwards["flash"] = meta
        self.kv_heads.append(k.shape[1])
        t = lambda x: x.transpose(1, 2)  # noqa: E731 - bhsd in, bshd for MathKernel
        out, lse = MathKernel.forward(t(q), t(k), t(v), a["is_causal"], a["scale"])
        assert meta[0].shape == q.shape and meta[1].shape == lse.shape
        return (t(out), lse) + tuple(meta[2:])

    def _scaled_dot_product_flash_attention_backward(self, *args, **kwargs):
        a = bind("_scaled_dot_product_flash_attention_backward", args, kwargs)
        q, k, v, out, lse = a["query"], a["key"], a["value"], a["out"], a["logsumexp"]
        # _flash_attention_backward: a *defined* cum_seq_q selects mha_varlen_bwd, which needs
        # int32 cu_seqlens [batch + 1] and 3-D [total_tokens, h, d] q/k/v.
        if a["cum_seq_q"] is not None:
            cq, ck = a["cum_seq_q"], a["cum_seq_k"]
            assert ck is not None and cq.dtype == torch.int32 and ck.dtype == torch.int32, \
                f"varlen branch: cu_seqlens must be int32, got {cq.dtype}/{getattr(ck, 'dtype', None)}"
            assert q.dim() == 3 and cq.dim() == 1 and cq.numel() >= 2, "varlen branch: 3-D q and [b + 1] cu_seqlens"
        fwd = self.forwards["flash"]  # dense path: exactly what the forward returned (derivatives.yaml)
        for name, i in (("cum_seq_q", 2), ("cum_seq_k", 3), ("max_q", 4), ("max_k", 5), ("philox_seed", 6),
                        ("philox_offset", 7)):
            _same_kind(a[name], fwd[i], name)
        assert a["max_q"] == q.shape[2] and a["max_k"] == k.shape[2] and a["dropout_p"] == 0.0
        # mha_bwd: q, k, v, out and dout share the fp16/bf16 dtype; lse fp32 [b, h, sq]; d % 8 == 0; GQA
        assert {t.dtype for t in (q, k, v, out, a["grad_out"])} == {q.dtype} and q.dtype in (torch.float16,
                                                                                             torch.bfloat16)
        assert lse.dtype == torch.float32 and lse.is_contiguous() and lse.shape == q.shape[:3]
        assert q.shape[-1] % 8 == 0 and q.shape[1] % k.shape[1] == 0 and k.shape == v.shape
        meta = _real_meta_call("_scaled_dot_product_flash_attention_backward", a)
        self.kv_heads.append(k.shape[1])
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        grads = tuple(t(g) for g in MathKernel.backward(t(a["grad_out"]), t(q), t(k), t(v), t(out), lse,
                                                        a["is_causal"], a["scale"]))
        assert [g.shape for g in grads] == [m.shape for m in meta]
        return grads

    def _efficient_attention_forward(self, *args, **kwargs):
        a = bind("_efficient_attention_forward", args, kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        assert q.shape[2] == k.shape[2] == v.shape[2], "the efficient kernel has no GQA"
        assert a["bias"] is None and a["cu_seqlens_q"] is None and a["cu_seqlens_k"] is None
        assert a["compute_log_sumexp"] and a["custom_mask_type"] in (0, 1) and a["dropout_p"] == 0.0
        meta = _real_meta_call("_efficient_attention_forward", a)
        self.forwards["efficient"] = meta
        self.kv_heads.append(k.shape[2])
        out, lse = MathKernel.forward(q, k, v, bool(a["custom_mask_type"]), a["scale"])
        lse = torch.nn.functional.pad(lse, (0, meta[1].shape[-1] - lse.shape[-1]), value=float("inf"))
        return (out, lse) + tuple(meta[2:])

    def _efficient_attention_backward(self, *args, **kwargs):
        a = bind("_efficient_attention_backward", args, kwargs)
        q, k, v, out, lse = a["query"], a["key"], a["value"], a["out"], a["logsumexp"]
        fwd = self.forwards["efficient"]
        # _efficient_attention_backward: dense BMHK, same heads, no cu_seqlens, no bias -> no bias grad
        assert q.dim() == 4 and q.shape[2] == k.shape[2] == v.shape[2] and k.shape == v.shape
        assert a["cu_seqlens_q"] is None and a["cu_seqlens_k"] is None
        assert a["bias"] is None and a["bias_requires_grad"] is False
        assert a["max_seqlen_q"] == fwd[4] and a["max_seqlen_k"] == fwd[5] and a["dropout_p"] == 0.0
        _same_kind(a["philox_seed"], fwd[2], "philox_seed")
        _same_kind(a["philox_offset"], fwd[3], "philox_offset")
        assert lse.dtype == torch.float32 and lse.is_contiguous() and lse.shape == fwd[1].shape  # kAlignLSE rows
        assert out.dtype == q.dtype and a["custom_mask_type"] in (0, 1)
        # (no meta call here: torch 2.13's meta kernel for this op lacks the schema's ``out``)
        self.kv_heads.append(k.shape[2])
        grads = MathKernel.backward(a["grad_out_"], q, k, v, out, lse[..., : q.shape[1]],
                                    bool(a["custom_mask_type"]), a["scale"])
        return grads + (None,)


@pytest.mark.parametrize("kernel,dtype,kv_heads_seen", [(CudaFlashKernel, torch.bfloat16, 2),
                                                         (CudaEfficientKernel, torch.float32, 4)])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_kernels_bind_to_real_schemas_and_branch_rules(monkeypatch, kernel, dtype, kv_heads_seen, causal):
    """The CUDA kernels' forward and backward calls, bound to the real op schemas and checked
    against torch's CUDA branch rules; their layouts, LSE trimming/padding and GQA handling."""
    fake = SchemaBoundCudaOps()
    monkeypatch.setattr(blocks, "_aten", fake)
    q, k, v, dout = _inputs(s=40, dtype=dtype)  # 40: the efficient kernel's LSE is padded to 64
    out, lse = kernel.forward(q, k, v, causal, 0.3)
    grads = kernel.backward(dout, q, k, v, out, lse, causal, 0.3)
    want_out, want_lse = MathKernel.forward(q, k, v, causal, 0.3)
    want = MathKernel.backward(dout, q, k, v, want_out, want_lse, causal, 0.3)
    assert lse.shape == (2, 4, 40) and torch.equal(out, want_out) and torch.equal(lse, want_lse)
    for got, ref, like in zip(grads, want, (q, k, v)):
        assert got.shape == like.shape and got.dtype == like.dtype and torch.equal(got, ref)
    assert fake.kv_heads == [kv_heads_seen] * 2  # flash: GQA native (2 KV heads), never repeated


def test_schema_bound_fake_rejects_the_old_placeholders(monkeypatch):
    """The fake can fail: torch.empty(0, int64) for cum_seq_q/k (the old call) selects the
    varlen branch and is refused; so are a wrong argument count and a wrong type."""
    fake = SchemaBoundCudaOps()
    q, k, v, dout = (x.transpose(1, 2) for x in _inputs(s=40, dtype=torch.bfloat16))
    out, lse = fake._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=0.3)[:2]
    empty = torch.empty(0, dtype=torch.int64)
    with pytest.raises(AssertionError, match="varlen branch"):
        fake._scaled_dot_product_flash_attention_backward(dout, q, k, v, out, lse, empty, empty, 40, 40, 0.0, True,
                                                          empty, empty, scale=0.3)
    with pytest.raises(TypeError, match="positional"):
        fake._scaled_dot_product_flash_attention_backward(dout, q, k, v, out, lse, None, None, 40, 40, 0.0, True,
                                                          None, None, 0.3)
    with pytest.raises(TypeError, match="max_q"):
        fake._scaled_dot_product_flash_attention_backward(dout, q, k, v, out, lse, None, None, 40.0, 40, 0.0, True,
                                                          None, None, scale=0.3)


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
