"""Needle-in-a-haystack and passkey sweeps over a megatron_ext.train checkpoint.

    torchrun --nproc-per-node N -m megatron_ext.eval.needle --checkpoint DIR --tokenizer-model M \\
        --lengths 1k,2k,4k,...,200k --depths 0:100:10 --out RESULTS_DIR [--cp N] \\
        [--haystack docs.jsonl ...] [--kind needle|passkey] [--seed S] [--cp-comm-type p2p] \\
        [--rope-scaling yarn --rope-factor F] [--chat-template]

Each (length, depth) cell is one prompt from ``data_tools.synth needle`` (the
prompt is at most length - 16 tokens, leaving room for the answer), run once
over all ranks with context-parallel prefill and scored by teacher-forced greedy
exact match plus the answer's mean log-prob (no judge model). Rank 0 writes
RESULTS_DIR/cells/*.json as cells finish, then summary.csv, heatmap.png and, for
passkey, passkey_accuracy.{md,png}. Run again with the same flags to resume:
finished cells are skipped. Scores do not depend on the CP size.

The answer is scored as the suffix of tokenize(prompt + separator + answer)
after the prompt (data_tools.segments), right for sentencepiece and byte-level
BPE alike. ``--chat-template`` wraps the prompt in the tokenizer's own chat
template (one user turn, then the assistant turn's opening; hf:DIR tokenizers)
and scores the answer right after the assistant turn starts.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import List

import torch.distributed as dist

from data_tools.common import DataError, parse_int_list
from data_tools.segments import encode_pair
from data_tools.synth.needle import needle_sample, parse_depths, read_haystack
from data_tools.tokenizing import canonical_spec

from ..rope import RopeConfig
from . import results
from .model import CheckpointInfo, check_tokenizer, eval_rope, read_checkpoint

ANSWER_BUDGET = 16
"""Tokens kept free after the prompt so prompt + answer fit the cell's length."""
MIN_LENGTH = 64


@dataclass
class Plan:
    """A checked request: everything every rank needs before the process group exists."""

    args: argparse.Namespace
    """The parsed command line."""
    info: CheckpointInfo
    """The checkpoint, its config and vocabulary."""
    lengths: List[int]
    """Context lengths, ascending, unique."""
    depths: List[float]
    """Needle depths in percent, ascending, unique."""
    rope: RopeConfig
    """RoPE for the evaluation (the checkpoint's, or extended)."""
    cp: int
    """Context-parallel size (= world size)."""
    settings: dict
    """What a stored cell must match to be reused."""
    haystack: str
    """The needle haystack text (read, and so checked, by every rank)."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="torchrun ... -m megatron_ext.eval.needle", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="save_dir (newest complete step) or a step-N folder")
    ap.add_argument("--tokenizer-model", required=True, help="the tokenizer the checkpoint was trained with: PATH.model (sentencepiece) or hf:DIR (a Hugging Face tokenizer.json)")
    ap.add_argument("--lengths", required=True, help="context lengths, e.g. 1k,2k,4k (k = 1000)")
    ap.add_argument("--depths", default="0:100:10", help="needle depths in %%: START:STOP:STEP (inclusive) or a list")
    ap.add_argument("--out", required=True, help="results folder (resumable)")
    ap.add_argument("--kind", choices=["needle", "passkey"], default="needle")
    ap.add_argument("--haystack", nargs="*", default=[], help="JSONL documents (key text); needed for --kind needle")
    ap.add_argument("--cp", type=int, default=0, help="context-parallel size (default and only choice: all ranks)")
    ap.add_argument("--cp-comm-type", choices=["p2p", "all_gather", "a2a"], default="p2p", help="p2p = ring")
    ap.add_argument("--rope-scaling", choices=["none", "linear", "ntk", "yarn"], default="none",
                    help="extend the checkpoint's RoPE at evaluation time (with --rope-factor)")
    ap.add_argument("--rope-factor", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="needle values and placement")
    ap.add_argument("--chat-template", action="store_true",
                    help="wrap each prompt in the tokenizer's chat template as one user turn (hf:DIR with a "
                         "chat template); the answer is scored where the assistant turn starts")
    return ap


def make_plan(args) -> Plan:
    """Check the request from the files alone; raises ValueError / FileNotFoundError /
    DataError (a bad haystack line)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    cp = args.cp or world
    if cp != world:
        raise ValueError(f"--cp {cp} must equal the number of processes ({world}): every prompt runs over all ranks")
    lengths, depths = parse_int_list(args.lengths), parse_depths(args.depths)
    if min(lengths) < MIN_LENGTH:
        raise ValueError(f"--lengths must be >= {MIN_LENGTH} tokens, got {min(lengths)}")
    if not all(0.0 <= d <= 100.0 for d in depths):
        raise ValueError(f"--depths are percentages in [0, 100], got {depths}")
    if args.kind == "needle" and not args.haystack:
        raise ValueError("--kind needle needs --haystack docs.jsonl (or use --kind passkey)")
    for path in args.haystack:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--haystack {path}: no such file")
    haystack = read_haystack(args.haystack)
    info = read_checkpoint(args.checkpoint)
    tok = check_tokenizer(args.tokenizer_model, info)
    template = tok.chat_template_digest() if args.chat_template else None  # raises if it has none
    rope, _ = eval_rope(info.config, lengths, args.rope_scaling, args.rope_factor)
    # Paths are absolute (hf:DIR too): the same command from another folder resumes.
    settings = {"checkpoint": os.path.abspath(info.path), "iteration": info.iteration, "kind": args.kind,
                "seed": args.seed, "haystack": [os.path.abspath(p) for p in args.haystack],
                "tokenizer": canonical_spec(args.tokenizer_model), "rope_scaling": args.rope_scaling,
                "rope_factor": args.rope_factor}
    if template:
        settings["chat_template"] = template
    return Plan(args, info, sorted(set(lengths)), sorted(set(depths)), rope, cp, settings, haystack)


