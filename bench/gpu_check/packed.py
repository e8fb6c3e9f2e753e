"""Section 2: packed documents (``cu_seqlens``, the trainer's thd path) through our ring
attention at P = 1 against float64 per-document references
(``attention.exactness.run_packed_case``: pads carry random values, so a pad
leaking into a document shows). Tolerances as section 1's (relative to max |ref|)."""
from __future__ import annotations

import contextlib
from typing import List

from megatron_ext.attention import exactness

from .rows import Row, at_most, guarded, reference, skipped

SECTION = "2 packed attention"
DOCS = (200, 37, 130, 9)  # odd lengths: every document gets a pad row
TENSORS = ("out", "dq", "dk", "dv")
# (label, device, Case dtype, tolerance)
VARIANTS = [("ring fp32 cpu", "cpu", "fp32", 1e-5), ("ring bf16 cuda", "cuda", "bf16", 2 ** -5),
            ("ring fp32 cuda", "cuda", "fp32", 1e-4)]


@contextlib.contextmanager
def _perturbable_reference():
    """run_packed_case looks reference_attention up at call time: route it through
    :func:`rows.reference`, so the self-test scales this section's reference too."""
    original = exactness.reference_attention
    exactness.reference_attention = lambda *a, **kw: reference(original(*a, **kw))
    try:
        yield
    finally:
        exactness.reference_attention = original


def _row(label: str, device: str, dtype: str, tol: float) -> Row:
    from megatron_ext.convert.runtime import single_process  # a 1-rank gloo group

    case = exactness.Case("ring", h=8, h_kv=2, d=64, dtype=dtype, doc_lengths=DOCS)
    with single_process(), _perturbable_reference():
        errs = exactness.run_packed_case(0, 1, case, device=device)
    rel = {n: errs[n] / max(errs[f"ref_max_{n}"], 1e-30) for n in TENSORS}
    worst = max(TENSORS, key=rel.get)
    row = at_most(SECTION, f"{label} docs={list(DOCS)}", rel[worst], tol, f"fwd+bwd vs fp64; worst {worst}")
    if not (errs["dtype_ok"] and errs["shape_ok"]):
        row.status, row.result = "FAIL", row.result + "; dtype or shape of the output differs"
    return row


def packed_rows(cuda: bool) -> List[Row]:
    rows = []
    for label, device, dtype, tol in VARIANTS:
        check = f"{label} docs={list(DOCS)}"
        if device == "cuda" and not cuda:
            rows.append(skipped(SECTION, check, "no CUDA device: CUDA kernels not run"))
        else:
            rows.append(guarded(SECTION, check, lambda a=(label, device, dtype, tol): _row(*a)))
    return rows
