"""Recompute choices (#23 item 3): model.recompute_* mapped onto megatron-core's own
TransformerConfig options, the old boolean kept as an alias, bad settings named, the
planner's memory/time ordering none > selective > full, and the paper configs' dry runs."""
import os
import re
import subprocess
import sys

import pytest
import torch

from megatron_ext.plan.layouts import FULL_RECOMPUTE, Layout, Recompute
from megatron_ext.plan.model import model_shape
from megatron_ext.plan.planner import config_layout, evaluate, run_shape
from megatron_ext.plan.time import hardware
from megatron_ext.train.config import load_config, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "launch/configs/tiny_cpu_pretrain.yaml")
PAPER = {s: os.path.join(REPO, f"launch/configs/longskywork_13b_200k_{s}.yaml") for s in ("pretrain", "sft", "long_sft")}


@pytest.mark.parametrize("sets, want", [
    ([], (None, None, None, ["core_attn"])),  # mcore's default list, inert without a granularity
    (["recompute=true"], ("full", "uniform", 1, ["core_attn"])),  # the old switch
    (["model.recompute_granularity=full"], ("full", "uniform", 1, ["core_attn"])),
    (["model.recompute_granularity=full", "model.recompute_method=block", "model.recompute_num_layers=1"],
     ("full", "block", 1, ["core_attn"])),
    (["model.recompute_granularity=selective"], ("selective", None, None, ["core_attn"])),
    (["model.recompute_granularity=selective", "model.recompute_modules=[core_attn, mlp]"],
     ("selective", None, None, ["core_attn", "mlp"])),
])
def test_recompute_keys_map_onto_megatron_core(sets, want):
    from megatron_ext.train.model import transformer_config

    cfg = load_config(TINY, sets)
    validate(cfg, 4)
    c = transformer_config(cfg, "cpu")
    assert (c.recompute_granularity, c.recompute_method, c.recompute_num_layers, c.recompute_modules) == want


@pytest.mark.parametrize("sets, says", [
    (["model.recompute_granularity=some"], "model.recompute_granularity 'some' is not one of full, selective"),
    (["recompute=true", "model.recompute_granularity=selective"], "contradicts model.recompute_granularity selective"),
    (["model.recompute_modules=[mlp]"], "needs model.recompute_granularity selective"),
    (["model.recompute_granularity=selective", "model.recompute_modules=[moe]"], "model.recompute_modules ['moe']"),
    (["model.recompute_granularity=selective", "model.recompute_num_layers=1"], "applies to model.recompute_granularity full"),
    (["model.recompute_granularity=full", "model.recompute_method=random"], "is not one of uniform, block"),
    (["model.recompute_granularity=selective", "model.recompute_modules=[layernorm]"], "layernorm needs model.transformer_impl"),
    (["model.recompute_granularity=full", "model.recompute_num_layers=3"], "between 1 and the layers per pipeline chunk"),
])
def test_bad_recompute_settings_are_named(sets, says):
    with pytest.raises(ValueError) as err:
        validate(load_config(TINY, sets), 4)
    assert says in str(err.value)


def test_planner_orders_none_selective_full():
    cfg = load_config(PAPER["pretrain"])
    base = config_layout(cfg, 64)
    evs = {}
    for name, rc in (("none", Recompute()), ("selective", Recompute("selective", ("core_attn", "mlp"))),
                     ("full", FULL_RECOMPUTE)):
        evs[name] = evaluate(model_shape(cfg), run_shape(cfg), Layout(**{**base.__dict__, "recompute": rc}),
                             hardware("H100", {}), 8, 80.0)
    mem = {k: e.memory.peak_bytes for k, e in evs.items()}
    step = {k: e.time["step_s"] for k, e in evs.items()}
    assert mem["none"] > mem["selective"] > mem["full"], mem
    assert step["none"] < step["selective"] < step["full"], step
    # full recompute repeats the ring forward: its CP and TP traffic grows too, not only compute
    assert evs["full"].time["tp comm"] > evs["none"].time["tp comm"]
    # block k recomputes k layers: between none and full in both
    block = evaluate(model_shape(cfg), run_shape(cfg), Layout(**{**base.__dict__, "recompute": Recompute(
        "full", (), "block", 26)}), hardware("H100", {}), 8, 80.0)
    assert mem["full"] < block.memory.peak_bytes < mem["none"] and step["none"] < block.time["step_s"] < step["full"]


