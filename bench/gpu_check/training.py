"""Sections 3 and 6: the trainer (``python -m megatron_ext.train`` under torchrun, one
process: NCCL on a GPU, gloo on CPU) on a corpus made here (no network).

3. A small GPT, bf16 on CUDA (fp32 on CPU), the distributed optimizer: 20 iterations
   saving at 10 and 20; then step-20 is removed, the log cut at 10 and the run resumed.
   The first resumed iteration's loss must be bitwise equal (a forward from restored
   weights). Iterations 11-20 must be bitwise equal on CPU; on CUDA torch's flash
   backward accumulates dq with atomics (not bitwise reproducible), so up to 1e-2 there.
6. A ~1.03B model (20 layers, hidden 2048, SwiGLU 5632, GQA 16/4, vocab 32000) at 16K
   tokens: the median of the trainer's own tflops_per_rank (the planner's one FLOP
   formula, ``megatron_ext.plan.model.flops_per_token``) over iterations 3-8, divided by
   the card's bf16 peak (``megatron_ext.plan.time.GPUS``). Floor 0.20: it catches a slow
   fallback (dense attention, fp32 matmuls); it is not a target.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Dict, List

from .rows import Row, at_least, at_most, failed_rows, guarded, reference, skipped
from .wheels import REPO

SECTION_TRAIN = "3 trainer resume"
SECTION_MFU = "6 trainer MFU"
CONFIG = os.path.join(REPO, "launch", "configs", "tiny_cpu_pretrain.yaml")
SMALL = ["model.num_layers=2", "model.hidden_size=128", "model.ffn_hidden_size=512", "model.num_attention_heads=4",
         "model.num_query_groups=2", "data.seq_length=256", "optim.micro_batch_size=1", "optim.global_batch_size=2",
         "optim.warmup_iters=2", "optim.train_iters=20", "checkpoint.save_interval=10", "checkpoint.keep_last=2"]
ONE_B = ["model.num_layers=20", "model.hidden_size=2048", "model.ffn_hidden_size=5632", "model.num_attention_heads=16",
         "model.num_query_groups=4", "model.swiglu=true", "model.normalization=RMSNorm", "model.add_bias_linear=false",
         "model.untie_embeddings=true", "model.vocab_size=32000", "data.seq_length=16384", "optim.micro_batch_size=1",
         "optim.global_batch_size=1", "optim.warmup_iters=2", "optim.train_iters=8", "checkpoint.save_interval=1000"]
COMMON = ["parallel.context_parallel_size=1", "parallel.use_distributed_optimizer=true", "logging.wandb=false",
          "logging.log_interval=1", "logging.eval_iters=0"]
CUDA_RESUME_TOL = 1e-2
SAVE_1B_BYTES = 15 * 2**30  # bf16 weights + fp32 main params + Adam moments of 1.03B parameters
MFU_FLOOR = 0.20


def prepare_data(work: str) -> Dict[str, str]:
    """A JSONL corpus of texts on this machine (``megatron_ext.demo.corpus``), a 1000-piece
    sentencepiece tokenizer and Megatron indexed binaries: {"tok": .model, "prefix": ...}."""
    from data_tools.tokenizer import train as train_tokenizer
    from megatron_ext.demo import corpus

    os.makedirs(work, exist_ok=True)
    docs = os.path.join(work, "docs.jsonl")
    corpus(docs, max_docs=80, max_chars=8000)
    tok = train_tokenizer([docs], 1000, os.path.join(work, "tok"))
    prefix = os.path.join(work, "docs")
    res = subprocess.run([sys.executable, "-m", "data_tools.preprocess", "--input", docs, "--output-prefix", prefix,
                          "--tokenizer-model", tok, "--append-eod"], capture_output=True, text=True, cwd=REPO)
    if res.returncode:
        raise RuntimeError(f"data_tools.preprocess failed: {res.stderr[-500:]}")
    return {"tok": tok, "prefix": prefix}


def train(data: Dict[str, str], save_dir: str, sets: List[str], precision: str, timeout: float):
    """One ``torchrun --nproc-per-node 1 -m megatron_ext.train`` run; the CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "localhost:0", "-m", "megatron_ext.train", "--config", CONFIG]
    for s in COMMON + sets + [f"precision={precision}", f"data.blend=[1.0, {data['prefix']}]",
                              f"data.tokenizer_model={data['tok']}", f"checkpoint.save_dir={save_dir}"]:
        cmd += ["--set", s]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p]), WANDB_MODE="disabled")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # torchrun's agent passes it on to its worker and reaps it
        try:
            proc.communicate(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the agent's own process group (this call made it)
            proc.communicate()
        raise RuntimeError(f"the training run took over {timeout:.0f} s and was stopped") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def read_metrics(save_dir: str) -> List[dict]:
    """The training iterations' records of ``save_dir/metrics.jsonl`` (validation records left out)."""
    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        return [r for r in (json.loads(line) for line in f if line.strip()) if "loss" in r]


def _ran(res, what: str) -> None:
    if res.returncode:
        tail = " | ".join(line for line in (res.stderr or res.stdout).splitlines()[-6:])
        raise RuntimeError(f"{what} exited {res.returncode}: {tail[-400:]}")


def resume_rows(ctx) -> List[Row]:
    """Section 3; leaves the resumed checkpoint folder in ``ctx.state["checkpoint"]`` for section 4."""
    precision = "bf16" if ctx.cuda else "fp32"
    what = f"{'NCCL' if ctx.cuda else 'gloo'} {precision} dist-opt"
    names = [f"20 iterations ({what})", "resume at 10: iteration 11 loss", "resume at 10: iterations 11-20"]
    save = os.path.join(ctx.work, "resume")
    try:
        data = ctx.state.get("data") or ctx.state.setdefault("data", prepare_data(os.path.join(ctx.work, "data")))
        shutil.rmtree(save, ignore_errors=True)
        _ran(train(data, save, SMALL, precision, ctx.timeout(300)), "the 20-iteration run")
        full = read_metrics(save)
        shutil.rmtree(os.path.join(save, "step-20"))
        with open(os.path.join(save, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in full[:10])
        res = train(data, save, SMALL, precision, ctx.timeout(300))
        _ran(res, "the resumed run")
        resumed = read_metrics(save)[10:]
    except Exception as err:  # noqa: BLE001 - every row of the section reports the crash
        return failed_rows(SECTION_TRAIN, names, err)
    ctx.state["checkpoint"] = save
    return resume_verdicts(names, full, resumed, "resumed from" in res.stdout, ctx.cuda)


def resume_verdicts(names: List[str], full: List[dict], resumed: List[dict], said_resumed: bool,
                    cuda: bool) -> List[Row]:
    """Section 3's rows from the metrics records of the uninterrupted run (``full``, 20)
    and of the resumed one (``resumed``, iterations 11-20)."""
    losses = [r["loss"] for r in full]
    if len(losses) != 20 or any(x != x for x in losses):
        return [Row(SECTION_TRAIN, n, "FAIL", f"{len(losses)} iteration records, not 20 finite losses")
                for n in names]
    rows = [at_most(SECTION_TRAIN, names[0], losses[-1] / losses[0], 0.99,
                    f"20 losses {losses[0]:.3f} -> {losses[-1]:.3f} (must fall)", tighten=True)]
    if [r["iteration"] for r in resumed] != list(range(11, 21)) or not said_resumed:
        why = f"did not resume at 10: resumed run logged iterations {[r['iteration'] for r in resumed]}"
        return rows + [Row(SECTION_TRAIN, n, "FAIL", why) for n in names[1:]]
    want, got = reference(losses[10:]), [r["loss"] for r in resumed]
    rows.append(at_most(SECTION_TRAIN, names[1], abs(got[0] - want[0]), 0.0, "bitwise, vs the uninterrupted run"))
    why = " (FA2 bwd atomics)" if cuda else ", bitwise"
    rows.append(at_most(SECTION_TRAIN, names[2], max(abs(a - b) for a, b in zip(got, want)),
                        CUDA_RESUME_TOL if cuda else 0.0, "max |loss diff| vs the uninterrupted run" + why))
    return rows


def _scratch_for(nbytes: int, fallback: str) -> str:
    """/dev/shm when it is writable and holds ``nbytes`` (the 1B run's final save goes to
    memory, not disk), else ``fallback``."""
    try:
        if os.access("/dev/shm", os.W_OK) and shutil.disk_usage("/dev/shm").free > 1.5 * nbytes:
            return "/dev/shm"
    except OSError:
        pass
    os.makedirs(fallback, exist_ok=True)
    return fallback


def peak_tflops(device_name: str):
    """The card's dense bf16 peak from the planner's table, or None when it is not listed."""
    from megatron_ext.plan.time import GPUS

    for key, hw in GPUS.items():
        if key in device_name.upper():
            return hw.peak_tflops_bf16
    return None


def mfu_rows(ctx) -> List[Row]:
    """Section 6: MFU of the ~1B model at 16K tokens per iteration (one sequence)."""
    check = "~1.03B model, 16K tokens, bf16, no recompute"
    if not ctx.cuda:
        return [skipped(SECTION_MFU, check, "no CUDA device: a 1B model at 16K tokens needs a GPU")]
    return [guarded(SECTION_MFU, check, lambda: _mfu_row(ctx, check))]


def _mfu_row(ctx, check: str) -> Row:
    import torch

    peak = peak_tflops(torch.cuda.get_device_name())
    if peak is None:
        return skipped(SECTION_MFU, check, f"no bf16 peak listed for {torch.cuda.get_device_name()}")
    data = ctx.state.get("data") or ctx.state.setdefault("data", prepare_data(os.path.join(ctx.work, "data")))
    save = tempfile.mkdtemp(prefix="gpu_check_mfu_", dir=_scratch_for(SAVE_1B_BYTES, ctx.work))
    try:
        _ran(train(data, save, ONE_B, "bf16", ctx.timeout(360)), "the 1B run")
        recs = read_metrics(save)[2:]
    finally:
        shutil.rmtree(save, ignore_errors=True)
    return mfu_row(check, recs, peak)


def mfu_row(check: str, records: List[dict], peak: float) -> Row:
    """Section 6's row from the 1B run's metrics records (warm-up iterations dropped):
    the median tflops_per_rank over the card's bf16 ``peak`` (TFLOP/s)."""
    if not records:
        return Row(SECTION_MFU, check, "FAIL", "the run logged no iterations after the warm-up")
    median = lambda key: sorted(r[key] for r in records)[len(records) // 2]  # noqa: E731
    tflops, ms = median("tflops_per_rank"), median("ms_per_iter")
    peak_mem = max(r["peak_mem_mib"] for r in records) / 1024
    return at_least(SECTION_MFU, check, tflops / reference(peak), MFU_FLOOR,
                    f"{tflops:.0f} TFLOP/s of {peak:.0f} peak, {ms:.0f} ms/iter, peak {peak_mem:.1f} GiB")
