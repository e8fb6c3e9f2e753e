"""Interleaved 1F1B (PP x VP model chunks per rank) through megatron-core's schedule
on gloo: per-iteration parity with one process from one shared checkpoint, a
checkpoint saved at PP=2 x VP=2 resuming at PP=1, and the config refusals."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.test_train import losses
from tests.test_train_core import CONFIG, _cfg

# 4 layers, 4 micro-batches of 1 sample, fp32, constant learning rate (clipping on: the
# grad norm spans both chunks of both stages); save at 2 to resume from there
BASE = ["model.num_layers=4", "checkpoint.format=fully_reshardable",  # resumed at other layouts
        "optim.global_batch_size=4", "optim.micro_batch_size=1", "optim.train_iters=4",
        "optim.warmup_iters=0", "optim.lr=1e-3", "optim.min_lr=1e-3", "precision=fp32",
        "checkpoint.save_interval=2", "parallel.context_parallel_size=1",
        "data.split=90,10,0", "logging.eval_iters=1"]  # and a validation (forward-only schedule) at the end
VPP = ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"]


def _reference_worker(rank, world, data, root):
    """PP=1 on one process: save the initial weights (the shared start), then train."""
    from megatron_ext.train import checkpoint as ckpt
    from megatron_ext.train.config import to_dict
    from megatron_ext.train.loop import Trainer

    cfg = _cfg(data, os.path.join(root, "one"), BASE)
    trainer = Trainer(cfg)
    ckpt.save_model_checkpoint(os.path.join(root, "init"), 0, trainer.model, to_dict(cfg))
    return trainer.train()


def _interleaved_worker(rank, world, data, root):
    """PP=2 x VP=2 from the shared weights; returns each chunk's global layer numbers and ends."""
    from megatron_ext.train.loop import Trainer, model_of

    cfg = _cfg(data, os.path.join(root, "vpp"), BASE + VPP + [f"checkpoint.init_from={root}/init"])
    trainer = Trainer(cfg)
    note = trainer.restore()
    chunks = [(c.pre_process, c.post_process, [layer.layer_number for layer in c.decoder.layers])
              for c in model_of(trainer)]
    return {"note": note, "chunks": chunks, "rc": trainer.train()}


def _valid_loss(save):
    recs = [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl"))]
    (loss,) = [r["valid_loss"] for r in recs if "valid_loss" in r]
    return loss


def _resume_worker(rank, world, data, save, sets):
    from megatron_ext.train.loop import run_stage

    return run_stage(_cfg(data, save, BASE + sets))


def _resume(data, root, src, name, sets, world):
    """Losses of iterations 3 and 4, resumed from ``src``'s step-2 (weights and optimizer)."""
    from megatron_ext.distributed import spawn_ranks

    save = os.path.join(root, name)
    os.makedirs(save)
    shutil.copytree(os.path.join(root, src, "step-2"), os.path.join(save, "step-2"))
    assert spawn_ranks(_resume_worker, world, (data, save, sets), timeout_s=120) == [0] * world
    return [r["loss"] for r in losses(save)]


def test_interleaved_pipeline_matches_one_process_and_reshards_on_resume(data, tmp_path):
    from megatron_ext.distributed import spawn_ranks

    root = str(tmp_path)
    assert spawn_ranks(_reference_worker, 1, (data, root), timeout_s=120) == [0]
    ref = [r["loss"] for r in losses(os.path.join(root, "one"))]
    out = spawn_ranks(_interleaved_worker, 2, (data, root), timeout_s=150)
    assert all(o["rc"] == 0 and o["note"].startswith("initialised weights from") for o in out), out
    # mcore's interleaving: rank r's chunk i holds layer r + 1 + i * PP; rank 0's chunk 0
    # embeds, rank 1's chunk 1 has the output layer
    assert [o["chunks"] for o in out] == [[(True, False, [1]), (False, False, [3])],
                                          [(False, False, [2]), (False, True, [4])]], out
    got = [r["loss"] for r in losses(os.path.join(root, "vpp"))]
    valid = [_valid_loss(os.path.join(root, name)) for name in ("one", "vpp")]
    print("per-iteration lm loss PP=1:", ref, "PP=2 x VP=2:", got, "validation:", valid)
    assert len(ref) == len(got) == 4 and ref[0] != ref[-1]
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(got + valid[1:], ref + valid[:1])), (got, ref, valid)
    # a checkpoint saved at PP=2 x VP=2 resumes at PP=1, and one saved at PP=1 at PP=2 x VP=2
    for name, src, sets, world, want in (("to_pp1", "vpp", [], 1, got[2:]), ("to_vpp", "one", VPP, 2, ref[2:])):
        resumed = _resume(data, root, src, name, sets, world)
        print(f"resumed {name} from {src}'s step-2:", resumed)
        assert len(resumed) == 2 and all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(resumed, want)), (name, resumed)


