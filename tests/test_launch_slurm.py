"""Launch against a real SLURM: a one-node cluster (munged, slurmctld, slurmd)
started for this module, a job rendered and submitted by `python -m launch
submit`, a preemption by SIGTERM followed by a requeue that resumes, and a time-limit warning
(USR1) after which the job saves and requeues itself.

Skipped, with the reason, where slurm-wlm/munge are not installed or we are not
root (.ci/install-slurm installs them in CI)."""
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from tests.slurm_cluster import LocalSlurm, missing_reason

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "launch/configs/tiny_cpu_pretrain.yaml")

pytestmark = pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or "")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalSlurm(str(tmp_path_factory.mktemp("slurm"))) as c:
        print(f"\nlocal SLURM up in {c.startup_s:.2f}s")
        yield c


def submit(cluster, tmp_path, name, data, iters, extra=()):
    sets = ["model.hidden_size=64", "model.ffn_hidden_size=128", "data.seq_length=256", f"optim.train_iters={iters}",
            "optim.global_batch_size=2", "logging.wandb=false", "logging.log_interval=1",
            "checkpoint.save_interval=100000", f"data.blend=[1.0, {data['pre']}]",
            f"data.tokenizer_model={data['tok']}", f"checkpoint.save_dir={tmp_path / 'run'}", *extra]
    cmd = [sys.executable, "-m", "launch", "submit", "--config", TINY, "--nodes", "1", "--gpus-per-node", "2",
           "--device", "cpu", "--job-name", name, "--time", "00:10:00", "--log-dir", str(tmp_path / "logs"),
           *[a for s in sets for a in ("--set", s)]]
    env = dict(cluster.env, PYTHONPATH=REPO)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()
    assert re.fullmatch(r"\d+", job_id), res.stdout
    return job_id


def node_log(tmp_path, name, job_id):
    path = tmp_path / "logs" / f"{name}-{job_id}-{socket.gethostname().split('.')[0]}.log"
    return path.read_text() if path.exists() else ""


def wait_for_text(tmp_path, name, job_id, pattern, cluster, timeout_s=90.0):
    deadline = time.monotonic() + timeout_s
    while not re.search(pattern, node_log(tmp_path, name, job_id)):
        state = cluster.job(job_id)["JobState"]
        if time.monotonic() > deadline or state in ("FAILED", "CANCELLED", "TIMEOUT"):
            raise AssertionError(f"{pattern!r} not in the log of job {job_id} ({state}):\n"
                                 + node_log(tmp_path, name, job_id)[-3000:])
        time.sleep(0.25)


def test_submit_runs_a_cp2_training_job(cluster, data, tmp_path):
    t0 = time.monotonic()
    job_id = submit(cluster, tmp_path, "mext-submit", data, iters=3)
    info = cluster.wait_for(job_id, ("COMPLETED",))
    print(f"\nsubmit job {job_id}: {info['JobState']} in {time.monotonic() - t0:.1f}s")
    log = node_log(tmp_path, "mext-submit", job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert "context_parallel_size: 2" in log and "iteration      3/3" in log
    assert (tmp_path / "run" / "step-3" / "COMPLETE").exists()
    batch = (tmp_path / "logs" / f"mext-submit-{job_id}.out").read_text()
    assert f"job {job_id} (mext-submit) finished with status 0" in batch


def test_preemption_saves_exits_cleanly_and_requeue_resumes(cluster, data, tmp_path):
    name, t0 = "mext-preempt", time.monotonic()
    job_id = submit(cluster, tmp_path, name, data, iters=100000)
    wait_for_text(tmp_path, name, job_id, r"iteration +2/", cluster)
    cluster.run(["scancel", "--signal=TERM", "--batch", job_id])
    info = cluster.wait_for(job_id, ("COMPLETED",))
    log = node_log(tmp_path, name, job_id)
    print(f"\npreempted job {job_id}: {info['JobState']} {time.monotonic() - t0:.1f}s after submit")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    saved = int(re.search(r"SIGTERM: saved at iteration (\d+); exiting cleanly", log).group(1))
    assert 2 <= saved < 100000 and (tmp_path / "run" / f"step-{saved}" / "COMPLETE").exists()
    batch = (tmp_path / "logs" / f"{name}-{job_id}.out").read_text()
    assert "SIGTERM: asking the trainers to save" in batch and "finished with status 0" in batch

    # --requeue: the same job comes back and resumes from that checkpoint; preempt it again.
    t1 = time.monotonic()
    cluster.run(["scontrol", "requeue", job_id])
    wait_for_text(tmp_path, name, job_id, rf"resumed from \S*step-{saved} at iteration {saved}", cluster)
    wait_for_text(tmp_path, name, job_id, rf"iteration +{saved + 1}/", cluster)

    # The time-limit warning (USR1, as --signal=B:USR1@lead sends it): save, then the job requeues
    # itself, since SLURM's --requeue does not cover a job that ran out of time.
    cluster.run(["scancel", "--signal=USR1", "--batch", job_id])
    wait_for_text(tmp_path, name, job_id, r"SIGTERM: saved at iteration \d+[^\n]*\n(.|\n)*SIGTERM: saved at iteration", cluster)
    second = [int(n) for n in re.findall(r"SIGTERM: saved at iteration (\d+)", node_log(tmp_path, name, job_id))][1]
    wait_for_text(tmp_path, name, job_id, rf"resumed from \S*step-{second} at iteration {second}", cluster, 150)
    wait_for_text(tmp_path, name, job_id, rf"iteration +{second + 1}/", cluster)
    cluster.run(["scancel", "--signal=TERM", "--batch", job_id])
    info = cluster.wait_for(job_id, ("COMPLETED",))
    print(f"requeued job {job_id}: {info['JobState']} {time.monotonic() - t1:.1f}s after requeue")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "2"
    again = [int(n) for n in re.findall(r"SIGTERM: saved at iteration (\d+)", node_log(tmp_path, name, job_id))]
    assert len(again) == 3 and saved < again[1] < again[2] and (tmp_path / "run" / f"step-{again[2]}" / "COMPLETE").exists()
    batch = (tmp_path / "logs" / f"{name}-{job_id}.out").read_text()
    assert batch.count("time limit near (USR1)") == 1 and batch.count(f"requeueing job {job_id}") == 1
