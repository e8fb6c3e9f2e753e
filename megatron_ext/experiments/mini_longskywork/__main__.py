"""Mini-LongSkywork: the paper's central claim in miniature, with ablations, as one command.

    python -m megatron_ext.experiments.mini_longskywork [--arms all|full,base,...] [--out runs/mini] [--resume]
        [--gate-threshold X] [--ignore-gate]

A small GPT is pretrained at L0, continually pretrained at L1 = 8 x L0 with RoPE ABF
on CIP data (CP = --nproc, 2 by default: the ring), SFT-ed, then long-SFT-ed for 200
iterations at L1 on SynL.
Arms share their common prefix (no stage is trained twice) and each is evaluated on
passkey, needle and held-out SynL at L0/2, L0, 2 L0, 4 L0 and L1. Writes
OUT/results.json, OUT/report.md, OUT/losses.png and OUT/heatmaps/. --resume continues
a killed run: finished data, stages and evaluations are not repeated. After ``base``
a gate evaluates the base with its own RoPE at L0/2 and L0; if its passkey accuracy at
L0 is under the threshold the base cannot copy, and the run stops there and reports
that (--ignore-gate runs on).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time

from data_tools.common import atomic_write

from ...cli import add_output_flags, quiet_cli

from . import data, report
from .config import ExperimentConfig, toy_config
from .stages import ALL_ARMS, ARMS, STAGES, TEMPLATE_ARMS, needed, write_configs
from .worker import PREFIX, load_experiment

_ITER = re.compile(r"iteration\s+(\d+)/(\d+).*lm loss: ([0-9.eE+-]+)")


def parse_arms(text: str):
    arms = list(ARMS) if text == "all" else [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in arms if a not in ALL_ARMS]
    if bad or not arms:
        raise ValueError(f"--arms: unknown arm(s) {bad}; expected 'all' or a comma list of {list(ALL_ARMS)}")
    return arms


def experiment_config(args) -> ExperimentConfig:
    """The stored sizes when resuming (so a resumed run never changes them), else fresh."""
    path = f"{args.out}/experiment.json"
    if os.path.exists(path):
        if not args.resume:
            raise ValueError(f"{args.out} holds a run already; pass --resume to continue it, or choose another --out")
        return load_experiment(json.load(open(path)))
    cfg = toy_config() if args.toy else ExperimentConfig()
    if args.gate_threshold is not None:
        cfg.gate_threshold = args.gate_threshold
    for flag, value in (("--nproc", args.nproc), ("--base-iters", args.base_iters)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.nproc is not None:
        cfg.nproc = args.nproc
    if args.base_iters is not None:  # the WSD decay keeps its share of the stage
        decay = max(1, cfg.base.wsd_decay * args.base_iters // cfg.base.iters) if cfg.base.wsd_decay else 0
        cfg.base = dataclasses.replace(cfg.base, iters=args.base_iters, wsd_decay=min(decay, args.base_iters))
    os.makedirs(args.out, exist_ok=True)
    atomic_write(path, json.dumps(dataclasses.asdict(cfg), indent=1).encode())
    return cfg


class Progress:
    """One line per stage event with the stage's ETA and the run's elapsed time."""

    def __init__(self, stages, t0: float):
        self.names = [s["name"] for s in stages]
        self.t0, self.stage, self.stage_t0 = t0, None, t0

    def line(self, text: str) -> None:
        now = time.monotonic()
        if text.startswith(f"{PREFIX} stage ") and text.endswith(" start"):
            self.stage, self.stage_t0 = text.split()[2], now
        m = _ITER.search(text)
        if m and self.stage:
            i, n, spent = int(m.group(1)), int(m.group(2)), now - self.stage_t0
            k = self.names.index(self.stage) + 1
            print(f"[stage {k}/{len(self.names)} {self.stage}] iteration {i}/{n} | lm loss {float(m.group(3)):.3f} | "
                  f"{spent:.0f} s, ETA {spent / i * (n - i):.0f} s | run {(now - self.t0) / 60:.1f} min", flush=True)
        elif text.startswith(PREFIX) or text.startswith("eval:"):
            print(f"{text} | run {(now - self.t0) / 60:.1f} min", flush=True)


def run_worker(out: str, plan: dict, progress: Progress) -> None:
    atomic_write(f"{out}/plan.json", json.dumps(plan, indent=1).encode())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(plan["experiment"]["nproc"]),
           "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "localhost:0", "-m", "megatron_ext.experiments.mini_longskywork.worker",
           "--plan", f"{out}/plan.json"]
    threads = str(plan["experiment"]["threads_per_rank"])
    env = dict(os.environ, OMP_NUM_THREADS=threads, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"))
    tail = []
    with open(f"{out}/worker.log", "a") as log, subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            tail = (tail + [line])[-30:]
            progress.line(line.strip())
    if proc.returncode:
        raise RuntimeError(f"the worker failed (exit {proc.returncode}); full log {out}/worker.log:\n" + "".join(tail))


def main(argv=None) -> int:
    quiet_cli(argv)
    ap = argparse.ArgumentParser(prog="python -m megatron_ext.experiments.mini_longskywork", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default="all", help=f"'all' ({', '.join(ARMS)}) or a comma list of those; "
                    f"{', '.join(TEMPLATE_ARMS)} is a diagnostic arm that trains on the evaluation's template")
    ap.add_argument("--out", default="runs/mini", help="run folder (results.json, report.md, stages/, eval/)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out; finished work is skipped")
    ap.add_argument("--toy", action="store_true", help="toy sizes (the smoke test): 2 iterations a stage, one length")
    ap.add_argument("--gate-threshold", type=float, default=None, help="passkey accuracy at L0 (base, own RoPE) "
                    "below which the run stops after base (default: the config's gate_threshold; a new run only)")
    ap.add_argument("--ignore-gate", action="store_true", help="run every stage even if the base cannot copy")
    ap.add_argument("--nproc", type=int, default=None, help="worker ranks (a new run only; default 2: gloo on "
                    "CPU cores; on a GPU machine one per GPU, e.g. 1): long stages and evaluation run at CP = nproc")
    ap.add_argument("--base-iters", type=int, default=None, help="iterations of the base stage (a new run only; "
                    "default the config's 2000): a base that copies needs far more than 2 CPU cores allow")
    add_output_flags(ap)
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    try:
        arms = parse_arms(args.arms)
        cfg = experiment_config(args)
    except ValueError as e:
        print(f"mini_longskywork: {e}", file=sys.stderr)
        return 2
    print(f"mini_longskywork: arms {', '.join(arms)} -> {args.out}", flush=True)
    paths = data.build(cfg, args.out, log=lambda s: print(s, flush=True))
    if any(a in TEMPLATE_ARMS for a in arms):
        paths["long_template"] = data.build_template(cfg, args.out)
    stages = write_configs(cfg, needed(arms), paths, args.out)
    evals = [{"arm": a, "stage_dir": f"{args.out}/stages/{ALL_ARMS[a]}", "out": f"{args.out}/eval/{a}.json"} for a in arms]
    os.makedirs(f"{args.out}/eval", exist_ok=True)
    for s in stages:
        if os.path.exists(f"{s['folder']}/DONE.json"):
            print(f"mini: stage {s['name']} finished earlier, skipped", flush=True)
    gate = {"threshold": cfg.gate_threshold, "ignore": args.ignore_gate, "stage_dir": f"{args.out}/stages/base",
            "controls": f"{args.out}/eval/controls.json", "file": f"{args.out}/gate.json"}
    plan = {"experiment": dataclasses.asdict(cfg), "paths": paths, "stages": stages, "evals": evals, "gate": gate}
    try:
        run_worker(args.out, plan, Progress(stages, t0))
    finally:
        _add_time(args.out, time.monotonic() - t0)
    # the report covers every finished stage and arm of the run folder, not only this call's
    recs = [json.load(open(f)) for f in (f"{args.out}/stages/{s.name}/DONE.json" for s in STAGES) if os.path.exists(f)]
    results = {a: json.load(open(f)) for a, f in ((a, f"{args.out}/eval/{a}.json") for a in ALL_ARMS)
               if os.path.exists(f)}
    setup = json.load(open(f"{args.out}/data/DONE.json")).get("setup", [])
    controls = {"base-own-rope": json.load(open(gate["controls"]))}
    res = report.write(cfg, args.out, recs, results, json.load(open(f"{args.out}/timing.json"))["seconds"], setup,
                       controls, json.load(open(gate["file"])))
    for arm, a in res["arms"].items():
        print(f"{arm:12s} passkey {a['passkey']} needle {a['needle']} synl {a['synl']}")
    for name, a in res["controls"].items():
        print(f"{name:12s} passkey {a['passkey']} needle {a['needle']} (control)")
    print(f"mini_longskywork: done; {args.out}/report.md, {args.out}/results.json", flush=True)
    return 0


def _add_time(out: str, seconds: float) -> None:
    """Wall-clock seconds over every invocation of this run (resumes add up)."""
    path = f"{out}/timing.json"
    before = json.load(open(path))["seconds"] if os.path.exists(path) else 0.0
    atomic_write(path, json.dumps({"seconds": before + seconds}).encode())


if __name__ == "__main__":
    raise SystemExit(main())
