"""Evaluation results on disk: one JSON per (length, depth) cell, so an interrupted
sweep resumes by skipping finished cells; summary.csv; a NIAH-style heatmap;
for passkey, accuracy by length as a Markdown table and a plot. Every file is
written to a temp name and renamed."""
from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Dict, List, Optional

from data_tools.common import atomic_write

CELL_DIR = "cells"
SUMMARY_FIELDS = ("kind", "length", "depth", "context_tokens", "score", "mean_logprob", "first_mismatch", "seconds")
FIGURE_INCHES, FIGURE_DPI = (10.0, 6.0), 100  # every figure is 1000 x 600 px


def cell_path(out_dir: str, length: int, depth: float) -> str:
    return os.path.join(out_dir, CELL_DIR, f"len{length:07d}_depth{depth:06.2f}.json")


def load_cell(out_dir: str, length: int, depth: float, settings: dict) -> Optional[dict]:
    """The finished cell, or None. A cell computed under other settings raises, so
    one results folder never mixes checkpoints, tasks or seeds."""
    path = cell_path(out_dir, length, depth)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        try:
            cell = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a result file ({e}); remove it to recompute the cell") from e
    if cell.get("settings") != settings:
        theirs = cell.get("settings", {})
        diff = {k: (theirs.get(k), settings.get(k)) for k in sorted(set(theirs) | set(settings))
                if theirs.get(k) != settings.get(k)}
        raise ValueError(f"{path} was computed with other settings (stored, now): {diff}; "
                         "use another --out, or the same flags to resume")
    return cell


def write_cell(out_dir: str, cell: dict) -> str:
    path = cell_path(out_dir, cell["length"], cell["depth"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, (json.dumps(cell, indent=1) + "\n").encode())
    return path


def load_cells(out_dir: str) -> List[dict]:
    folder = os.path.join(out_dir, CELL_DIR)
    cells = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                cells.append(json.load(f))
    return sorted(cells, key=lambda c: (c["length"], c["depth"]))


def write_summary(out_dir: str, cells: List[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, SUMMARY_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(cells)
    path = os.path.join(out_dir, "summary.csv")
    atomic_write(path, buf.getvalue().encode())
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIGURE_DPI)
    atomic_write(path, buf.getvalue())
    return path


def _length_label(n: int) -> str:
    return f"{n / 1000:g}k" if n >= 1000 else str(n)


def plot_heatmap(cells: List[dict], path: str, title: str) -> str:
    """Score by depth (y, 0 % at the top) and context length (x); each cell shows its
    answer's mean log-prob. Missing cells stay blank."""
    plt = _pyplot()
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    grid = [[math.nan] * len(lengths) for _ in depths]
    fig, ax = plt.subplots(figsize=FIGURE_INCHES)
    for c in cells:
        row, col = depths.index(c["depth"]), lengths.index(c["length"])
        grid[row][col] = c["score"]
        ax.text(col, row, f"{c['mean_logprob']:.1f}", ha="center", va="center", fontsize=9)
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="greedy exact match (cell text: mean answer log-prob)")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def accuracy_by_length(cells: List[dict]) -> List[Dict[str, float]]:
    rows = []
    for n in sorted({c["length"] for c in cells}):
        mine = [c for c in cells if c["length"] == n]
        rows.append({"length": n, "cells": len(mine), "accuracy": sum(c["score"] for c in mine) / len(mine),
                     "mean_logprob": sum(c["mean_logprob"] for c in mine) / len(mine)})
    return rows


def write_passkey_report(out_dir: str, cells: List[dict], title: str) -> List[str]:
    """passkey_accuracy.md (a table) and passkey_accuracy.png (accuracy against length)."""
    plt = _pyplot()
    rows = accuracy_by_length(cells)
    lines = [f"# {title}", "", "| length | cells | accuracy | mean answer log-prob |", "|---|---|---|---|"]
    lines += [f"| {r['length']} | {r['cells']} | {r['accuracy']:.2f} | {r['mean_logprob']:.3f} |" for r in rows]
    table = os.path.join(out_dir, "passkey_accuracy.md")
    atomic_write(table, ("\n".join(lines) + "\n").encode())
    fig, ax = plt.subplots(figsize=FIGURE_INCHES)
    ax.plot([r["length"] for r in rows], [r["accuracy"] for r in rows], marker="o")
    ax.set_xscale("log")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey accuracy (greedy exact match)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    plot = _save_figure(fig, os.path.join(out_dir, "passkey_accuracy.png"))
    plt.close(fig)
    return [table, plot]
