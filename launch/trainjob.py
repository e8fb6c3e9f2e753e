"""Kubeflow Trainer v2: a ``TrainJob`` (trainer.kubeflow.org/v1alpha1) for torchrun with our config.

``python -m launch render --template trainjob`` writes two YAML documents from
``launch/templates/trainjob.yaml``:

* a ``ClusterTrainingRuntime`` (default name :data:`RUNTIME`): the torch ML policy, one
  replicated job ``node`` whose container ``node`` runs in the checkout (``--repo``) with
  a memory-backed ``/dev/shm``; any pod failure fails its Job (``backoffLimit: 0``,
  ``restartPolicy: Never``) and JobSet restarts every node together up to
  ``--max-restarts`` times, so all ranks resume from the same checkpoint;
* the ``TrainJob``: image, ``torchrun -m megatron_ext.train --config ... [--set ...]``,
  ``numNodes``, ``numProcPerNode``, GPUs per node, and our environment.

``--runtime NAME`` leaves the runtime out and points the TrainJob at an installed
ClusterTrainingRuntime instead (creating a cluster-scoped runtime needs cluster-admin
rights); the image's working directory must then be the checkout. Node count,
processes per node and rendezvous come from the Trainer (PET_* variables), so the
command names none of them. The v1 ``PyTorchJob`` stays ``--template k8s``.
"""
from __future__ import annotations

import os
import re

import yaml

API_VERSION = "trainer.kubeflow.org/v1alpha1"
RUNTIME = "megatron-ext-torch"
TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates", "trainjob.yaml")


def dns1035_name(text: str) -> str:
    """A TrainJob name: lowercase letters, digits and '-', starting with a letter, at most 63
    characters (the CRD's rule; the name is also the JobSet's and its Service's)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = "job-" + name
    return name[:63].rstrip("-")


def _header(text: str) -> str:
    return "".join(line for line in text.splitlines(True) if line.startswith("#"))


def render_trainjob(spec, nproc: int, env=(), grace_s: int = 120) -> str:
    """The runtime (unless ``spec.runtime``) and the TrainJob as YAML text; ``spec`` is a
    checked :class:`launch.render.JobSpec`, ``env`` extra ``NAME=VALUE`` pairs for the trainer,
    ``grace_s`` the pods' terminationGracePeriodSeconds (:func:`launch.render.job_grace`; only
    the runtime we write carries it: an installed ``--runtime`` keeps its own)."""
    with open(TEMPLATE) as f:
        text = f.read()
    runtime, job = yaml.safe_load_all(text)
    name = dns1035_name(spec.job_name)
    runtime_name = spec.runtime or RUNTIME
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", runtime_name):
        raise ValueError(f"--runtime {runtime_name!r} is not a Kubernetes object name "
                         f"(lowercase letters, digits, '-' and '.', at most 253)")
    _fill_runtime(runtime, spec, runtime_name, grace_s)
    job["metadata"].update(name=name, labels={"app": "megatron-ext", "job-name": name},
                           annotations={"megatron-ext/job-name": spec.job_name})
    job["spec"]["runtimeRef"]["name"] = runtime_name
    trainer = job["spec"]["trainer"]
    trainer.update(image=spec.image, numNodes=spec.nodes, numProcPerNode=nproc,
                   command=["torchrun", "-m", "megatron_ext.train", "--config", spec.config]
                   + [a for s in spec.sets for a in ("--set", s)])
    trainer["env"] += [{"name": k, "value": v} for k, v in (e.split("=", 1) for e in env)]
    if spec.device == "cuda":
        trainer["resourcesPerNode"] = {"limits": {"nvidia.com/gpu": spec.gpus_per_node}}
    docs = [job] if spec.runtime else [runtime, job]
    return _header(text) + yaml.safe_dump_all(docs, sort_keys=False)


def _fill_runtime(runtime: dict, spec, name: str, grace_s: int) -> None:
    runtime["metadata"]["name"] = name
    runtime["metadata"]["labels"]["app"] = "megatron-ext"
    jobset = runtime["spec"]["template"]["spec"]
    jobset["failurePolicy"]["maxRestarts"] = spec.max_restarts
    pod = jobset["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    pod["terminationGracePeriodSeconds"] = grace_s  # SIGTERM, then this long to finish and save
    container = pod["containers"][0]
    container.update(image=spec.image, workingDir=spec.repo)
