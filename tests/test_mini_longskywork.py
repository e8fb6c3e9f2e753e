"""Mini-LongSkywork at toy sizes: every arm, 2 iterations a stage, one eval length.

One run is killed in the middle of the ``full`` arm (during its long SFT stage) and
resumed: the resumed run repeats no finished stage, then writes the report. Its base
trained on copy-rich text that holds none of the evaluation; its gate passed (threshold
0). Another run's gate cannot pass (threshold above 1): it stops after ``base``."""
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
    """Start a toy run (gate threshold 0: it passes) and SIGKILL its whole process group once ``marker``
    is printed."""
    proc = subprocess.Popen(CMD + ["--out", out, "--gate-threshold", "0"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
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


def _check_controls(res: dict) -> None:
    assert set(res) == {"L0", "L1", "arms", "controls"} and (res["L0"], res["L1"]) == (384, 768)
    assert list(res["controls"]) == ["base-own-rope"]
    for task, by_length in res["controls"]["base-own-rope"].items():
        assert task in ("passkey", "needle") and list(by_length) == ["192", "384"], task
        assert all(0.0 <= v <= 1.0 for v in by_length.values())


def _check_copy_data(out: str) -> None:
    """The base's copy-rich text: every kind, and nothing of the evaluation (template wording, or
    haystack lines that no training document has)."""
    from data_tools.synth.copytext import eval_hits
    from megatron_ext.eval.needle import cell_prompt
    from data_tools.common import load_tokenizer
    from data_tools.synth.needle import read_haystack

    rows = [json.loads(x) for x in open(f"{out}/data/copy.jsonl")]
    assert {r["meta"]["kind"] for r in rows} == {"span", "repeat", "keys"}
    text = "\n".join(r["text"] for r in rows)
    sp = load_tokenizer(f"{out}/tok.model")
    prompts = [cell_prompt(read_haystack([f"{out}/haystack.jsonl"]), k, 0, sp, 384, 50.0)["sample"]["prompt"]
               for k in ("passkey", "needle")]
    assert all(eval_hits(p) for p in prompts)  # the scan sees the real evaluation prompts
    assert not eval_hits(text)
    train = {ln.strip() for x in open(f"{out}/docs.jsonl") for ln in json.loads(x)["text"].splitlines()}
    hay = [ln.strip() for x in open(f"{out}/haystack.jsonl") for ln in json.loads(x)["text"].splitlines()]
    only = [ln for ln in hay if len(ln) >= 20 and ln not in train]
    assert only and not [ln for ln in only if ln in text]
    import sentencepiece as spm

    pieces = spm.SentencePieceProcessor(model_file=f"{out}/tok.model").encode_as_pieces("51252")
    assert [p for p in pieces if p.strip("\u2581")] == list("51252")  # split digits
    base = open(f"{out}/configs/base.yaml").read()
    assert "lr_decay_style: WSD" in base and "lr_wsd_decay_iters: 1" in base and "data/copy" in base


def _check_results(res: dict) -> None:
    _check_controls(res)
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
    _check_copy_data(out)
    assert json.load(open(f"{out}/gate.json"))["passed"] is True
    text = open(f"{out}/report.md").read()
    assert "Gate passed (base-own-rope passkey at L0 0.00, threshold 0.00" in text
    assert "| base-own-rope | passkey |" in text
    assert "Arms with passkey >= 0.90 at 384 tokens:" in text and "supervised tokens per sample" in text
    assert "copy-rich text" in text
    for section in ("## Setup", "## Accuracy", "## What held and what did not", "## Stages", "## Sizes",
                    "total time", "tokens/s/rank"):
        assert section in text, section
    assert text.count("| ") > 6 * 3  # a row per arm and task
    for arm in ARMS:
        assert f"| {arm} | {ARMS[arm]} | passkey |" in text
        for task in ("passkey", "needle"):
            assert os.path.getsize(f"{out}/heatmaps/{arm}_{task}.png") > 1000
    assert os.path.getsize(f"{out}/losses.png") > 1000


def test_toy_run_stops_at_the_gate_when_the_base_cannot_copy(tmp_path):
    out = str(tmp_path / "mini")
    res = subprocess.run(CMD + ["--out", out, "--gate-threshold", "1.01"], cwd=REPO, capture_output=True,
                         text=True, timeout=420)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "mini: gate stopped the run: base-own-rope passkey at L0" in res.stdout
    assert "mini: stage cpt start" not in res.stdout and not os.path.exists(f"{out}/stages/cpt")
    gate = json.load(open(f"{out}/gate.json"))
    assert gate["passed"] is False and gate["ignored"] is False and gate["threshold"] == 1.01
    results = json.load(open(f"{out}/results.json"))
    _check_controls(results)
    assert list(results["arms"]) == ["base"]  # the finished arm only
    text = open(f"{out}/report.md").read()
    assert "STOPPED AT THE GATE: the base cannot copy" in text and "| base-own-rope | needle |" in text


def test_toy_run_on_one_rank_as_on_one_gpu(tmp_path):
    """--nproc 1 (one GPU's layout): the long stage and the evaluation run at CP = 1; --base-iters
    sets the base stage's length, its WSD decay keeping its share."""
    out = str(tmp_path / "mini")
    res = subprocess.run(CMD + ["--out", out, "--gate-threshold", "0", "--arms", "cpt-only", "--nproc", "1",
                                "--base-iters", "4"], cwd=REPO, capture_output=True, text=True, timeout=420)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    import yaml

    cpt, base = (yaml.safe_load(open(f"{out}/configs/{n}.yaml")) for n in ("cpt", "base"))
    assert cpt["parallel"]["context_parallel_size"] == 1 and cpt["data"]["seq_length"] == 768
    assert (base["optim"]["train_iters"], base["optim"]["lr_wsd_decay_iters"]) == (4, 2)
    assert json.load(open(f"{out}/experiment.json"))["nproc"] == 1
    assert "iteration      4/4" in open(f"{out}/worker.log").read()
    results = json.load(open(f"{out}/results.json"))
    assert list(results["arms"]) == ["cpt-only"] and "base-own-rope" in results["controls"]
    bad = subprocess.run(CMD + ["--out", str(tmp_path / "bad"), "--nproc", "0"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--nproc must be >= 1, got 0" in bad.stderr


def test_arms_share_stages_and_verdict_reads_the_numbers():
    assert [s.name for s in needed(["full"])] == ["base", "cpt", "sft", "long_sft"]
    assert [s.name for s in needed(["no-cip"])] == ["base", "cpt_concat", "sft_concat", "long_sft_concat"]
    assert len(needed(list(ARMS))) == len(STAGES) - 1 == 8  # no stage twice; the template arm adds one
    arms = {a: {"passkey": {"4096": 0.1}, "needle": {"4096": 0.1}, "synl": {"4096": 0.0}} for a in ARMS}
    arms["full"] = {"passkey": {"4096": 0.95}, "needle": {"4096": 0.9}, "synl": {"4096": 0.5}}
    counts = {a: {"passkey": {"4096": 20}, "needle": {"4096": 20}, "synl": {"4096": 4}} for a in ARMS}
    lines = report.verdict({"L0": 512, "L1": 4096, "arms": arms}, counts)
    assert lines[0].startswith("The target") and " held: full 0.95 (20 cells)" in lines[0]
    assert lines[1] == "Arms with passkey >= 0.90 at 4096 tokens: full 0.95 (20 cells)."
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


def test_haystack_only_lines_exclude_wrapped_training_boilerplate(tmp_path):
    """A haystack line that a training document holds inside a longer line is training text, not a leak;
    a line only the haystack holds is still caught in copy text."""
    from megatron_ext.experiments.mini_longskywork.data import _haystack_only, template_hits

    (tmp_path / "data").mkdir()
    wrapped = "* Set upstream metadata fields: Bug-Database, Bug-Submit,"
    secret = "* Fix the frobnicator's overflow in the gizmo parser (Closes: #1234)."
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": wrapped + " Repository.\n* other"}) + "\n")
    (tmp_path / "haystack.jsonl").write_text(json.dumps({"text": f"{wrapped}\n{secret}\n"}) + "\n")
    hay = _haystack_only(str(tmp_path))
    copy = tmp_path / "copy.jsonl"
    copy.write_text(json.dumps({"text": f"x {wrapped} y"}) + "\n" + json.dumps({"text": f"x {secret} y"}) + "\n")
    hits = template_hits(str(copy), hay)
    assert hits and all(h.startswith(f"{copy}:2: ") for h in hits) and "frobnicator" in hits[0]


def test_copy_samples_must_fit_twice_in_a_window(tmp_path):
    """GPTDataset cuts L0 windows at arbitrary offsets of the concatenated copy samples: a sample longer
    than L0 / 2 is refused before any text is made (the first 90-minute attempt's base never learned to copy)."""
    import dataclasses

    from megatron_ext.experiments.mini_longskywork.config import ExperimentConfig
    from megatron_ext.experiments.mini_longskywork.data import _copy_text

    cfg = dataclasses.replace(ExperimentConfig(), copy_tokens=257)
    with pytest.raises(ValueError, match="copy_tokens 257 must be at most L0 / 2 = 256"):
        _copy_text(cfg, str(tmp_path), "unused.model")
    assert ExperimentConfig().copy_tokens <= ExperimentConfig().l0 // 2
