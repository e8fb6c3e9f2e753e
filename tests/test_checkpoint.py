"""Checkpoints under faults, on gloo (CPU): the default dp_reshardable format resharded
offline for another layout, per-rank RNG states, kill -9 during a save, missing and
truncated shards, a full disk, and SIGTERM in the middle of an iteration with async save.

Losses at the same layout are compared bitwise; across layouts within 1e-4 relative
(another reduction order, as tests/test_train_core.py)."""
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from megatron_ext.distributed import spawn_ranks
from megatron_ext.train.checkpoint import BrokenCheckpointError, complete_steps, verify
from tests.test_train import losses, train, train_cmd, train_spawned
from tests.test_train_core import _cfg

# CP=2 on 2 ranks (tiny_cpu_pretrain.yaml), 4 micro-batches per iteration, async save on (the default)
RUN = ["optim.train_iters=6", "checkpoint.save_interval=2", "checkpoint.keep_last=3"]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted 6-iteration run with complete step-2, -4 and -6."""
    save = str(tmp_path_factory.mktemp("ckpt_ref") / "run")
    res = train(data, save, nproc=2, extra=RUN)
    assert res.returncode == 0, res.stderr[-3000:]
    assert complete_steps(save) == [2, 4, 6]
    return save


def _workers(proc):
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                           text=True).stdout.split()]


def test_kill9_during_save_resumes_from_the_previous_complete_step(data, reference, tmp_path):
    save = str(tmp_path / "run")
    proc = subprocess.Popen(train_cmd(data, save, nproc=2, extra=RUN), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    partial = os.path.join(save, "step-4.partial")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not os.path.isdir(partial):
        time.sleep(0.01)
    assert os.path.isdir(partial), "step-4 never started saving"
    os.kill(_workers(proc)[-1], signal.SIGKILL)  # one rank, in the middle of writing step-4
    assert proc.wait(timeout=120) != 0
    assert complete_steps(save) == [2], os.listdir(save)  # step-4 never became complete
    res = train(data, save, nproc=2, extra=RUN)
    assert res.returncode == 0 and "resumed from" in res.stdout and "step-2 at iteration 2" in res.stdout, \
        res.stderr[-3000:]
    assert not os.path.exists(partial) and complete_steps(save) == [2, 4, 6]
    ran = [r["loss"] for r in losses(save)]
    want = [r["loss"] for r in losses(reference)]
    assert ran[-4:] == want[2:], (ran, want)  # bitwise, iterations 3..6


def test_missing_or_truncated_shard_is_named_and_skip_broken_falls_back(data, reference, tmp_path):
    save = str(tmp_path / "run")
    shutil.copytree(reference, save)
    step6 = os.path.join(save, "step-6")
    shards = sorted(f for f in os.listdir(step6) if f.endswith(".distcp"))
    assert len(shards) >= 2
    gone = os.path.join(step6, shards[0])
    os.rename(gone, gone + ".moved")
    with pytest.raises(BrokenCheckpointError, match=f"{gone}: shard file missing"):
        verify(step6)
    os.rename(gone + ".moved", gone)
    cut = os.path.join(step6, shards[-1])
    size = os.path.getsize(cut)
    with open(cut, "r+b") as f:
        f.truncate(size // 2)
    with open(os.path.join(save, "metrics.jsonl")) as f:  # the log of iterations 1..4, as if stopped at 4
        head = f.readlines()[:4]
    with open(os.path.join(save, "metrics.jsonl"), "w") as f:
        f.writelines(head)
    res = train(data, save, nproc=2, extra=["optim.train_iters=8", "checkpoint.save_interval=2"])
    assert res.returncode != 0
    assert f"{cut}: truncated shard file: {size // 2} bytes" in res.stdout + res.stderr, res.stderr[-3000:]
    assert "checkpoint.skip_broken=true" in res.stdout + res.stderr
    res = train(data, save, nproc=2, extra=RUN + ["checkpoint.skip_broken=true"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"skipping broken checkpoint {step6}" in res.stdout and "step-4 at iteration 4" in res.stdout
    assert [r["loss"] for r in losses(save)] == [r["loss"] for r in losses(reference)]  # bitwise


def _du(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_disk_full_during_save_reports_and_keeps_the_previous_checkpoint(data, reference, tmp_path):
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    step = _du(os.path.join(reference, "step-2"))
    size_kib = (step * 3 // 2) // 1024 + 64  # room for one checkpoint and the log, not for two
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {res.stderr.decode().strip()}")
    try:
        save = str(mnt / "run")
        res = train(data, save, nproc=2, extra=RUN + [f"data.cache_dir={tmp_path / 'cache'}"])
        out = res.stdout + res.stderr
        assert res.returncode != 0, out[-3000:]  # run_stage returns 3; torchrun exits 1 for any failed worker
        assert f"train: checkpoint error: saving {save}/step-4 failed" in out, out[-3000:]
        # torch's writer reports ENOSPC or a short write ("unexpected pos"), by timing: the free space says which
        free = re.search(r"([0-9.]+) MiB were free on the checkpoint filesystem", out)
        assert free and float(free.group(1)) < 1.0, out[-3000:]
        assert f"the newest complete checkpoint, {save}/step-2, is intact" in out
        assert complete_steps(save) == [2] and not os.path.exists(os.path.join(save, "step-4.partial"))
        verify(os.path.join(save, "step-2"))  # every file the metadata lists, whole
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_sigterm_mid_iteration_with_async_save_exits_0_and_resumes_identically(data, reference, tmp_path):
    save = str(tmp_path / "run")
    proc = subprocess.Popen(train_cmd(data, save, nproc=2, extra=RUN[:1] + ["checkpoint.save_interval=100"]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = os.path.join(save, "metrics.jsonl")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (os.path.exists(log) and len(open(log).readlines()) >= 2):
        time.sleep(0.01)
    for pid in _workers(proc):  # both ranks, as SLURM signals every task; torchrun would exit 1 itself
        os.kill(pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    print([line for line in out.splitlines() if "SIGTERM" in line])
    steps = complete_steps(save)
    assert len(steps) == 1 and 2 <= steps[0] < 6 and f"SIGTERM: saved at iteration {steps[0]}" in out
    res = train(data, save, nproc=2, extra=RUN[:1] + ["checkpoint.save_interval=100"])
    assert res.returncode == 0 and f"step-{steps[0]} at iteration {steps[0]}" in res.stdout, res.stderr[-3000:]
    assert [r["loss"] for r in losses(save)] == [r["loss"] for r in losses(reference)]  # bitwise


def _stop_worker(rank, world, data, save):
    """Rank 1 gets the signal during micro-batch 2: the vote posted before micro-batch 3 carries
    it, and every rank reads that vote, and stops, before micro-batch 4."""
    import torch

    from megatron_ext.train.loop import StopRequested, Trainer
    from megatron_ext.train.model import unwrap

    trainer = Trainer(_cfg(data, save, ["parallel.context_parallel_size=2", "optim.global_batch_size=4"]))
    batches, _ = trainer._data()
    before = [p.detach().clone() for p in unwrap(trainer.model[0]).parameters()]
    forward, calls = trainer._forward_step, []

    def forward_step(iterator, model):
        calls.append(1)
        out = forward(iterator, model)  # takes micro-batch len(calls)
        if rank == 1 and len(calls) == 2:
            trainer._on_sigterm()
        return out

    trainer._forward_step = forward_step
    try:
        trainer.step(next(batches))
        return "no stop"
    except StopRequested as why:
        unchanged = all(torch.equal(a, b) for a, b in zip(before, unwrap(trainer.model[0]).parameters()))
        return str(why), len(calls), unchanged


def test_stop_flag_is_agreed_between_micro_batches(data, tmp_path):
    out = spawn_ranks(_stop_worker, 2, (data, str(tmp_path / "s")), timeout_s=150)
    assert out == [("stop requested before micro-batch 4/4", 4, True)] * 2, out


def _rng_worker(rank, world, data, save):
    """Give each rank its own RNG states, save, scramble, restore: each gets its own back."""
    import random

    import numpy as np
    import torch
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_ext.train.loop import Trainer

    def draws():
        with get_cuda_rng_tracker().fork():
            tracked = torch.rand(2).tolist()
        return [torch.rand(2).tolist(), tracked, random.random(), float(np.random.rand())]

    cfg = _cfg(data, save, ["parallel.context_parallel_size=1", "checkpoint.async_save=false"])
    trainer = Trainer(cfg)
    batches, _ = trainer._data()
    trainer.step(next(batches))  # an optimizer with state to save
    trainer.state.iteration = 1
    torch.manual_seed(100 + rank)
    random.seed(200 + rank)
    np.random.seed(300 + rank)
    with get_cuda_rng_tracker().fork():
        torch.rand(rank + 1)  # the tracker's stream moves on by a rank-dependent amount
    trainer.save()
    want = draws()
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    with get_cuda_rng_tracker().fork():
        torch.rand(5)
    note = trainer.restore()
    return note, want, draws()


def test_every_rank_restores_its_own_rng_states(data, tmp_path):
    out = spawn_ranks(_rng_worker, 2, (data, str(tmp_path / "r")), timeout_s=150)
    for note, want, got in out:
        assert note.endswith("at iteration 1") and got == want, (note, want, got)
    assert all(a != b for a, b in zip(out[0][1], out[1][1])), out  # the ranks' streams differ


def test_dp_reshardable_reshards_offline_tp2cp2_to_tp1cp4_and_pp2(data, tmp_path):
    from megatron_ext.train.reshard import main as reshard

    base = ["optim.train_iters=4", "checkpoint.save_interval=2"]
    src = str(tmp_path / "tp2cp2")
    res = train_spawned(data, src, extra=base + ["parallel.tensor_model_parallel_size=2", "parallel.context_parallel_size=2"])
    assert res.returncode == 0, res.stderr[-3000:]
    want = [r["loss"] for r in losses(src)][2:]
    shutil.rmtree(os.path.join(src, "step-4"))
    # dp_reshardable does not load at another TP: the error names the tool
    wrong = str(tmp_path / "wrong")
    shutil.copytree(src, wrong)
    res = train(data, wrong, nproc=2, extra=base + ["parallel.context_parallel_size=2"], timeout=90)
    assert res.returncode != 0 and "python -m megatron_ext.train.reshard --checkpoint" in res.stderr, \
        res.stderr[-3000:]
    for name, layout, sets in (
            ("tp1cp4", "tp=1,pp=1,cp=4,dp=1", ["parallel.context_parallel_size=4"]),
            ("pp2cp2", "tp=1,pp=2,cp=2,dp=1", ["parallel.pipeline_model_parallel_size=2",
                                               "parallel.context_parallel_size=2"])):
        out = str(tmp_path / name)
        assert reshard(["--checkpoint", src, "--to-layout", layout, "--out", out]) == 0
        assert complete_steps(out) == [2]
        res = train_spawned(data, out, extra=base + sets)
        assert res.returncode == 0 and "step-2 at iteration 2" in res.stdout, res.stderr[-3000:]
        got = [r["loss"] for r in losses(out)]
        assert len(got) == 2 and all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(got, want)), (name, got, want)
