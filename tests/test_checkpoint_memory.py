"""The planner's host-memory model of a checkpoint (megatron_ext.plan.host_memory): against
a measured save and load on gloo ranks (VmHWM, bench/checkpoint_memory.py), its rank
placement per node, and its line in the dry run and the planner."""
import os
import subprocess
import sys

import pytest

from bench.checkpoint_memory import Case, available_formats, measure, predicted
from megatron_ext.plan.host_memory import FORMATS, checkpoint_host_memory, rank_bytes
from megatron_ext.plan.layouts import Layout, PlanError
from megatron_ext.plan.planner import config_layout, shape_and_run
from megatron_ext.train.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(REPO, "launch/configs/longskywork_13b_200k_pretrain.yaml")
GIB = 2 ** 30


@pytest.mark.parametrize("fmt", available_formats())
def test_model_within_20_percent_of_measured_peak_rss(fmt):
    """DP=2: the save's DP-rank 0 gathers (fully_reshardable), rank 1 does not; both load."""
    case = Case("dp2", dp=2)
    ranks, pred = measure(case, fmt), predicted(case, fmt)
    for op in ("save", "load"):
        measured = max(r[f"{op}_bytes"] for r in ranks)
        want = pred[f"{op}_rank_bytes"]
        if want == 0:  # nothing modelled: the measurement must be small next to the state (12 B/param)
            assert measured < 0.1 * predicted(case, "fully_reshardable")["load_rank_bytes"], (op, measured)
            continue
        assert abs(want / measured - 1) <= 0.2, (fmt, op, want, measured, ranks)


def paper():
    cfg = load_config(PAPER, [])
    shape, run = shape_and_run(cfg)
    return shape, run, config_layout(cfg, 64)


def test_only_dp_rank_0_of_each_optimizer_group_gathers():
    """TP2 x CP4 fills a node (tp-cp-ep-dp-pp order): node 0 holds the two ranks with cp = dp = 0."""
    shape, run, lay = paper()
    assert (lay.tp, lay.cp, lay.dp) == (2, 4, 8)
    est = checkpoint_host_memory(shape, run, lay, "fully_reshardable", 8)
    gather = rank_bytes(shape, run, lay, "fully_reshardable", 0, True, True)
    other = rank_bytes(shape, run, lay, "fully_reshardable", 0, False, True)
    assert est.save_node_bytes == pytest.approx(2 * gather["save"] + 6 * other["save"])
    assert est.load_node_bytes == pytest.approx(8 * gather["load"])  # every rank reads the whole TP shard
    assert est.written_node_bytes == pytest.approx(2 * gather["written"] + 6 * other["written"])
    dp = checkpoint_host_memory(shape, run, lay, "dp_reshardable", 8)
    assert dp.save_node_bytes < est.save_node_bytes / 5 and dp.load_node_bytes < est.load_node_bytes / 4
    # fully parallel: every node writes 1/8 of the same bytes, node 0 writes all the optimizer state
    assert dp.written_node_bytes * 8 == pytest.approx(est.written_node_bytes + 7 * 8 * other["written"])
    assert checkpoint_host_memory(shape, run, lay, "dp_reshardable", 8, write_gib_s=4).save_s == \
        pytest.approx(dp.save_s / 2)
    with pytest.raises(PlanError, match="checkpoint format 'zarr'"):
        checkpoint_host_memory(shape, run, lay, "zarr")


def test_paper_dry_runs_show_host_memory_under_1_tib():
    for stage in ("pretrain", "sft", "long_sft"):
        out = subprocess.run([sys.executable, "-m", "megatron_ext.train", "--config",
                              os.path.join(REPO, f"launch/configs/longskywork_13b_200k_{stage}.yaml"), "--dry-run",
                              "--world-size", "64"], capture_output=True, text=True, cwd=REPO).stdout
        line = next(x for x in out.splitlines() if "host memory per node during checkpoint:" in x)
        gib = float(line.split(":")[1].split("GiB")[0])
        assert 0 < gib < 1024 and "under 1 TiB" in line, line
        for fmt in FORMATS:
            assert fmt in out


def test_plan_cli_prints_host_memory_and_save_time_above_best():
    out = subprocess.run([sys.executable, "-m", "megatron_ext.plan", "--config", PAPER, "--gpus", "64",
                          "--ckpt-write-gib-s", "4"], capture_output=True, text=True, cwd=REPO).stdout.splitlines()
    assert out[-1].startswith("best:")
    assert any("host memory per node during checkpoint:" in x for x in out)
    assert any("at 4 GiB/s per node" in x for x in out)
