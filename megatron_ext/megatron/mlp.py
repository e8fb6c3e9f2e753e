"""``RecomputableMLP``: megatron-core's MLP, safe under selective recompute of ``mlp``.

megatron-core 0.16.1 recomputes the MLP with ``tensor_parallel.checkpoint(self.mlp, ...)``
(``transformer_layer.py:719``). With ``add_bias_linear`` the MLP returns ``(output,
linear_fc2.bias)``: the bias *parameter itself* (``mlp.py:241-250``). An autograd.Function
that returns a tensor which is not one of its inputs sets that tensor's grad_fn, so the
parameter stops being a leaf and its grad_fn becomes the checkpoint node. In backward the
checkpoint reruns the MLP, gets that parameter back as an output and backpropagates
through it, i.e. into the checkpoint node that is running: it recomputes again, without
end (memory grows until killed; at CP > 1 the ring P2P of a recomputed core attention
runs at every level). This is device-independent; CUDA runs hit it the same way.
Returning a view of the bias keeps the parameter a leaf: the view gets the grad_fn, its
gradient flows into the parameter through ``ViewBackward``, and nothing else changes.
"""
from __future__ import annotations

from megatron.core.transformer.mlp import MLP


class RecomputableMLP(MLP):
    """megatron-core's MLP whose returned bias is a view of ``linear_fc2``'s bias, never
    the parameter (see the module docstring).

    forward: hidden_states [s, b, h] -> (output [s, b, h], bias [h] or None).
    """

    def forward(self, hidden_states, *args, **kwargs):
        output, bias = super().forward(hidden_states, *args, **kwargs)
        return output, (None if bias is None else bias.view_as(bias))
