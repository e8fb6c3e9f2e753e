"""Pre-tokenization throughput on real text (Debian changelogs), side by side:

* ours:           python -m data_tools.preprocess (subprocess, --workers = cores)
* megatron-style: multiprocessing.Pool.imap(encode, lines, 32) + IndexedDatasetBuilder.add_document
* limit:          sentencepiece encode(list_of_texts, num_threads=cores), texts in memory, no I/O

    python -m bench.preprocess [--big-mb 40] [--small-mb 8] [--vocab 8000]

Corpora: "big" ~100 KB documents, "small" ~200-byte documents, cut from
/usr/share/doc/*/changelog*.gz. Prints tokens/s, ratios to the limit and peak
RSS; writes bench/results/preprocess.json.
"""
from __future__ import annotations

import argparse
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
    parts, size = [], 0
    for path in sorted(glob.glob("/usr/share/doc/*/changelog*.gz")):
        parts.append(gzip.open(path, "rt", errors="replace").read())
        size += len(parts[-1])
        if size >= megabytes * 1e6:
            break
    return "".join(parts)[: int(megabytes * 1e6)]


def write_corpus(path: str, text: str, doc_chars: int) -> int:
    docs = [text[i:i + doc_chars] for i in range(0, len(text), doc_chars)]
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return len(docs)


def limit(model: str, path: str) -> tuple:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    texts = [json.loads(line)["text"] for line in open(path)]
    t0 = time.perf_counter()
    ids = sp.encode(texts, num_threads=CORES)
    dt = time.perf_counter() - t0
    return sum(map(len, ids)), dt


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


def ours(model: str, path: str, prefix: str) -> tuple:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "data_tools.preprocess", "--input", path, "--output-prefix", prefix,
           "--tokenizer-model", model, "--append-eod", "--workers", str(CORES)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    # The summary line: "... in 1.23s (... tokens/s, peak RSS 85 MiB)": the tool's own time, after imports.
    m = re.search(r" in ([0-9.]+)s \(.*peak RSS ([0-9]+) MiB\)", out.stdout)
    from data_tools.indexed import read_index

    tokens = int(read_index(prefix + "_text_document").lengths.sum())
    return tokens, float(m.group(1)), wall, int(m.group(2))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big-mb", type=float, default=40)
    ap.add_argument("--small-mb", type=float, default=16)
    ap.add_argument("--vocab", type=int, default=8000)
    args = ap.parse_args(argv)
    report, rows = {"cores": CORES}, []
    with tempfile.TemporaryDirectory(prefix="mext-bench-pre-") as tmp:
        text = corpus_text(max(args.big_mb, args.small_mb))
        with open(os.path.join(tmp, "train.txt"), "w") as f:
            f.write(text[:20_000_000])
        from data_tools.tokenizer import train

        model = train([os.path.join(tmp, "train.txt")], args.vocab, os.path.join(tmp, "tok"))
        for name, mb, chars in (("big", args.big_mb, 100_000), ("small", args.small_mb, 200)):
            path = os.path.join(tmp, f"{name}.jsonl")
            docs = write_corpus(path, text[: int(mb * 1e6)], chars)
            n_lim, t_lim = limit(model, path)
            n_meg, t_meg = megatron_style(model, path, os.path.join(tmp, f"meg_{name}"))
            n_our, t_our, t_wall, rss = ours(model, path, os.path.join(tmp, f"our_{name}"))
            if n_our != n_meg:
                raise RuntimeError(f"{name}: ours wrote {n_our} tokens, megatron-style {n_meg}")
            lim = n_lim / t_lim
            rows += [[name, "limit", docs, n_lim, lim, 1.0, "-", "-"],
                     [name, "megatron-style", docs, n_meg, n_meg / t_meg, n_meg / t_meg / lim, "-", "-"],
                     [name, "ours", docs, n_our, n_our / t_our, n_our / t_our / lim, n_our / t_wall / lim, rss]]
            report[name] = {"docs": docs, "limit_tok_s": lim, "megatron_tok_s": n_meg / t_meg,
                            "ours_tok_s": n_our / t_our, "ours_ratio": n_our / t_our / lim,
                            "ours_ratio_incl_startup": n_our / t_wall / lim,
                            "megatron_ratio": n_meg / t_meg / lim, "ours_peak_rss_mib": rss}
    print_table(f"Pre-tokenization on {CORES} cores (ratio = tokens/s over the tokenizer limit; target ours >= 0.8; "
                f"'incl. startup' adds the interpreter start and imports of the subprocess)",
                ["corpus", "pipeline", "docs", "tokens", "tokens/s", "ratio", "ratio incl. startup", "peak RSS MiB"], rows)
    print(f"\nbench: wrote {write_json('preprocess', report)}")


if __name__ == "__main__":
    main()
