"""Copy-rich pretraining text (synth copy), SynL question weights and the split-digits tokenizer."""
import json
import random
import subprocess
import sys

import pytest

from data_tools.synth.copytext import EVAL_PHRASES, eval_hits
from data_tools.synth.needle import PASSKEY_FILLER, needle_for
from data_tools.synth.synl import QUESTION_TYPES, SynlConfig, parse_weights, synl_sample
from tests.conftest import make_docs, write_jsonl


def synth(*args):
    return subprocess.run([sys.executable, "-m", "data_tools.synth", *args], capture_output=True, text=True,
                          timeout=120)


def copy_run(src, tokenizer, out, seed="1", n="40", kinds="span=1,repeat=1,keys=1"):
    res = synth("copy", "--input", src, "--output", str(out), "--num-samples", n, "--target-tokens", "400",
                "--tokenizer-model", tokenizer, "--seed", seed, "--kinds", kinds)
    assert res.returncode == 0, res.stderr
    return res, [json.loads(x) for x in open(out)]


def test_copy_samples_repeat_what_they_say_and_are_seeded(corpus, tokenizer, sp, tmp_path):
    res, rows = copy_run(corpus, tokenizer, tmp_path / "a.jsonl")
    assert "40 copy samples (" in res.stdout and " tokens" in res.stdout
    assert {r["meta"]["kind"] for r in rows} == {"span", "repeat", "keys"}
    sources = [json.loads(x)["text"] for x in open(corpus)]
    for r in rows:
        text, meta = r["text"], r["meta"]
        assert meta["n_tokens"] == len(sp.encode(text)) <= 400
        if meta["kind"] == "span":
            assert 30 <= meta["span_tokens"] <= 150 and meta["span_tokens"] == len(sp.encode(meta["span"]))
            assert text.count(meta["span"].strip()) >= 2  # the span recurs later
            assert meta["span"] in sources[meta["doc"]]
        elif meta["kind"] == "repeat":
            half, _, again = text.partition("\n\n")
            assert half == again and half in sources[meta["doc"]]
        else:
            for label, value in meta["keys"].items():
                assert f"Set {label} to {value}." in text and f"Checked {label}: {value}." in text
                assert text.index(f"Set {label}") < text.index(f"Checked {label}")
            assert any(" " in label for label in meta["keys"]) or len(meta["keys"]) <= 3
    again = open(tmp_path / "a.jsonl").read()
    copy_run(corpus, tokenizer, tmp_path / "b.jsonl")
    assert open(tmp_path / "b.jsonl").read() == again  # deterministic
    copy_run(corpus, tokenizer, tmp_path / "c.jsonl", seed="2")
    assert open(tmp_path / "c.jsonl").read() != again
    _, only = copy_run(corpus, tokenizer, tmp_path / "d.jsonl", kinds="keys=1", n="5")
    assert {r["meta"]["kind"] for r in only} == {"keys"}


def test_copy_never_carries_the_evaluation_wording(tokenizer, tmp_path):
    """A source with the passkey template is skipped; no sample holds a template phrase."""
    docs = make_docs(30, seed=5)
    needle, question, key = needle_for("passkey", random.Random(0))
    docs[3] = docs[3] + " " + needle + PASSKEY_FILLER
    docs[7] = docs[7] + " The special magic number is 1234567. "
    src = write_jsonl(tmp_path / "src.jsonl", docs)
    res, rows = copy_run(src, tokenizer, tmp_path / "copy.jsonl", n="60")
    assert "2 source documents skipped (evaluation wording)" in res.stdout
    assert eval_hits(docs[3]) and eval_hits(question) and eval_hits(docs[7])  # the scan can fail
    assert all(not eval_hits(r["text"]) and r["meta"]["doc"] not in (3, 7) for r in rows)
    assert all(p.lower() not in open(tmp_path / "copy.jsonl").read().lower() for p in EVAL_PHRASES)


def test_copy_cli_errors(corpus, tokenizer, tmp_path):
    res = synth("copy", "--input", corpus, "--output", str(tmp_path / "x.jsonl"), "--num-samples", "2",
                "--target-tokens", "400", "--tokenizer-model", tokenizer, "--kinds", "span=1,quote=2")
    assert res.returncode == 2 and "'quote' is not one of span, repeat, keys" in res.stderr
    assert not (tmp_path / "x.jsonl").exists()
    res = synth("copy", "--input", corpus, "--output", str(tmp_path / "x.jsonl"), "--num-samples", "2",
                "--target-tokens", "200", "--tokenizer-model", tokenizer)
    assert res.returncode == 2 and "2 x hi < target_tokens 200" in res.stderr


