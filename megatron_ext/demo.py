"""``make demo``: the whole LongSkywork pipeline, small, on this machine's CPUs.

1. CP attention exactness on 4 gloo ranks (float64 reference).
2. A real corpus (Debian changelogs from /usr/share/doc; where an image has fewer than
   50, Python's own standard-library docs and docstrings) -> sentencepiece tokenizer.
3. CIP pretraining samples and SynL SFT samples -> Megatron indexed binaries.
4. The three stages (pretrain with RoPE ABF, sft, long_sft) with CP=2 ring
   attention x DP=2 on 4 gloo processes, each stage starting from the last.
5. Tokens/s per rank at CP=1 vs CP=2, same sequence length.
6. A passkey sweep of the long_sft model, CP=2 ring prefill on 2 gloo processes:
   runs/demo/eval_passkey/heatmap.png and passkey_accuracy.md.
7. A report: runs/demo/report.md and loss curves in runs/demo/losses.png.
"""
from __future__ import annotations

import argparse
import ast
import glob
import gzip
import json
import os
import subprocess
import sys
import sysconfig
import time

from data_tools.common import atomic_write

from .cli import add_output_flags, quiet_cli

ROOT = "runs/demo"
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "configs")


def sh(*args, quiet=False) -> str:
    """Run a tool; show its summary line; stop the demo with its stderr on failure."""
    res = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    if res.returncode:
        sys.stderr.write(res.stdout[-3000:] + res.stderr[-5000:])
        raise SystemExit(f"demo: step failed: {' '.join(args[:2])}")
    if not quiet:
        lines = [line for line in res.stdout.splitlines() if line.strip()]
        print("   " + (lines[-1] if lines else ""))
    return res.stdout


CHANGELOGS = "/usr/share/doc/*/changelog*.gz"


