"""Issue #23's CUDA-path fixes that CPU tests can pin down: list-typed config overrides,
torchrun.sh's environment, the conversion device, the grad-finite skip in fp32, and
packed SFT blends through validate(), the dry run and the dataset."""
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CFG = os.path.join(REPO, "launch/configs/tiny_cpu_pretrain.yaml")


# -- row 8: list element types from the command line -------------------------------------------
def test_list_override_takes_a_scalar_and_checks_element_types():
    from megatron_ext.train.config import load_config

    assert load_config(TINY_CFG, ["fault.inject_nan_at=5"]).fault.inject_nan_at == [5]
    assert load_config(TINY_CFG, ["fault.inject_nan_at=[2, 3.0]"]).fault.inject_nan_at == [2, 3]
    with pytest.raises(ValueError, match=r"fault.inject_nan_at\[1\]: expected int, got 'x'"):
        load_config(TINY_CFG, ["fault.inject_nan_at=[2, x]"])
    res = subprocess.run([sys.executable, "-m", "megatron_ext.train", "--config", TINY_CFG, "--set",
                          "fault.inject_nan_at=5", "--dry-run", "--world-size", "4"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_torchrun_sh_exports_cuda_device_max_connections(tmp_path):
    (tmp_path / "envdump.py").write_text(
        "import os\nprint('CDMC=' + os.environ.get('CUDA_DEVICE_MAX_CONNECTIONS', 'unset'), flush=True)\n")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_DEVICE_MAX_CONNECTIONS"}
    env.update(CONFIG=TINY_CFG, NPROC="1", PYTHON=sys.executable, MODULE="envdump",
               PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    res = subprocess.run([os.path.join(REPO, "launch/torchrun.sh")], capture_output=True, text=True, env=env,
                         timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "CDMC=1" in res.stdout, res.stdout


# -- row 5: an inf gradient with a finite loss skips the step ----------------------------------
def _inf_grad_worker(rank, world, data, save, extra):
    from megatron_ext.train.loop import Trainer
    from megatron_ext.train.model import unwrap
    from tests.test_train_core import _cfg

    trainer = Trainer(_cfg(data, save, ["precision=fp32", "optim.warmup_iters=0", *extra]))
    batches, _ = trainer._data()
    params = dict(unwrap(trainer.model[0]).named_parameters())
    name = next(n for n in params if n.endswith("linear_fc1.weight"))
    run = trainer._run_schedule

    def poisoned(micro_batches, forward_only):  # the loss stays finite; one grad element becomes inf
        out = run(micro_batches, forward_only)
        params[name].main_grad.view(-1)[3] = float("inf")
        return out

    before = {n: p.detach().clone() for n, p in params.items()}
    trainer._run_schedule = poisoned
    bad = trainer.step(next(batches))
    after_bad = {n: p.detach().clone() for n, p in params.items()}
    trainer._run_schedule = run
    good = trainer.step(next(batches))
    moved = max(float((p.detach() - after_bad[n]).abs().max()) for n, p in params.items())
    return {"bad": bad, "good": good, "moved": moved, "finite": all(torch.isfinite(t).all() for t in after_bad.values()),
            "unchanged": all(torch.equal(before[n], after_bad[n]) for n in before)}


@pytest.mark.parametrize("dist_opt", [True, False])
def test_inf_in_one_gradient_skips_the_step_in_fp32(data, tmp_path, dist_opt):
    from megatron_ext.distributed import spawn_ranks

    out = spawn_ranks(_inf_grad_worker, 1, (data, str(tmp_path), [f"parallel.use_distributed_optimizer={dist_opt}",
                                                                  "parallel.context_parallel_size=1"]),
                      timeout_s=150)[0]
    import math
    assert math.isfinite(out["bad"]["loss"]) and not out["bad"]["finite"], out["bad"]
    assert out["finite"] and out["unchanged"]
    assert out["good"]["finite"] and out["moved"] > 0  # the next, clean step trains


# -- row 3: conversion builds on the requested device, even where CUDA exists --------------------
def test_conversion_stays_on_cpu_when_cuda_is_available(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from megatron_ext.convert import export_hf, forward_logits, import_hf
    from megatron_ext.megatron.cpu import enable_cpu_runtime
    from megatron_ext.train.model import transformer_config
    from megatron_ext.train.config import TrainConfig
    from tests.test_convert import _hf_logits, _hf_model, _save

    model = _hf_model("llama")
    src = _save(model, tmp_path / "hf")
    enable_cpu_runtime()  # the CPU patches stay applied; from here on the process believes it has a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    moved = []

    def no_cuda(what):
        def refuse(self, *args, **kw):
            moved.append(what)
            raise AssertionError(f"{what}.cuda() called during a device='cpu' conversion")
        return refuse

    module_to, tensor_to = torch.nn.Module.to, torch.Tensor.to

    def checked(original, what):
        def to(self, *args, **kw):
            target = kw.get("device", args[0] if args else None)
            if target is not None and not isinstance(target, torch.dtype) and "cuda" in str(target):
                moved.append(what)
                raise AssertionError(f"{what}.to({target}) during a device='cpu' conversion")
            return original(self, *args, **kw)
        return to

    monkeypatch.setattr(torch.nn.Module, "cuda", no_cuda("Module"))
    monkeypatch.setattr(torch.Tensor, "cuda", no_cuda("Tensor"))
    monkeypatch.setattr(torch.nn.Module, "to", checked(module_to, "Module"))
    monkeypatch.setattr(torch.Tensor, "to", checked(tensor_to, "Tensor"))
    assert transformer_config(TrainConfig(), "cpu").use_cpu_initialization
    assert not transformer_config(TrainConfig(), "cuda").use_cpu_initialization  # the trainer's GPU path
    import_hf(src, str(tmp_path / "ours"))
    ids = torch.randint(0, 512, (1, 16))
    ours = forward_logits(str(tmp_path / "ours"), ids)
    export_hf(str(tmp_path / "ours"), str(tmp_path / "back"))
    assert not moved and ours.device.type == "cpu"
    monkeypatch.undo()
    torch.testing.assert_close(ours, _hf_logits(model, ids), rtol=1e-4, atol=1e-4)


def test_convert_cli_takes_a_device():
    res = subprocess.run([sys.executable, "-m", "megatron_ext.convert", "export-hf", "--help"], capture_output=True,
                         text=True)
    assert res.returncode == 0 and "--device" in res.stdout


# -- row 2: packed SFT blends, the same description in validate(), the run and the dry run -------
def _example_ids(ds):
    """(first token, length) of every real example in every bin of ``ds``."""
    out = []
    for i in range(len(ds)):
        s, at = ds[i], 0
        for n in s["doc_lengths"]:
            if int(s["tokens"][at]) >= 1000:
                out.append((int(s["tokens"][at]), n))
            at += n
    return out


def test_packed_sft_blend_is_weighted_by_example_count_and_deterministic(tmp_path):
    from collections import Counter

    from megatron_ext.train.packing import PackedSftDataset
    from tests.test_packing import _write_sft

    a_len = [40 + 2 * i for i in range(12)]  # even lengths: prefix a; odd: prefix b
    b_len = [51, 61, 71, 81]
    _write_sft(str(tmp_path / "a"), a_len)
    _write_sft(str(tmp_path / "b"), b_len, seed=1)
    blend = [(0.25, str(tmp_path / "a")), (0.75, str(tmp_path / "b"))]
    ds = PackedSftDataset(blend, 256, seed=5)
    seen = Counter(_example_ids(ds))
    a = {k: v for k, v in seen.items() if k[1] % 2 == 0}
    b = {k: v for k, v in seen.items() if k[1] % 2 == 1}
    # 16 examples in all: a draws round(16 x 0.25) = 4 distinct ones, b round(16 x 0.75) = 12: each 3 times
    assert sum(a.values()) == 4 and set(a.values()) == {1}
    assert b == {(1000 + i, n): 3 for i, n in enumerate(b_len)}
    assert all(n == a_len[t - 1000] for t, n in a)  # whole examples, as written
    assert _example_ids(PackedSftDataset(blend, 256, seed=5)) == _example_ids(ds)  # deterministic
    others = [{k for k in _example_ids(PackedSftDataset(blend, 256, seed=s)) if k[1] % 2 == 0} for s in range(6, 10)]
    assert any(o != set(a) for o in others)  # the subset is drawn by the seed
    assert "from 2 prefixes" in ds.summary()


def test_blend_rules_hold_in_validate_and_the_dry_run(tmp_path):
    from megatron_ext.train.config import load_config, validate

    long_sft = os.path.join(REPO, "launch/configs/longskywork_13b_200k_long_sft.yaml")
    for sets, text in ((["data.blend=[0, a, 1, b]"], "data.blend[0]: weight 0 of 'a' must be a positive number"),
                       (["data.blend=[1, a, 1, a]"], "names a prefix twice"),
                       (["data.document_masks=true"], "data.document_masks applies to data.packing=none")):
        with pytest.raises(ValueError, match=text.replace("[", r"\[").replace("]", r"\]")):
            validate(load_config(long_sft, sets), 64)
        res = subprocess.run([sys.executable, "-m", "megatron_ext.train", "--config", long_sft, "--dry-run",
                              "--world-size", "64", *[a for s in sets for a in ("--set", s)]],
                             capture_output=True, text=True)
        assert res.returncode == 2 and "config error" in res.stderr, res.stderr
    res = subprocess.run([sys.executable, "-m", "megatron_ext.train", "--config", long_sft, "--dry-run",
                          "--world-size", "64"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert ("data: packed SFT (whole examples, blend weighted by example count); blend 0.5 x data/synl_200k, "
            "0.5 x data/sft_mix_200k") in res.stdout
    assert "data files: 0 of 8 found on this machine" in res.stdout


def test_training_on_a_packed_sft_blend(data, tmp_path):
    import shutil

    from tests.test_train import SFT_SCRATCH, losses, train

    for suffix in ("_text_document", "_loss_mask_document"):
        for ext in (".bin", ".idx"):
            shutil.copy(data["sft"] + suffix + ext, str(tmp_path / "other") + suffix + ext)
    save = str(tmp_path / "run")
    res = train(data, save, nproc=1, config="tiny_cpu_sft.yaml", prefix="sft",
                extra=["optim.train_iters=2", "data.seq_length=768", "parallel.context_parallel_size=1",
                       f"data.blend=[0.5, {data['sft']}, 0.5, {tmp_path / 'other'}]", *SFT_SCRATCH])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "from 2 prefixes" in res.stdout and len(losses(save)) == 2
