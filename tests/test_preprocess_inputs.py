"""Pre-tokenization input kinds: Parquet, .jsonl.gz, .jsonl.zst and Hugging Face datasets
folders give the same .bin/.idx bytes as the same text in JSON lines; bad rows name the
file and row; resume on Parquet is byte-identical; JSON lines runs load none of them."""
import gzip
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from tests.conftest import make_docs
from tests.test_preprocess import preprocess
from tests.test_preprocess_resume import crash

SMALL = ["--batch-bytes", "3000", "--workers", "2"]  # many batches, crossing Parquet row groups


def rows(n, seed):
    docs = make_docs(n, seed=seed, max_sentences=12)
    return [{"title": f"Document {i}: " + d.split(".")[0], "text": d} for i, d in enumerate(docs)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def write_parquet(path, records, row_group_size=37):
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return str(path)


def write_dataset(path, records, shards=2):
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(path), num_shards=shards)
    return str(path)


def outputs(prefix, names=("text",)):
    return {(n, ext): (prefix.parent / f"{prefix.name}_{n}_document{ext}").read_bytes()
            for n in names for ext in (".bin", ".idx")}


@pytest.fixture(scope="module")
def same_text(tmp_path_factory):
    """One corpus written as every input kind."""
    root = tmp_path_factory.mktemp("kinds")
    records = rows(240, seed=21)
    raw = "".join(json.dumps(r) + "\n" for r in records).encode()
    half = len(raw) // 2
    cut = raw.index(b"\n", half) + 1
    (root / "c.jsonl.gz").write_bytes(gzip.compress(raw))
    z = zstandard.ZstdCompressor()
    (root / "c.jsonl.zst").write_bytes(z.compress(raw[:cut]) + z.compress(raw[cut:]))  # two frames
    return {"records": records, "root": root, "jsonl": write_jsonl(root / "c.jsonl", records),
            "gz": str(root / "c.jsonl.gz"), "zst": str(root / "c.jsonl.zst"),
            "parquet": write_parquet(root / "c.parquet", records),
            "datasets": write_dataset(root / "c_ds", records)}


@pytest.mark.parametrize("kind", ["gz", "zst", "parquet", "datasets"])
def test_every_input_kind_gives_the_json_lines_bytes(kind, same_text, tokenizer, tmp_path):
    keys = ["--json-keys", "text", "title", "--append-eod"]  # two keys -> two datasets, as Megatron-LM
    preprocess([same_text["jsonl"]], tmp_path / "ref", tokenizer, *keys, *SMALL)
    res = preprocess([same_text[kind]], tmp_path / "got", tokenizer, *keys, *SMALL)
    assert "240 docs" in res.stdout
    assert outputs(tmp_path / "got", ("text", "title")) == outputs(tmp_path / "ref", ("text", "title"))


def test_mixed_inputs_concatenate_in_order(same_text, tokenizer, tmp_path):
    more = rows(30, seed=4)
    pq_more = write_parquet(tmp_path / "more.parquet", more, row_group_size=8)
    write_jsonl(tmp_path / "all.jsonl", same_text["records"] + more)
    preprocess([str(tmp_path / "all.jsonl")], tmp_path / "ref", tokenizer, *SMALL)
    preprocess([same_text["zst"], pq_more], tmp_path / "got", tokenizer, *SMALL)
    assert outputs(tmp_path / "got") == outputs(tmp_path / "ref")


def test_sft_columns_give_the_json_lines_bytes(tokenizer, tmp_path):
    records = [{"prompt": f"Question {i}: where is the river?", "response": f"Behind the harbour, {i}."}
               for i in range(40)]
    chats = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}!"}]}
             for i in range(25)]
    for name, recs in (("pair", records), ("chat", chats)):
        src = write_jsonl(tmp_path / f"{name}.jsonl", recs)
        preprocess([src], tmp_path / f"{name}_ref", tokenizer, "--sft", *SMALL)
        for kind, path in (("pq", write_parquet(tmp_path / f"{name}.parquet", recs, 7)),
                           ("ds", write_dataset(tmp_path / f"{name}_ds", recs))):
            preprocess([path], tmp_path / f"{name}_{kind}", tokenizer, "--sft", *SMALL)
            assert outputs(tmp_path / f"{name}_{kind}", ("text", "loss_mask")) == \
                outputs(tmp_path / f"{name}_ref", ("text", "loss_mask")), (name, kind)


def bad_records():
    recs = rows(8, seed=3)
    recs[3]["text"] = None      # null cell: a missing key
    recs[5]["text"] = "   \n"   # whitespace only
    recs[6]["text"] = "a\x00b"  # NUL
    return recs