def python_docs(min_chars: int = 2000):
    """Texts always present with Python: each stdlib module's docstrings joined (the
    modules with at least ``min_chars``), then the reference topics of ``pydoc_data``."""
    import pydoc_data.topics

    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "site-packages", "dist-packages", "idlelib", "lib2to3", "tkinter"}
    files = sorted(glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "*", "*.py")))
    for f in files:
        if os.path.basename(os.path.dirname(f)) in skip:
            continue
        try:
            tree = ast.parse(open(f, encoding="utf-8", errors="replace").read())
        except (SyntaxError, ValueError):
            continue
        nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        text = "\n\n".join(d for d in (ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, nodes)) if d)
        if len(text) >= min_chars:
            yield text
    yield from (pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def corpus(path: str, max_docs: int = 400, max_chars: int = 30_000) -> str:
    """Write the demo corpus (JSONL) to ``path``; returns what it holds, e.g. '400 Debian changelogs'."""
    files = sorted(glob.glob(CHANGELOGS))
    if len(files) >= 50:
        texts, what = (gzip.open(f, "rt", errors="replace").read() for f in files[:max_docs]), "Debian changelogs"
    else:
        print(f"demo: {len(files)} changelogs under /usr/share/doc (fewer than 50, e.g. a slim image); "
              f"using Python's standard-library docstrings and reference docs as the corpus")
        texts, what = python_docs(), "Python stdlib docs"
    n = 0
    with open(path + ".tmp", "w") as out:
        for text in texts:
            out.write(json.dumps({"text": text[:max_chars]}) + "\n")
            n += 1
            if n == max_docs:
                break
    os.replace(path + ".tmp", path)
    return f"{n} {what}"


def torchrun(config: str, nproc: int, sets) -> str:
    cmd = ["torch.distributed.run", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint",
           "localhost:0", "-m", "megatron_ext.train", "--config", os.path.join(CONFIGS, config)]
    for s in sets:
        cmd += ["--set", s]
    out = sh(*cmd, quiet=True)
    iters = [line.strip() for line in out.splitlines() if "iteration" in line and "lm loss" in line]
    packing = [line.strip() for line in out.splitlines() if "packing=sft:" in line]  # the fill rate
    print("\n".join("   " + line[:200] for line in packing[:1] + (iters[-1:] or ["(no iteration line)"])))
    return out


def data(tok: str) -> None:
    d = f"{ROOT}/data"
    sh("data_tools.synth", "cip", "--input", f"{ROOT}/docs.jsonl", "--output", f"{d}/cip.jsonl", "--target-tokens",
       "2048", "--tokenizer-model", tok, "--seed", "0", "--num-samples", "48")
    # examples sized below seq_length (1024 sft, 2048 long_sft; SynL lands within ~3% of its
    # target) so that packing (data.packing: sft) places every one whole
    for name, tokens, n in (("synl_short", 900, 48), ("synl_long", 1800, 24)):
        sh("data_tools.synth", "synl", "--output", f"{d}/{name}.jsonl", "--num-samples", str(n), "--target-tokens",
           str(tokens), "--tokenizer-model", tok, "--seed", "1")
    sh("data_tools.preprocess", "--input", f"{d}/cip.jsonl", "--output-prefix", f"{d}/cip", "--tokenizer-model", tok,
       "--append-eod")
    for name in ("synl_short", "synl_long"):
        sh("data_tools.preprocess", "--input", f"{d}/{name}.jsonl", "--output-prefix", f"{d}/{name}",
           "--tokenizer-model", tok, "--sft")


def throughput(tok_sets) -> dict:
    """tokens/s per rank of 6 pretrain iterations at CP=1 and CP=2 (4 ranks, 2048 tokens)."""
    out = {}
    for cp in (1, 2):
        save = f"{ROOT}/throughput_cp{cp}"
        torchrun("tiny_cpu_pretrain.yaml", 4, tok_sets + [f"parallel.context_parallel_size={cp}", "optim.train_iters=6",
                                                         f"checkpoint.save_dir={save}", "checkpoint.save_interval=100",
                                                         "logging.log_interval=1"])
        recs = [json.loads(line) for line in open(f"{save}/metrics.jsonl")][2:]  # skip warm-up iterations
        out[cp] = sum(r["tokens_per_s_per_rank"] for r in recs) / len(recs)
    return out


def passkey_eval(tok: str) -> str:
    """Passkey sweep of the long_sft checkpoint (2048-token RoPE range) at CP=2."""
    out = f"{ROOT}/eval_passkey"
    sh("torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
       "-m", "megatron_ext.eval.needle", "--checkpoint", f"{ROOT}/long_sft", "--tokenizer-model", tok,
       "--lengths", "256,512,1k,2k", "--depths", "0:100:25", "--kind", "passkey", "--out", out)
    return out


def report(stages, speed, seconds, eval_dir) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5))
    lines = ["# megatron-ext demo", "", "| stage | iterations | first loss | final loss |", "|---|---|---|---|"]
    for ax, stage in zip(axes, stages):
        recs = [json.loads(line) for line in open(f"{ROOT}/{stage}/metrics.jsonl")]
        ax.plot([r["iteration"] for r in recs], [r["loss"] for r in recs])
        ax.set_title(stage)
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        lines.append(f"| {stage} | {recs[-1]['iteration']} | {recs[0]['loss']:.4f} | {recs[-1]['loss']:.4f} |")
    fig.tight_layout()
    fig.savefig(f"{ROOT}/losses.png", dpi=100)
    lines += ["", f"tokens/s per rank, 4 ranks, 2048-token sequences: CP=1 {speed[1]:.0f}, CP=2 {speed[2]:.0f} "
              f"(ratio {speed[2] / speed[1]:.2f})", ""]
    passkey = open(f"{eval_dir}/passkey_accuracy.md").read().splitlines()[2:]
    caption = f"passkey, long_sft checkpoint, CP=2 ring prefill, greedy exact match (heatmap {eval_dir}/heatmap.png):"
    lines += [caption, ""] + passkey
    lines += ["", f"total time {seconds / 60:.1f} min", "", "![losses](losses.png)",
              f"![passkey]({os.path.relpath(eval_dir, ROOT)}/heatmap.png)"]
    atomic_write(f"{ROOT}/report.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines[2:4 + len(stages)] + [lines[5 + len(stages)], caption] + passkey))


def main(argv=None) -> int:
    quiet_cli(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-exactness", action="store_true", help="skip step 1")
    add_output_flags(ap)
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    os.makedirs(f"{ROOT}/data", exist_ok=True)
    for stage in ("pretrain", "sft", "long_sft", "throughput_cp1", "throughput_cp2", "eval_passkey"):
        subprocess.run(["rm", "-rf", f"{ROOT}/{stage}"], check=True)  # a demo always starts fresh
    if not args.skip_exactness:
        print("1. CP attention exactness (4 gloo ranks, float64 reference)")
        subprocess.run([sys.executable, "-m", "megatron_ext.attention.demo", "--seq-len", "1024"], check=True)
    print("2. corpus and tokenizer")
    print(f"   {corpus(f'{ROOT}/docs.jsonl')} -> {ROOT}/docs.jsonl")
    sh("data_tools.tokenizer", "train", "--input", f"{ROOT}/docs.jsonl", "--vocab-size", "4000", "--output-prefix", f"{ROOT}/tok")
    print("3. CIP and SynL data -> indexed binaries")
    tok = f"{ROOT}/tok.model"
    data(tok)
    tok_sets = [f"data.tokenizer_model={tok}", "logging.log_interval=10"]
    stages = ("pretrain", "sft", "long_sft")
    print("4. three stages, CP=2 (ring) x DP=2 on 4 gloo processes")
    for stage in stages:
        torchrun(f"tiny_cpu_{stage}.yaml", 4, tok_sets)
    print("5. tokens/s per rank, CP=1 vs CP=2")
    speed = throughput(tok_sets + [f"data.blend=[1.0, {ROOT}/data/cip]", "logging.wandb=false"])
    print("6. passkey eval of long_sft, CP=2 ring prefill")
    eval_dir = passkey_eval(tok)
    print("7. report")
    report(stages, speed, time.monotonic() - t0, eval_dir)
    print(f"demo: done in {(time.monotonic() - t0) / 60:.1f} min; report {ROOT}/report.md, loss curves {ROOT}/losses.png, "
          f"checkpoints {ROOT}/{{pretrain,sft,long_sft}}, wandb (offline) under each stage's folder, "
          f"passkey heatmap {eval_dir}/heatmap.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
