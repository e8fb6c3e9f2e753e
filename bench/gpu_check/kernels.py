"""Sections 1 and 5: the block kernels of ``megatron_ext.attention.blocks`` forward and
backward against float64 (``attention.reference``), and their speed against SDPA.

Tolerances, relative to max |reference| of each tensor (out, lse, dq, dk, dv), the
inputs being rounded to the kernel's dtype first so only the kernel's own error counts:

* bf16 (flash): 2**-5, the bound tests/test_cp_attention.py holds bf16 gradients to
  (FA2 rounds P and dS to bf16 before its matmuls);
* fp32 on CUDA (efficient): 1e-4. torch's memory-efficient kernel does its fp32 matmuls
  as 3xTF32 (cutlass OpMultiplyAddFastF32), close to fp32; 1e-4 leaves room, yet
  a wrong scale, mask, LSE padding or GQA fold is an O(1) error;
* fp32 on CPU: 1e-5, the CPU tests' bound.

Causal is checked on equal blocks only: blocks.py applies ``causal`` to diagonal
(sq == sk) blocks alone; unequal blocks are the ring's off-diagonal, unmasked ones.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from megatron_ext.attention import blocks
from megatron_ext.attention import reference as ref_module

from .rows import Row, at_least, at_most, failed_rows, guarded, reference, rel_error, skipped

SECTION_EXACT = "1 block kernels"
SECTION_SPEED = "5 kernel speed"
B, H, H_KV, D = 2, 8, 2, 64  # GQA: 4 query heads per K/V head
CASES = [("sq=sk=256 causal", 256, 256, True), ("sq=sk=256", 256, 256, False),
         ("sq=128 sk=384", 128, 384, False), ("sq=384 sk=128", 384, 128, False)]
# (label, device, dtype, the kernel select_kernel must pick, tolerance)
KERNELS = [("cpu_flash fp32", "cpu", torch.float32, "cpu_flash", 1e-5),
           ("cuda_flash bf16", "cuda", torch.bfloat16, "cuda_flash", 2 ** -5),
           ("cuda_efficient fp32", "cuda", torch.float32, "cuda_efficient", 1e-4)]
NAMES = ("out", "lse", "dq", "dk", "dv")


def kernel_errors(device: str, dtype: torch.dtype, sq: int, sk: int, causal: bool, seed: int = 0) -> dict:
    """Relative errors {out, lse, dq, dk, dv} of ``select_kernel(device, dtype)`` on one
    block q [B, sq, H, D], k, v [B, sk, H_KV, D], plus "kernel" (its name) and "dtype_ok"."""
    g = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(B, sq, H, D, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(B, sk, H_KV, D, generator=g).to(dtype) for _ in range(2))
    scale = D ** -0.5
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out = ref_module.reference_attention(*ref, causal, scale)
    ref_out.backward(dout.double())
    _, ref_lse = blocks.MathKernel.forward(*(t.detach() for t in ref), causal, scale)  # fp64 plain torch
    kernel = blocks.select_kernel(torch.device(device), dtype)
    mine = [t.to(device) for t in (q, k, v, dout)]
    out, lse = kernel.forward(*mine[:3], causal, scale)
    grads = kernel.backward(mine[3], *mine[:3], out, lse, causal, scale)
    got = [out, lse, *grads]
    want = [ref_out, ref_lse, *(t.grad for t in ref)]
    errs = {n: rel_error(a, w) for n, a, w in zip(NAMES, got, want)}
    errs["kernel"] = kernel.name
    errs["dtype_ok"] = out.dtype == dtype and all(t.dtype == dtype for t in grads)
    return errs


def _exact_row(label, device, dtype, expected, tol, case) -> Row:
    name, sq, sk, causal = case
    errs = kernel_errors(device, dtype, sq, sk, causal)
    check = f"{label} {name}"
    if errs["kernel"] != expected:
        return Row(SECTION_EXACT, check, "FAIL", f"select_kernel chose {errs['kernel']}, not {expected}")
    worst = max(NAMES, key=lambda n: errs[n])
    row = at_most(SECTION_EXACT, check, errs[worst], tol, f"fwd+bwd vs fp64; worst {worst}")
    if not errs["dtype_ok"]:
        row.status, row.result = "FAIL", row.result + "; output/grad dtype differs from the input's"
    return row


def exact_rows(cuda: bool) -> List[Row]:
    """Section 1: every kernel x case; CUDA kernels SKIP without CUDA."""
    rows = []
    for label, device, dtype, expected, tol in KERNELS:
        for case in CASES:
            check = f"{label} {case[0]}"
            if device == "cuda" and not cuda:
                rows.append(skipped(SECTION_EXACT, check, "no CUDA device: CUDA kernel not run"))
                continue
            args = (label, device, dtype, expected, tol, case)
            rows.append(guarded(SECTION_EXACT, check, lambda a=args: _exact_row(*a)))
    return rows


# -- section 5: speed ------------------------------------------------------------------------------
SPEED_SHAPE = dict(b=1, s=16384, h=16, d=128)  # the ~1B model's attention at 16K (section 6), MHA
SPEED_FLOOR_FLASH = 0.9  # the same FA2 kernels underneath: only our wrapper's cost may show
SPEED_FLOOR_DEFAULT = 0.5  # SDPA's own choice (cuDNN on Hopper, maybe): a 2x gap calls for wiring it in


def _speed_inputs():
    b, s, h, d = (SPEED_SHAPE[k] for k in "bshd")
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)]


def speed_figures() -> dict:
    """Seconds of our flash kernel and of SDPA (flash backend, and SDPA's default choice),
    forward and forward+backward, causal bf16 on SPEED_SHAPE, by CUDA events."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bench.common import cuda_time

    q, k, v, dout = _speed_inputs()
    scale = SPEED_SHAPE["d"] ** -0.5
    kernel = blocks.select_kernel(q.device, q.dtype)
    t = lambda x: x.transpose(1, 2)  # noqa: E731 - bshd <-> bhsd view
    leaves = [t(x).detach().requires_grad_() for x in (q, k, v)]

    def ours_fwd():
        return kernel.forward(q, k, v, True, scale)

    def ours_fwd_bwd():
        out, lse = kernel.forward(q, k, v, True, scale)
        return kernel.backward(dout, q, k, v, out, lse, True, scale)

    def sdpa_fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(*(t(x) for x in (q, k, v)), is_causal=True, scale=scale)

    def sdpa_fwd_bwd():  # autograd.grad: no .grad accumulation, which our kernel does not pay either
        out = F.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale)
        return torch.autograd.grad(out, leaves, t(dout))

    fig = {"ours_fwd": cuda_time(ours_fwd), "ours_fwd_bwd": cuda_time(ours_fwd_bwd),
           "sdpa_default_fwd_bwd": cuda_time(sdpa_fwd_bwd)}
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fig["sdpa_flash_fwd"] = cuda_time(sdpa_fwd)
        fig["sdpa_flash_fwd_bwd"] = cuda_time(sdpa_fwd_bwd)
    return fig


