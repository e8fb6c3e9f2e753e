"""The ``autograd.Function`` shared by the single-group CP algorithms (ring, all-gather).

Each algorithm supplies ``forward(q, k, v, group, causal, scale, layout, *options) -> (out, lse)``
and ``backward(dout, q, k, v, out, lse, group, causal, scale, layout, *options) -> (dq, dk, dv)``,
where ``options`` are the algorithm's own non-tensor settings (the ring's ``kv_chunks``);
the backward recomputes blocks from the saved global lse, never differentiating
through a kernel.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .checks import validate


def cp_attention_function(name: str, forward: Callable, backward: Callable) -> type:
    """Build the ``autograd.Function`` subclass ``name`` from a forward/backward pair."""

    def fwd(ctx, q, k, v, group, causal, scale, layout, *options):
        out, lse = forward(q, k, v, group, causal, scale, layout, *options)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, causal, scale, layout, *options)
        return out

    def bwd(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward(dout.contiguous(), q, k, v, out, lse, *ctx.args)
        return (dq, dk, dv) + (None,) * len(ctx.args)

    doc = f"Exact CP attention by {forward.__module__}; hand-written backward from the global lse."
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd),
                                                    "__doc__": doc})


def apply_cp_attention(function: type, q, k, v, group, causal: bool, softmax_scale: Optional[float], layout: str,
                       *options):
    """Validate (every rank raises together on misuse), default the scale to d**-0.5, run."""
    validate(q, k, v, group, causal, layout)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return function.apply(q, k, v, group, causal, scale, layout, *options)
