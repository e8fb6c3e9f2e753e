"""Mini-LongSkywork at toy sizes: every arm, 2 iterations a stage, one eval length.

One run is killed in the middle of the ``full`` arm (during its long SFT stage) and
resumed: the resumed run repeats no finished stage, then writes the report."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

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
    counts = {a: {"passkey": {"4096": 20}, "needle": {"4096": 20}, "synl": {"4096": 4}} for a in ARMS}
    lines = report.verdict({"L0": 512, "L1": 4096, "arms": arms}, counts)
    assert lines[0].startswith("The target") and " held: full 0.95 (20 cells)" in lines[0]
    assert any("SynL in the long SFT helped" in x and "full 0.93 (40 cells) vs no-synl 0.10 (40 cells)" in x
               for x in lines)
    assert lines[-1].endswith("agrees with the paper (synthetic long data helps).")
    arms["no-synl"] = arms["full"]
    assert report.verdict({"L0": 512, "L1": 4096, "arms": arms}, counts)[-1].endswith("(synthetic data did not help).")


def test_verdict_is_inconclusive_when_every_arm_is_at_the_floor():
    """Issue #25 finding 6: every arm at 0.00 used to read 'agrees with ProLong'."""
    arms = {a: {"passkey": {"768": 0.0}, "needle": {"768": 0.0}, "synl": {"768": 0.0}} for a in ARMS}
    arms["no-cip"]["passkey"]["768"] = 0.1  # a stray hit stays under the floor
    evals = {a: {"cells": [{"task": t, "length": 768} for t in ("passkey", "needle") for _ in range(10)]}
             for a in ARMS}
    counts = report.cell_counts(evals)
    assert counts["full"] == {"passkey": {"768": 10}, "needle": {"768": 10}, "synl": {}}
    lines = report.verdict({"L0": 384, "L1": 768, "arms": arms}, counts)
    assert lines[0].startswith("Inconclusive: no arm clears the floor") and "no-cip 0.05 (20 cells)" in lines[0]
    assert not any("agrees with" in x for x in lines)
    assert lines[-1].startswith("On synthetic long SFT data this run is inconclusive")
    assert any(x.startswith("SynL in the long SFT is inconclusive") and "(20 cells)" in x for x in lines)
    arms["no-synl"]["passkey"]["768"] = arms["no-synl"]["needle"]["768"] = 0.5  # one arm clears: conclusive
    lines = report.verdict({"L0": 384, "L1": 768, "arms": arms}, counts)
    assert not lines[0].startswith("Inconclusive") and lines[-1].endswith("(synthetic data did not help).")
    assert any(x.startswith("SynL in the long SFT hurt retrieval") for x in lines)


def test_haystack_split_by_content_keeps_copies_on_one_side():
    """Issue #25 finding 5: the same changelog under several packages sat on both sides of an index split."""
    import json as _json

    from megatron_ext.experiments.mini_longskywork.data import content_key, split_held_out

    texts = [f"pkg{i} (1.{i}) unstable; urgency=low\n  * change {i}\n" for i in range(30)]
    lines = [_json.dumps({"text": t}) for t in texts]
    lines += [_json.dumps({"text": texts[i] + "  "}) for i in range(0, 30, 3)]  # copies (trailing space differs)
    lines += [lines[0], lines[6], lines[12]]  # byte-identical copies
    haystack, train, dropped = split_held_out(lines, 5)
    held = {content_key(x) for x in haystack}
    assert len(haystack) == len(held) == 5
    assert not held & {content_key(x) for x in train}  # no text on both sides
    assert len(train) + len(haystack) + dropped == len(lines) and dropped >= 1
    assert train == [x for x in lines if content_key(x) not in held]  # input order
    by_index = set(range(0, len(lines), len(lines) // 5)[:5])  # the old split: copies on both sides
    rest = {content_key(x) for i, x in enumerate(lines) if i not in by_index}
    assert {content_key(lines[i]) for i in by_index} & rest
    with pytest.raises(RuntimeError, match="only 30 distinct documents .43 with copies"):
        split_held_out(lines, 16)
