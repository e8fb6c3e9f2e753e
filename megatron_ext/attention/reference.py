"""Dense float64 references, written without the block kernels, for checks only.

They materialise [S, S] scores: use them on small inputs, or on a few rows.
"""
from __future__ import annotations

import torch


def reference_attention(q, k, v, causal: bool, scale: float):
    """Dense float64 attention. q: [b, S, h, d]; k, v: [b, S, h_kv, d] -> [b, S, h, d]."""
    groups = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(groups, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(groups, dim=1)
    scores = qh @ kh.transpose(-1, -2) * scale
    if causal:
        n = scores.shape[-1]
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ vh).transpose(1, 2)


def reference_rows(rows, q, k, v, dout, causal: bool, scale: float):
    """Out and dq for a few query rows, each against every key, in float64.

    rows: LongTensor [n] of global positions; q, dout: [S, h, d]; k, v: [S, h_kv, d]
    (one batch element). Returns out [n, h, d] and dq [n, h, d].
    """
    groups = q.shape[1] // k.shape[1]
    kd = k.double().repeat_interleave(groups, dim=1).transpose(0, 1)  # [h, S, d]
    vd = v.double().repeat_interleave(groups, dim=1).transpose(0, 1)
    outs, dqs = [], []
    for i in rows.tolist():
        qi, doi = q[i].double(), dout[i].double()  # [h, d]
        scores = torch.einsum("hd,hsd->hs", qi, kd) * scale
        if causal:
            scores[:, i + 1:] = float("-inf")
        p = torch.softmax(scores, dim=-1)
        o = torch.einsum("hs,hsd->hd", p, vd)
        dp = torch.einsum("hd,hsd->hs", doi, vd)
        ds = p * (dp - (doi * o).sum(-1, keepdim=True))
        outs.append(o)
        dqs.append(torch.einsum("hs,hsd->hd", ds, kd) * scale)
    return torch.stack(outs), torch.stack(dqs)
