"""Section 4: ``megatron_ext.convert.forward_logits`` on this machine against a CPU-only
process (``CUDA_VISIBLE_DEVICES=""``), on section 3's checkpoint. On a CUDA machine the
default call must keep the ids and the model on one device (issue 23 row 3); where
``forward_logits`` takes a ``device`` argument, ``device="cuda"`` is checked too.
Tolerance: 1e-4 of max |logit| (fp32; CUDA matmuls may sum in another order).

``python -m bench.gpu_check.logits CKPT IDS OUT [DEVICE]`` is the other process: it saves
the logits of the ids in ``IDS`` (a torch file) to ``OUT``, computed on DEVICE (default the
CPU). The ``device="cuda"`` row runs there too: this process applies megatron-core's CPU
patches for the default call, after which it refuses CUDA work.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import tempfile
from typing import List

import torch

from .rows import Row, at_most, failed_rows, guarded, rel_error, skipped
from .wheels import REPO

SECTION = "4 forward_logits"
TOL = 1e-4
SHAPE = (2, 33)  # odd length: forward_logits pads to even for the zigzag halves


def process_logits(checkpoint: str, ids: torch.Tensor, timeout: float = 300, device: str = "") -> torch.Tensor:
    """forward_logits of ``ids`` [b, s] in a fresh process -> [b, s, vocab] on the CPU: one that
    sees no GPU (``device`` ""), or one that computes on ``device`` (no CPU patches there yet)."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_logits_") as tmp:
        src, out = os.path.join(tmp, "ids.pt"), os.path.join(tmp, "logits.pt")
        torch.save(ids, src)
        env = dict(os.environ, **({} if device else {"CUDA_VISIBLE_DEVICES": ""}))
        res = subprocess.run([sys.executable, "-m", "bench.gpu_check.logits", checkpoint, src, out]
                             + ([device] if device else []),
                             capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
        if res.returncode:
            raise RuntimeError(f"the {device or 'CPU-only'} process exited {res.returncode}: {res.stderr[-400:]}")
        return torch.load(out)


def logits_rows(ctx) -> List[Row]:
    names = ["default device vs CPU-only process", "device='cuda' vs CPU-only process"]
    ckpt = ctx.state.get("checkpoint")
    if not ckpt:
        return [Row(SECTION, n, "FAIL", "no checkpoint: section 3 did not leave one") for n in names]
    from megatron_ext.convert import forward_logits
    from megatron_ext.convert.runtime import read_checkpoint
    from megatron_ext.train.checkpoint import latest_checkpoint

    path = latest_checkpoint(ckpt)
    vocab = read_checkpoint(path)[1]
    ids = torch.randint(0, vocab, SHAPE, generator=torch.Generator().manual_seed(3))
    try:
        want = process_logits(path, ids, ctx.timeout(300))
    except Exception as err:  # noqa: BLE001
        return failed_rows(SECTION, names, err)

    def compare(name, got, where):
        return at_most(SECTION, name, rel_error(got, want), TOL, f"logits {list(got.shape)} {where}, vs fp32 CPU")

    rows = []
    if not ctx.cuda:
        rows.append(skipped(SECTION, names[1], "no CUDA device"))
    elif "device" not in inspect.signature(forward_logits).parameters:
        rows.append(skipped(SECTION, names[1], "forward_logits takes no device argument in this checkout"))
    else:  # its own process: this one applies the CPU patches in the next row, which bars CUDA after
        rows.append(guarded(SECTION, names[1], lambda: compare(
            names[1], process_logits(path, ids, ctx.timeout(300), "cuda:0"), "computed on cuda:0")))
    rows.insert(0, guarded(SECTION, names[0], lambda: compare(names[0], forward_logits(path, ids), "default device")))
    return rows


def main(argv=None) -> int:
    checkpoint, src, out, *device = argv if argv is not None else sys.argv[1:]
    from megatron_ext.convert import forward_logits

    logits = forward_logits(checkpoint, torch.load(src), *device)
    torch.save(logits.cpu(), out + ".tmp")
    os.replace(out + ".tmp", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