@pytest.mark.parametrize("kind", ["parquet", "datasets"])
def test_bad_row_names_file_and_row(kind, tokenizer, tmp_path):
    recs = bad_records()
    path = write_parquet(tmp_path / "bad.parquet", recs, 3) if kind == "parquet" else \
        write_dataset(tmp_path / "bad_ds", recs)
    res = preprocess([path], tmp_path / "out", tokenizer, check=False)
    assert res.returncode == 2 and f"{path}: row 3: missing key: 'text'" in res.stderr, res.stderr
    assert not list(tmp_path.glob("out*"))
    res = preprocess([path], tmp_path / "out", tokenizer, "--skip-invalid")
    assert "5 docs" in res.stdout and "skipped 3" in res.stdout
    rejects = [json.loads(line) for line in open(tmp_path / "out.rejects.jsonl")]
    assert [(r["file"], r["row"], r["reason"]) for r in rejects] == [
        (path, 3, "missing key: 'text'"), (path, 5, "empty text: 'text'"), (path, 6, "NUL byte: in 'text'")]


def test_missing_column_and_dataset_dict_are_named(same_text, tokenizer, tmp_path):
    res = preprocess([same_text["parquet"]], tmp_path / "o", tokenizer, "--json-keys", "body", check=False)
    assert res.returncode == 2 and f"{same_text['parquet']}: no column 'body'" in res.stderr
    assert "title, text" in res.stderr and "--json-keys" in res.stderr
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows(3, 1))}).save_to_disk(str(folder))
    res = preprocess([str(folder)], tmp_path / "o", tokenizer, check=False)
    assert res.returncode == 2 and "a DatasetDict with splits train" in res.stderr and str(folder / "train") in res.stderr


def test_bad_jsonl_zst_line_names_file_and_line(tokenizer, tmp_path):
    raw = b'{"text": "a good line."}\n' * 3 + b'{"text": 42}\n'
    path = tmp_path / "in.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    res = preprocess([str(path)], tmp_path / "out", tokenizer, check=False)
    assert res.returncode == 2 and f"{path}:4: not a string" in res.stderr


@pytest.mark.parametrize("kind", ["parquet", "datasets", "zst", "gz"])
def test_crash_then_resume_is_byte_identical(kind, tokenizer, tmp_path):
    recs = rows(600, seed=8)
    raw = "".join(json.dumps(r) + "\n" for r in recs).encode()
    if kind == "parquet":
        src = write_parquet(tmp_path / "big.parquet", recs, 50)
    elif kind == "datasets":
        src = write_dataset(tmp_path / "big_ds", recs, shards=3)
    else:
        src = str(tmp_path / f"big.jsonl.{kind}")
        pack = zstandard.ZstdCompressor().compress if kind == "zst" else gzip.compress
        (tmp_path / f"big.jsonl.{kind}").write_bytes(pack(raw))
    flags = ["--append-eod", "--batch-bytes", "3000", "--checkpoint-seconds", "0", "--workers", "2"]
    preprocess([src], tmp_path / "clean", tokenizer, *flags)
    crash("checkpoint", 6, src, tmp_path / "cut", tokenizer, *flags)
    progress = json.loads((tmp_path / "cut.progress.json").read_text())
    assert 0 < progress["docs"] < 600 and progress["position"][1] > 0  # stopped mid-file
    preprocess([src], tmp_path / "cut", tokenizer, *flags, "--resume")
    assert outputs(tmp_path / "cut") == outputs(tmp_path / "clean")


def test_resume_refuses_a_changed_dataset_folder(tokenizer, tmp_path):
    src = write_dataset(tmp_path / "ds", rows(300, seed=2), shards=1)
    flags = ["--batch-bytes", "3000", "--checkpoint-seconds", "0", "--workers", "1"]
    crash("checkpoint", 3, src, tmp_path / "cut", tokenizer, *flags)
    write_dataset(tmp_path / "ds", rows(300, seed=5), shards=1)  # same folder, new content
    res = preprocess([src], tmp_path / "cut", tokenizer, *flags, "--resume", check=False)
    assert res.returncode == 2 and "was written for other inputs" in res.stderr


def test_json_lines_run_loads_no_table_or_zstd_library(same_text, tokenizer, tmp_path):
    code = ("import sys, data_tools.preprocess as p; assert p.main(sys.argv[1:]) == 0; "
            "print(sorted(m for m in ('pyarrow', 'datasets', 'zstandard', 'pandas') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code, "--input", same_text["jsonl"], same_text["gz"],
                          "--output-prefix", str(tmp_path / "o"), "--tokenizer-model", tokenizer],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"
