"""The experiment's one distributed job: pending training stages, then pending evaluations.

    torchrun --nproc-per-node NPROC -m megatron_ext.experiments.mini_longskywork.worker --plan OUT/plan.json

One launch runs every stage in order (megatron-core's parallel state is rebuilt per
stage), so interpreter and import start-up is paid once. Each finished stage writes
``DONE.json`` and each finished arm ``OUT/eval/ARM.json`` (rank 0, atomically);
a killed run resumes at the first unfinished one.

After ``base`` the gate evaluates the base with its own RoPE at L0/2 and L0
(``OUT/eval/controls.json``, the report's ``controls.base-own-rope``). Passkey at L0
below ``gate_threshold`` means the base cannot copy: the later stages are not run
(``OUT/gate.json`` says so) unless the plan says to ignore the gate.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from data_tools.common import atomic_write

from ...cli import add_output_flags, quiet_cli

from .config import ExperimentConfig, StageSize

PREFIX = "mini:"
"""Lines the orchestrator reads for progress."""


def load_experiment(tree: dict) -> ExperimentConfig:
    sizes = {k: StageSize(**tree[k]) for k in ("base", "cpt", "sft", "long_sft")}
    rest = {k: v for k, v in tree.items() if k not in sizes}
    rest["sft_targets"] = tuple(rest["sft_targets"])
    return ExperimentConfig(**rest, **sizes)


def stage_record(name: str, folder: str, seconds: float) -> dict:
    recs = [json.loads(x) for x in open(f"{folder}/metrics.jsonl") if '"loss"' in x]
    speed = sorted(r["tokens_per_s_per_rank"] for r in recs[1:] or recs)  # the first iteration warms up
    return {"stage": name, "seconds": round(seconds, 1), "iterations": recs[-1]["iteration"],
            "first_loss": recs[0]["loss"], "final_loss": recs[-1]["loss"],
            "tokens_per_s_per_rank": speed[len(speed) // 2]}


def run_stages(plan: dict, rank: int) -> None:
    import torch.distributed as dist

    from ...train.config import load_config, validate
    from ...train.loop import run_stage

    for st in plan["stages"]:
        done = f"{st['folder']}/DONE.json"
        if os.path.exists(done):
            continue
        if rank == 0:
            print(f"{PREFIX} stage {st['name']} start", flush=True)
        t0 = time.monotonic()
        cfg = load_config(st["config"])
        validate(cfg, dist.get_world_size())
        if run_stage(cfg):
            raise RuntimeError(f"stage {st['name']} stopped with a data error (see above)")
        if rank == 0:
            atomic_write(done, json.dumps(stage_record(st["name"], st["folder"], time.monotonic() - t0)).encode())
            print(f"{PREFIX} stage {st['name']} done", flush=True)
        dist.barrier()


def run_gate(plan: dict, rank: int) -> bool:
    """The base-own-rope control (evaluated once) and the gate's decision; True: run the rest."""
    import torch.distributed as dist

    from .evaluate import CONTROL_TASKS, control_lengths, evaluate_arm

    g, cfg = plan["gate"], load_experiment(plan["experiment"])
    if not os.path.exists(g["controls"]):
        if rank == 0:
            print(f"{PREFIX} eval base-own-rope start", flush=True)
        res = evaluate_arm(cfg, g["stage_dir"], plan["paths"], log=print if rank == 0 else (lambda *_: None),
                           own_rope=True, lengths=control_lengths(cfg), tasks=CONTROL_TASKS)
        if rank == 0:
            atomic_write(g["controls"], json.dumps(dict(res, arm="base-own-rope")).encode())
        dist.barrier()
    passkey = json.load(open(g["controls"]))["passkey"][str(cfg.l0)]
    passed = passkey >= g["threshold"]
    if rank == 0:
        atomic_write(g["file"], json.dumps({"passed": passed, "ignored": bool(g["ignore"]) and not passed,
                                            "threshold": g["threshold"], "passkey_l0": passkey}).encode())
        what = "passed" if passed else "ignored (--ignore-gate)" if g["ignore"] else "stopped the run"
        print(f"{PREFIX} gate {what}: base-own-rope passkey at L0 {passkey:.2f} vs threshold {g['threshold']}",
              flush=True)
    return passed or bool(g["ignore"])


def run_evals(plan: dict, rank: int, only_finished: bool = False) -> None:
    import torch.distributed as dist

    from .evaluate import evaluate_arm

    cfg = load_experiment(plan["experiment"])
    for ev in plan["evals"]:
        if only_finished and not os.path.exists(f"{ev['stage_dir']}/DONE.json"):
            continue
        if os.path.exists(ev["out"]):
            continue
        if rank == 0:
            print(f"{PREFIX} eval {ev['arm']} start", flush=True)
        res = evaluate_arm(cfg, ev["stage_dir"], plan["paths"], log=print if rank == 0 else (lambda *_: None))
        if rank == 0:
            atomic_write(ev["out"], json.dumps(dict(res, arm=ev["arm"])).encode())
            print(f"{PREFIX} eval {ev['arm']} done in {res['seconds']:.0f} s: "
                  + ", ".join(f"{t} {res[t]}" for t in ("passkey", "needle", "synl")), flush=True)
        dist.barrier()


def main(argv=None) -> int:
    quiet_cli(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", required=True, help="OUT/plan.json written by the orchestrator")
    add_output_flags(ap)
    args = ap.parse_args(argv)
    plan = json.load(open(args.plan))
    import torch.distributed as dist

    from ...distributed import init_distributed_from_env

    init_distributed_from_env()
    try:
        rank, stages = dist.get_rank(), plan["stages"]
        run_stages(dict(plan, stages=[s for s in stages if s["name"] == "base"]), rank)
        go = run_gate(plan, rank)
        if go:
            run_stages(dict(plan, stages=[s for s in stages if s["name"] != "base"]), rank)
        run_evals(plan, rank, only_finished=not go)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
