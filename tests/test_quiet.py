"""Quiet CLIs: on CPU our commands print their own output and no third-party warning;
-v shows them; on CUDA megatron-core's TE/Apex fallback warnings stay visible (#23 row 6)."""
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from data_tools import common, quiet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARNING_LINE = re.compile(r"^\S+:\d+: \w*Warning: ", re.M)
FALLBACK = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."


def _emit(message, category, module):
    """A warning attributed to ``module``, as the library itself would raise it."""
    warnings.warn_explicit(message, category, f"/site-packages/{module.replace('.', '/')}.py", 24, module=module)


def _seen_after(setup):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        setup()
        _emit(FALLBACK, UserWarning, "megatron.core.optimizer")
        _emit("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning,
              "torch.distributed.checkpoint.planner_helpers")
        _emit("our own warning", UserWarning, "megatron_ext.train.loop")
    return [str(w.message) for w in seen]


@pytest.mark.parametrize("cuda", [False, True])
def test_fallback_warning_visible_only_on_cuda(monkeypatch, cuda):
    from megatron_ext.cli import quiet_cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setenv(quiet.VERBOSE_ENV, "0")  # restored afterwards, whatever quiet_cli sets
    seen = _seen_after(lambda: quiet_cli([]))
    assert (FALLBACK in seen) == cuda, seen
    assert "our own warning" in seen  # only third-party notices are filtered
    assert not any("ShardedTensor" in s for s in seen)


def test_train_main_keeps_fallback_warning_on_cuda(monkeypatch):
    """train/__main__ used to filter the TE/Apex notices unconditionally."""
    from megatron_ext.train.__main__ import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(quiet.VERBOSE_ENV, "0")  # restored afterwards, whatever quiet_cli sets
    config = os.path.join(REPO, "launch/configs/longskywork_13b_200k_pretrain.yaml")
    seen = _seen_after(lambda: main(["--config", config, "--dry-run", "--world-size", "64"]))
    assert FALLBACK in seen and not any("ShardedTensor" in s for s in seen)


def test_verbose_shows_everything(monkeypatch):
    from megatron_ext.cli import quiet_cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(quiet.VERBOSE_ENV, "0")  # restored afterwards, whatever quiet_cli sets
    seen = _seen_after(lambda: quiet_cli(["--config", "x.yaml", "-v"]))
    assert FALLBACK in seen and any("ShardedTensor" in s for s in seen)
    assert os.environ[quiet.VERBOSE_ENV] == "1"  # spawned workers inherit it


def test_progress_off_the_terminal_or_when_disabled(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setenv(quiet.PROGRESS_ENV, "0")
    assert isinstance(common.progress(total=3), common._Silent)
    monkeypatch.setenv(quiet.PROGRESS_ENV, "1")
    bar = common.progress(total=3)
    assert not isinstance(bar, common._Silent)
    bar.close()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert isinstance(common.progress(total=3), common._Silent)


def _run(args, env):
    return subprocess.run([sys.executable, "-m"] + args, capture_output=True, text=True, timeout=180, cwd=REPO,
                          env=env)


def test_cli_stderr_has_no_third_party_warnings_on_cpu(data, tmp_path):
    """A training run, its resume (checkpoint loading) and an HF export, in subprocesses."""
    env = {k: v for k, v in os.environ.items() if k != quiet.VERBOSE_ENV}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    save = tmp_path / "run"
    sets = ["parallel.context_parallel_size=1", "model.hidden_size=64", "model.ffn_hidden_size=128",
            "model.swiglu=true", "model.normalization=RMSNorm", "model.add_bias_linear=false",
            "data.seq_length=256", "optim.global_batch_size=2", "logging.wandb=false", "checkpoint.save_interval=1",
            f"data.blend=[1.0, {data['pre']}]", f"data.tokenizer_model={data['tok']}", f"checkpoint.save_dir={save}"]
    train = ["megatron_ext.train", "--config", "launch/configs/tiny_cpu_pretrain.yaml"] + [
        a for s in sets for a in ("--set", s)]
    res = _run(train + ["--set", "optim.train_iters=1"], env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "iteration" in res.stdout and not WARNING_LINE.search(res.stderr), res.stderr[-3000:]
    res = _run(train + ["--set", "optim.train_iters=2"], env)  # resumes: loads the checkpoint
    assert res.returncode == 0 and not WARNING_LINE.search(res.stderr), res.stderr[-3000:]
    res = _run(["megatron_ext.convert", "export-hf", "--checkpoint", str(save), "--out", str(tmp_path / "hf")], env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "exported" in res.stdout and not WARNING_LINE.search(res.stderr), res.stderr[-3000:]
    res = _run(["megatron_ext.convert", "export-hf", "-v", "--checkpoint", str(save), "--out",
                str(tmp_path / "hf2")], env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Transformer Engine and Apex are not installed" in res.stderr  # -v: everything shows
