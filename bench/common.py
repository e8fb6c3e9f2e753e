"""Helpers shared by the benchmarks: timing, peak memory, table and JSON output."""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def synced_time(fn: Callable[[], object], reps: int, barrier: Callable[[], None] = lambda: None) -> float:
    """Minimum wall seconds of ``fn`` over ``reps`` runs after one warm-up, each run
    started together on every rank (``barrier``). The minimum, because this
    machine is shared: other work only ever adds time."""
    fn()
    times = []
    for _ in range(reps):
        barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cuda_time(fn: Callable[[], object], reps: int = 10, warmup: int = 3) -> float:
    """Median seconds of ``fn`` on the current CUDA stream, timed by CUDA events after
    ``warmup`` untimed runs (the first calls pick kernels and fill caches)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def print_table(title: str, headers: Sequence[str], rows: List[Sequence[object]]) -> None:
    cells = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def write_json(name: str, data: Dict, merge: bool = False, results_dir: str = RESULTS_DIR) -> str:
    """Write ``data`` with machine info to bench/results/NAME.json (atomically).

    With ``merge``, top-level keys of an existing file that ``data`` does not
    set are kept, so a run of some sections leaves the others' figures in place.
    ``results_dir``: another folder than bench/results (tests).
    """
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{name}.json")
    old = {}
    if merge and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    payload = {**old, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                  "torch": torch.__version__}, **data}
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


@dataclass(frozen=True)
class BenchLayout:
    """One measured parallel layout: a row of a bench's table (benches add their own knobs)."""

    name: str
    """Row label."""
    tp: int = 1
    """Tensor parallel."""
    pp: int = 1
    """Pipeline stages."""
    cp: int = 1
    """Context parallel."""
    dp: int = 1
    """Data parallel."""

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp
