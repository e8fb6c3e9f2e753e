"""Launch tools without a cluster: rendered structure, layout checks, quoting,
the K8s manifest, and torchrun.sh on 2 CPU processes."""
import os
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(REPO, "launch/configs/longskywork_13b_200k_pretrain.yaml")
TINY = os.path.join(REPO, "launch/configs/tiny_cpu_pretrain.yaml")
HOSTILE = "x; rm -rf ~ $(touch pwned) `id`"


def render(*args, check=True):
    res = subprocess.run([sys.executable, "-m", "launch", "render", *args], capture_output=True, text=True, cwd=REPO)
    if check and res.returncode:
        raise AssertionError(res.stderr)
    return res


def test_slurm_script_structure():
    text = render("--template", "slurm", "--config", PAPER, "--nodes", "8", "--gpus-per-node", "8",
                  "--partition", "gpu", "--account", "proj", "--time", "12:00:00").stdout
    for want in ("#SBATCH --nodes=8", "#SBATCH --gpus-per-node=8", "#SBATCH --signal=B:USR1@",
                 "#SBATCH --requeue", "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=12:00:00",
                 "#SBATCH --exclusive", "#SBATCH --mem=0", 'srun --kill-on-bad-exit=1 --cpus-per-task "$SLURM_CPUS_PER_TASK"',
                 "scontrol show hostnames", "--rdzv-backend c10d", '--nnodes "$SLURM_NNODES"', "NPROC_PER_NODE=8",
                 "PYTHONFAULTHANDLER=1", "export TORCH_NCCL_ASYNC_ERROR_HANDLING=3", "export CUDA_DEVICE_MAX_CONNECTIONS=1",
                 "-m megatron_ext.train", "%x-%j-%N.log", "trap \"\" TERM USR1",
                 "--signals-to-handle SIGINT,SIGHUP,SIGQUIT", 'scontrol requeue "$SLURM_JOB_ID"'):
        assert want in text, want
    assert "NCCL_ASYNC_ERROR_HANDLING=1" not in text  # aborting communicators on an error can hang the rank
    cpu = render("--template", "slurm", "--config", TINY, "--nodes", "1", "--gpus-per-node", "2", "--device", "cpu").stdout
    assert "--gpus-per-node" not in cpu and "NCCL_" not in cpu and "--exclusive" not in cpu
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_hostfile_script_structure():
    text = render("--template", "hostfile", "--config", PAPER, "--nodes", "8", "--gpus-per-node", "8").stdout
    for want in ("HOSTFILE=", "ssh", "pdsh", "--nnodes $NODES", "--rdzv-backend c10d", "NODES=8",
                 "PYTHONFAULTHANDLER=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=3 NCCL_IB_TIMEOUT=22 CUDA_DEVICE_MAX_CONNECTIONS=1 "):
        assert want in text, want  # ssh carries no environment: the command line sets it
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_k8s_manifest_has_what_the_training_operator_needs():
    doc = yaml.safe_load(render("--template", "k8s", "--config", PAPER, "--nodes", "4", "--gpus-per-node", "8",
                                "--job-name", "LongSkywork 13B!", "--image", "reg/megatron-ext:1").stdout)
    assert doc["apiVersion"] == "kubeflow.org/v1" and doc["kind"] == "PyTorchJob"
    assert doc["metadata"]["name"] == "longskywork-13b"
    specs = doc["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 3
    for role in ("Master", "Worker"):
        c = specs[role]["template"]["spec"]["containers"][0]
        assert c["name"] == "pytorch" and c["image"] == "reg/megatron-ext:1"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert c["command"][:5] == ["torchrun", "--nproc-per-node", "8", "-m", "megatron_ext.train"]
    assert doc["spec"]["elasticPolicy"]["nProcPerNode"] == 8 and doc["spec"]["elasticPolicy"]["maxReplicas"] == 4
    pod = specs["Master"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    # torchrun (PID 1) must give the trainers the pod's whole grace period to save, not its 30 s
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == str(pod["terminationGracePeriodSeconds"])
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    assert pod["containers"][0]["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    one = yaml.safe_load(render("--template", "k8s", "--config", PAPER, "--nodes", "1", "--gpus-per-node", "8").stdout)
    # the operator's elastic rendezvous host is <job>-worker-0: one node has no Worker, so no elasticPolicy
    assert list(one["spec"]["pytorchReplicaSpecs"]) == ["Master"] and "elasticPolicy" not in one["spec"]
    assert one["spec"]["runPolicy"] == {"backoffLimit": 3}  # --max-restarts still bounds the restarts


@pytest.mark.parametrize("args,text", [
    (["--nodes", "2", "--gpus-per-node", "6"], "does not divide the world size 12"),
    (["--nodes", "3", "--gpus-per-node", "8"], "multiple of micro_batch_size x DP = 3"),
    (["--nodes", "1", "--gpus-per-node", "8", "--set", "data.seq_length=100004"], "must divide by 2 x CP = 8"),
    (["--nodes", "1", "--gpus-per-node", "8", "--partition", "a b"], "partition 'a b'"),
])
def test_layout_errors_before_writing(args, text, tmp_path):
    out = tmp_path / "job.sbatch"
    res = render("--template", "slurm", "--config", PAPER, "--out", str(out), *args, check=False)
    assert res.returncode == 2 and text in res.stderr
    assert not out.exists()


@pytest.mark.parametrize("command", ["render", "submit"])
@pytest.mark.parametrize("flags,text", [
    (["--nodes", "0"], "--nodes must be an integer >= 1, got 0"),
    (["--nodes", "-2"], "--nodes must be an integer >= 1, got -2"),
    (["--gpus-per-node", "0"], "--gpus-per-node must be an integer >= 1, got 0"),
    (["--nproc-per-node", "0"], "--nproc-per-node must be an integer >= 1, got 0"),
    (["--nodes", "two"], "argument --nodes: invalid int value: 'two'"),
    (["--gpus-per-node", "1.5"], "argument --gpus-per-node: invalid int value: '1.5'"),
    (["--time", "1:2:3:4"], "is not a SLURM time limit"),
])
def test_bad_numeric_flags_give_one_line_and_exit_2(command, flags, text, capsys):
    from launch.__main__ import main

    args = ([command] + (["--template", "slurm"] if command == "render" else []) +
            ["--config", TINY, "--device", "cpu", "--gpus-per-node", "2"] + flags + (["--dry-run"] if command == "submit" else []))
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and text in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_hostile_values_stay_inert(tmp_path):
    for template in ("slurm", "hostfile"):
        text = render("--template", template, "--config", TINY, "--nodes", "1", "--gpus-per-node", "2", "--device",
                      "cpu", "--job-name", HOSTILE, "--set", f"logging.wandb_project={HOSTILE}").stdout
        # Run only the variable assignments: the values must come back verbatim and run nothing.
        assigns = "\n".join(line for line in text.splitlines() if line.startswith(("JOB_NAME=", "EXTRA_ARGS=")))
        probe = assigns + '\nprintf "%s\\n" "$JOB_NAME" "${EXTRA_ARGS[@]}"\n'
        res = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, cwd=tmp_path)
        assert res.stdout.splitlines() == [HOSTILE, "--set", f"logging.wandb_project={HOSTILE}"], template
        assert not (tmp_path / "pwned").exists()
    doc = yaml.safe_load(render("--template", "k8s", "--config", TINY, "--nodes", "1", "--gpus-per-node", "2",
                                "--device", "cpu", "--job-name", HOSTILE).stdout)
    assert doc["metadata"]["annotations"]["megatron-ext/job-name"] == HOSTILE


def test_submit_dry_run_prints_the_script():
    res = subprocess.run([sys.executable, "-m", "launch", "submit", "--config", TINY, "--nodes", "1",
                          "--gpus-per-node", "2", "--device", "cpu", "--dry-run"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0 and res.stdout.startswith("#!/bin/bash") and "#SBATCH --nodes=1" in res.stdout


def test_torchrun_sh_runs_a_2_process_cpu_job(data, tmp_path):
    env = dict(os.environ, CONFIG=TINY, NPROC="2", PYTHON=sys.executable, PYTHONPATH=REPO, LOG_RANK="0")
    sets = ["model.hidden_size=64", "data.seq_length=256", "optim.train_iters=2", "logging.wandb=false",
            "logging.log_interval=1", f"data.blend=[1.0, {data['pre']}]", f"data.tokenizer_model={data['tok']}",
            f"checkpoint.save_dir={tmp_path / 'run'}"]
    args = [a for s in sets for a in ("--set", s)]
    res = subprocess.run([os.path.join(REPO, "launch/torchrun.sh"), *args], capture_output=True, text=True,
                         env=env, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "iteration      2/2" in res.stdout and (tmp_path / "run" / "step-2" / "COMPLETE").exists()
    res = subprocess.run([os.path.join(REPO, "launch/torchrun.sh"), "--set", "bogus=1"], capture_output=True,
                         text=True, env=env, timeout=120, cwd=tmp_path)
    assert res.returncode != 0  # the trainer's status comes back


def test_setup_torch_floor_covers_what_the_launch_scripts_use():
    import ast
    import re

    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    reqs = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    floor = [tuple(map(int, m.groups())) for r in reqs for m in [re.fullmatch(r"torch>=(\d+)\.(\d+)", r)] if m]
    sbatch = open(os.path.join(REPO, "launch/slurm/train.sbatch")).read()
    assert "--signals-to-handle" in sbatch
    assert floor and floor[0] >= (2, 9), f"torchrun --signals-to-handle needs torch >= 2.9; setup.py allows {floor}"