def test_synl_question_weights(sp):
    types = tuple(QUESTION_TYPES)
    w = parse_weights("lookup=4,reverse_lookup=4", types)
    assert w[types.index("lookup")] == 4 and w[types.index("count")] == 1 and len(w) == len(types)
    with pytest.raises(ValueError, match="'lookups' is not one of the question types"):
        parse_weights("lookups=2", types)
    with pytest.raises(ValueError, match="every type weight 0"):
        parse_weights(",".join(f"{t}=0" for t in types), types)
    only = parse_weights(",".join(f"{t}={int(t == 'reverse_lookup')}" for t in types), types)
    cfg, rng = SynlConfig(300, types, only), random.Random(0)
    count = lambda t: len(sp.encode(t))  # noqa: E731
    assert {synl_sample(count, cfg, rng)["meta"]["question_type"] for _ in range(6)} == {"reverse_lookup"}
    res = synth("synl", "--output", "/dev/null", "--num-samples", "1", "--target-tokens", "300", "--tokenizer-model",
                "x.model", "--question-weights", "lookup=x")
    assert res.returncode != 0


def test_split_digits_gives_one_piece_per_digit(tmp_path):
    import sentencepiece as spm

    from data_tools.tokenizer import main

    rng = random.Random(0)
    numbers = ["51252", "2024", "1.2.3", "777"]
    docs = [" ".join(f"release {rng.choice(numbers)} of {w}" for w in make_docs(1, i)[0].split()[:40]) for i in range(80)]
    src = write_jsonl(tmp_path / "num.jsonl", docs)
    pieces = {}
    for flag in ([], ["--split-digits"]):
        prefix = str(tmp_path / f"tok{len(flag)}")
        assert main(["train", "--input", src, "--vocab-size", "600", "--output-prefix", prefix, *flag]) == 0
        sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
        pieces[bool(flag)] = [p.lstrip("\u2581") for p in sp.encode_as_pieces("key 51252 and 1.2.3")]
    digits = [p for p in pieces[True] if any(c.isdigit() for c in p)]
    assert digits == ["5", "1", "2", "5", "2", "1", "2", "3"]  # one piece per digit, none mixed with "."
    assert len([p for p in pieces[False] if any(c.isdigit() for c in p)]) < 8  # without it numbers merge


def test_span_samples_survive_an_empty_lead_in():
    """A drawn lead-in budget of 0 tokens (or a span at the document's start) gives no lead-in, not a crash.

    The first 90-minute run died here: ``_fit_words`` read ``words[0]`` of an empty slice."""
    from data_tools.synth.copytext import CopyBuilder, CopyConfig

    words = " ".join(f"w{i}" for i in range(600))
    builder = CopyBuilder([words], lambda t: len(t.split()), CopyConfig(target_tokens=400, kinds=("span",),
                                                                        weights=(1.0,), seed=0))
    assert builder._fit_words([], 5) == [] and builder._fit_words(["a ", "b "], 0) == []
    rows = [s for s, _ in zip(builder.samples(), range(300))]
    assert all(r["meta"]["n_tokens"] <= 400 and r["text"].count(r["meta"]["span"].strip()) >= 2 for r in rows)


def test_keys_samples_drop_keys_when_a_small_budget_cannot_hold_them_all():
    """With a small vocabulary (many tokens per key) the sample keeps fewer keys instead of failing;
    each kept key is still set and checked. The toy experiment's 1000-piece tokenizer hit this."""
    from data_tools.synth.copytext import CopyBuilder, CopyConfig

    words = " ".join(f"w{i}" for i in range(300))
    cfg = CopyConfig(target_tokens=70, kinds=("keys",), weights=(1.0,), span_tokens=(5, 20), keys_per_sample=(6, 6))
    rows = [s for s, _ in zip(CopyBuilder([words], lambda t: len(t) // 3, cfg).samples(), range(20))]
    assert all(len(t["text"]) // 3 <= 70 for t in rows)
    assert any(len(r["meta"]["keys"]) < 6 for r in rows)
    for r in rows:
        for label, value in r["meta"]["keys"].items():
            assert f"Set {label} to {value}." in r["text"] and f"Checked {label}: {value}." in r["text"]
