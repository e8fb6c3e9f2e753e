"""The planner: one parameter/FLOP formula (checked against megatron-core's own model),
the memory model's sanity cases, the time model's ranking, the CLI and the dry run."""
import json
import os
import re

import pytest

from megatron_ext.distributed import spawn_ranks
from megatron_ext.plan import model as pm
from megatron_ext.plan.__main__ import main as plan_main
from megatron_ext.plan.layouts import Layout
from megatron_ext.plan.memory import estimate_memory, stage_params
from megatron_ext.plan.planner import config_recompute, evaluate, plan, run_shape
from megatron_ext.plan.time import hardware
from megatron_ext.train.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = {s: os.path.join(REPO, f"launch/configs/longskywork_13b_200k_{s}.yaml") for s in ("pretrain", "sft", "long_sft")}
BEST = re.compile(r"^best: TP=(\d+) PP=(\d+) CP=(\d+) DP=(\d+) \(cp_comm_type [a-z_+0-9= ]+\) memory ([\d.]+) GiB "
                  r"of ([\d.]+) GiB, ~\d+ tokens/s/GPU$")
# (swiglu, normalization, bias, untied, heads, groups)
SHAPES = [(True, "RMSNorm", False, True, 4, 2), (False, "LayerNorm", True, False, 4, 4)]


def _count_worker(rank, world_size, shapes):
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ext.megatron.cpu import enable_cpu_runtime
    from megatron_ext.megatron.model import build_gpt_model
    from megatron_ext.megatron.specs import get_gpt_layer_cp_spec

    enable_cpu_runtime()
    parallel_state.initialize_model_parallel(world_size, 1)
    model_parallel_cuda_manual_seed(1)
    counts = []
    for swiglu, norm, bias, untied, heads, groups in shapes:
        config = TransformerConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=heads,
                                   num_query_groups=groups, use_cpu_initialization=True, attention_dropout=0.0,
                                   hidden_dropout=0.0, tensor_model_parallel_size=world_size, gated_linear_unit=swiglu,
                                   activation_func=torch.nn.functional.silu if swiglu else torch.nn.functional.gelu,
                                   normalization=norm, add_bias_linear=bias)  # SP: no param change
        model = build_gpt_model(config, vocab_size=128, max_sequence_length=64,
                                layer_spec=get_gpt_layer_cp_spec(normalization=norm),
                                share_embeddings_and_output_weights=not untied)
        counts.append(sum(p.numel() for p in model.parameters()))
    parallel_state.destroy_model_parallel()
    return counts


def _shape(swiglu, norm, bias, untied, heads, groups):
    return pm.ModelShape(2, 64, 96, heads, groups, 128, swiglu, norm == "LayerNorm", bias, untied)


@pytest.mark.parametrize("tp", [1, 2])
def test_parameter_count_is_megatron_cores(tp):
    counts = spawn_ranks(_count_worker, tp, (SHAPES,), timeout_s=90)[0]
    for args, got in zip(SHAPES, counts):
        shape = _shape(*args)
        lay = Layout(tp, 1, 1, 1)
        assert stage_params(shape, lay, True, True) == got, (args, got)
        if tp == 1:
            assert pm.parameter_count(shape) == got


def test_one_flops_formula_counts_swiglu_third_matrix():
    from megatron_ext.train import metrics

    assert metrics.flops_per_token is pm.flops_per_token  # the log uses the planner's formula
    cfg = load_config(PAPER["pretrain"])
    h, f, layers, v, s = 4608, 12288, 52, 65536, 196608
    matrices = 4 * h * h + 3 * h * f  # MHA: QKV 3h^2 + proj h^2; SwiGLU fc1 [2f, h] + fc2 [h, f]
    assert pm.flops_per_token(cfg) == 3 * (2 * layers * matrices + 2 * layers * s * h + 2 * h * v)
    assert pm.flops_per_token(cfg, recompute=True) == pm.flops_per_token(cfg) + 2 * layers * (matrices + s * h)
    assert abs(pm.parameter_count(pm.model_shape(cfg)) / 1e9 - 13.85) < 0.01


def _ev(stage, gpus, **kw):
    cfg = load_config(PAPER[stage])
    lay = Layout(**{"tp": 1, "pp": 1, "cp": 1, "dp": gpus, "recompute": True, **kw})
    return evaluate(pm.model_shape(cfg), run_shape(cfg), lay, hardware("H100", {}), 8, 80.0)


