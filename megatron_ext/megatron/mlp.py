"""The MLP's output linear, safe under selective recompute of ``mlp``.

megatron-core 0.16.1 recomputes the MLP with ``tensor_parallel.checkpoint(self.mlp, ...)``
(``transformer_layer.py:719``). With ``add_bias_linear`` the MLP returns ``(output,
linear_fc2.bias)``: ``RowParallelLinear`` (and TE's) hands back the bias *parameter itself*
(``layers.py:1050``, ``mlp.py:241-250``). An autograd.Function that returns a tensor which is
not one of its inputs sets that tensor's grad_fn, so the parameter stops being a leaf and its
grad_fn becomes the checkpoint node. In backward the checkpoint reruns the MLP, gets that
parameter back as an output and backpropagates through it, i.e. into the checkpoint node that
is running: it recomputes again, without end (memory grows until the process is killed).
Nothing here is CPU-specific; a CUDA run does the same.

A view of the bias keeps the parameter a leaf: the view takes the grad_fn and its gradient
flows into the parameter through ``ViewBackward``. Only ``linear_fc2``'s class changes, so
megatron-core still recognises the MLP (``transformer_layer.py:354`` passes it the TP group).
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def bias_view_linear(cls: type) -> type:
    """A subclass of the row-parallel linear ``cls`` (megatron-core's ``RowParallelLinear``
    or TE's ``TERowParallelLinear``) whose forward returns a view of its bias, never the
    parameter. One class per ``cls``. forward: x [s, b, in / tp] -> (y [s, b, out], bias [out]
    or None)."""

    def forward(self, *args, **kwargs):
        output, bias = cls.forward(self, *args, **kwargs)
        return output, (None if bias is None else bias.view_as(bias))

    name = f"{cls.__name__}BiasView"
    doc = f"{cls.__name__} returning a view of its bias (megatron_ext.megatron.mlp: selective mlp recompute)."
    sub = type(name, (cls,), {"forward": forward, "__doc__": doc, "__module__": __name__, "__qualname__": name})
    globals()[name] = sub  # importable by name, so a pickled module finds its class
    return sub
