"""Quiet command lines: on CPU our CLIs print their own output and nothing else.

megatron-core, torch and transformers warn about things a CPU user cannot act on: missing
GPU extras (TransformerEngine, Apex), deprecations inside torch's checkpoint and collective
code, a non-leaf ``.grad`` probe inside megatron-core's optimizer. This is the one place that
lists them. Only our ``main()`` functions call :func:`quiet_cli`; importing our modules from
your own code leaves your warning filters as they are.

* ``-v`` / ``--verbose`` (or ``MEGATRON_EXT_VERBOSE=1``, which spawned workers inherit) shows
  every warning.
* On CUDA, megatron-core's "Transformer Engine and Apex are not installed. Falling back"
  warnings stay visible: there they mean slower kernels than the machine could run.
* ``--no-progress`` (or ``MEGATRON_EXT_PROGRESS=0``) turns off the progress bars that long
  offline work shows on a terminal (``data_tools.common.progress``).

This module lives at the bottom layer so that data_tools and megatron_ext share it.
"""
from __future__ import annotations

import os
import sys
import warnings

VERBOSE_ENV = "MEGATRON_EXT_VERBOSE"
PROGRESS_ENV = "MEGATRON_EXT_PROGRESS"

_LIBS = r"(torch|megatron\.core|transformers|safetensors|huggingface_hub)(\.|$)"
GPU_FALLBACK = (r"(Transformer Engine and Apex are not installed|Apex is not installed)", UserWarning,
                r"megatron\.core(\.|$)")
"""(message regex, category, module regex) of megatron-core's missing-GPU-extras notices."""
KNOWN = (
    ("", FutureWarning, _LIBS),  # deprecations inside the libraries (ShardedTensor, load_state_dict, ...)
    ("", DeprecationWarning, _LIBS),
    (r".*(cuda_graph_scope|full scope is deprecated)", UserWarning, r"megatron\.core(\.|$)"),
    (r"The \.grad attribute of a Tensor that is not a leaf", UserWarning, r"megatron\.core(\.|$)"),
    (r"TypedStorage is deprecated", UserWarning, _LIBS),
)
"""(message regex, category, module regex) of the other third-party notices filtered on CPU and GPU."""


def verbose_requested(argv=None) -> bool:
    """True when ``-v``/``--verbose`` is among argv (default: sys.argv[1:]) or the environment asks."""
    args = sys.argv[1:] if argv is None else argv
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0") or any(a in ("-v", "--verbose") for a in args)


def add_output_flags(parser):
    """Adds ``-v/--verbose`` and ``--no-progress`` to an argparse parser (its subparsers inherit
    nothing: call it on each parser that parses the arguments). Returns the parser."""
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show third-party warnings too (default on CPU: our own output only)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")
    return parser


def filters(cuda: bool) -> list:
    """The (message, category, module) filters that a quiet CLI installs; ``cuda``: keep the
    TE/Apex fallback notices visible."""
    return list(KNOWN) + ([] if cuda else [GPU_FALLBACK])


def quiet_cli(argv=None, *, cuda: bool = False) -> bool:
    """Call first thing in a CLI's ``main(argv)``. Unless verbose, ignores the known third-party
    warnings of :data:`KNOWN` (and, when ``cuda`` is False, :data:`GPU_FALLBACK`) for the rest of
    the process. ``--no-progress`` sets ``MEGATRON_EXT_PROGRESS=0``. Returns whether verbose;
    verbose also sets ``MEGATRON_EXT_VERBOSE=1`` so that spawned workers are verbose too."""
    args = sys.argv[1:] if argv is None else argv
    if "--no-progress" in args:
        os.environ[PROGRESS_ENV] = "0"
    if verbose_requested(args):
        os.environ[VERBOSE_ENV] = "1"
        return True
    for message, category, module in filters(cuda):
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    return False


def progress_enabled() -> bool:
    """Progress bars: only on a terminal (stderr), and not when switched off."""
    return os.environ.get(PROGRESS_ENV, "1") != "0" and sys.stderr.isatty()