def test_interleaved_pipeline_config_refusals():
    from megatron_ext.train.config import load_config, validate

    def check(sets, world):
        return validate(load_config(CONFIG, ["parallel.context_parallel_size=1", *sets]), world)

    ok = ["model.num_layers=4", *VPP]
    assert check(ok + ["optim.global_batch_size=4"], 2)["grad_accum"] == 4
    assert check(["parallel.virtual_pipeline_model_parallel_size=1"], 2)["dp"] == 2  # 1: no interleaving
    cases = {("model.num_layers=4", "parallel.virtual_pipeline_model_parallel_size=2"):
             "virtual_pipeline_model_parallel_size 2 needs parallel.pipeline_model_parallel_size > 1",
             ("model.num_layers=6", *VPP):
             "pipeline_model_parallel_size x virtual_pipeline_model_parallel_size = 2 x 2 = 4 must divide "
             "model.num_layers 6",
             (*ok, "parallel.virtual_pipeline_model_parallel_size=0"): "must be unset or >= 1",
             (*ok, "optim.global_batch_size=3"): "= 3 / 1 = 3, to be a multiple of parallel.pipeline_model_parallel_size 2",
             (*ok, "optim.global_batch_size=1"): "= 1 / 1 = 1, to be a multiple of parallel.pipeline_model_parallel_size 2"}
    for sets, text in cases.items():
        with pytest.raises(ValueError) as err:
            check(sets, 2)
        assert text in str(err.value), (sets, str(err.value))
    res = subprocess.run([sys.executable, "-m", "megatron_ext.train", "--config", CONFIG, "--dry-run",
                          "--world-size", "4", *[x for s in ok + ["parallel.context_parallel_size=1"]
                                                 for x in ("--set", s)]], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "PP=2 (virtual 2) CP=1" in res.stdout, res.stderr


def _first_layer_weight(rank, world):
    from megatron_ext.train.config import TrainConfig
    from megatron_ext.train.model import build_model, init_model_parallel, init_seed

    cfg = TrainConfig()
    cfg.parallel.pipeline_model_parallel_size = 2
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.ffn_hidden_size = 2, 32, 64
    cfg.model.num_attention_heads = cfg.model.num_query_groups = 2
    init_model_parallel(cfg)
    model, _ = build_model(cfg, 64)
    layer = model.decoder.layers[0]
    return init_seed(cfg), layer.layer_number, layer.mlp.linear_fc1.weight.detach().clone()


def test_pipeline_stages_draw_their_layers_from_different_seeds():
    """Megatron-LM seeds each pipeline rank with seed + 100 x rank; stage 1's first layer
    (global layer 2) must not start as a copy of stage 0's (global layer 1)."""
    from megatron_ext.distributed import spawn_ranks

    (s0, n0, w0), (s1, n1, w1) = spawn_ranks(_first_layer_weight, 2, timeout_s=120)
    assert (s1 - s0, n0, n1) == (100, 1, 2)
    assert w0.shape == w1.shape and not torch.equal(w0, w1)
