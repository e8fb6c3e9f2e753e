"""launch render --template trainjob: the TrainJob and ClusterTrainingRuntime validate against
Kubeflow Trainer's own CRD schemas (tests/data/kubeflow-trainer, v2.3.0), and carry our torchrun
command, layout and environment."""
import copy
import hashlib
import os
import re

import pytest
import yaml

from tests.k8s_schema import CRD
from tests.test_launch import HOSTILE, PAPER, REPO, TINY, render

DATA = os.path.join(REPO, "tests", "data", "kubeflow-trainer")
TRAINJOB_CRD = os.path.join(DATA, "trainer.kubeflow.org_trainjobs.yaml")
RUNTIME_CRD = os.path.join(DATA, "trainer.kubeflow.org_clustertrainingruntimes.yaml")


@pytest.fixture(scope="module")
def crds():
    return {"TrainJob": CRD(TRAINJOB_CRD), "ClusterTrainingRuntime": CRD(RUNTIME_CRD)}


def docs(*args):
    return list(yaml.safe_load_all(render("--template", "trainjob", *args).stdout))


def test_shipped_crds_are_the_copies_the_readme_names():
    readme = open(os.path.join(DATA, "README.md")).read()
    for path in (TRAINJOB_CRD, RUNTIME_CRD):
        digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
        assert f"{digest}  {os.path.basename(path)}" in readme, path
    assert "v2.3.0" in readme and "658725bdae5c7e3a0854d93ac6ff492e109a22ab" in readme


@pytest.mark.parametrize("args", [
    ["--config", PAPER, "--nodes", "4", "--gpus-per-node", "8", "--job-name", "LongSkywork 13B!",
     "--image", "reg/megatron-ext:1", "--set", "optim.train_iters=10"],
    ["--config", TINY, "--nodes", "1", "--gpus-per-node", "2", "--device", "cpu", "--job-name", "42 tiny"],
    ["--config", PAPER, "--nodes", "8", "--gpus-per-node", "8", "--job-name", HOSTILE, "--max-restarts", "0"],
])
def test_rendered_objects_validate_against_the_official_schema(args, crds):
    objs = docs(*args)
    assert [o["kind"] for o in objs] == ["ClusterTrainingRuntime", "TrainJob"]
    for obj in objs:
        assert crds[obj["kind"]].errors(obj) == [], obj["kind"]


def test_trainjob_runs_torchrun_with_our_config_and_layout():
    runtime, job = docs("--config", PAPER, "--nodes", "4", "--gpus-per-node", "8", "--job-name", "LongSkywork 13B!",
                        "--image", "reg/megatron-ext:1", "--set", "optim.train_iters=10")
    assert job["apiVersion"] == runtime["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert job["metadata"]["name"] == "longskywork-13b"
    assert job["metadata"]["annotations"]["megatron-ext/job-name"] == "LongSkywork 13B!"
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                         "name": runtime["metadata"]["name"]}
    t = job["spec"]["trainer"]
    assert (t["numNodes"], t["numProcPerNode"], t["image"]) == (4, 8, "reg/megatron-ext:1")
    assert t["command"] == ["torchrun", "-m", "megatron_ext.train", "--config", PAPER, "--set", "optim.train_iters=10"]
    assert t["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": 8}}
    env = {e["name"]: e["value"] for e in t["env"]}
    assert env["PYTHONFAULTHANDLER"] == "1" and env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert not [k for k in env if k.startswith("PET_")]  # the Trainer owns those (its webhook rejects them)
    grace = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"]
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == str(grace)  # torchrun's SIGKILL waits as long as the pod's
    # The runtime: the torch policy, and the replicated job the Trainer's torch plugin fills in.
    assert runtime["spec"]["mlPolicy"]["torch"] == {}
    jobset = runtime["spec"]["template"]["spec"]
    assert jobset["failurePolicy"]["maxRestarts"] == 3
    (node,) = jobset["replicatedJobs"]
    assert node["name"] == "node"
    assert node["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    pod = node["template"]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["node"] and pod["containers"][0]["workingDir"] == REPO
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]


def test_cpu_and_installed_runtime_variants():
    (job,) = docs("--config", TINY, "--nodes", "1", "--gpus-per-node", "2", "--device", "cpu",
                  "--runtime", "torch-distributed", "--job-name", "42 tiny")
    assert job["kind"] == "TrainJob" and job["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert job["metadata"]["name"] == "job-42-tiny"  # a TrainJob name starts with a letter
    t = job["spec"]["trainer"]
    assert "resourcesPerNode" not in t and t["numProcPerNode"] == 2
    assert not [e for e in t["env"] if e["name"].startswith("NCCL")]
    res = render("--template", "trainjob", "--config", TINY, "--gpus-per-node", "2", "--device", "cpu",
                 "--runtime", "Bad_Name", check=False)
    assert res.returncode == 2 and "--runtime 'Bad_Name'" in res.stderr


def test_layout_is_checked_before_writing(tmp_path):
    out = tmp_path / "job.yaml"
    res = render("--template", "trainjob", "--config", PAPER, "--nodes", "2", "--gpus-per-node", "6",
                 "--out", str(out), check=False)
    assert res.returncode == 2 and "does not divide the world size 12" in res.stderr and not out.exists()
    render("--template", "trainjob", "--config", PAPER, "--nodes", "2", "--gpus-per-node", "8", "--out", str(out))
    assert out.exists() and not os.access(out, os.X_OK)


# Each mutation is something the API server rejects; the validator must too.
MUTATIONS = {
    "misspelt field": (1, lambda j: j["spec"]["trainer"].update(numProcsPerNode=8), "numProcsPerNode"),
    "string count": (1, lambda j: j["spec"]["trainer"].update(numNodes="4"), "is not of type 'integer'"),
    "name starts with a digit": (1, lambda j: j["metadata"].update(name="4job"), "metadata.name"),
    "name too long": (1, lambda j: j["metadata"].update(name="a" * 64), "63"),
    "no runtime name": (1, lambda j: j["spec"]["runtimeRef"].pop("name"), "'name' is a required property"),
    "duplicate env": (1, lambda j: j["spec"]["trainer"]["env"].append({"name": "PYTHONFAULTHANDLER", "value": "0"}),
                      "duplicate keys"),
    "bad quantity": (1, lambda j: j["spec"]["trainer"].update(resourcesPerNode={"limits": {"nvidia.com/gpu": "8 GPUs"}}),
                     "does not match"),
    "wrong version": (1, lambda j: j.update(apiVersion="kubeflow.org/v1"), "trainer.kubeflow.org/v1alpha1"),
    "label value": (1, lambda j: j["metadata"]["labels"].update(app="a b"), "does not match"),
    "two ML policies": (0, lambda r: r["spec"]["mlPolicy"].update(mpi={}), "Only one of the policy"),
    "runtime in a namespace": (0, lambda r: r["metadata"].update(namespace="team"), "namespace"),
    "int32 overflow": (0, lambda r: r["spec"]["template"]["spec"]["failurePolicy"].update(maxRestarts=2**31),
                       "is greater than the maximum"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_validator_rejects_what_the_api_server_rejects(name, crds):
    objs = docs("--config", PAPER, "--nodes", "4", "--gpus-per-node", "8")
    which, mutate, text = MUTATIONS[name]
    obj = copy.deepcopy(objs[which])
    mutate(obj)
    errors = crds[obj["kind"]].errors(obj)
    assert errors and any(re.search(re.escape(text), e) for e in errors), (name, errors)
