"""Generate synthetic long-context JSONL.

    python -m data_tools.synth cip    --input docs.jsonl [...] --output cip.jsonl --target-tokens N --tokenizer-model M --seed S
                                      [--k 4] [--chunk-chars 200:2000] [--separator '\\n\\n'] [--allow-reuse]
                                      [--mode cip|concat] [--num-samples N] [--json-key text]
    python -m data_tools.synth synl   --output synl.jsonl --num-samples N --target-tokens N --tokenizer-model M --seed S
                                      [--question-types lookup,count,...]
    python -m data_tools.synth needle --output needle.jsonl --lengths 1k,2k --depths 0:100:10 --tokenizer-model M
                                      [--haystack docs.jsonl] [--kind needle|passkey] [--seed S]
"""
from __future__ import annotations

import argparse
import random
import sys
import time

from ..common import DataError, JsonlWriter, iter_texts, load_tokenizer, parse_int_list, progress
from .cip import CipBuilder, CipConfig
from .needle import needle_sample, parse_depths, read_haystack
from .synl import QUESTION_TYPES, SynlConfig, synl_sample


def _counter(model: str):
    sp = load_tokenizer(model)
    return lambda text: len(sp.encode(text))


def run_cip(args, out: JsonlWriter) -> str:
    lo, hi = (int(x) for x in args.chunk_chars.split(":"))
    cfg = CipConfig(args.target_tokens, args.k, lo, hi, args.separator.encode().decode("unicode_escape"),
                    args.allow_reuse, args.mode, args.seed)
    sources = [text for _, text in iter_texts(args.input, args.json_key)]
    builder = CipBuilder(sources, _counter(args.tokenizer_model), cfg)
    partial, tokens = 0, 0
    with progress(total=args.num_samples, unit="sample", desc=args.mode) as bar:
        for sample in builder.samples():
            out.write(sample)
            partial += sample["meta"]["partial"]
            tokens += sample["meta"]["n_tokens"]
            bar.update(1)
            if args.num_samples and out.count >= args.num_samples:
                break
    short = f", {partial} shorter than the target (source documents ran out)" if partial else ""
    return f"{out.count} {args.mode} samples, {tokens} tokens{short}"


def run_synl(args, out: JsonlWriter) -> str:
    types = tuple(args.question_types.split(",")) if args.question_types else tuple(QUESTION_TYPES)
    bad = [t for t in types if t not in QUESTION_TYPES]
    if bad:
        raise ValueError(f"unknown question types {bad}; expected {QUESTION_TYPES}")
    cfg, rng, count = SynlConfig(args.target_tokens, types, args.seed), random.Random(args.seed), _counter(args.tokenizer_model)
    with progress(total=args.num_samples, unit="sample", desc="synl") as bar:
        for _ in range(args.num_samples):
            out.write(synl_sample(count, cfg, rng))
            bar.update(1)
    return f"{out.count} synl samples"


def run_needle(args, out: JsonlWriter) -> str:
    haystack = "" if args.kind == "passkey" else read_haystack(args.haystack)
    if args.kind == "needle" and not haystack.strip():
        raise ValueError("--kind needle needs --haystack with text (or use --kind passkey)")
    rng, count = random.Random(args.seed), _counter(args.tokenizer_model)
    lengths, depths = parse_int_list(args.lengths), parse_depths(args.depths)
    with progress(total=len(lengths) * len(depths), unit="sample", desc=args.kind) as bar:
        for length in lengths:
            for depth in depths:
                out.write(needle_sample(haystack, args.kind, length, depth, count, rng, fit_response=True))
                bar.update(1)
    return f"{out.count} {args.kind} samples ({len(lengths)} lengths x {len(depths)} depths)"


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m data_tools.synth", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("cip", "synl", "needle"):
        p = sub.add_parser(name)
        p.add_argument("--output", required=True)
        p.add_argument("--tokenizer-model", required=True, help="PATH.model (sentencepiece) or hf:DIR (a Hugging Face tokenizer.json)")
        p.add_argument("--seed", type=int, default=0)
    cip, synl, needle = (sub.choices[n] for n in ("cip", "synl", "needle"))
    cip.add_argument("--input", nargs="+", required=True, help="JSONL source documents")
    cip.add_argument("--target-tokens", type=int, required=True)
    cip.add_argument("--num-samples", type=int, default=0, help="stop after N samples (0: until sources run out)")
    cip.add_argument("--k", type=int, default=4, help="documents interleaved at a time")
    cip.add_argument("--chunk-chars", default="200:2000", help="chunk size range MIN:MAX in characters")
    cip.add_argument("--separator", default="\\n\\n", help="between segments (escapes allowed)")
    cip.add_argument("--allow-reuse", action="store_true", help="documents may appear in several samples")
    cip.add_argument("--mode", choices=["cip", "concat"], default="cip")
    cip.add_argument("--json-key", default="text")
    synl.add_argument("--num-samples", type=int, required=True)
    synl.add_argument("--target-tokens", type=int, required=True)
    synl.add_argument("--question-types", default="", help="comma list; default: all")
    needle.add_argument("--lengths", required=True, help="e.g. 1k,2k,4k")
    needle.add_argument("--depths", default="0:100:10", help="START:STOP:STEP (inclusive) or a comma list")
    needle.add_argument("--haystack", nargs="*", default=[], help="JSONL documents (key text) for --kind needle")
    needle.add_argument("--kind", choices=["needle", "passkey"], default="needle")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.monotonic()
    out = JsonlWriter(args.output)
    try:
        summary = {"cip": run_cip, "synl": run_synl, "needle": run_needle}[args.command](args, out)
    except (DataError, ValueError, FileNotFoundError) as e:
        out.abort()
        print(f"synth {args.command}: {e}", file=sys.stderr)
        return 2
    except BaseException:
        out.abort()
        raise
    out.commit()
    print(f"synth {args.command}: {summary} -> {args.output} in {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
