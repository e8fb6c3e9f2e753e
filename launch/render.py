"""Render cluster job files from a training config and cluster flags.

Values land shell-quoted (SLURM, hostfile) or through a YAML dumper (K8s), so a
hostile job name stays inert text; names that a scheduler parses are reduced
to safe characters. The layout is checked before anything is written.
"""
from __future__ import annotations

import copy
import os
import re
import shlex
import string
from dataclasses import dataclass, field
from typing import List, Optional

import yaml

# Template files, relative to launch/.
TEMPLATES = {"slurm": "slurm/train.sbatch", "k8s": "templates/k8s.yaml", "hostfile": "templates/hostfile.sh",
             "trainjob": "templates/trainjob.yaml"}  # trainjob: Kubeflow Trainer v2 (launch/trainjob.py)
HERE = os.path.dirname(os.path.abspath(__file__))
NCCL_DEFAULTS = ("TORCH_NCCL_ASYNC_ERROR_HANDLING=3", "NCCL_IB_TIMEOUT=22", "CUDA_DEVICE_MAX_CONNECTIONS=1")
"""CUDA jobs' environment, on every launch path. 3 (torch's default since 2.2): on an NCCL error or
timeout the rank exits without aborting its communicators, an abort that can itself hang (1 did it).
CUDA_DEVICE_MAX_CONNECTIONS=1: megatron-core orders the sequence-parallel and gradient collectives
ahead of the GEMMs they overlap (tensor_parallel/layers.py)."""


@dataclass
class JobSpec:
    """What the cluster is asked for."""

    template: str
    """slurm, k8s (v1 PyTorchJob), trainjob (Kubeflow Trainer v2) or hostfile."""
    config: str
    """Training config (YAML)."""
    nodes: int = 1
    """Nodes."""
    gpus_per_node: int = 8
    """Accelerators (or CPU slots with device=cpu) per node."""
    nproc_per_node: Optional[int] = None
    """Trainer processes per node (default: gpus_per_node)."""
    device: str = "cuda"
    """cuda (NCCL, requests GPUs) or cpu (gloo, requests no GPUs)."""
    job_name: str = "megatron-ext"
    """Job name."""
    partition: str = ""
    """SLURM partition."""
    time: str = "24:00:00"
    """SLURM time limit."""
    account: str = ""
    """SLURM account."""
    log_dir: str = "logs"
    """Per-job, per-node logs go here."""
    image: str = "megatron-ext:latest"
    """Container image (k8s)."""
    max_restarts: int = 3
    """Restarts (k8s elastic policy; trainjob: the runtime's JobSet failure policy)."""
    runtime: str = ""
    """trainjob: an installed ClusterTrainingRuntime to use (default: write our own)."""
    sets: List[str] = field(default_factory=list)
    """--set overrides passed to the trainer."""
    python: str = "python"
    """Interpreter on the nodes."""
    repo: str = os.path.dirname(HERE)
    """megatron-ext checkout on the nodes."""
    gpu: str = "H100"
    """GPU type the planner times the iteration on (grace period)."""
    ckpt_write_gib_s: float = 0.0
    """Checkpoint write bandwidth per node, GiB/s (0: the planner's default); sizes the grace period."""


def _safe_name(text: str, k8s: bool = False) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text) or "job"
    if k8s:  # DNS-1123: lowercase alphanumerics and '-', at most 63
        name = re.sub(r"[^a-z0-9-]", "-", text.lower()).strip("-")[:63] or "job"
    return name


SLURM_TIME = r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}"  # MM, MM:SS, H:MM:SS, D-H, D-H:MM, D-H:MM:SS


def check_numbers(spec: JobSpec) -> None:
    """Every count is a positive integer (max_restarts: >= 0) and the time limit is SLURM's format."""
    counts = [("--nodes", spec.nodes, 1), ("--gpus-per-node", spec.gpus_per_node, 1),
              ("--nproc-per-node", spec.nproc_per_node, 1), ("max_restarts", spec.max_restarts, 0)]
    for flag, value, least in counts:
        if flag == "--nproc-per-node" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{flag} must be an integer >= {least}, got {value!r}")
    if not re.fullmatch(SLURM_TIME, spec.time):
        raise ValueError(f"--time {spec.time!r} is not a SLURM time limit (MM, HH:MM:SS, D-HH or D-HH:MM:SS)")


def check_layout(spec: JobSpec) -> dict:
    """TP x CP x PP x DP must equal nodes x nproc_per_node; seq_length % (2 x CP) == 0."""
    from megatron_ext.train.config import load_config, validate

    if spec.template not in TEMPLATES:
        raise ValueError(f"unknown template {spec.template!r}; expected one of {sorted(TEMPLATES)}")
    if spec.device not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {spec.device!r}")
    check_numbers(spec)
    world = spec.nodes * (spec.nproc_per_node or spec.gpus_per_node)
    cfg = load_config(spec.config, spec.sets)
    return validate(cfg, world)


def job_grace(spec: JobSpec):
    """launch.grace.Grace of ``spec``: the stop signal's lead time from the planned iteration
    and save time; ValueError if it does not leave time to train within ``spec.time``."""
    from megatron_ext.train.config import load_config

    from .grace import grace_period

    nproc = spec.nproc_per_node or spec.gpus_per_node
    grace = grace_period(load_config(spec.config, spec.sets), spec.nodes * nproc, nproc, spec.device, spec.gpu,
                         spec.ckpt_write_gib_s)
    limit = _slurm_seconds(spec.time)
    if grace.seconds >= limit:
        raise ValueError(f"--time {spec.time} ({limit} s) is not longer than the stop grace period: {grace.why}")
    return grace


