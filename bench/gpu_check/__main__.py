"""python -m bench.gpu_check [--sections 1,2,3,4,5,6] [--cpu-only] [--perturb-reference]

Installs the wheels of ``.whl/`` whose modules are missing (``make gpu-wheels``), runs
the sections, prints one table and writes bench/results/gpu_check.json. Exit 1 when a
row FAILs or none PASSes. ``--perturb-reference`` is the self-test: every reference
is scaled and every bound tightened, so every row that runs must FAIL.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

from .wheels import REPO, ensure_wheels

SECTIONS = ("1", "2", "3", "4", "5", "6")
START = time.monotonic()


@dataclass
class Context:
    """What the sections share."""

    cuda: bool
    """A CUDA device is visible: CUDA-only rows run, else they SKIP."""
    work: str
    """Scratch folder (corpus, tokenizer, checkpoints)."""
    state: dict = field(default_factory=dict)
    """Hand-offs: "data" (section 3 -> 6), "checkpoint" (section 3 -> 4)."""
    deadline: float = float("inf")
    """time.monotonic() by which the whole run must end (--budget-s)."""

    def timeout(self, wanted: float) -> float:
        """A subprocess's timeout: ``wanted`` seconds, cut so the run still ends (and prints
        its table) by the deadline; at least 30 s. RuntimeError (the row FAILs, saying so)
        when under 60 s are left: a 30 s run plus its 45 s shutdown would overrun."""
        left = self.deadline - time.monotonic()
        if left < 60.0:
            raise RuntimeError(f"not started: {left:.0f} s of --budget-s left")
        return max(30.0, min(wanted, left - 15.0))


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception as err:  # noqa: BLE001 - the title says so; the rows say what failed
        return f"not importable ({type(err).__name__})"


def run_sections(ctx: Context, sections, after_each=None) -> list:
    from . import kernels, logits, packed, training

    table = {"1": lambda: kernels.exact_rows(ctx.cuda), "2": lambda: packed.packed_rows(ctx.cuda),
             "3": lambda: training.resume_rows(ctx), "4": lambda: logits.logits_rows(ctx),
             "5": lambda: kernels.speed_rows(ctx.cuda), "6": lambda: training.mfu_rows(ctx)}
    from .rows import failed_rows

    rows = []
    for s in sections:
        t0 = time.perf_counter()
        try:
            rows += table[s]()
        except Exception as err:  # noqa: BLE001 - a section's own bug still leaves the table
            rows += failed_rows(f"{s} (crashed)", ["the whole section"], err)
        print(f"gpu_check: section {s} done in {time.perf_counter() - t0:.0f} s", flush=True)
        if after_each:
            after_each(rows)
    return rows


def parse_sections(text: str) -> list:
    """"1,3" -> ["1", "3"]; ValueError naming an unknown section."""
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in chosen if s not in SECTIONS]
    if bad or not chosen:
        raise ValueError(f"--sections {text!r}: unknown {bad}; choose from {','.join(SECTIONS)}")
    if "4" in chosen and "3" not in chosen:
        raise ValueError("--sections: section 4 reads section 3's checkpoint; add 3")
    return sorted(chosen)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated sections to run")
    ap.add_argument("--cpu-only", action="store_true", help="hide the GPUs (CUDA_VISIBLE_DEVICES='')")
    ap.add_argument("--perturb-reference", action="store_true", help="self-test: every row must FAIL")
    ap.add_argument("--work-dir", default=os.path.join(REPO, "runs", "gpu_check"), help="scratch folder")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="the whole run's time limit: subprocess timeouts shrink to keep within it")
    ap.add_argument("--results-dir", default=None, help="where gpu_check.json goes (default bench/results)")
    args = ap.parse_args(argv)
    try:
        sections = parse_sections(args.sections)
    except ValueError as err:
        print(f"gpu_check: {err}", file=sys.stderr)
        return 2
    if args.cpu_only:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported
    try:
        wheels, wheel_error = ensure_wheels(), None
    except (OSError, ValueError, RuntimeError, subprocess.CalledProcessError) as err:
        wheels, wheel_error = "FAILED", " ".join(str(err).split())[:300]
    import torch

    from bench.common import RESULTS_DIR, print_table, write_json

    from .rows import FAIL, HEADERS, Row, exit_code, set_self_test

    set_self_test(args.perturb_reference)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "no CUDA device (CPU mode: CUDA-only rows SKIP)"
    print(f"gpu_check: {device}; torch {torch.__version__}; wheels: {wheels}", flush=True)
    rows = [Row("0 setup", "wheels from .whl/", FAIL, wheel_error)] if wheel_error else []
    ctx = Context(cuda=cuda, work=os.path.abspath(args.work_dir), deadline=START + args.budget_s)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def record(done: list, partial: bool) -> str:
        """The JSON so far: written after every section too, so a run killed from outside keeps its rows."""
        return write_json("gpu_check", {"date": when, "device": device, "self_test": args.perturb_reference,
                                        "wheels": wheels, "partial": partial, "exit_code": exit_code(done),
                                        "rows": [r.to_dict() for r in done]},
                          results_dir=args.results_dir or RESULTS_DIR)

    rows += run_sections(ctx, sections, after_each=lambda done: record(rows + done, True))
    title = (f"GPU acceptance check, {when}: {device}; torch {torch.__version__}, megatron-core "
             f"{_version('megatron.core')}" + ("; SELF-TEST (--perturb-reference)" if args.perturb_reference else ""))
    print_table(title, HEADERS, [r.cells() for r in rows])
    code = exit_code(rows)
    path = record(rows, False)
    counts = {s: sum(r.status == s for r in rows) for s in ("PASS", "FAIL", "SKIP")}
    print(f"\ngpu_check: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP in "
          f"{time.monotonic() - START:.0f} s -> {path}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
