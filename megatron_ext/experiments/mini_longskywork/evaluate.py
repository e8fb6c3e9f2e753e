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
from typing import Dict, List

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


def _cells(cfg: ExperimentConfig, sp, haystack: str, log) -> List[dict]:
    """Every prompt of the evaluation (the same for every arm)."""
    cells = []
    for kind in ("passkey", "needle"):
        for length in cfg.eval_lengths:
            for depth in parse_depths(cfg.eval_depths):
                c = cell_prompt(haystack, kind, 0, sp, length, depth)
                cells.append({"task": kind, "length": length, "depth": depth, **c})
    for length in cfg.eval_lengths:
        for i in range(cfg.synl_eval_samples):
            try:
                cells.append({"task": "synl", "length": length, "depth": float(i), **synl_prompt(sp, length, i)})
            except ValueError as e:  # the smallest table does not fit this length
                log(f"eval: no SynL question fits {length} tokens ({e}); synl at {length} is not reported")
                break
    return cells


def evaluate_arm(cfg: ExperimentConfig, stage_dir: str, paths: Dict[str, str], log=print) -> dict:
    """{"passkey": {"4096": acc, ...}, "needle": {...}, "synl": {...}, "cells": [...], "seconds": s}."""
    from megatron.core import parallel_state
    import torch.distributed as dist

    t0 = time.monotonic()
    info = read_checkpoint(stage_dir)
    rope = RopeConfig(base=cfg.rope_base, scaling="abf", abf_base=cfg.abf_base, original_max_position=cfg.l0)
    model, bf16 = load_model(info, dist.get_world_size(), "p2p", rope, max(cfg.eval_lengths))
    group = parallel_state.get_context_parallel_group()
    sp = load_tokenizer(paths["tokenizer"])
    done = []
    for c in _cells(cfg, sp, read_haystack([paths["haystack"]]), log):
        s = score_answer(model, c["prompt_ids"], c["answer_ids"], group, bf16)
        done.append({"task": c["task"], "length": c["length"], "depth": c["depth"], "score": int(s.greedy_match),
                     "mean_logprob": s.mean_logprob, "answer": c["sample"]["response"],
                     "context_tokens": len(c["prompt_ids"])})
    out = {task: {} for task in TASKS}
    for task in TASKS:
        for length in cfg.eval_lengths:
            mine = [c["score"] for c in done if c["task"] == task and c["length"] == length]
            if mine:
                out[task][str(length)] = sum(mine) / len(mine)
    return dict(out, cells=done, seconds=round(time.monotonic() - t0, 1), checkpoint=info.path,
                iteration=info.iteration)
