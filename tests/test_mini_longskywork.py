"""Mini-LongSkywork at toy sizes: every arm, 2 iterations a stage, one eval length.

One run is killed in the middle of the ``full`` arm (during its long SFT stage) and
resumed: the resumed run repeats no finished stage, then writes the report."""
import json
import os
import signal
import subprocess
import sys
import time

from megatron_ext.experiments.mini_longskywork import report
from megatron_ext.experiments.mini_longskywork.stages import ARMS, STAGES, needed
from tests.test_train import REPO

CMD = [sys.executable, "-m", "megatron_ext.experiments.mini_longskywork", "--toy"]


def _run_until(out: str, marker: str, timeout_s: float = 150) -> list:
    """Start a toy run and SIGKILL its whole process group once ``marker`` is printed."""
    proc = subprocess.Popen(CMD + ["--out", out], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines, t0 = [], time.monotonic()
    try:
        for line in proc.stdout:
            lines.append(line)
            if marker in line or time.monotonic() - t0 > timeout_s:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert any(marker in x for x in lines), "".join(lines[-30:])
    return lines


def _check_results(res: dict) -> None:
    assert set(res) == {"L0", "L1", "arms"} and (res["L0"], res["L1"]) == (384, 768)
    assert set(res["arms"]) == set(ARMS)
    for arm, tasks in res["arms"].items():
        assert set(tasks) == {"passkey", "needle", "synl"}, arm
        for task, by_length in tasks.items():
            assert list(by_length) == ["384"], (arm, task)
            assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in by_length.values()), (arm, task)


def test_toy_run_killed_mid_arm_resumes_without_repeating_a_stage(tmp_path):
    out = str(tmp_path / "mini")
    _run_until(out, "[stage 4/8 long_sft] iteration 1/2")  # base, cpt and sft are finished
    finished = ["base", "cpt", "sft"]
    before = {s: os.path.getsize(f"{out}/stages/{s}/metrics.jsonl") for s in finished}
    assert not os.path.exists(f"{out}/stages/long_sft/DONE.json")
    res = subprocess.run(CMD + ["--out", out], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--resume" in res.stderr  # an existing run is never silently overwritten
    res = subprocess.run(CMD + ["--out", out, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for s in finished:
        assert f"mini: stage {s} finished earlier, skipped" in res.stdout
        assert f"mini: stage {s} start" not in res.stdout
        assert os.path.getsize(f"{out}/stages/{s}/metrics.jsonl") == before[s], s  # not trained again
    assert "mini: stage long_sft start" in res.stdout and "[stage 4/8 long_sft]" in res.stdout
    assert all(os.path.exists(f"{out}/stages/{s.name}/DONE.json") for s in needed(list(ARMS)))
    assert not os.path.exists(f"{out}/stages/long_sft_template")  # the diagnostic arm is not in "all"
    _check_results(json.load(open(f"{out}/results.json")))
    text = open(f"{out}/report.md").read()
    for section in ("## Setup", "## Accuracy", "## What held and what did not", "## Stages", "## Sizes",
                    "total time", "tokens/s/rank"):
        assert section in text, section
    assert text.count("| ") > 6 * 3  # a row per arm and task
    for arm in ARMS:
        assert f"| {arm} | {ARMS[arm]} | passkey |" in text
        for task in ("passkey", "needle"):
            assert os.path.getsize(f"{out}/heatmaps/{arm}_{task}.png") > 1000
    assert os.path.getsize(f"{out}/losses.png") > 1000


def test_arms_share_stages_and_verdict_reads_the_numbers():
    assert [s.name for s in needed(["full"])] == ["base", "cpt", "sft", "long_sft"]
    assert [s.name for s in needed(["no-cip"])] == ["base", "cpt_concat", "sft_concat", "long_sft_concat"]
    assert len(needed(list(ARMS))) == len(STAGES) - 1 == 8  # no stage twice; the template arm adds one
    arms = {a: {"passkey": {"4096": 0.1}, "needle": {"4096": 0.1}, "synl": {"4096": 0.0}} for a in ARMS}
    arms["full"] = {"passkey": {"4096": 0.95}, "needle": {"4096": 0.9}, "synl": {"4096": 0.5}}
    lines = report.verdict({"L0": 512, "L1": 4096, "arms": arms})
    assert lines[0].startswith("The target") and " held: full 0.95" in lines[0]
    assert any("SynL in the long SFT helped" in x for x in lines)
    assert lines[-1].endswith("agrees with the paper (synthetic long data helps).")
    arms["no-synl"] = arms["full"]
    assert report.verdict({"L0": 512, "L1": 4096, "arms": arms})[-1].endswith("(synthetic data did not help).")