def _slurm_seconds(text: str) -> int:
    """Seconds of a SLURM time limit (MM, MM:SS, H:MM:SS, D-H, D-H:MM, D-H:MM:SS)."""
    days, sep, rest = text.partition("-") if "-" in text else ("0", "", text)
    parts = [int(x) for x in rest.split(":")]
    if sep:
        h, m, sec = (parts + [0, 0])[:3]
    else:
        h, m, sec = ([0, parts[0], 0], [0] + parts, parts)[len(parts) - 1]
    return ((int(days) * 24 + h) * 60 + m) * 60 + sec


def render(spec: JobSpec) -> str:
    """The job file's text; raises ValueError on a bad layout."""
    check_layout(spec)
    grace = job_grace(spec)
    nproc = spec.nproc_per_node or spec.gpus_per_node
    if spec.template == "k8s":
        return _render_k8s(spec, nproc, grace.seconds)
    if spec.template == "trainjob":
        from .trainjob import render_trainjob

        env = (f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={grace.seconds}",) + (NCCL_DEFAULTS if spec.device == "cuda" else ())
        return render_trainjob(spec, nproc, env, grace.seconds)
    q = shlex.quote
    values = {
        "job_name": _safe_name(spec.job_name), "job_name_q": q(spec.job_name), "nodes": spec.nodes,
        "nproc_per_node": nproc, "config_q": q(spec.config), "repo_q": q(spec.repo), "python_q": q(spec.python),
        "log_dir": _safe_path(spec.log_dir), "log_dir_q": q(spec.log_dir),
        "extra_args": " ".join(q(a) for s in spec.sets for a in ("--set", s)),
        "time_limit": spec.time,  # check_numbers checked its format
        "cpus_per_task": max(1, nproc * (4 if spec.device == "cuda" else 1)),
        # whole GPU nodes: all their memory (checkpoint staging, CUDA contexts), no co-tenants
        "gpu_directive": f"#SBATCH --gpus-per-node={spec.gpus_per_node}\n#SBATCH --exclusive\n#SBATCH --mem=0\n"
        if spec.device == "cuda" else "",
        "partition_directive": f"#SBATCH --partition={_checked(spec.partition, r'[A-Za-z0-9_,-]+', 'partition')}\n"
        if spec.partition else "",
        "account_directive": f"#SBATCH --account={_checked(spec.account, r'[A-Za-z0-9_.-]+', 'account')}\n"
        if spec.account else "",
        "nccl_env": "".join(f"export {v}\n" for v in NCCL_DEFAULTS) if spec.device == "cuda" else "",
        "nccl_prefix": "".join(f"{v} " for v in NCCL_DEFAULTS) if spec.device == "cuda" else "",
        "signal_lead_s": grace.seconds, "grace_why": grace.why,
    }
    with open(os.path.join(HERE, TEMPLATES[spec.template])) as f:
        return string.Template(f.read()).substitute(values)


def _checked(value: str, pattern: str, what: str) -> str:
    if not re.fullmatch(pattern, value):
        raise ValueError(f"{what} {value!r} has characters a scheduler directive cannot carry")
    return value


def _safe_path(path: str) -> str:
    return _checked(path, r"[A-Za-z0-9_./%-]+", "log dir")


def _render_k8s(spec: JobSpec, nproc: int, grace_s: int) -> str:
    with open(os.path.join(HERE, TEMPLATES["k8s"])) as f:
        text = f.read()
    header = "".join(line for line in text.splitlines(True) if line.startswith("#"))
    doc = yaml.safe_load(text)
    doc["metadata"]["name"] = _safe_name(spec.job_name, k8s=True)
    doc["metadata"]["labels"] = {"app": "megatron-ext", "job-name": _safe_name(spec.job_name, k8s=True)}
    doc["metadata"]["annotations"] = {"megatron-ext/job-name": spec.job_name}
    pol = doc["spec"]["elasticPolicy"]
    pol.update(minReplicas=spec.nodes, maxReplicas=spec.nodes, nProcPerNode=nproc, maxRestarts=spec.max_restarts)
    master = doc["spec"]["pytorchReplicaSpecs"]["Master"]
    container = master["template"]["spec"]["containers"][0]
    container["image"] = spec.image
    container["command"] = ["torchrun", "--nproc-per-node", str(nproc), "-m", "megatron_ext.train", "--config",
                            spec.config] + [a for s in spec.sets for a in ("--set", s)]
    container["workingDir"] = spec.repo
    # SIGTERM, then this long to finish the iteration and save (launch.grace); torchrun, PID 1 here,
    # passes SIGTERM on and would SIGKILL its trainers after 30 s (torch >= 2.11 reads this variable)
    master["template"]["spec"]["terminationGracePeriodSeconds"] = grace_s
    env = ([f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={grace_s}"] + list(NCCL_DEFAULTS if spec.device == "cuda" else ()))
    container["env"] += [{"name": k, "value": v} for k, v in (e.split("=", 1) for e in env)]
    if spec.device == "cuda":
        container["resources"] = {"limits": {"nvidia.com/gpu": spec.gpus_per_node}}
    workers = doc["spec"]["pytorchReplicaSpecs"]["Worker"]
    if spec.nodes > 1:
        workers.update(replicas=spec.nodes - 1, template=copy.deepcopy(master["template"]))
    else:  # the operator's elastic rendezvous is <job>-worker-0: one node runs without it
        del doc["spec"]["pytorchReplicaSpecs"]["Worker"], doc["spec"]["elasticPolicy"]
        doc["spec"]["runPolicy"] = {"backoffLimit": spec.max_restarts}  # the restarts elasticPolicy gave
    return header + yaml.safe_dump(doc, sort_keys=False)