@pytest.mark.parametrize("stage", sorted(PAPER))
def test_paper_configs_take_the_cheapest_recompute_that_fits(stage):
    res = subprocess.run([sys.executable, "-m", "megatron_ext.train", "--config", PAPER[stage], "--dry-run",
                          "--world-size", "64"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "data: packed SFT" in out or "data: megatron-core GPTDataset" in out  # the run's data description
    assert re.fullmatch(r"memory per GPU: [\d.]+ GiB of 80 GiB: fits", out.strip().splitlines()[-1])
    rows = re.findall(r"^    (\S+) +([\d.]+) GiB +(fits|does not fit) +([\d.]+) s/step(  <- this config)?$", out, re.M)
    assert len(rows) >= 5, out
    mine = [r for r in rows if r[4]]
    assert len(mine) == 1 and mine[0][2] == "fits"
    fitting = [float(r[3]) for r in rows if r[2] == "fits"]
    assert float(mine[0][3]) == min(fitting), rows  # nothing listed that fits is faster
    assert "Recompute:" in open(PAPER[stage]).read()  # the config says why


def _recompute_runs(data, tmp_path, none, runs):
    """Train 2 iterations (2 ranks, CP=2) with each of ``runs``; the losses must match ``none``,
    the save dir of the same run without recompute (the two_iterations fixture)."""
    from tests.test_train import losses, train_spawned

    got = {"none": [r["loss"] for r in losses(none)]}
    for name, extra in runs:
        save = str(tmp_path / name)
        res = train_spawned(data, save, nproc=2, extra=["optim.train_iters=2", *extra])
        assert res.returncode == 0, res.stderr[-2000:]
        got[name] = [r["loss"] for r in losses(save)]
    for name, _ in runs:
        assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(got["none"], got[name])), got


def test_block_recompute_trains_like_none(data, two_iterations, tmp_path):
    """megatron-core's full recompute of the first layer only (the paper configs' method)."""
    _recompute_runs(data, tmp_path, two_iterations, [("block", ["model.recompute_granularity=full", "model.recompute_method=block",
                                                "model.recompute_num_layers=1"])])


def _selective_worker(rank, world_size, modules):
    """One step of a 1-layer GPT (CP=2, ring) without recompute and with selective ``modules``;
    after the recomputed forward every parameter must still be a leaf."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_ext.megatron.batch import cp_masked_loss, get_batch_on_this_cp_rank
    from megatron_ext.megatron.cpu import enable_cpu_runtime
    from tests.gpt_harness import build_model, make_batch

    enable_cpu_runtime()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=2)
    model_parallel_cuda_manual_seed(1)
    try:
        out = {}
        for name, kw in (("none", {}), ("selective", dict(recompute_granularity="selective",
                                                          recompute_modules=list(modules)))):
            model = build_model(1, 2, "p2p", num_layers=1, **kw)
            local = get_batch_on_this_cp_rank(make_batch(cp=2), parallel_state.get_context_parallel_group())
            per_token = model(local["tokens"], local["position_ids"], None, labels=local["labels"])
            not_leaves = sorted(n for n, p in model.named_parameters() if not p.is_leaf)
            if not_leaves:  # a backward now would recompute without end: stop here
                return {"not_leaves": not_leaves}
            loss, _, _ = cp_masked_loss(per_token, local["loss_mask"],
                                        parallel_state.get_data_parallel_group(with_context_parallel=True))
            loss.backward()
            out[name] = (per_token.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        return out
    finally:
        parallel_state.destroy_model_parallel()


def test_selective_mlp_recompute_keeps_the_bias_a_leaf_and_the_grads():
    """megatron-core's MLP returns linear_fc2's bias parameter; checkpointed, that parameter got
    the checkpoint node as grad_fn and the backward recursed into it (#23). Our spec's
    linear_fc2 returns a view: parameters stay leaves, outputs and grads match no recompute (1e-6 rel)."""
    from megatron_ext.distributed import spawn_ranks

    for res in spawn_ranks(_selective_worker, 2, (("core_attn", "mlp"),), timeout_s=600):
        assert "not_leaves" not in res, res
        (out0, g0), (out1, g1) = res["none"], res["selective"]
        assert torch.allclose(out0, out1, rtol=1e-6, atol=0), (out0 - out1).abs().max()
        assert g0.keys() == g1.keys() and any("linear_fc2.bias" in n for n in g0)
        for n in g0:
            assert (g0[n] - g1[n]).abs().max() <= 1e-6 * g0[n].abs().max(), n


def test_selective_recompute_trains_like_none(data, two_iterations, tmp_path):
    """megatron-core checkpoints our CP core attention and the MLP (with biases: the tiny config's
    add_bias_linear). Before our spec's linear_fc2 returned a view of its bias,
    this recursed without end in the first backward (memory grows until killed: 5 GiB in
    30 s here), so first check, for free, that the spec still wraps linear_fc2."""
    from megatron.core.tensor_parallel import RowParallelLinear

    from megatron_ext.megatron.mlp import bias_view_linear
    from megatron_ext.megatron.specs import get_gpt_layer_cp_spec

    assert get_gpt_layer_cp_spec().submodules.mlp.submodules.linear_fc2 is bias_view_linear(RowParallelLinear)
    _recompute_runs(data, tmp_path, two_iterations, [("selective", ["model.recompute_granularity=selective",
                                                    "model.recompute_modules=[core_attn, mlp]"])])
