"""The quiet-output policy of our CLIs (data_tools.quiet), with CUDA detected here.

Call :func:`quiet_cli` first thing in a megatron_ext CLI's ``main(argv)``. On CUDA,
megatron-core's TransformerEngine/Apex fallback warnings stay visible.
"""
from __future__ import annotations

from data_tools.quiet import add_output_flags, quiet_cli as _quiet_cli  # noqa: F401  (re-exported)


def cuda_available() -> bool:
    """torch.cuda.is_available(), read once per call (tests monkeypatch it)."""
    import torch

    return torch.cuda.is_available()


def quiet_cli(argv=None) -> bool:
    """data_tools.quiet.quiet_cli with ``cuda`` from this machine; returns whether verbose."""
    return _quiet_cli(argv, cuda=cuda_available())
