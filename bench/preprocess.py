"""Pre-tokenization throughput, side by side in one run, and where its time goes.

    python -m bench.preprocess [--small-docs 100000] [--big-mb 20] [--vocab 8000] [--reps 5] [--python-path DIR]

Pipelines, each timed on the same corpus in the same run, interleaved, minimum over
--reps repetitions (this machine is shared and noisy):

* limit:          the tokenizer's own batch encode, texts already in memory, no I/O, all
                  cores: sentencepiece ``encode(texts, num_threads=cores)``; for ``hf:``
                  ``[e.ids for e in tokenizers.Tokenizer.encode_batch_fast(texts)]``;
                  Python's garbage collector off during the call (as in ours).
* ours:           ``python -m data_tools.preprocess --append-eod --workers cores`` as a
                  subprocess, wall time INCLUDING interpreter start, imports, reading,
                  JSON, writing .bin/.idx (and "excl. start-up": the tool's own timer).
* megatron-style: multiprocessing.Pool.imap(encode, lines, 32) + IndexedDatasetBuilder
                  (Megatron-LM's preprocess_data.py in miniature; sentencepiece only).
* ours (parquet): the same tool and flags on the same texts written as one Parquet
                  file (a "text" column, pyarrow's default row groups), run interleaved
                  with the JSON lines run; "parquet / JSON lines" is the JSON lines wall
                  time over the Parquet wall time (> 1: Parquet input is faster).

ratio = limit seconds / pipeline seconds for the same tokens (1.0 = as fast as the bare
tokenizer call). Goal: ours >= 0.9 for sentencepiece and >= 0.8 for hf:, on big
(~100 KB) and small documents. Corpora: "small" = the first --small-docs paragraphs
(blank-line separated, ~150 B) of /usr/share/doc/*/changelog*.gz, "big" = --big-mb of
the same text cut into 100 KB documents (Python's own sources when the changelogs are
missing). Tokenizers are trained here: sentencepiece BPE and a byte-level BPE
tokenizer.json, both --vocab pieces. A second table profiles one pass of our
stages on one thread (small corpus, sentencepiece). Peak RSS is the tool's own.
``--python-path`` runs the tool from another checkout (before/after figures).
``--no-parquet`` skips the Parquet rows. Writes bench/results/preprocess.json.
"""
from __future__ import annotations

import argparse
import gc
import glob
import gzip
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.common import print_table, write_json

CORES = os.cpu_count() or 1
_SP = None


def corpus_text(megabytes: float) -> str:
    """Real English-ish text: Debian changelogs, else the Python standard library's sources."""
    paths = sorted(glob.glob("/usr/share/doc/*/changelog*.gz"))
    if len(paths) < 50:
        print("bench: few changelogs under /usr/share/doc; using Python's standard library sources")
        paths = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "**", "*.py"), recursive=True))
    parts, size = [], 0
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", errors="replace") as f:
            parts.append(f.read())
        size += len(parts[-1])
        if size >= megabytes * 1e6:
            break
    return "".join(parts)[: int(megabytes * 1e6)]


def write_docs(path: str, docs) -> int:
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return len(docs)


def paragraphs(text: str, n: int):
    out = [p.strip() for p in re.split(r"\n\s*\n", text)]
    return [p for p in out if p][:n]


def hf_tokenizer(train_txt: str, vocab: int, folder: str) -> str:
    """A byte-level BPE tokenizer.json with </s> as EOS, trained locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([train_txt], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                               show_progress=False))
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "</s>", "pad_token": "<pad>"}, f)
    return "hf:" + folder


def limit_fn(spec: str, texts):
    """The tokenizer's bare batch encode of ``texts``; returns a timed callable -> token count."""
    if spec.startswith("hf:"):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(spec[3:], "tokenizer.json"))
        return lambda: sum(len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False))
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=spec)
    return lambda: sum(map(len, sp.encode(texts, num_threads=CORES)))


def _init(model):
    global _SP
    import sentencepiece as spm

    _SP = spm.SentencePieceProcessor(model_file=model)


def _encode(line):
    return _SP.encode(json.loads(line)["text"]) + [_SP.eos_id()]


