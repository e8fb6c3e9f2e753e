"""The stop signal's lead time that launch render derives from the planned iteration and
save time (launch/grace.py): in the SLURM script, in the K8s manifest, and growing with
the iteration and the save."""
import math
import os
import subprocess
import sys

import yaml

from launch.grace import DEFAULT_S, MARGIN, SLACK_S, grace_period
from megatron_ext.plan.host_memory import DEFAULT_WRITE_GIB_S, checkpoint_host_memory, config_format
from megatron_ext.plan.planner import config_layout, shape_and_run
from megatron_ext.plan.time import estimate_time, hardware
from megatron_ext.train.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(REPO, "launch/configs/longskywork_13b_200k_pretrain.yaml")
TINY = os.path.join(REPO, "launch/configs/tiny_cpu_pretrain.yaml")


def render(*args, check=True):
    res = subprocess.run([sys.executable, "-m", "launch", "render", *args], capture_output=True, text=True, cwd=REPO)
    if check and res.returncode:
        raise AssertionError(res.stderr)
    return res


def lead(*extra) -> int:
    text = render("--template", "slurm", "--config", PAPER, "--nodes", "8", "--gpus-per-node", "8", *extra).stdout
    line = next(x for x in text.splitlines() if x.startswith("#SBATCH --signal=B:USR1@"))
    return int(line.rsplit("@", 1)[1])


def test_slurm_lead_is_the_planned_iteration_plus_save_with_margin():
    res = render("--template", "slurm", "--config", PAPER, "--nodes", "8", "--gpus-per-node", "8")
    cfg = load_config(PAPER, [])
    shape, run = shape_and_run(cfg)
    lay = config_layout(cfg, 64)
    step = estimate_time(shape, run, lay, hardware("H100", {}), 8)["step_s"]
    save = checkpoint_host_memory(shape, run, lay, config_format(cfg), 8, True, DEFAULT_WRITE_GIB_S).save_s
    want = math.ceil(MARGIN * (step + save) + SLACK_S)
    assert step > 100 and save > 1  # a 200K step of a 13B model, a 13B checkpoint
    assert f"#SBATCH --signal=B:USR1@{want}\n" in res.stdout
    assert f"stop grace period {want} s" in res.stderr  # printed
    assert grace_period(cfg, 64, 8).seconds == want


def test_k8s_grace_period_matches_slurm_lead():
    doc = yaml.safe_load(render("--template", "k8s", "--config", PAPER, "--nodes", "8", "--gpus-per-node", "8").stdout)
    specs = doc["spec"]["pytorchReplicaSpecs"]
    for role in ("Master", "Worker"):
        assert specs[role]["template"]["spec"]["terminationGracePeriodSeconds"] == lead()


def test_trainjob_runtime_grace_period_matches_slurm_lead():
    docs = list(yaml.safe_load_all(render("--template", "trainjob", "--config", PAPER, "--nodes", "8",
                                          "--gpus-per-node", "8").stdout))
    runtime = next(d for d in docs if d["kind"] == "ClusterTrainingRuntime")
    pod = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == lead() > 120


def test_lead_grows_with_iteration_and_save_time():
    base = lead()
    cfg = load_config(PAPER, [])
    assert lead("--set", f"optim.global_batch_size={2 * cfg.optim.global_batch_size}") > base  # 2x micro-batches
    assert lead("--gpu", "A100") > base  # slower GPU, longer iteration
    assert lead("--ckpt-write-gib-s", "0.5") > base > lead("--ckpt-write-gib-s", "8")


def test_time_limit_shorter_than_the_grace_period_is_refused():
    res = render("--template", "slurm", "--config", PAPER, "--nodes", "8", "--gpus-per-node", "8", "--time", "5",
                 check=False)
    assert res.returncode == 2 and "not longer than the stop grace period" in res.stderr


def test_cpu_jobs_keep_the_fixed_default():
    text = render("--template", "slurm", "--config", TINY, "--nodes", "1", "--gpus-per-node", "2",
                  "--device", "cpu").stdout
    assert f"#SBATCH --signal=B:USR1@{DEFAULT_S}\n" in text
