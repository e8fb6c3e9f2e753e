"""results.json (exact schema, read by other code), report.md, heatmaps and loss curves."""
from __future__ import annotations

import json
import os
from typing import Dict, List

from data_tools.common import atomic_write

from ...eval import results as eval_results
from .config import ExperimentConfig
from .evaluate import TASKS
from .stages import ALL_ARMS, ARMS, TEMPLATE_ARMS

RETRIEVAL = ("passkey", "needle")


def results_json(cfg: ExperimentConfig, evals: Dict[str, dict]) -> dict:
    """{"L0": 512, "L1": 4096, "arms": {arm: {task: {"length": accuracy}}}} over the main arms
    (the template diagnostic stays out of it)."""
    return {"L0": cfg.l0, "L1": cfg.l1,
            "arms": {arm: {task: dict(ev[task]) for task in TASKS} for arm, ev in evals.items() if arm in ARMS}}


FLOOR = 0.1
"""Mean passkey+needle accuracy at or below which an arm has shown no retrieval: comparing two
such arms says nothing about the recipes (a copier that never copies scores 0 everywhere)."""


def _mean(values: List[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _retrieval(res: dict, arm: str) -> float:
    """Mean passkey and needle accuracy over every length."""
    a = res["arms"].get(arm, {})
    return _mean([v for t in RETRIEVAL for v in a.get(t, {}).values()])


def cell_counts(evals: Dict[str, dict]) -> Dict[str, Dict[str, Dict[str, int]]]:
    """{arm: {task: {"length": number of cells}}}: how many cells each accuracy is the mean of."""
    out: Dict[str, Dict[str, Dict[str, int]]] = {}
    for arm, ev in evals.items():
        per = out.setdefault(arm, {task: {} for task in TASKS})
        for c in ev["cells"]:
            key = str(c["length"])
            per[c["task"]][key] = per[c["task"]].get(key, 0) + 1
    return out


def _n(counts: dict, arm: str, tasks=RETRIEVAL, length: str = "") -> int:
    """Cells behind an arm's figure (one length, or every length)."""
    per = counts.get(arm, {})
    return sum(n for t in tasks for k, n in per.get(t, {}).items() if not length or k == length)


def verdict(res: dict, counts: dict) -> List[str]:
    """Plain statements of what held and what did not, from the numbers alone, each figure with
    the number of cells behind it (``counts``: :func:`cell_counts`). Inconclusive when no arm
    clears the floor (mean passkey+needle accuracy > FLOOR)."""
    arms = res["arms"]
    lengths = {n for a in arms.values() for n in a["passkey"]}
    l1 = str(res["L1"]) if str(res["L1"]) in lengths else max(lengths, key=int)  # toy runs stop short of L1
    pk = {arm: a["passkey"][l1] for arm, a in arms.items()}
    fig = lambda arm: f"{arm} {_retrieval(res, arm):.2f} ({_n(counts, arm)} cells)"  # noqa: E731
    cleared = [arm for arm in arms if _retrieval(res, arm) > FLOOR]
    out = []
    if not cleared:
        best = max(arms, key=lambda a: _retrieval(res, a))
        out.append(f"Inconclusive: no arm clears the floor (mean passkey+needle accuracy > {FLOOR:.2f}); best "
                   f"{fig(best)}. The comparisons below cannot tell the recipes apart.")
    if {"full", "base", "no-long-sft"} <= set(pk):
        hit = pk["full"] >= 0.9 and pk["base"] <= 0.3 and pk["no-long-sft"] <= 0.3
        out.append(f"The target (full >= 0.9 passkey at {l1} tokens; base and no-long-sft <= 0.3) "
                   f"{'held' if hit else 'did not hold'}: " + ", ".join(
                       f"{a} {pk[a]:.2f} ({_n(counts, a, ('passkey',), l1)} cells)"
                       for a in ("full", "base", "no-long-sft")) + ".")
    pairs = [("no-long-sft", "the 200-iteration long SFT"), ("no-synl", "SynL in the long SFT"),
             ("no-cip", "CIP (against plain concatenation) in continual pretraining"),
             ("cpt-only", "SFT and long SFT after continual pretraining")]
    for arm, what in pairs:
        if arm in arms and "full" in arms:
            d = _retrieval(res, "full") - _retrieval(res, arm)
            word = ("is inconclusive for retrieval (both arms at the floor)" if not {"full", arm} & set(cleared) else
                    "helped retrieval" if d > 0.05 else "hurt retrieval" if d < -0.05 else
                    "made no clear difference to retrieval")
            out.append(f"{what[0].upper() + what[1:]} {word}: mean passkey+needle accuracy over all lengths, "
                       f"{fig('full')} vs {fig(arm)}.")
    if "no-synl" in arms and "full" in arms:
        d = _retrieval(res, "full") - _retrieval(res, "no-synl")
        if not {"full", "no-synl"} & set(cleared):
            out.append("On synthetic long SFT data this run is inconclusive: neither full nor no-synl clears the "
                       "floor, so it can agree with neither the paper nor ProLong.")
        else:
            side = "the paper (synthetic long data helps)" if d > 0.05 else "ProLong (synthetic data did not help)"
            out.append(f"On synthetic long SFT data this run agrees with {side}.")
    return out


def _losses(stages: List[str], out: str) -> str:
    plt = eval_results._pyplot()
    fig, axes = plt.subplots(1, len(stages), figsize=(3.2 * len(stages), 2.8), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        recs = [json.loads(x) for x in open(f"{out}/stages/{stage}/metrics.jsonl") if '"loss"' in x]
        ax.plot([r["iteration"] for r in recs], [r["loss"] for r in recs])
        ax.set_title(stage, fontsize=9)
        ax.set_xlabel("iteration")
    axes[0][0].set_ylabel("lm loss")
    fig.tight_layout()
    return eval_results._save_figure(fig, f"{out}/losses.png")


def _heatmaps(evals: Dict[str, dict], out: str) -> Dict[str, List[str]]:
    paths = {}
    os.makedirs(f"{out}/heatmaps", exist_ok=True)
    for arm, ev in evals.items():
        paths[arm] = []
        for task in RETRIEVAL:
            cells = [c for c in ev["cells"] if c["task"] == task]
            acc = _mean([c["score"] for c in cells])
            path = f"{out}/heatmaps/{arm}_{task}.png"
            eval_results.plot_heatmap(cells, path, f"{arm}: {task}, accuracy {acc:.2f}")
            paths[arm].append(os.path.relpath(path, out))
    return paths


def _table(evals: Dict[str, dict], lengths: List[int]) -> List[str]:
    """Accuracy per arm, task and length, with the number of cells behind it."""
    counts = cell_counts(evals)
    lines = ["| arm | stage | task | " + " | ".join(f"{n} (cells)" for n in lengths) + " |",
             "|" + "---|" * (3 + len(lengths))]
    for arm, ev in evals.items():
        for task in TASKS:
            cells = [f"{ev[task][str(n)]:.2f} ({counts[arm][task].get(str(n), 0)})" if str(n) in ev[task] else "n/a"
                     for n in lengths]
            lines.append(f"| {arm} | {ALL_ARMS[arm]} | {task} | " + " | ".join(cells) + " |")
    return lines


def _logprob_table(evals: Dict[str, dict], lengths: List[int]) -> List[str]:
    """Mean log-prob of the whole answer (per token), where exact match is too coarse to see a trend."""
    lines = ["| arm | task | " + " | ".join(str(n) for n in lengths) + " |", "|" + "---|" * (2 + len(lengths))]
    for arm, ev in evals.items():
        for task in TASKS:
            row = [_mean([c["mean_logprob"] for c in ev["cells"] if c["task"] == task and c["length"] == n])
                   for n in lengths]
            lines.append(f"| {arm} | {task} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    return lines


def write(cfg: ExperimentConfig, out: str, stage_recs: List[dict], evals: Dict[str, dict], seconds: float,
          setup: List[str]) -> dict:
    """Writes OUT/results.json, OUT/report.md, OUT/losses.png, OUT/heatmaps/; returns results.json's dict."""
    res = results_json(cfg, evals)
    atomic_write(f"{out}/results.json", (json.dumps(res, indent=1) + "\n").encode())
    losses = _losses([r["stage"] for r in stage_recs], out)
    maps = _heatmaps(evals, out)
    lines = ["# Mini-LongSkywork", "", f"L0 = {cfg.l0}, L1 = {cfg.l1}; total time {seconds / 60:.1f} min "
             f"(this run's wall clock, 2 CPU cores).", "", "## Setup", ""] + [f"- {s}" for s in setup]
    lines += ["", "## Accuracy (greedy exact match of the whole answer, teacher-forced)", ""]
    main = {a: e for a, e in evals.items() if a in ARMS}
    diag = {a: e for a, e in evals.items() if a in TEMPLATE_ARMS}
    lines += _table(main, cfg.eval_lengths)
    lines += ["", "Mean log-prob per answer token (higher is better; exact match needs every token):", ""]
    lines += _logprob_table(main, cfg.eval_lengths)
    lines += ["", "## What held and what did not", ""] + [f"- {s}" for s in verdict(res, cell_counts(main))]
    if diag:
        lines += ["", "## Diagnostic arm: TRAINS ON THE EVALUATION'S TEMPLATE", "",
                  "Long SFT from the same SFT weights on the full arm's data plus passkey and needle samples made "
                  "with the evaluation's templates (other keys and depths; needle haystack from the training "
                  "documents). It is not a result of the recipe: it shows what this model can reach when retrieval "
                  "is trained directly.", ""] + _table(diag, cfg.eval_lengths) + [""] + \
            _logprob_table(diag, cfg.eval_lengths)
    lines += ["", "## Stages", "", "| stage | iterations | first loss | final loss | tokens/s/rank (median) | "
              "seconds |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['iterations']} | {r['first_loss']:.3f} | {r['final_loss']:.3f} | "
              f"{r['tokens_per_s_per_rank']:.0f} | {r['seconds']:.0f} |" for r in stage_recs]
    lines += ["", "Evaluation seconds per arm: " + ", ".join(f"{a} {e['seconds']:.0f}" for a, e in evals.items()),
              "", f"![losses]({os.path.relpath(losses, out)})", ""]
    for arm, paths in maps.items():
        lines += [f"![{arm} {os.path.basename(p)}]({p})" for p in paths]
    lines += ["", "## Sizes", "", "```json", json.dumps(cfg.sizes(), indent=1), "```", ""]
    atomic_write(f"{out}/report.md", "\n".join(lines).encode())
    return res