def test_memory_sanity_at_13b_200k_on_64_gpus():
    assert not _ev("pretrain", 64).fits  # TP=1 PP=1 CP=1: weights+grads alone are 77 GiB
    for stage in PAPER:  # the paper configs' own layouts fit
        cfg = load_config(PAPER[stage])
        p = cfg.parallel
        ev = _ev(stage, 64 // (p.tensor_model_parallel_size * p.context_parallel_size), tp=p.tensor_model_parallel_size,
                 cp=p.context_parallel_size, cp_comm_type=p.cp_comm_type, recompute=config_recompute(cfg))
        assert ev.fits and ev.gib > 20, (stage, ev.gib)
    # the distributed optimizer shards 12 B/param over DP x CP; without it every GPU holds all of it
    cfg = load_config(PAPER["pretrain"], ["parallel.use_distributed_optimizer=false"])
    lay = Layout(2, 1, 4, 8)
    off = estimate_memory(pm.model_shape(cfg), run_shape(cfg), lay)
    on = estimate_memory(pm.model_shape(cfg), run_shape(load_config(PAPER["pretrain"])), lay)
    assert off.parts["optimizer"] == pytest.approx(on.parts["optimizer shard"] * 32)


def test_best_layout_fits_and_multiplies_to_the_gpu_count():
    cfg = load_config(PAPER["long_sft"])
    evals = plan(pm.model_shape(cfg), run_shape(cfg), 128, 8, hardware("H100", {}), 80.0)
    best = evals[0]
    assert best.fits and best.gib <= 80.0 and best.layout.world == 128
    assert all(e.time["tokens_per_s_per_gpu"] <= best.time["tokens_per_s_per_gpu"] for e in evals if e.fits)


def test_ring_beats_all_gather_for_mha_at_200k_across_nodes():
    # TP=2 x CP=8 spans two 8-GPU nodes; MHA (36 KV heads) makes all-gather's K/V large
    ring = _ev("pretrain", 4, tp=2, cp=8)
    gather = _ev("pretrain", 4, tp=2, cp=8, cp_comm_type="all_gather")
    assert ring.time["tokens_per_s_per_gpu"] > gather.time["tokens_per_s_per_gpu"]
    assert ring.memory.peak_bytes < gather.memory.peak_bytes


def test_cli_table_layout_and_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert plan_main(["--config", PAPER["pretrain"], "--gpus", "64", "--top", "5", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    m = BEST.match(lines[-1])
    assert m, lines[-1]
    tp, pp, cp, dp = map(int, m.groups()[:4])
    assert tp * pp * cp * dp == 64 and float(m.group(5)) <= float(m.group(6)) == 80
    data = json.loads(out.read_text())
    assert data["layouts"][0]["fits"] and len(data["layouts"]) > 100
    assert plan_main(["--config", PAPER["pretrain"], "--gpus", "64", "--layout", "tp=1,pp=1,cp=1"]) == 0
    text = capsys.readouterr().out
    assert "does not fit" in text and "logits + loss" in text and "optimizer shard" in text


@pytest.mark.parametrize("argv, says", [
    (["--gpus", "0"], "must be positive"),
    (["--gpus", "12"], "whole number of 8-GPU nodes"),
    (["--gpus", "7"], "no valid layout"),
    (["--gpus", "64", "--gpu", "V100"], "unknown GPU"),
    (["--gpus", "64", "--set", "data.seq_length=196607"], "divides by 2 x CP for no CP size"),
    (["--gpus", "64", "--layout", "tp=3,cp=2"], "does not divide --gpus 64"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, says, capsys):
    assert plan_main(["--config", PAPER["pretrain"]] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


@pytest.mark.parametrize("name", ["cp1", "cp2", "cp2-recompute", "cp2-selective", "tp2", "tp2-sp", "pp2"])
def test_memory_model_within_15_percent_of_measured(name):
    """Peak tensor memory of what the trainer builds and steps (megatron_ext.train's
    build_model, wrap_model, build_optimizer, Trainer.step through megatron-core's
    schedule: GPTModel, DDP with its fp32 grad buffer, the distributed optimizer) on
    gloo ranks, from the torch profiler's memory events, against the planner's
    prediction. pp2: 1F1B over 2 micro-batches, the fuller stage; tp2-sp: sequence parallel."""
    from bench.plan_vs_measured import CASES, measure, predicted

    case = next(c for c in CASES if c.name == name)
    got, want = measure(case), predicted(case)
    assert abs(want / got - 1) <= 0.15, (name, want / 2 ** 20, got / 2 ** 20)
