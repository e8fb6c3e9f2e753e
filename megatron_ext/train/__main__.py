"""Train one stage of the LongSkywork recipe.

    torchrun --nproc-per-node N -m megatron_ext.train --config launch/configs/X.yaml [--set a.b=c ...] [--dry-run]

Resumes from the newest complete checkpoint in checkpoint.save_dir; a new
stage starts from checkpoint.init_from. SIGTERM saves and exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import warnings

import yaml

from .config import load_config, to_dict, validate


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|cuda_graph_scope).*")
    ap = argparse.ArgumentParser(prog="python -m megatron_ext.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML training config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the plan; needs no GPUs")
    ap.add_argument("--world-size", type=int, default=None, help="with --dry-run: the planned number of GPUs")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        world = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
        validate(cfg, world)
    except (ValueError, FileNotFoundError, yaml.YAMLError) as e:
        print(f"train: config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from .dryrun import dry_run

        print(dry_run(cfg, world, cfg.model.vocab_size or 65536))
        return 0
    return _run(cfg)


def _run(cfg) -> int:
    import torch.distributed as dist

    _init_distributed()
    from .loop import Trainer

    try:
        trainer = Trainer(cfg)
        if dist.get_rank() == 0:
            print(f"[{cfg.stage}] config:\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False), flush=True)
        note = trainer.restore()
        if dist.get_rank() == 0:
            print(f"[{cfg.stage}] {note}", flush=True)
        return trainer.train()
    finally:
        dist.destroy_process_group()


def _init_distributed() -> None:
    """init_process_group on a store namespaced by torchrun's restart count: after a
    restart, gloo must not find the previous attempt's addresses under the same keys."""
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    timeout = datetime.timedelta(minutes=10)
    if "MASTER_ADDR" not in os.environ:  # a plain single process
        dist.init_process_group(backend, init_method="tcp://127.0.0.1:0", rank=0, world_size=1, timeout=timeout)
        return
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"megatron_ext/attempt-{attempt}", store),
                            rank=rank, world_size=world, timeout=timeout)


if __name__ == "__main__":
    raise SystemExit(main())