def megatron_style(model: str, path: str, prefix: str) -> tuple:
    """The reference pipeline of Megatron-LM's preprocess_data.py, in miniature."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    t0 = time.perf_counter()
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    n = 0
    with open(path) as f, mp.get_context("fork").Pool(CORES, initializer=_init, initargs=(model,)) as pool:
        for ids in pool.imap(_encode, f, 32):
            builder.add_document(ids, [len(ids)])
            n += len(ids)
    builder.finalize(prefix + ".idx")
    return n, time.perf_counter() - t0


def ours(spec: str, path: str, prefix: str, python_path: str) -> tuple:
    """(tokens, wall seconds incl. start-up, the tool's own seconds, peak RSS MiB)."""
    env = {**os.environ, "PYTHONPATH": python_path} if python_path else None
    cmd = [sys.executable, "-m", "data_tools.preprocess", "--input", path, "--output-prefix", prefix,
           "--tokenizer-model", spec, "--append-eod", "--workers", str(CORES)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    m = re.search(r"(\d+) tokens.* in ([0-9.]+)s \(.*peak RSS ([0-9]+) MiB\)", out.stdout)
    return int(m.group(1)), wall, float(m.group(2)), int(m.group(3))


def write_parquet(path: str, jsonl: str) -> str:
    """The texts of ``jsonl`` as a one-column Parquet file (pyarrow's defaults)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(jsonl) as f:
        pq.write_table(pa.table({"text": [json.loads(line)["text"] for line in f]}), path)
    return path


def compare(name, spec, path, docs, tmp, reps, python_path, parquet=None):
    """Rows for one corpus and tokenizer: limit, ours (and megatron-style for sentencepiece;
    ours on ``parquet``, the same texts as Parquet, when given)."""
    with open(path) as f:
        texts = [json.loads(line)["text"] for line in f]
    lim = limit_fn(spec, texts)
    n_lim = lim() + len(texts)  # + one EOD per document, as ours writes
    t_lim, t_our, t_own, t_meg, rss, t_pq, t_pq_own = [], [], [], [], 0, [], []
    for _ in range(reps):
        gc.disable()  # the tokenizer's best: no collector passes over its 100K fresh lists (ours runs so too)
        t0 = time.perf_counter()
        lim()
        t_lim.append(time.perf_counter() - t0)
        gc.enable()
        n_our, wall, own, peak = ours(spec, path, os.path.join(tmp, "our"), python_path)
        t_our.append(wall)
        t_own.append(own)
        rss = max(rss, peak)
        if parquet:
            n_pq, wall, own, peak_pq = ours(spec, parquet, os.path.join(tmp, "our_pq"), python_path)
            t_pq.append(wall)
            t_pq_own.append(own)
            if n_pq != n_our:
                raise RuntimeError(f"{name}: Parquet input gave {n_pq} tokens, JSON lines {n_our}")
        if not spec.startswith("hf:"):
            n_meg, t = megatron_style(spec, path, os.path.join(tmp, "meg"))
            t_meg.append(t)
    if n_our != n_lim:
        raise RuntimeError(f"{name}: ours wrote {n_our} tokens, the tokenizer gives {n_lim}")
    lim_s, kind = min(t_lim), "hf" if spec.startswith("hf:") else "sentencepiece"
    rows = [[name, kind, "limit", docs, n_lim, n_lim / lim_s, 1.0, "-", "-"],
            [name, kind, "ours", docs, n_our, n_our / min(t_our), lim_s / min(t_our), lim_s / min(t_own), rss]]
    if t_pq:
        rows.append([name, kind, "ours (parquet)", docs, n_pq, n_pq / min(t_pq), lim_s / min(t_pq),
                     lim_s / min(t_pq_own), peak_pq])
    if t_meg:
        rows.append([name, kind, "megatron-style", docs, n_meg, n_meg / min(t_meg), lim_s / min(t_meg), "-", "-"])
    report = {"docs": docs, "tokens": n_lim, "limit_s": lim_s, "ours_s": min(t_our), "ours_own_s": min(t_own),
              "ratio": lim_s / min(t_our), "ratio_excl_startup": lim_s / min(t_own), "peak_rss_mib": rss}
    if t_meg:
        report.update(megatron_s=min(t_meg), megatron_ratio=lim_s / min(t_meg))
    if t_pq:
        report.update(parquet_s=min(t_pq), parquet_own_s=min(t_pq_own), parquet_ratio=lim_s / min(t_pq),
                      parquet_vs_jsonl=min(t_our) / min(t_pq), parquet_vs_jsonl_excl_startup=min(t_own) / min(t_pq_own))
    return rows, report


def _min_wall(cmd, reps=5) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        best = min(best, time.perf_counter() - t0)
    return best


def profile(spec: str, path: str, tmp: str) -> dict:
    """Seconds per stage of our pipeline, each stage run alone on one thread over the corpus."""
    from data_tools import preprocess as pre
    from data_tools.batches import parse, read_batches
    from data_tools.outputs import encode, flatten

    start = _min_wall([sys.executable, "-c", "pass"])
    imports = _min_wall([sys.executable, "-c", "import data_tools.preprocess, sentencepiece"]) - start
    out = {"interpreter start": start, "start-up imports": imports}

    def timed(name, fn):
        t0 = time.perf_counter()
        result = fn()
        out[name] = time.perf_counter() - t0
        return result

    args = pre.build_parser().parse_args(["--input", path, "--output-prefix", os.path.join(tmp, "prof"),
                                          "--tokenizer-model", spec, "--append-eod"])
    p = pre.Preprocessor(args)
    batches = timed("read + cut into batches", lambda: list(read_batches([path], (0, 0, 0), args.batch_bytes)))
    timed("JSON decode + checks", lambda: [parse(b, path, ["text"], False, False) for b in batches])
    ids = timed("tokenizer call (1 thread)", lambda: [encode(p.tok, b.records[0]) for b in batches if b.records])
    flat = timed("flatten to arrays", lambda: [flatten(i, p.code, p.eod) for i in ids])
    o = p.outputs["text"]
    o.open()

    def write_bin():
        for tokens, lengths in flat:
            o.append(tokens, lengths)
        o.sync()
    timed(".bin + lengths write", write_bin)
    timed(".idx write", o.write_index)
    o.discard()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small-docs", type=int, default=100_000, help="paragraphs in the small corpus")
    ap.add_argument("--big-mb", type=float, default=20, help="size of the big-document corpus")
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--reps", type=int, default=5, help="repetitions; each figure is the minimum")
    ap.add_argument("--python-path", default="", help="PYTHONPATH for the tool (another checkout)")
    ap.add_argument("--no-hf", action="store_true", help="skip the hf: rows")
    ap.add_argument("--no-parquet", action="store_true", help="skip the Parquet rows")
    args = ap.parse_args(argv)
    report, rows = {"cores": CORES, "reps": args.reps}, []
    with tempfile.TemporaryDirectory(prefix="mext-bench-pre-") as tmp:
        text = corpus_text(max(args.big_mb, 40))
        train_txt = os.path.join(tmp, "train.txt")
        with open(train_txt, "w") as f:
            f.write(text[:20_000_000])
        from data_tools.tokenizer import train

        specs = [train([train_txt], args.vocab, os.path.join(tmp, "tok"))]
        if not args.no_hf:
            specs.append(hf_tokenizer(train_txt, args.vocab, os.path.join(tmp, "hf")))
        big = text[: int(args.big_mb * 1e6)]
        corpora = {"small": paragraphs(text, args.small_docs),
                   "big": [big[i:i + 100_000] for i in range(0, len(big), 100_000)]}
        for name, docs in corpora.items():
            path = os.path.join(tmp, f"{name}.jsonl")
            write_docs(path, docs)
            parquet = None if args.no_parquet else write_parquet(os.path.join(tmp, f"{name}.parquet"), path)
            for spec in specs:
                r, rep = compare(name, spec, path, len(docs), tmp, args.reps, args.python_path, parquet)
                rows += r
                report[f"{name}_{'hf' if spec.startswith('hf:') else 'sentencepiece'}"] = rep
        gc.disable()  # as the tool runs: no collector passes over the bench's own live objects
        prof = profile(specs[0], os.path.join(tmp, "small.jsonl"), tmp)
        gc.enable()
        report["profile_small_sentencepiece"] = prof
    print_table(f"Pre-tokenization on {CORES} cores, min of {args.reps} (ratio = limit seconds / pipeline seconds; "
                f"goal ours >= 0.9 sentencepiece, >= 0.8 hf; ratio includes interpreter start)",
                ["corpus", "tokenizer", "pipeline", "docs", "tokens", "tokens/s", "ratio", "ratio excl. start-up",
                 "peak RSS MiB"], rows)
    pq_rows = [[k.split("_")[0], k.split("_")[1], v["ours_s"], v["parquet_s"], v["parquet_vs_jsonl"],
                v["parquet_vs_jsonl_excl_startup"]] for k, v in report.items() if isinstance(v, dict) and "parquet_s" in v]
    if pq_rows:
        print_table("Parquet input vs JSON lines: same texts, same flags, interleaved (ratio = JSON lines seconds / "
                    "Parquet seconds; > 1: Parquet faster)",
                    ["corpus", "tokenizer", "JSON lines s", "Parquet s", "ratio", "ratio excl. start-up"], pq_rows)
    print_table("Where our time goes: one pass of each stage on one thread (small corpus, sentencepiece)",
                ["stage", "seconds", "share"], [[k, v, f"{v / sum(prof.values()):.1%}"] for k, v in prof.items()])
    print(f"\nbench: wrote {write_json('preprocess', report)}")


if __name__ == "__main__":
    main()
