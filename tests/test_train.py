"""The training driver end to end (gloo, CPU): stages, exact resume, faults,
SIGTERM, restarts, another CP size, dry runs. Tests of the CLI, torchrun or
signals launch torchrun; tests of what training computes use ``train_spawned``."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
        "model.num_query_groups=2", "data.seq_length=256", "optim.global_batch_size=4", "optim.warmup_iters=2",
        "logging.wandb=false", "logging.log_interval=1"]


def _sets(data, save_dir, prefix, extra):
    """The --set overrides of one tiny run: TINY, the data and tokenizer, the save folder, then ``extra``."""
    return TINY + [f"data.blend=[1.0, {data[prefix]}]", f"data.tokenizer_model={data['tok']}",
                   f"checkpoint.save_dir={save_dir}", *extra]


def train_cmd(data, save_dir, nproc=4, config="tiny_cpu_pretrain.yaml", extra=(), restarts=0, prefix="pre"):
    sets = _sets(data, save_dir, prefix, extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--max-restarts",
           str(restarts), "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
           "-m", "megatron_ext.train", "--config", os.path.join(REPO, "launch/configs", config)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def train(*args, timeout=120, **kw):
    res = subprocess.run(train_cmd(*args, **kw), capture_output=True, text=True, timeout=timeout)
    return res


def _stage_worker(rank, world, config, sets):
    """What `megatron_ext.train` runs on each rank once its world is up; the exit code, stdout and stderr."""
    import contextlib
    import io

    from megatron_ext.train.config import load_config, validate
    from megatron_ext.train.loop import run_stage

    cfg = load_config(config, sets)
    validate(cfg, world)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_stage(cfg)
    return code, out.getvalue(), err.getvalue()


def train_spawned(data, save_dir, nproc=4, config="tiny_cpu_pretrain.yaml", extra=(), prefix="pre", timeout=120):
    """The run of ``train`` on spawn_ranks' processes instead of torchrun's (no per-rank import of
    megatron-core under the suite's forkserver): for tests of what training computes, not of the
    CLI or torchrun. Returns rank 0's exit code, stdout and stderr (Python-level writes); a rank
    that raises makes this raise with its traceback."""
    from types import SimpleNamespace

    from megatron_ext.distributed import spawn_ranks

    sets = _sets(data, save_dir, prefix, extra)
    code, out, err = spawn_ranks(_stage_worker, nproc, (os.path.join(REPO, "launch/configs", config), sets),
                                 timeout_s=timeout)[0]
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def losses(save_dir):
    recs = [json.loads(line) for line in open(os.path.join(save_dir, "metrics.jsonl"))]
    return [r for r in recs if "loss" in r]  # training iterations (validation records carry valid_loss)


def test_config_errors_name_the_problem(tmp_path):
    base = [sys.executable, "-m", "megatron_ext.train", "--config", os.path.join(REPO, "launch/configs/tiny_cpu_pretrain.yaml")]
    cases = {"model.hidden=64": "unknown config keys ['model.hidden']",
             "stage=warmup": "stage 'warmup' is not one of",
             "data.seq_length=1001": "must divide by 2 x CP = 4",
             "optim.global_batch_size=3": "multiple of micro_batch_size x DP",
             "optim.lr=fast": "config key optim.lr: expected float, got 'fast'",
             "optim.train_iters=2.5": "config key optim.train_iters: expected int, got 2.5",
             "logging.wandb=maybe": "config key logging.wandb: expected bool"}
    for override, text in cases.items():
        res = subprocess.run(base + ["--set", override, "--dry-run", "--world-size", "4"], capture_output=True, text=True)
        assert res.returncode == 2 and text in res.stderr, (override, res.stderr)
    res = subprocess.run(base + ["--dry-run", "--world-size", "3"], capture_output=True, text=True)
    assert res.returncode == 2 and "does not divide the world size 3" in res.stderr


def test_config_reads_numbers_yaml_leaves_as_text():
    from megatron_ext.train.config import load_config

    cfg = load_config(os.path.join(REPO, "launch/configs/tiny_cpu_pretrain.yaml"),
                      ["optim.lr=1e-3", "optim.train_iters=1e2", "model.rope.abf_base=5e6"])
    assert (cfg.optim.lr, cfg.optim.train_iters, cfg.model.rope.abf_base) == (1e-3, 100, 5e6)
    assert isinstance(cfg.optim.lr, float) and isinstance(cfg.optim.train_iters, int)


@pytest.mark.parametrize("stage", ["pretrain", "sft", "long_sft"])
def test_paper_scale_configs_pass_dry_run(stage):
    res = subprocess.run([sys.executable, "-m", "megatron_ext.train", "--config",
                          os.path.join(REPO, f"launch/configs/longskywork_13b_200k_{stage}.yaml"), "--dry-run",
                          "--world-size", "64", "--gpu-memory-gib", "80"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    seq = "8192" if stage == "sft" else "196608"
    assert "TP=2 (sequence parallel on)" in res.stdout and "13.85 B" in res.stdout, res.stdout
    assert f"sequence {seq} tokens" in res.stdout and "expect:" in res.stdout
    for part in ("weights", "grads (fp32 buffer)", "optimizer shard", "activations saved", "logits + loss",
                 "layer backward temporaries (p2p attention)"):
        assert part in res.stdout, part
    assert re.fullmatch(r"memory per GPU: [\d.]+ GiB of 80 GiB: fits", res.stdout.strip().splitlines()[-1])


def test_dry_run_exits_1_when_the_layout_does_not_fit():
    res = subprocess.run([sys.executable, "-m", "megatron_ext.train", "--config", os.path.join(
        REPO, "launch/configs/longskywork_13b_200k_pretrain.yaml"), "--dry-run", "--world-size", "64",
        "--set", "parallel.tensor_model_parallel_size=1", "--set", "parallel.context_parallel_size=8",
        "--set", "parallel.sequence_parallel=false"],
        capture_output=True, text=True)
    assert res.returncode == 1, res.stderr
    assert re.fullmatch(r"memory per GPU: [\d.]+ GiB of 80 GiB: does not fit", res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def six_iterations(data, tmp_path_factory):
    """One uninterrupted 6-iteration run (CP=2 x DP=2, no checkpoint before the final one), shared
    read-only by the tests below that need it: the same command was launched twice."""
    save = str(tmp_path_factory.mktemp("six_iterations") / "run")
    res = train_spawned(data, save, extra=["optim.train_iters=6", "checkpoint.save_interval=10"])
    assert res.returncode == 0, res.stderr[-2000:]
    return save


def test_three_stages_and_exact_resume(data, six_iterations, tmp_path):
    full, cut = six_iterations, str(tmp_path / "cut")
    res = train_spawned(data, cut, extra=["optim.train_iters=6", "checkpoint.save_interval=3"])
    assert res.returncode == 0, res.stderr[-2000:]
    # Stop at 3: drop step-6 and the log lines after 3, then resume.
    import shutil
    shutil.rmtree(os.path.join(cut, "step-6"))
    with open(os.path.join(cut, "metrics.jsonl")) as f:
        head = f.readlines()[:3]
    with open(os.path.join(cut, "metrics.jsonl"), "w") as f:
        f.writelines(head)
    res = train_spawned(data, cut, extra=["optim.train_iters=6", "checkpoint.save_interval=3"])
    assert "resumed from" in res.stdout and "step-3 at iteration 3" in res.stdout
    assert [r["loss"] for r in losses(full)] == [r["loss"] for r in losses(cut)]  # bitwise
    assert losses(full)[-1]["loss"] < losses(full)[0]["loss"]
    sft = str(tmp_path / "sft")
    res = train(data, sft, config="tiny_cpu_sft.yaml", prefix="sft",
                extra=["optim.train_iters=3", f"checkpoint.init_from={full}", "data.seq_length=512"])
    assert res.returncode == 0 and "initialised weights from" in res.stdout, res.stderr[-2000:]
    long_sft = str(tmp_path / "long_sft")
    res = train(data, long_sft, config="tiny_cpu_long_sft.yaml", prefix="sft",
                extra=["optim.train_iters=2", f"checkpoint.init_from={sft}", "data.seq_length=1024"])
    assert res.returncode == 0 and "initialised weights from" in res.stdout, res.stderr[-2000:]
    assert all(r["loss"] == r["loss"] for r in losses(sft) + losses(long_sft))


def test_activation_recompute_gives_the_same_losses(data, two_iterations, tmp_path):
    save = str(tmp_path / "recompute_true")
    res = train_spawned(data, save, nproc=2, extra=["optim.train_iters=2", "recompute=true"])
    assert res.returncode == 0, res.stderr[-2000:]
    # two_iterations: the same run with recompute=false (the default)
    runs = {"false": [r["loss"] for r in losses(two_iterations)], "true": [r["loss"] for r in losses(save)]}
    assert all(abs(a - b) <= 1e-6 * abs(a) for a, b in zip(runs["false"], runs["true"])), runs


def test_nan_steps_are_skipped_then_stop(data, tmp_path):
    res = train(data, str(tmp_path / "a"), nproc=2, extra=["optim.train_iters=4", "fault.inject_nan_at=[2]"])
    assert res.returncode == 0, res.stderr[-2000:]
    recs = losses(str(tmp_path / "a"))
    assert [r["nan"] for r in recs] == [0, 1, 0, 0] and recs[-1]["skipped"] == 1
    res = train(data, str(tmp_path / "b"), nproc=2, extra=["optim.train_iters=6", "fault.inject_nan_at=[2,3,4]",
                                                          "fault.max_consecutive_nonfinite=3"])
    assert res.returncode != 0 and "3 consecutive non-finite steps" in res.stderr + res.stdout


def test_sigterm_saves_and_exits_cleanly(data, tmp_path):
    save = str(tmp_path / "run")
    proc = subprocess.Popen(train_cmd(data, save, nproc=2, extra=["optim.train_iters=500", "checkpoint.save_interval=1000"]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = os.path.join(save, "metrics.jsonl")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not (os.path.exists(log) and len(open(log).readlines()) >= 2):
        time.sleep(0.2)
    # SIGTERM to the trainer processes (torchrun's own agent turns a SIGTERM to itself
    # into exit code 1 after forwarding it, so the workers are signalled directly).
    for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
        os.kill(int(pid), signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: saved at iteration" in out
    from megatron_ext.train.checkpoint import complete_steps
    steps = complete_steps(save)
    assert steps and steps[-1] < 500


def test_partial_checkpoint_is_ignored_and_other_cp_size_resumes(data, six_iterations, tmp_path):
    save = str(tmp_path / "run")
    assert train_spawned(data, save, extra=["optim.train_iters=4", "checkpoint.save_interval=2"]).returncode == 0
    os.remove(os.path.join(save, "step-4", "COMPLETE"))  # as if killed while saving step 4
    res = train_spawned(data, save, extra=["optim.train_iters=6", "checkpoint.save_interval=2",
                                   "parallel.context_parallel_size=1"])  # CP=1 x DP=4 now
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout and "step-2 at iteration 2" in res.stdout
    a = [r["loss"] for r in losses(six_iterations)][2:]
    b = [r["loss"] for r in losses(save)][-4:]
    assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b)), (a, b)


def test_torchrun_restart_resumes_after_a_killed_rank(data, tmp_path):
    save = str(tmp_path / "run")
    proc = subprocess.Popen(train_cmd(data, save, nproc=2, restarts=1,
                                      extra=["optim.train_iters=8", "checkpoint.save_interval=2"]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    from megatron_ext.train.checkpoint import complete_steps
    while time.monotonic() < deadline and not complete_steps(save):
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert workers, "no worker processes found"
    os.kill(int(workers[-1]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out and complete_steps(save) == [6, 8]  # keep_last=2 pruned the older ones


SFT_SCRATCH = ["checkpoint.init_from=''", "checkpoint.save_interval=10", "precision=fp32"]


def test_sft_packing_cp2_dp2_matches_one_process_and_logs_fill_rate(data, tmp_path):
    # SynL examples of 346-405 tokens: two whole examples per 768-token sample
    runs = {}
    for name, nproc, cp, tp in (("one", 1, 1, 1), ("cp2dp2", 4, 2, 1), ("tp2cp2", 4, 2, 2)):
        save = str(tmp_path / name)  # tp2cp2: sequence parallel, documents padded to 2 x CP x TP
        res = train_spawned(data, save, nproc=nproc, config="tiny_cpu_sft.yaml", prefix="sft",
                    extra=SFT_SCRATCH + ["optim.train_iters=3", "data.seq_length=768",
                                         f"parallel.context_parallel_size={cp}",
                                         f"parallel.tensor_model_parallel_size={tp}"])
        assert res.returncode == 0, res.stderr[-2000:]
        fill = re.search(r"packing=sft: (\d+) examples in (\d+) samples of 768 tokens, fill rate (0\.\d+) "
                         r"\(real tokens / seq_length\)", res.stdout)
        assert fill and int(fill[1]) > int(fill[2]) and float(fill[3]) > 0.8, res.stdout[-2000:]
        runs[name] = [r["loss"] for r in losses(save)]
    for layout in ("cp2dp2", "tp2cp2"):
        a, b = runs["one"], runs[layout]
        assert len(a) == len(b) == 3 and all(abs(x - y) <= 1e-4 * abs(x) for x, y in zip(a, b)), runs


def test_sft_packing_overlong_example_is_named_unless_dropped(data, tmp_path):
    from data_tools.indexed import read_index

    lengths = read_index(data["sft"] + "_text_document").lengths.tolist()
    first = next(i for i, n in enumerate(lengths) if n > 384)
    sets = SFT_SCRATCH + ["optim.train_iters=1", "data.seq_length=384", "parallel.context_parallel_size=1",
                          "model.num_layers=1"]
    res = train(data, str(tmp_path / "a"), nproc=1, config="tiny_cpu_sft.yaml", prefix="sft", extra=sets)
    assert res.returncode != 0 and f"example {first} has {lengths[first]} tokens, more than seq_length=384" \
        in res.stderr, res.stderr[-2000:]
    res = train(data, str(tmp_path / "b"), nproc=1, config="tiny_cpu_sft.yaml", prefix="sft",
                extra=sets + ["data.drop_overlong=true"])
    assert res.returncode == 0 and re.search(r"fill rate 0\.\d+ .*, [1-9]\d* overlong dropped", res.stdout), \
        res.stderr[-2000:]


def test_packing_needs_micro_batch_size_one_and_no_pipeline():
    for override, text in (("optim.micro_batch_size=2", "optim.micro_batch_size must be 1 with data.packing=sft"),
                           ("parallel.pipeline_model_parallel_size=2", "pipeline_model_parallel_size must be 1 with "
                                                                       "data.packing=sft")):
        res = subprocess.run([sys.executable, "-m", "megatron_ext.train", "--config",
                              os.path.join(REPO, "launch/configs/tiny_cpu_sft.yaml"), "--set", override,
                              "--dry-run", "--world-size", "4"], capture_output=True, text=True)
        assert res.returncode == 2 and text in res.stderr, res.stderr


def test_document_masks_change_pretraining_loss(data, tmp_path):
    runs = {}
    for flag in ("false", "true"):
        save = str(tmp_path / flag)
        res = train_spawned(data, save, nproc=2, extra=["optim.train_iters=1", "model.num_layers=1",
                                                f"data.document_masks={flag}"])
        assert res.returncode == 0, res.stderr[-2000:]
        runs[flag] = losses(save)[0]["loss"]
    # the same tokens, but with attention cut at EODs (and no loss on each EOD's next-document label)
    assert runs["true"] == runs["true"] and runs["true"] != runs["false"], runs
