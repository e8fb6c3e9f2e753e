"""Train one stage of the LongSkywork recipe.

    torchrun --nproc-per-node N -m megatron_ext.train --config launch/configs/X.yaml [--set a.b=c ...] [--dry-run]

Resumes from the newest complete checkpoint in checkpoint.save_dir; a new
stage starts from checkpoint.init_from. SIGTERM saves and exits 0.
"""
from __future__ import annotations

import argparse
import os
import sys

import yaml

from ..cli import add_output_flags, quiet_cli
from .config import load_config, validate


def main(argv=None) -> int:
    quiet_cli(argv)
    ap = argparse.ArgumentParser(prog="python -m megatron_ext.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML training config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the plan; needs no GPUs")
    ap.add_argument("--world-size", type=int, default=None, help="with --dry-run: the planned number of GPUs")
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0, help="with --dry-run: memory per GPU")
    ap.add_argument("--skip-broken", action="store_true",
                    help="resume from the previous complete checkpoint when the newest has a missing or truncated "
                         "file (checkpoint.skip_broken=true)")
    ap.add_argument("--ckpt-write-gib-s", type=float, default=None,
                    help="with --dry-run: checkpoint write bandwidth per node, GiB/s (planned save time)")
    add_output_flags(ap)
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set + (["checkpoint.skip_broken=true"] if args.skip_broken else []))
        world = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
        validate(cfg, world)
    except (ValueError, FileNotFoundError, yaml.YAMLError) as e:
        print(f"train: config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from .dryrun import dry_run

        from ..plan.host_memory import DEFAULT_WRITE_GIB_S

        report, fits = dry_run(cfg, world, gpu_memory_gib=args.gpu_memory_gib,
                               ckpt_write_gib_s=args.ckpt_write_gib_s or DEFAULT_WRITE_GIB_S)
        print(report)
        return 0 if fits else 1
    return _run(cfg)


def _run(cfg) -> int:
    import torch.distributed as dist

    from ..distributed import init_distributed_from_env

    init_distributed_from_env()
    from .loop import run_stage

    try:
        return run_stage(cfg)
    finally:
        dist.destroy_process_group()

if __name__ == "__main__":
    raise SystemExit(main())