def _tflops(seconds: float, passes: float) -> float:
    b, s, h, d = (SPEED_SHAPE[k] for k in "bshd")
    return passes * 4 * b * h * s * s * d / 2 / seconds / 1e12  # causal: half the score matrix


def speed_rows(cuda: bool) -> List[Row]:
    """Section 5: ratios ours / SDPA of TFLOP/s (fwd: 1 pass, fwd+bwd: 3.5 passes)."""
    checks = [("fwd: ours / SDPA flash", "ours_fwd", "sdpa_flash_fwd", 1.0, SPEED_FLOOR_FLASH),
              ("fwd+bwd: ours / SDPA flash", "ours_fwd_bwd", "sdpa_flash_fwd_bwd", 3.5, SPEED_FLOOR_FLASH),
              ("fwd+bwd: ours / SDPA default", "ours_fwd_bwd", "sdpa_default_fwd_bwd", 3.5, SPEED_FLOOR_DEFAULT)]
    shape = "b={b} s={s} h={h} d={d} causal bf16".format(**SPEED_SHAPE)
    if not cuda:
        return [skipped(SECTION_SPEED, c[0], "no CUDA device: timing needs CUDA events") for c in checks]
    try:
        fig = speed_figures()
    except Exception as err:  # noqa: BLE001 - every row of the section reports the crash
        return failed_rows(SECTION_SPEED, [c[0] for c in checks], err)
    rows = []
    for name, ours, theirs, passes, floor in checks:
        mine, other = _tflops(fig[ours], passes), reference(_tflops(fig[theirs], passes))
        rows.append(at_least(SECTION_SPEED, name, mine / other, floor,
                             f"{shape}: ours {mine:.0f} TFLOP/s, SDPA {other:.0f}"))
    return rows
