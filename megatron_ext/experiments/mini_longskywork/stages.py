"""The training stages, shared between arms, each run once through ``megatron_ext.train``.

Arms share their common prefix: ``base`` -> ``cpt`` (CIP) -> ``sft`` -> ``long_sft``
serves four arms, and the ``no-cip`` and ``no-synl`` arms branch off it. A stage is
finished when its folder holds ``DONE.json`` (written by the worker after the
trainer returns); an unfinished stage is re-run and the trainer resumes from its
newest checkpoint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import yaml

from data_tools.common import atomic_write

from .config import ExperimentConfig, StageSize


@dataclass
class Stage:
    """One training stage of the experiment."""

    name: str
    """Folder name under OUT/stages/."""
    parent: Optional[str]
    """Stage whose final weights this one starts from (None: random init)."""
    data: str
    """Dataset name from :func:`data.build`."""
    kind: str
    """Trainer stage: pretrain, sft or long_sft."""
    long: bool
    """Runs at L1 with RoPE ABF and CP = nproc (2: the ring), else at L0, data-parallel over the ranks."""
    size: str
    """Which ExperimentConfig StageSize: base, cpt, sft or long_sft."""


STAGES: List[Stage] = [
    Stage("base", None, "docs", "pretrain", False, "base"),
    Stage("cpt", "base", "cip", "pretrain", True, "cpt"),
    Stage("sft", "cpt", "sft", "sft", False, "sft"),
    Stage("long_sft", "sft", "long_mix", "long_sft", True, "long_sft"),
    Stage("long_sft_nosynl", "sft", "long_nosynl", "long_sft", True, "long_sft"),
    Stage("cpt_concat", "base", "concat", "pretrain", True, "cpt"),
    Stage("sft_concat", "cpt_concat", "sft", "sft", False, "sft"),
    Stage("long_sft_concat", "sft_concat", "long_mix", "long_sft", True, "long_sft"),
    Stage("long_sft_template", "sft", "long_template", "long_sft", True, "long_sft"),
]
"""In run order: the main line first, so a stop early still yields the main arms."""

ARMS: Dict[str, str] = {"base": "base", "cpt-only": "cpt", "full": "long_sft", "no-long-sft": "sft",
                        "no-cip": "long_sft_concat", "no-synl": "long_sft_nosynl"}
"""Arm -> the stage whose final weights it evaluates (``--arms all``)."""

TEMPLATE_ARMS: Dict[str, str] = {"full+retrieval-data": "long_sft_template"}
"""Diagnostic arms that TRAIN ON THE EVALUATION'S TEMPLATE (passkey/needle-style samples
in the long SFT). Never part of ``all``; the report keeps them apart and labels them."""

ALL_ARMS: Dict[str, str] = {**ARMS, **TEMPLATE_ARMS}


def needed(arms: List[str]) -> List[Stage]:
    """The stages the arms need (their ancestors included), in run order."""
    want = set()
    for arm in arms:
        name = ALL_ARMS[arm]
        while name:
            want.add(name)
            name = next(s.parent for s in STAGES if s.name == name)
    return [s for s in STAGES if s.name in want]


def _blend(cfg: ExperimentConfig, stage: Stage, paths: Dict[str, str]) -> list:
    """Megatron blend [weight, prefix, ...]: pretraining from scratch mixes in the copy-rich text."""
    if stage.parent is None and cfg.copy_share > 0:
        return [1.0 - cfg.copy_share, paths[stage.data], cfg.copy_share, paths["copy"]]
    return [1.0, paths[stage.data]]


def _optim(size: StageSize) -> dict:
    """The stage's optim section: cosine, or megatron-core's WSD when ``size.wsd_decay``."""
    sched = {"lr_decay_style": "WSD", "lr_wsd_decay_iters": size.wsd_decay} if size.wsd_decay else {}
    return {"lr": size.lr, "min_lr": size.lr / 10, "warmup_iters": size.warmup, **sched, "micro_batch_size": 1,
            "global_batch_size": size.global_batch, "train_iters": size.iters, "weight_decay": 0.1}


def stage_config(cfg: ExperimentConfig, stage: Stage, paths: Dict[str, str], out: str) -> dict:
    """The megatron_ext.train config of one stage (a plain dict, written as YAML)."""
    size: StageSize = getattr(cfg, stage.size)
    rope = {"base": cfg.rope_base, "original_max_position": cfg.l0}
    rope.update({"scaling": "abf", "abf_base": cfg.abf_base} if stage.long or stage.parent else {"scaling": "none"})
    heads = cfg.num_attention_heads
    return {
        "stage": stage.kind,
        "expected": f"mini_longskywork stage {stage.name}: loss falls over {size.iters} iterations",
        "parallel": {"context_parallel_size": cfg.nproc if stage.long else 1, "cp_comm_type": "p2p"},
        "model": {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "ffn_hidden_size": 4 * cfg.hidden_size,
                  "num_attention_heads": heads, "num_query_groups": heads, "rope": rope},
        "data": {"blend": _blend(cfg, stage, paths), "tokenizer_model": paths["tokenizer"],
                 "seq_length": cfg.l1 if stage.long else cfg.l0, "sft": stage.kind != "pretrain",
                 "cache_dir": f"{out}/cache/{stage.name}"},
        "optim": _optim(size),
        "checkpoint": {"save_dir": f"{out}/stages/{stage.name}", "save_interval": max(1, size.iters // 2),
                       "keep_last": 1, "init_from": f"{out}/stages/{stage.parent}" if stage.parent else ""},
        "logging": {"log_interval": max(1, min(10, size.iters // 10)), "wandb": False},
    }


def write_configs(cfg: ExperimentConfig, stages: List[Stage], paths: Dict[str, str], out: str) -> List[dict]:
    """Each stage's YAML under OUT/configs/; returns the worker plan's stage entries."""
    entries = []
    for stage in stages:
        conf = f"{out}/configs/{stage.name}.yaml"
        os.makedirs(os.path.dirname(conf), exist_ok=True)
        atomic_write(conf, yaml.safe_dump(stage_config(cfg, stage, paths, out), sort_keys=False).encode())
        entries.append({"name": stage.name, "config": conf, "folder": f"{out}/stages/{stage.name}",
                        "iters": getattr(cfg, stage.size).iters})
    return entries
