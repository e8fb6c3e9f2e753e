"""Evaluate one arm: passkey, needle and held-out SynL accuracy per context length.

Runs on every rank of the worker's world (CP = world size, ring prefill) through
``megatron_ext.eval``: the checkpoint loader, the passkey/needle prompts of
``eval.needle`` and the teacher-forced greedy exact match of ``eval.scoring``.
Every arm is evaluated with the same RoPE (ABF, the long stages' base): for
``base`` that is "the L0 model with only RoPE ABF applied".
"""
from __future__ import annotations

import random
import time
from typing import Dict, List, Optional

from data_tools.common import load_tokenizer
from data_tools.synth.needle import parse_depths, read_haystack
from data_tools.synth.synl import SynlConfig, synl_sample

from ...eval.model import load_model, read_checkpoint
from ...eval.needle import ANSWER_BUDGET, cell_prompt, prompt_and_answer
from ...eval.scoring import score_answer
from ...rope import RopeConfig
from .config import ExperimentConfig

TASKS = ("passkey", "needle", "synl")
SYNL_SEED = "mini-heldout-synl"
"""SynL evaluation tables are seeded from this string; training tables come from integer seeds."""


def synl_prompt(sp, length: int, index: int) -> dict:
    """A held-out SynL question whose prompt fits ``length - ANSWER_BUDGET`` tokens; the answer's
    tokens are the suffix of the whole text's tokens (data_tools.segments)."""
    rng = random.Random(f"{SYNL_SEED}:{length}:{index}")
    sample = synl_sample(lambda text: len(sp.encode(text)), SynlConfig(length - ANSWER_BUDGET), rng)
    return prompt_and_answer(sp, sample)


def _cells(cfg: ExperimentConfig, sp, haystack: str, log, lengths: List[int], tasks=TASKS) -> List[dict]:
    """Every prompt of the evaluation (the same for every arm) at ``lengths``, of ``tasks``."""
    cells = []
    for kind in [t for t in ("passkey", "needle") if t in tasks]:
        for length in lengths:
            for depth in parse_depths(cfg.eval_depths):
                c = cell_prompt(haystack, kind, 0, sp, length, depth)
                cells.append({"task": kind, "length": length, "depth": depth, **c})
    for length in lengths if "synl" in tasks else []:
        for i in range(cfg.synl_eval_samples):
            try:
                cells.append({"task": "synl", "length": length, "depth": float(i), **synl_prompt(sp, length, i)})
            except ValueError as e:  # the smallest table does not fit this length
                log(f"eval: no SynL question fits {length} tokens ({e}); synl at {length} is not reported")
                break
    return cells


CONTROL_TASKS = ("passkey", "needle")
"""Tasks of the base-own-rope control (the gate reads its passkey)."""


def control_lengths(cfg: ExperimentConfig) -> List[int]:
    """L0/2 and L0: where the base model was trained."""
    return [cfg.l0 // 2, cfg.l0]


def evaluate_arm(cfg: ExperimentConfig, stage_dir: str, paths: Dict[str, str], log=print, own_rope: bool = False,
                 lengths: Optional[List[int]] = None, tasks=TASKS) -> dict:
    """{"passkey": {"4096": acc, ...}, "needle": {...}, "synl": {...}, "cells": [...], "seconds": s}.

    ``own_rope``: the base's RoPE (no ABF) instead of the long stages' ABF; ``lengths`` default
    ``cfg.eval_lengths``; only ``tasks`` are evaluated (and keyed)."""
    from megatron.core import parallel_state
    import torch.distributed as dist

    t0 = time.monotonic()
    info = read_checkpoint(stage_dir)
    lengths = lengths or cfg.eval_lengths
    scaling = {"scaling": "none"} if own_rope else {"scaling": "abf", "abf_base": cfg.abf_base}
    rope = RopeConfig(base=cfg.rope_base, original_max_position=cfg.l0, **scaling)
    model, bf16 = load_model(info, dist.get_world_size(), "p2p", rope, max(lengths))
    group = parallel_state.get_context_parallel_group()
    sp = load_tokenizer(paths["tokenizer"])
    done = []
    for c in _cells(cfg, sp, read_haystack([paths["haystack"]]), log, lengths, tasks):
        s = score_answer(model, c["prompt_ids"], c["answer_ids"], group, bf16)
        done.append({"task": c["task"], "length": c["length"], "depth": c["depth"], "score": int(s.greedy_match),
                     "mean_logprob": s.mean_logprob, "answer": c["sample"]["response"],
                     "context_tokens": len(c["prompt_ids"])})
    out = {task: {} for task in tasks}
    for task in tasks:
        for length in lengths:
            mine = [c["score"] for c in done if c["task"] == task and c["length"] == length]
            if mine:
                out[task][str(length)] = sum(mine) / len(mine)
    return dict(out, cells=done, seconds=round(time.monotonic() - t0, 1), checkpoint=info.path,
                iteration=info.iteration)
