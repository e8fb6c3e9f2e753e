"""Pre-tokenization: Megatron reads what we write, SFT masks, bad input, resume,
validate/merge/stats, flat memory."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_tools.indexed import index_bytes, token_dtype
from tests.conftest import make_docs, write_jsonl


def run(*args, check=True):
    res = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)
    if check and res.returncode:
        raise AssertionError(res.stderr)
    return res


def preprocess(inputs, prefix, tokenizer, *extra, check=True):
    return run("data_tools.preprocess", "--input", *inputs, "--output-prefix", str(prefix),
               "--tokenizer-model", tokenizer, *extra, check=check)


def test_megatron_reads_our_output_token_exact(corpus, tokenizer, sp, tmp_path):
    gz = tmp_path / "more.jsonl.gz"
    extra = make_docs(20, seed=5)
    with gzip.open(gz, "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in extra)
    res = preprocess([corpus, str(gz)], tmp_path / "out", tokenizer, "--append-eod", "--batch-bytes", "5000")
    assert "320 docs" in res.stdout and "tokens/s" in res.stdout
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    texts = [json.loads(line)["text"] for line in open(corpus)] + extra
    assert len(ds) == len(texts)
    for i, text in enumerate(texts):
        assert ds[i].tolist() == sp.encode(text) + [sp.eos_id()]
    assert ds[0].dtype == np.uint16
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p or "progress" in p]


def test_int32_index_for_large_vocab_is_readable(tmp_path):
    assert token_dtype(65499) == np.uint16 and token_dtype(65500) == np.int32
    lengths = np.array([3, 1, 2], dtype=np.int32)
    tokens = np.array([70000, 1, 2, 99999, 5, 6], dtype=np.int32)
    tokens.tofile(tmp_path / "big.bin")
    (tmp_path / "big.idx").write_bytes(index_bytes(np.int32, lengths))
    ds = IndexedDataset(str(tmp_path / "big"))
    assert [ds[i].tolist() for i in range(3)] == [[70000, 1, 2], [99999], [5, 6]]


def test_int32_buffers_and_lists_flatten_to_the_same_bytes(tokenizer):
    from data_tools.outputs import encode, flatten
    from data_tools.tokenizing import load_tokenizer

    tok = load_tokenizer(tokenizer)
    texts = ["The river \u2603.", "x", "caf\u00e9 au lait " * 50]
    assert not isinstance(encode(tok, texts)[0], list)  # sentencepiece takes the buffer path
    for code in (8, 4):  # uint16, int32
        for eod in (None, tok.eos_id()):
            fast, lists = flatten(encode(tok, texts), code, eod), flatten(tok.encode_batch(texts), code, eod)
            assert fast[0].typecode == lists[0].typecode and fast[0].tobytes() == lists[0].tobytes()
            assert fast[1] == lists[1] and sum(fast[1]) == len(fast[0])


@pytest.mark.parametrize("kind", ["sentencepiece", "byte-level-bpe"])
def test_sft_mask_marks_response_and_eod(kind, tokenizer, bpe_dir, tmp_path):
    """A record is tokenized as one text (prompt, the implied space, response); the mask
    starts after the longest common token prefix with the prompt alone."""
    from data_tools.common import load_tokenizer
    from data_tools.segments import common_prefix

    spec = tokenizer if kind == "sentencepiece" else f"hf:{bpe_dir}"
    tok = load_tokenizer(spec)
    rows = [{"prompt": "What is the pass key? The pass key is", "response": "51252"},
            {"prompt": "Which river? ", "response": "The harbour."},
            {"messages": [{"role": "user", "content": "Say one word."}, {"role": "assistant", "content": "Lantern."}]}]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preprocess([str(path)], tmp_path / "sft", spec, "--sft")
    tokens, mask = IndexedDataset(str(tmp_path / "sft_text_document")), IndexedDataset(str(tmp_path / "sft_loss_mask_document"))
    wholes = [(rows[0]["prompt"], rows[0]["prompt"] + " 51252"), (rows[1]["prompt"], rows[1]["prompt"] + "The harbour."),
              ("user: Say one word.\nassistant: ", "user: Say one word.\nassistant: Lantern.\n")]
    for i, (prompt, whole) in enumerate(wholes):
        full = tok.encode(whole)
        cut = common_prefix(full, tok.encode(prompt))
        assert tokens[i].tolist() == full + [tok.eos_id()]
        assert mask[i].tolist() == [0] * cut + [1] * (len(full) - cut) + [1]
        assert "".join(tok.decode(full[cut:]).split()) == "".join(whole[len(prompt):].split())


BAD_LINES = {
    "invalid JSON": b'{"text": "unterminated\n',
    "missing key": b'{"body": "no text key"}\n',
    "not a string": b'{"text": 42}\n',
    "invalid UTF-8": b'{"text": "caf\xe9"}\n',
    "empty text": b'{"text": "   "}\n',
    "NUL byte": b'{"text": "a\\u0000b"}\n',
}


@pytest.mark.parametrize("reason", list(BAD_LINES))
def test_bad_line_stops_with_file_and_line(reason, tokenizer, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": "a good line."}\n' * 3 + BAD_LINES[reason] + b'{"text": "after."}\n')
    res = preprocess([str(path)], tmp_path / "out", tokenizer, check=False)
    assert res.returncode == 2
    assert f"{path}:4: {reason}" in res.stderr
    assert os.listdir(tmp_path) == ["in.jsonl"]  # no output, no temp files
    if reason == "invalid JSON":  # with --resume too: bad input would fail again, so nothing is kept
        res = preprocess([str(path)], tmp_path / "out", tokenizer, "--resume", check=False)
        assert res.returncode == 2 and os.listdir(tmp_path) == ["in.jsonl"]


@pytest.mark.parametrize("sft", [False, True], ids=["text", "sft"])
def test_blank_lines_hold_no_record_and_bad_lines_keep_their_numbers(sft, tokenizer, tmp_path):
    """Files joined with cat often hold blank lines: skipped, as iter_texts skips them; a bad line
    after them still names its own line number."""
    rec = (lambda i: {"prompt": f"q {i}?", "response": f"a {i}."}) if sft else (lambda i: {"text": f"good {i}."})
    good = [json.dumps(rec(i)).encode() + b"\n" for i in range(4)]
    flags = ("--sft",) if sft else ("--append-eod",)
    (tmp_path / "plain.jsonl").write_bytes(b"".join(good))
    (tmp_path / "blank.jsonl").write_bytes(b"\n".join(good[:2]) + b"\n  \t\r\n" + b"".join(good[2:]) + b"\n")
    preprocess([str(tmp_path / "plain.jsonl")], tmp_path / "a", tokenizer, *flags)
    preprocess([str(tmp_path / "blank.jsonl")], tmp_path / "b", tokenizer, *flags)
    for name in ("_text_document", "_loss_mask_document") if sft else ("_text_document",):
        for ext in (".bin", ".idx"):
            assert (tmp_path / f"a{name}{ext}").read_bytes() == (tmp_path / f"b{name}{ext}").read_bytes()
    (tmp_path / "bad.jsonl").write_bytes(b"".join(good[:2]) + b"\n \n" + BAD_LINES["invalid JSON"])
    res = preprocess([str(tmp_path / "bad.jsonl")], tmp_path / "c", tokenizer, *flags, check=False)
    assert res.returncode == 2 and f"{tmp_path / 'bad.jsonl'}:5: invalid JSON" in res.stderr, res.stderr


def test_skip_invalid_counts_and_lists_rejects(tokenizer, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(b'{"text": "good %d."}\n' % i + line for i, line in enumerate(BAD_LINES.values())))
    res = preprocess([str(path)], tmp_path / "out", tokenizer, "--skip-invalid")
    assert "6 docs" in res.stdout and "skipped 6" in res.stdout
    for reason in BAD_LINES:
        assert f"{reason}: 1" in res.stdout
    rejects = [json.loads(line) for line in open(tmp_path / "out.rejects.jsonl")]
    assert [r["line"] for r in rejects] == [2, 4, 6, 8, 10, 12]
    assert len(IndexedDataset(str(tmp_path / "out_text_document"))) == 6


def test_kill_9_then_resume_is_byte_identical(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "big.jsonl", make_docs(3000, seed=9))
    flags = ["--append-eod", "--batch-bytes", "4000", "--checkpoint-seconds", "0", "--workers", "1"]
    preprocess([src], tmp_path / "clean", tokenizer, *flags)
    cmd = [sys.executable, "-m", "data_tools.preprocess", "--input", src, "--output-prefix", str(tmp_path / "cut"),
           "--tokenizer-model", tokenizer, *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "cut.progress.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (progress.exists() and json.loads(progress.read_text())["docs"] > 500):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert progress.exists() and not (tmp_path / "cut_text_document.idx").exists(), "killed before the end"
    preprocess([src], tmp_path / "cut", tokenizer, *flags, "--resume")
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"cut_text_document{ext}").read_bytes() == (tmp_path / f"clean_text_document{ext}").read_bytes()


def test_validate_catches_truncation_and_corruption(corpus, tokenizer, tmp_path):
    preprocess([corpus], tmp_path / "d", tokenizer)
    prefix = str(tmp_path / "d_text_document")
    assert "validate: OK" in run("data_tools.validate", prefix, "--tokenizer-model", tokenizer).stdout
    good_bin, good_idx = open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()
    cases = {
        "truncated .bin": (good_bin[:-2], good_idx, ".bin: "),
        "bad magic": (good_bin, b"XXIDIDX\x00\x00" + good_idx[9:], "bad magic"),
        "truncated .idx": (good_bin, good_idx[:-8], "truncated or corrupt"),
        "bad pointer": (good_bin, good_idx[:34 + 4 * 300 + 8] + b"\x07" * 8 + good_idx[34 + 4 * 300 + 16:], "pointer"),
    }
    for name, (b, i, text) in cases.items():
        open(prefix + ".bin", "wb").write(b)
        open(prefix + ".idx", "wb").write(i)
        res = run("data_tools.validate", prefix, check=False)
        assert res.returncode == 1 and text in res.stderr and "d_text_document" in res.stderr, (name, res.stderr)
    open(prefix + ".bin", "wb").write(good_bin)
    open(prefix + ".idx", "wb").write(good_idx)
    res = run("data_tools.validate", prefix, "--tokenizer-model", tokenizer)
    assert res.returncode == 0


def test_merge_and_stats(corpus, tokenizer, tmp_path):
    other = write_jsonl(tmp_path / "b.jsonl", make_docs(40, seed=3))
    preprocess([corpus], tmp_path / "a", tokenizer)
    preprocess([other], tmp_path / "b", tokenizer)
    res = run("data_tools.merge", "--inputs", str(tmp_path / "a_text_document"), str(tmp_path / "b_text_document"),
              "--output-prefix", str(tmp_path / "ab"))
    assert "340 documents" in res.stdout
    a, b, ab = (IndexedDataset(str(tmp_path / n)) for n in ("a_text_document", "b_text_document", "ab"))
    assert len(ab) == 340
    assert ab[0].tolist() == a[0].tolist() and ab[300].tolist() == b[0].tolist() and ab[339].tolist() == b[39].tolist()
    assert "validate: OK" in run("data_tools.validate", str(tmp_path / "ab")).stdout
    stats = run("data_tools.stats", str(tmp_path / "ab")).stdout
    assert f"340 documents, {int(ab.sequence_lengths.sum())} tokens" in stats


def test_peak_memory_stays_flat(tokenizer, tmp_path):
    peaks = []
    for n in (2000, 8000):
        src = write_jsonl(tmp_path / f"in{n}.jsonl", make_docs(n, seed=n))
        out = preprocess([src], tmp_path / f"o{n}", tokenizer).stdout
        peaks.append(float(out.split("peak RSS ")[1].split(" MiB")[0]))
    assert peaks[1] - peaks[0] < 15, peaks  # 4x the input, about the same peak


def test_tokenizer_cli_writes_model_and_vocab(corpus, tmp_path):
    res = run("data_tools.tokenizer", "train", "--input", corpus, "--vocab-size", "700", "--model-type", "unigram",
              "--output-prefix", str(tmp_path / "t"))
    assert "tokenizer: wrote" in res.stdout
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "t.model"))
    assert (tmp_path / "t.vocab").exists() and sp.vocab_size() <= 700
    assert (sp.bos_id(), sp.eos_id(), sp.pad_id()) == (1, 2, 3)
    assert sp.decode(sp.encode("The river ☃.")) == "The river ☃."  # byte fallback: nothing is unknown


def test_tokenizer_training_stops_reading_once_its_sample_is_full(tmp_path):
    """The second file is never read (its first line is not JSON): the first fills the sample."""
    from data_tools.tokenizer import train

    first = write_jsonl(tmp_path / "first.jsonl", make_docs(200, seed=5))
    (tmp_path / "second.jsonl").write_bytes(b"not json\n")
    model = train([str(first), str(tmp_path / "second.jsonl")], 600, str(tmp_path / "tok"), sample_bytes=20_000)
    assert os.path.getsize(model) > 0
    with pytest.raises(Exception, match="second.jsonl"):  # reading it does fail
        train([str(tmp_path / "second.jsonl")], 600, str(tmp_path / "tok2"))
