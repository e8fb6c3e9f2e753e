"""Train a sentencepiece tokenizer from JSONL or text.

    python -m data_tools.tokenizer train --input X.jsonl [Y.txt ...] --vocab-size N --output-prefix P
        [--model-type bpe|unigram] [--json-key text] [--sample-bytes 200000000] [--split-digits]

Writes P.model and P.vocab. Byte fallback is on (no unknown bytes); ids:
unk=0, bos=1, eos=2, pad=3. ``--sample-bytes`` caps the text fed to the trainer.
``--split-digits`` (as Llama's tokenizer) makes every digit its own piece, so a
number tokenizes the same wherever it appears.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from .common import atomic_write, iter_texts, progress
from .quiet import add_output_flags, quiet_cli

UNK, BOS, EOS, PAD = 0, 1, 2, 3


def train(inputs, vocab_size: int, output_prefix: str, model_type: str = "bpe", json_key: str = "text",
          sample_bytes: int = 200_000_000, split_digits: bool = False) -> str:
    """Train and return the path of the .model file. Deterministic: the first
    ``sample_bytes`` of text, in input order, no shuffling. ``split_digits``: sentencepiece's
    option of that name (one piece per digit)."""
    import sentencepiece as spm

    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mext-spm-") as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        written = 0
        with open(corpus, "w", encoding="utf-8") as out, progress(unit="doc", desc="collect") as bar:
            for _, text in iter_texts(inputs, json_key):
                for line in text.splitlines():
                    line = line.strip()
                    if line and written < sample_bytes:
                        out.write(line + "\n")
                        written += len(line) + 1
                bar.update(1)
                if written >= sample_bytes:
                    break  # the sample is full: the rest of the corpus is never read
        if written == 0:
            raise ValueError(f"no text found in {inputs} (key {json_key!r})")
        tmp_prefix = os.path.join(tmp, "spm")
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=tmp_prefix, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, unk_id=UNK, bos_id=BOS, eos_id=EOS, pad_id=PAD, character_coverage=0.9995,
            shuffle_input_sentence=False, num_threads=os.cpu_count() or 1, minloglevel=2,
            hard_vocab_limit=False, split_digits=split_digits,
        )
        for ext in (".vocab", ".model"):  # .model last: it is what other tools look for
            with open(tmp_prefix + ext, "rb") as f:
                atomic_write(output_prefix + ext, f.read())
    return output_prefix + ".model"


def main(argv=None) -> int:
    quiet_cli(argv)
    ap = argparse.ArgumentParser(prog="python -m data_tools.tokenizer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a sentencepiece model")
    t.add_argument("--input", nargs="+", required=True, help="JSONL (key --json-key) or text files, .gz ok")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    t.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    t.add_argument("--json-key", default="text")
    t.add_argument("--sample-bytes", type=int, default=200_000_000, help="cap on training text (bytes)")
    t.add_argument("--split-digits", action="store_true", help="one piece per digit (as Llama's tokenizer)")
    add_output_flags(t)
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    try:
        path = train(args.input, args.vocab_size, args.output_prefix, args.model_type, args.json_key,
                     args.sample_bytes, args.split_digits)
    except (RuntimeError, ValueError, FileNotFoundError) as e:  # sentencepiece reports bad settings as RuntimeError
        print(f"tokenizer: {e}", file=sys.stderr)
        return 2
    print(f"tokenizer: wrote {path} ({args.model_type}, vocab {args.vocab_size}) in {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
