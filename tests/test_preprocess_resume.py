"""Pre-tokenization: a crash in each window of the run and of the final renames,
then --resume; what the resume fingerprint covers; empty input; hf: tokenizers."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_tools.indexed import index_bytes, write_index
from tests.conftest import make_docs
from tests.test_preprocess import BAD_LINES, preprocess, run

FLAGS = ["--append-eod", "--skip-invalid", "--batch-bytes", "3000", "--checkpoint-seconds", "0", "--workers", "2"]
# Runs preprocess in a child that dies (os._exit, as from kill -9) the Nth time it reaches POINT.
CRASH = """
import os, sys
import data_tools.preprocess as p
point, nth, seen = sys.argv[1], int(sys.argv[2]), [0]
def reached(name):
    if name == point:
        seen[0] += 1
        if seen[0] == nth:
            os._exit(137)
p._reached = reached
sys.exit(p.main(sys.argv[3:]))
"""


def crash(point, nth, src, prefix, tokenizer, *flags):
    res = subprocess.run([sys.executable, "-c", CRASH, point, str(nth), "--input", src, "--output-prefix", str(prefix),
                          "--tokenizer-model", tokenizer, *flags], capture_output=True, text=True, timeout=120)
    assert res.returncode == 137, res.stderr  # it did reach the point


@pytest.fixture(scope="module")
def dirty(tmp_path_factory, tokenizer):
    """An input with a bad line every 5 documents, and its clean (uninterrupted) output."""
    root = tmp_path_factory.mktemp("dirty")
    lines, bad = [], list(BAD_LINES.values())
    for i, doc in enumerate(make_docs(400, seed=11, max_sentences=10)):
        lines.append(json.dumps({"text": doc}).encode() + b"\n")
        if i % 5 == 3:
            lines.append(bad[i % len(bad)])
    src = root / "dirty.jsonl"
    src.write_bytes(b"".join(lines))
    res = preprocess([str(src)], root / "clean", tokenizer, *FLAGS)
    return {"src": str(src), "clean": root / "clean", "summary": res.stdout.split(" -> ")[0]}


def files(prefix):
    return {ext: (prefix.parent / f"{prefix.name}_text_document{ext}").read_bytes() for ext in (".bin", ".idx")}


@pytest.mark.parametrize("point,nth", [("checkpoint", 4), ("indexed", 1), ("old-index-removed", 1),
                                       ("bins-renamed", 1), ("indexes-renamed", 1)])
def test_crash_in_each_window_then_resume(point, nth, dirty, tokenizer, corpus, tmp_path):
    prefix = tmp_path / "cut"
    preprocess([corpus], prefix, tokenizer, "--append-eod")  # an older dataset at the same prefix
    old, clean = files(prefix), files(dirty["clean"])
    crash(point, nth, dirty["src"], prefix, tokenizer, *FLAGS)
    present = {ext: (tmp_path / f"cut_text_document{ext}") for ext in (".bin", ".idx")}
    if all(p.exists() for p in present.values()):  # a pair on disk is never half old, half new
        assert files(prefix) in (old, clean), point
    assert (tmp_path / "cut.progress.json").exists()
    res = preprocess([dirty["src"]], prefix, tokenizer, *FLAGS, "--resume")
    assert files(prefix) == clean
    assert res.stdout.split(" -> ")[0] == dirty["summary"]  # docs, tokens and reject counts: each reject once
    assert (tmp_path / "cut.rejects.jsonl").read_bytes() == (dirty["clean"].parent / "clean.rejects.jsonl").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["cut.rejects.jsonl", "cut_text_document.bin", "cut_text_document.idx"]


DISK_FULL = CRASH.replace("os._exit(137)", "raise OSError(28, 'No space left on device')")


def test_disk_full_keeps_the_progress_for_resume(dirty, tokenizer, tmp_path):
    """An OSError in mid-run (ENOSPC at the 4th checkpoint) exits 1 in one line and, with
    --resume, keeps the temp outputs and progress file, so the rerun ends byte-identical."""
    prefix = tmp_path / "full"
    res = subprocess.run([sys.executable, "-c", DISK_FULL, "checkpoint", "4", "--input", dirty["src"],
                          "--output-prefix", str(prefix), "--tokenizer-model", tokenizer, *FLAGS, "--resume"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "No space left on device; fix the cause and rerun with --resume" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and (tmp_path / "full.progress.json").exists()
    preprocess([dirty["src"]], prefix, tokenizer, *FLAGS, "--resume")
    assert files(prefix) == files(dirty["clean"])


def test_resume_refuses_changed_input_or_tokenizer(dirty, tokenizer, tmp_path):
    from sentencepiece import sentencepiece_model_pb2

    src, tok = shutil.copy(dirty["src"], tmp_path / "in.jsonl"), shutil.copy(tokenizer, tmp_path / "tok.model")
    prefix = tmp_path / "out"
    crash("checkpoint", 2, src, prefix, tok, *FLAGS)
    stat = os.stat(src)
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size, touched
    res = preprocess([src], prefix, tok, *FLAGS, "--resume", check=False)
    assert res.returncode == 2 and "out.progress.json: was written for other inputs" in res.stderr
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(open(tok, "rb").read())
    piece = next(p for p in proto.pieces if p.score < -1)
    piece.score += 0.5  # same size, other content
    edited = proto.SerializeToString()
    assert len(edited) == os.path.getsize(tok)
    open(tok, "wb").write(edited)
    assert preprocess([src], prefix, tok, *FLAGS, "--resume", check=False).returncode == 2
    open(tok, "wb").write(open(tokenizer, "rb").read())
    preprocess([src], prefix, tok, *FLAGS, "--resume")
    assert files(prefix) == files(dirty["clean"])


def test_empty_input_is_an_error_unless_allowed(tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    res = preprocess([str(empty)], tmp_path / "out", tokenizer, check=False)
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert f"{empty}: no documents (empty input)" in res.stderr and "--allow-empty" in res.stderr
    rejected = tmp_path / "bad.jsonl"
    rejected.write_bytes(BAD_LINES["missing key"] * 3)
    res = preprocess([str(rejected)], tmp_path / "out", tokenizer, "--skip-invalid", check=False)
    assert res.returncode == 2 and "all 3 lines were rejected" in res.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "empty.jsonl"]
    assert "0 docs, 0 tokens" in preprocess([str(empty)], tmp_path / "out", tokenizer, "--allow-empty").stdout
    assert "0 documents, 0 tokens" in run("data_tools.validate", str(tmp_path / "out_text_document")).stdout


def test_streamed_index_matches_index_bytes(tmp_path):
    rng = np.random.default_rng(0)
    for n in (0, 1, 3, 7, 100):
        for dtype in (np.uint16, np.int32):
            lengths = rng.integers(1, 300, n).astype(np.int32)
            lengths.tofile(tmp_path / "lengths")
            tokens = write_index(str(tmp_path / "x.idx"), dtype, str(tmp_path / "lengths"), chunk=3)
            assert (tmp_path / "x.idx").read_bytes() == index_bytes(dtype, lengths) and tokens == lengths.sum()


@pytest.fixture(scope="module")
def hf_dir(corpus, tmp_path_factory):
    """A tiny byte-level BPE tokenizer.json trained locally (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([corpus], trainer)
    root = tmp_path_factory.mktemp("hf")
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": {"content": "<pad>"}}))
    return root


def test_hf_tokenizer_preprocess_matches_tokenizers(hf_dir, corpus, tmp_path):
    from tokenizers import Tokenizer

    from data_tools.common import load_tokenizer

    ref = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    tok = load_tokenizer(f"hf:{hf_dir}")
    assert (tok.eos_id(), tok.pad_id(), tok.bos_id()) == (2, 3, -1) and tok.vocab_size() == ref.get_vocab_size()
    texts = [json.loads(line)["text"] for line in open(corpus)]
    assert tok.decode(tok.encode(texts[0])) == texts[0]
    preprocess([corpus], tmp_path / "hf", f"hf:{hf_dir}", "--append-eod", "--batch-bytes", "5000")
    ds = IndexedDataset(str(tmp_path / "hf_text_document"))
    assert len(ds) == len(texts)
    for i, text in enumerate(texts):
        assert ds[i].tolist() == ref.encode(text, add_special_tokens=False).ids + [2]
    assert "validate: OK" in run("data_tools.validate", str(tmp_path / "hf_text_document"),
                                 "--tokenizer-model", f"hf:{hf_dir}").stdout
    res = preprocess([corpus], tmp_path / "x", f"hf:{tmp_path}", check=False)
    assert res.returncode == 2 and f"{tmp_path}/tokenizer.json: not found" in res.stderr
