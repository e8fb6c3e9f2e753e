"""Synthetic data: CIP reconstruction and order, SynL answers re-derived from
the rendered Markdown, needle/passkey placement, CLI errors."""
import json
import subprocess
import sys

import pytest

from data_tools.synth.synl import QUESTION_TYPES


def synth(*args, check=True):
    res = subprocess.run([sys.executable, "-m", "data_tools.synth", *args], capture_output=True, text=True, timeout=120)
    if check and res.returncode:
        raise AssertionError(res.stderr)
    return res


def read(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("mode", ["cip", "concat"])
def test_cip_reconstructs_from_sources_in_order(mode, corpus, tokenizer, sp, tmp_path):
    out = tmp_path / "cip.jsonl"
    res = synth("cip", "--input", corpus, "--output", str(out), "--target-tokens", "3000", "--tokenizer-model",
                tokenizer, "--seed", "3", "--k", "3", "--chunk-chars", "100:400", "--mode", mode)
    sources = [json.loads(line)["text"] for line in open(corpus)]
    samples = read(out)
    assert len(samples) >= 5 and f"{len(samples)} {mode} samples" in res.stdout
    used = set()
    for s in samples:
        meta = s["meta"]
        assert s["text"] == meta["separator"].join(sources[g["doc"]][g["start"]:g["end"]] for g in meta["segments"])
        assert meta["n_tokens"] == len(sp.encode(s["text"])) <= 3000
        last_end = {}
        for g in meta["segments"]:
            assert g["end"] > g["start"]
            assert g["start"] == last_end.get(g["doc"], 0), "a document's chunks must be contiguous, in order"
            last_end[g["doc"]] = g["end"]
            if mode == "concat":
                assert g["start"] == 0 and (g["end"] == len(sources[g["doc"]]) or g is meta["segments"][-1])
        assert not used & set(last_end), "no document is reused without --allow-reuse"
        used |= set(last_end)
        if not meta["partial"]:
            assert meta["n_tokens"] >= 2900  # filled up to the last segment's cut
    if mode == "cip":
        docs_per_sample = [len({g["doc"] for g in s["meta"]["segments"]}) for s in samples]
        assert max(docs_per_sample) >= 3  # interleaved, not one document at a time


def parse_markdown(prompt):
    lines = [line for line in prompt.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "").replace("-", "")) == set()
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def recompute(rows, qtype, q):
    """An independent evaluator: ids, int columns as ints, dates as ISO strings."""
    num = lambda col, v: int(v) if col in ("score", "units") else v  # noqa: E731
    ops = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, ">": lambda a, b: a > b,
           ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b}
    find = {r["id"]: r for r in rows}
    if qtype == "lookup":
        return find[q["key"]][q["column"]]
    if qtype == "reverse_lookup":
        hits = [r["id"] for r in rows if r[q["column"]] == q["value"]]
        assert len(hits) == 1
        return hits[0]
    if qtype == "compare":
        a, b = (num(q["column"], find[k][q["column"]]) for k in q["keys"])
        assert a != b
        return q["keys"][0] if (a > b) == (q["pick"] == "larger") else q["keys"][1]
    sel = [r for r in rows if qtype in ("count", "filter") and ops[q["op"]](num(q["column"], r[q["column"]]), num(q["column"], q["value"]))]
    if qtype == "count":
        return str(len(sel))
    if qtype == "filter":
        assert sel
        return ", ".join(r["id"] for r in sel)
    if qtype == "sum":
        return str(sum(int(r[q["column"]]) for r in rows))
    if qtype in ("argmax", "argmin"):
        values = sorted((num(q["column"], r[q["column"]]), r["id"]) for r in rows)
        pick = values[-1] if qtype == "argmax" else values[0]
        assert [v for v, _ in values].count(pick[0]) == 1
        return pick[1]
    if qtype == "multi_hop":
        return find[find[q["key"]][q["via_column"]]][q["column"]]
    raise AssertionError(qtype)


def test_synl_answers_recomputed_from_markdown(tokenizer, sp, tmp_path):
    out = tmp_path / "synl.jsonl"
    synth("synl", "--output", str(out), "--num-samples", str(4 * len(QUESTION_TYPES)), "--target-tokens", "1500",
          "--tokenizer-model", tokenizer, "--seed", "11")
    seen = set()
    for s in read(out):
        meta = s["meta"]
        rows = parse_markdown(s["prompt"])
        assert len(rows) == meta["n_rows"] and len(rows[0]) == meta["n_columns"]
        assert len({r["id"] for r in rows}) == len(rows)
        assert s["response"] == meta["answer"] == recompute(rows, meta["question_type"], meta["query"])
        assert meta["n_tokens"] == len(sp.encode(s["prompt"])) <= 1500
        seen.add(meta["question_type"])
    assert seen == set(QUESTION_TYPES)


@pytest.mark.parametrize("kind", ["needle", "passkey"])
def test_needle_at_depth_within_length(kind, corpus, tokenizer, sp, tmp_path):
    out = tmp_path / "n.jsonl"
    args = ["needle", "--output", str(out), "--lengths", "500,2k", "--depths", "0:100:25", "--tokenizer-model",
            tokenizer, "--kind", kind, "--seed", "2"] + (["--haystack", corpus] if kind == "needle" else [])
    synth(*args)
    samples = read(out)
    assert [(s["meta"]["length"], s["meta"]["depth"]) for s in samples] == [(n, d) for n in (500, 2000) for d in (0, 25, 50, 75, 100)]
    for s in samples:
        meta, prompt = s["meta"], s["prompt"]
        assert meta["n_tokens"] == len(sp.encode(prompt)) <= meta["length"] and meta["n_tokens"] > 0.9 * meta["length"]
        body = prompt.rsplit("\n\n", 1)[0]
        at = body.find(meta["answer"])
        assert at >= 0 and s["response"] == meta["answer"]
        assert abs(at / len(body) - meta["depth"] / 100) < 0.1


@pytest.mark.parametrize("kind", ["sentencepiece", "byte-level-bpe"])
def test_needle_sft_samples_fit_with_their_answer(kind, tokenizer, bpe_dir, tmp_path):
    """The whole sample, tokenized as preprocess --sft does (prompt + ' ' + answer), fits its length."""
    from data_tools.common import load_tokenizer

    spec = tokenizer if kind == "sentencepiece" else f"hf:{bpe_dir}"
    tok, out = load_tokenizer(spec), tmp_path / "p.jsonl"
    synth("needle", "--output", str(out), "--lengths", "200,300", "--depths", "0:100:50", "--tokenizer-model", spec,
          "--kind", "passkey")
    for s in read(out):
        whole = len(tok.encode(s["prompt"] + " " + s["response"]))
        assert s["meta"]["sample_tokens"] == whole <= s["meta"]["length"] and whole >= s["meta"]["length"] - 12
        assert s["meta"]["n_tokens"] == len(tok.encode(s["prompt"])) < whole


def test_cli_errors_are_clear(tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    res = synth("cip", "--input", str(bad), "--output", str(tmp_path / "o.jsonl"), "--target-tokens", "100",
                "--tokenizer-model", tokenizer, check=False)
    assert res.returncode == 2 and f"{bad}:2:" in res.stderr and not (tmp_path / "o.jsonl").exists()
    res = synth("synl", "--output", str(tmp_path / "s.jsonl"), "--num-samples", "1", "--target-tokens", "100",
                "--tokenizer-model", str(tmp_path / "missing.model"), check=False)
    assert res.returncode == 2 and "missing.model" in res.stderr
    assert "--target-tokens" in synth("cip", "--help").stdout