def make_cell(plan: Plan, sp, length: int, depth: float) -> dict:
    """The cell's prompt and answer tokens; the same on every run (seeded by the cell)."""
    return cell_prompt(plan.haystack, plan.args.kind, plan.args.seed, sp, length, depth, plan.args.chat_template)


def cell_prompt(haystack: str, kind: str, seed: int, sp, length: int, depth: float, chat: bool = False) -> dict:
    """One passkey/needle prompt of at most ``length - ANSWER_BUDGET`` tokens: {"sample",
    "prompt_ids", "answer_ids"}; seeded by (seed, kind, length, depth). ``prompt_ids +
    answer_ids`` is exactly the tokenization of the whole text (the suffix rule); ``chat``
    renders the prompt as a user turn with the tokenizer's chat template first."""
    rng = random.Random(f"{seed}:{kind}:{length}:{depth}")
    wrap = sp.chat_prompt if chat else (lambda text: text)
    sample = needle_sample(haystack, kind, length - ANSWER_BUDGET, depth, lambda text: len(sp.encode(wrap(text))),
                           rng)
    return prompt_and_answer(sp, sample, wrap)


def prompt_and_answer(sp, sample: dict, wrap=None) -> dict:
    """{"sample", "prompt_ids", "answer_ids"} for a {"prompt", "response"} sample, by the suffix
    rule (data_tools.segments.encode_pair); ``wrap`` renders the prompt text first."""
    prompt = wrap(sample["prompt"]) if wrap else sample["prompt"]
    prompt_ids, answer_ids = encode_pair(sp, prompt, sample["response"])
    return {"sample": sample, "prompt_ids": prompt_ids, "answer_ids": answer_ids}


def _from_rank0(fn):
    """fn() on rank 0, its result broadcast to every rank; an error there raises on all
    ranks instead of leaving them waiting in the next collective."""
    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn())]
        except (ValueError, FileNotFoundError) as e:
            box = [("error", str(e))]
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise ValueError(value)
    return value


def run(plan: Plan) -> int:
    """The sweep on every rank of an initialised world (CP = world)."""
    from data_tools.common import load_tokenizer

    from .model import load_model
    from .scoring import score_answer

    rank, out = dist.get_rank(), plan.args.out
    model, bf16 = load_model(plan.info, plan.cp, plan.args.cp_comm_type, plan.rope,
                             max(plan.lengths) + 2 * plan.cp)
    from megatron.core import parallel_state

    cp_group = parallel_state.get_context_parallel_group()
    todo = _from_rank0(lambda: [(n, d) for n in plan.lengths for d in plan.depths
                                if results.load_cell(out, n, d, plan.settings) is None])
    total = len(plan.lengths) * len(plan.depths)
    sp = load_tokenizer(plan.args.tokenizer_model) if rank == 0 else None
    if rank == 0:
        print(f"needle: {plan.args.kind}, {total} cells, {total - len(todo)} already finished in {out}; "
              f"CP={plan.cp} ({plan.args.cp_comm_type}), checkpoint {plan.info.path}", flush=True)
    for length, depth in todo:
        cell = _from_rank0(lambda: make_cell(plan, sp, length, depth))
        t0 = time.perf_counter()
        score = score_answer(model, cell["prompt_ids"], cell["answer_ids"], cp_group, bf16)
        if rank == 0:
            _record(plan, cell, score, length, depth, time.perf_counter() - t0)
    if rank == 0:
        _report(plan)
    dist.barrier()
    return 0


def _record(plan: Plan, cell: dict, score, length: int, depth: float, seconds: float) -> None:
    meta = cell["sample"]["meta"]
    results.write_cell(plan.args.out, {
        "kind": plan.args.kind, "length": length, "depth": depth, "context_tokens": len(cell["prompt_ids"]),
        "needle": meta["needle"], "answer": cell["sample"]["response"], "answer_tokens": cell["answer_ids"],
        "argmax_tokens": score.argmax_tokens, "score": int(score.greedy_match), "mean_logprob": score.mean_logprob,
        "first_mismatch": score.first_mismatch, "seconds": round(seconds, 3),
        "run": {"cp": plan.cp, "cp_comm_type": plan.args.cp_comm_type}, "settings": plan.settings})
    print(f"needle: length {length:>7} depth {depth:5.1f}% score {int(score.greedy_match)} "
          f"log-prob {score.mean_logprob:8.3f} ({seconds:.2f}s)", flush=True)


def _report(plan: Plan) -> None:
    out, cells = plan.args.out, results.load_cells(plan.args.out)
    accuracy = sum(c["score"] for c in cells) / len(cells)
    title = f"{plan.args.kind}: {plan.info.path} (iteration {plan.info.iteration}), accuracy {accuracy:.2f}"
    paths = [results.write_summary(out, cells), results.plot_heatmap(cells, os.path.join(out, "heatmap.png"), title)]
    if plan.args.kind == "passkey":
        paths += results.write_passkey_report(out, cells, title)
    print(f"needle: {len(cells)} cells, accuracy {accuracy:.2f}; "
          f"heatmap {paths[1]}; wrote {', '.join(paths[:1] + paths[2:])}", flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = make_plan(args)
    except (ValueError, FileNotFoundError, DataError) as e:
        return _fail(e)
    from ..distributed import init_distributed_from_env

    init_distributed_from_env()
    try:
        return run(plan)
    except ValueError as e:
        return _fail(e)
    finally:
        dist.destroy_process_group()


def _fail(error: Exception) -> int:
    """Every rank exits 2; only rank 0 says why (they all hit the same error)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"needle: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
