"""Which TP x PP x CP x DP layout fits, and which is fastest, for a config on N GPUs.

    python -m megatron_ext.plan --config launch/configs/X.yaml --gpus 64 [--gpus-per-node 8]
        [--gpu-memory-gib 80] [--gpu H100|H800|A100|H200] [--layout tp=2,pp=1,cp=4[,ulysses=2]]
        [--constant compute_efficiency=0.45 ...] [--top 15] [--json out.json] [--ckpt-write-gib-s 2]

Prints a ranked table (layout, memory per GPU, fits, tokens/s per GPU, MFU); the
last line is ``best: TP=a PP=b CP=c DP=d (cp_comm_type ...) memory X GiB of B GiB,
~T tokens/s/GPU``; above it, the best layout's host memory per node during a checkpoint
and its planned save time (plan/host_memory.py). ``--layout`` explains one layout part by part instead. Bad input:
one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import yaml

from data_tools.quiet import add_output_flags, quiet_cli  # never imports megatron-core: no GPU notices to keep

from .host_memory import DEFAULT_WRITE_GIB_S, config_format, host_memory_lines
from .layouts import PlanError
from .planner import best_line, config_layout, evaluate, explain, plan, shape_and_run, table
from .time import GPUS, hardware


def _constants(items):
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise PlanError(f"--constant needs name=value, got {item!r}")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise PlanError(f"--constant {key}: {value!r} is not a number") from None
    return out


def _write_json(path: str, data) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".plan-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> int:
    quiet_cli(argv)
    ap = argparse.ArgumentParser(prog="python -m megatron_ext.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML training config (model, seq_length, batch)")
    ap.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (NVLink domain)")
    ap.add_argument("--gpu", default="H100", help=f"GPU type: {'|'.join(GPUS)}")
    ap.add_argument("--gpu-memory-gib", type=float, default=None, help="memory budget per GPU (default: the GPU's)")
    ap.add_argument("--layout", default=None, help="explain one layout: tp=..,pp=..,cp=..[,ulysses=..][,mbs=..]")
    ap.add_argument("--constant", action="append", default=[], metavar="NAME=VALUE",
                    help="override a time/memory constant (see megatron_ext/plan/time.py Hardware)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--top", type=int, default=15, help="rows of the ranked table")
    ap.add_argument("--json", default=None, help="write every evaluated layout here")
    ap.add_argument("--ckpt-write-gib-s", type=float, default=DEFAULT_WRITE_GIB_S,
                    help="checkpoint filesystem write bandwidth per node, GiB/s (planned save time)")
    add_output_flags(ap)
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except (PlanError, ValueError, FileNotFoundError, yaml.YAMLError) as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from ..train.config import load_config

    cfg = load_config(args.config, args.set)
    hw = hardware(args.gpu, _constants(args.constant))
    budget = args.gpu_memory_gib if args.gpu_memory_gib is not None else hw.memory_gib
    if budget <= 0:
        raise PlanError(f"--gpu-memory-gib {budget:g} must be positive")
    shape, run = shape_and_run(cfg)
    if args.layout:
        from .layouts import parse_layout
        from .planner import check_gpus

        check_gpus(shape, run, args.gpus, args.gpus_per_node)
        lay = parse_layout(args.layout, args.gpus, config_layout(cfg, args.gpus))
        ev = evaluate(shape, run, lay, hw, args.gpus_per_node, budget)
        print("\n".join(explain(ev, shape, run, args.gpus, args.gpus_per_node)))
        print("\n".join(host_memory_lines(shape, run, lay, args.gpus_per_node, config_format(cfg),
                                          args.ckpt_write_gib_s)))
        if args.json:
            _write_json(args.json, {"gpu": hw.name, "gpus": args.gpus, "layouts": [ev.as_dict()]})
        return 0
    evals = plan(shape, run, args.gpus, args.gpus_per_node, hw, budget)
    fitting = sum(e.fits for e in evals)
    print(f"{cfg.stage}: {args.gpus} x {hw.name} ({budget:g} GiB), {args.gpus_per_node} per node; "
          f"seq_length {run.seq_length}, global batch {run.global_batch_size}; {len(evals)} valid layouts, "
          f"{fitting} fit")
    print("\n".join(table(evals, args.top)))
    if args.json:
        _write_json(args.json, {"gpu": hw.name, "gpus": args.gpus, "gpus_per_node": args.gpus_per_node,
                                "budget_gib": budget, "layouts": [e.as_dict() for e in evals]})
    if not evals[0].fits:
        smallest = min(evals, key=lambda e: e.gib)
        print(f"best: none fits; the smallest is {smallest.layout.label()} at {smallest.gib:.1f} GiB "
              f"of {budget:g} GiB")
        return 1
    print("\n".join(host_memory_lines(shape, run, evals[0].layout, args.gpus_per_node, config_format(cfg),
                                      args.ckpt_write_gib_s)))
    print(best_line(evals[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
