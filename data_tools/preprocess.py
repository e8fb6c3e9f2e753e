"""Pre-tokenize JSON lines, Parquet or ``datasets`` folders into Megatron indexed binaries,
streaming and resumable.

    python -m data_tools.preprocess --input A.jsonl [B.jsonl.gz C.jsonl.zst D.parquet DATASET_DIR ...]
        --output-prefix P --tokenizer-model M
        [--json-keys text] [--append-eod] [--workers N] [--sft] [--resume] [--skip-invalid] [--allow-empty]

Inputs, by name: ``*.parquet`` (pyarrow), a folder (a Hugging Face dataset saved with
``save_to_disk``, read by ``datasets.load_from_disk``), ``*.gz`` / ``*.zst`` (compressed
JSON lines), anything else JSON lines. ``--json-keys`` names the JSON keys, and the
columns of Parquet and datasets input (:mod:`data_tools.tables`).

``--tokenizer-model`` is a sentencepiece ``PATH.model`` or ``hf:DIR`` (a Hugging
Face ``tokenizer.json``); the EOD id is the tokenizer's EOS. Writes
``P_{key}_document.bin/.idx`` (with ``--sft`` also the aligned uint8
``P_loss_mask_document``: 1 on response tokens and the EOD). An SFT record is
tokenized as one text, prompt + implied separator + response, and the mask
starts at the suffix after the prompt (:mod:`data_tools.segments`).

Pipeline: the main thread cuts the input into blocks of whole lines
(:mod:`data_tools.batches`); ``--workers`` threads parse, tokenize (the tokenizer runs
outside the GIL) and flatten blocks side by side (:mod:`data_tools.outputs`); the main
thread appends them in input order. At most ``2 x workers`` batches are in flight, so
memory stays flat whatever the input size (the index is streamed from a lengths file
at the end). Start-up imports neither numpy nor torch.

Crash safety: output goes to temp names; a progress file records where input and
output stand (reject counts travel with their batch: a resumed run counts each once)
and ``--resume`` continues a killed run to a byte-identical result. It is tied to the
inputs' sizes and mtimes, the options and the tokenizer's content. At the end the
``.idx`` files go to temp names, old ``.idx`` files are removed, then ``.bin`` and
``.idx`` are renamed: no ``.bin`` ever sits beside another run's ``.idx``.

A bad line stops the run (exit 2, ``FILE:LINE: reason``; a bad table row:
``FILE: row N: reason``, N from 0; no output) unless
``--skip-invalid``, which counts and lists rejects in ``P.rejects.jsonl``. Input
with no documents is an error (exit 2, naming the files) unless ``--allow-empty``.
"""
from __future__ import annotations

import argparse
import collections
import gc
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict

from .batches import Batch, parse, read_batches
from .tables import is_table
from .common import COMPRESSED, atomic_write, input_stamp, load_tokenizer, progress
from .quiet import add_output_flags, quiet_cli
from .idxwrite import UINT8, token_code
from .outputs import Output, encode, flatten, flatten_sft
from .records import REASONS
from .segments import split_encoded, texts_to_encode
from .sysinfo import peak_rss_bytes

MASK_DATASET = "loss_mask"
FINAL = "final"  # progress phase: every .idx written to its temp name, renames may be under way


def _reached(point: str) -> None:
    """Named points of the run (``checkpoint``, ``indexed``, ``old-index-removed``,
    ``bins-renamed``, ``indexes-renamed``). A no-op; crash tests replace it to stop
    the process exactly there."""


class Preprocessor:
    """The streaming pipeline; see the module docstring."""

    def __init__(self, args):
        self.args = args
        self.tok = load_tokenizer(args.tokenizer_model, threads=args.workers)
        self.eod = self.tok.eos_id()
        self.code = token_code(self.tok.vocab_size())
        keys = ["text"] if args.sft else args.json_keys
        self.outputs = {k: Output(f"{args.output_prefix}_{k}_document", self.code) for k in keys}
        if args.sft:
            self.outputs[MASK_DATASET] = Output(f"{args.output_prefix}_{MASK_DATASET}_document", UINT8)
        self.progress_path = args.output_prefix + ".progress.json"
        self.rejects_tmp = args.output_prefix + ".rejects.jsonl.tmp"
        self.counts: Dict[str, int] = {}
        self.docs = self.tokens = 0
        self.last_checkpoint = time.monotonic()
        self._fingerprint = None

    def fingerprint(self) -> str:
        """What the output depends on: the inputs (path, size, mtime), the options, the tokenizer's content."""
        if self._fingerprint is None:
            a = self.args
            inputs = [input_stamp(p) for p in a.input]
            spec = [inputs, a.json_keys, a.append_eod, a.sft, a.skip_invalid, self.tok.fingerprint()]
            self._fingerprint = hashlib.sha256(json.dumps(spec).encode()).hexdigest()
        return self._fingerprint

    # -- batches -------------------------------------------------------------------------
    def encode(self, batch: Batch) -> Dict[str, tuple]:
        """Parse one batch and tokenize it -> {dataset: (tokens, int32 lengths)}; runs on a worker thread."""
        a = self.args
        parse(batch, a.input[batch.file], a.json_keys, a.sft, a.skip_invalid)
        records, batch.lines, batch.data, batch.records = batch.records, None, None, None  # free as we go
        if not records or not records[0]:
            return {}
        if not a.sft:
            eod = self.eod if a.append_eod else None
            return {key: flatten(encode(self.tok, texts), self.code, eod)
                    for key, texts in zip(a.json_keys, records)}
        # Each record is tokenized as one text, cut where the loss mask changes (the suffix rule).
        texts = [texts_to_encode(r) for r in records]
        ids = iter(self.tok.encode_batch([t for ts in texts for t in ts]))
        per_record = [split_encoded(r, [next(ids) for _ in ts]) for r, ts in zip(records, texts)]
        tokens, mask, lengths = flatten_sft(per_record, self.code, self.eod)
        return {"text": (tokens, lengths), MASK_DATASET: (mask, lengths)}

    def write(self, encoded, batch: Batch) -> None:
        """Append one encoded batch (in input order) and checkpoint when due."""
        for name, (tokens, lengths) in encoded.items():
            self.outputs[name].append(tokens, lengths)
        if batch.rejects:
            for r in batch.rejects:
                self.counts[r["kind"]] = self.counts.get(r["kind"], 0) + 1
            self.rejects.write("".join(json.dumps({k: v for k, v in r.items() if k != "kind"}) + "\n"
                                       for r in batch.rejects).encode())
        if encoded:
            lengths = next(iter(encoded.values()))[1]
            self.docs += len(lengths)
            self.tokens += sum(lengths)
        final = batch.position[0] >= len(self.args.input)
        if final or time.monotonic() - self.last_checkpoint >= self.args.checkpoint_seconds:
            self.checkpoint(batch.position)

    def checkpoint(self, position, phase: str = "run", state=None) -> None:
        self.last_checkpoint = time.monotonic()
        state = state or {name: o.sync() for name, o in self.outputs.items()}
        self.rejects.flush()
        os.fsync(self.rejects.fileno())
        atomic_write(self.progress_path, json.dumps({
            "fingerprint": self.fingerprint(), "phase": phase, "position": position, "outputs": state,
            "docs": self.docs, "tokens": self.tokens, "counts": self.counts,
            "rejects_bytes": self.rejects.tell()}).encode())
        _reached("checkpoint")

    # -- the run -------------------------------------------------------------------------
    def _resume_state(self):
        if not (self.args.resume and os.path.exists(self.progress_path)):
            return None
        with open(self.progress_path) as f:
            state = json.load(f)
        if state["fingerprint"] != self.fingerprint():
            raise SystemExit(f"{self.progress_path}: was written for other inputs (size or mtime), options or "
                             f"tokenizer; delete it or rerun without --resume")
        self.docs, self.tokens, self.counts = state["docs"], state["tokens"], state["counts"]
        return state

    def run(self) -> int:
        # The pipeline makes no reference cycles; the collector's passes over the many small
        # lists in flight cost ~5% of a run on small documents.
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            return self._run()
        finally:
            if gc_was_on:
                gc.enable()

    def _run(self) -> int:
        state = self._resume_state()
        if state and state.get("phase") == FINAL:
            return self._rename()
        for name, out in self.outputs.items():
            out.open(state["outputs"][name] if state else None)
        if state:
            with open(self.rejects_tmp, "r+b") as f:
                f.truncate(state["rejects_bytes"])
        self.rejects = open(self.rejects_tmp, "ab" if state else "wb")
        paths = self.args.input
        workers = max(1, self.args.workers)
        pool = ThreadPoolExecutor(workers)
        # Input bytes give an ETA (not for compressed files or tables: their sizes are not what is read).
        total = None if any(p.endswith(COMPRESSED) or is_table(p) for p in paths) else \
            sum(os.path.getsize(p) for p in paths)
        columns = None if self.args.sft else self.args.json_keys  # what tables read (None: the SFT columns)
        bar = progress(total=total, unit="B", desc="preprocess", unit_scale=True)
        try:
            inflight = collections.deque()
            start = state["position"] if state else (0, 0, 0)
            for batch in read_batches(paths, start, self.args.batch_bytes, columns):
                inflight.append((pool.submit(self.encode, batch) if batch.has_input() else None, batch))
                while len(inflight) > 2 * workers or (inflight and inflight[0][0] is None) or \
                        (inflight and inflight[0][0].done()):
                    self._write_next(inflight, bar)
            while inflight:
                self._write_next(inflight, bar)
            self._finish()
        except BaseException as err:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
            # with --resume a failure from outside (a full disk, Ctrl-C) keeps the progress; bad input
            # (SystemExit naming FILE:LINE, no documents) would fail again the same way
            if not self.args.resume or isinstance(err, SystemExit):
                self._discard()
            raise
        pool.shutdown()
        bar.close()
        return self._rename()

    def _write_next(self, inflight, bar) -> None:
        future, batch = inflight.popleft()
        self.write(future.result() if future else {}, batch)
        bar.update(batch.size)
        bar.set_postfix(docs=self.docs, refresh=False)

    def _discard(self) -> None:
        for out in self.outputs.values():
            out.discard()
        if getattr(self, "rejects", None):
            self.rejects.close()
        for p in (self.rejects_tmp, self.progress_path):
            if os.path.exists(p):
                os.remove(p)

    def _finish(self) -> None:
        """Every .idx to its temp name, then the progress file says so (phase FINAL)."""
        if self.docs == 0 and not self.args.allow_empty:
            rejected = sum(self.counts.values())
            unit = "rows" if all(map(is_table, self.args.input)) else "lines"
            why = f"all {rejected} {unit} were rejected" if rejected else "empty input"
            raise SystemExit(f"{', '.join(self.args.input)}: no documents ({why}); nothing written "
                             f"(--allow-empty writes an empty dataset)")
        state = {name: out.write_index() for name, out in self.outputs.items()}
        _reached("indexed")
        self.checkpoint((len(self.args.input), 0, 0), FINAL, state)
        self.rejects.close()

    def _rename(self) -> int:
        """Idempotent, so ``--resume`` completes it after a crash: old .idx files go first
        (no new .bin ever sits beside an old .idx), then the .bin files, then the .idx files."""
        outs = self.outputs.values()
        for out in outs:
            if os.path.exists(out.bin_tmp) and os.path.exists(out.prefix + ".idx"):
                os.remove(out.prefix + ".idx")
        _reached("old-index-removed")
        for out in outs:
            if os.path.exists(out.bin_tmp):
                os.replace(out.bin_tmp, out.prefix + ".bin")
        _reached("bins-renamed")
        for out in outs:
            if os.path.exists(out.idx_tmp):
                os.replace(out.idx_tmp, out.prefix + ".idx")
        _reached("indexes-renamed")
        for out in outs:
            if os.path.exists(out.len_tmp):
                os.remove(out.len_tmp)
        rejected = sum(self.counts.values())
        if os.path.exists(self.rejects_tmp):
            if rejected:
                os.replace(self.rejects_tmp, self.args.output_prefix + ".rejects.jsonl")
            else:
                os.remove(self.rejects_tmp)
        os.remove(self.progress_path)
        self.summary = {"docs": self.docs, "tokens": self.tokens, "rejected": rejected,
                        "counts": {k: self.counts[k] for k in REASONS if self.counts.get(k)}}
        return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m data_tools.preprocess", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True,
                    help="read in order: JSON lines (.jsonl, .jsonl.gz, .jsonl.zst), .parquet files, "
                         "datasets folders (save_to_disk)")
    ap.add_argument("--output-prefix", required=True)
    ap.add_argument("--tokenizer-model", required=True,
                    help="PATH.model (sentencepiece) or hf:DIR (a Hugging Face tokenizer.json)")
    ap.add_argument("--json-keys", nargs="+", default=["text"],
                    help="JSON keys, or Parquet/datasets columns, to tokenize: one dataset P_{key}_document each")
    ap.add_argument("--append-eod", action="store_true", help="end every document with the EOS id")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                    else os.cpu_count() or 1, help="tokenizer threads (default: the CPUs this process may use)")
    ap.add_argument("--sft", action="store_true", help="prompt/response or messages; writes the loss mask too")
    ap.add_argument("--resume", action="store_true", help="continue a killed run from its progress file")
    ap.add_argument("--skip-invalid", action="store_true", help="skip bad lines, list them in PREFIX.rejects.jsonl")
    ap.add_argument("--allow-empty", action="store_true", help="write an empty dataset for input without documents")
    ap.add_argument("--batch-bytes", type=int, default=1 << 18,
                    help="input per tokenizer batch (small batches keep every worker busy to the end)")
    ap.add_argument("--checkpoint-seconds", type=float, default=2.0,
                    help="save resume progress at most this often (and at the end)")
    return add_output_flags(ap)


def main(argv=None) -> int:
    quiet_cli(argv)
    args = build_parser().parse_args(argv)
    t0 = time.monotonic()
    try:
        pre = Preprocessor(args)
        pre.run()
    except SystemExit as e:
        if isinstance(e.code, str):
            print(f"preprocess: {e.code}", file=sys.stderr)
            return 2
        raise
    except (FileNotFoundError, ValueError) as e:
        print(f"preprocess: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or failing disk: not the input's fault
        hint = "fix the cause and rerun with --resume to continue" if args.resume else \
            "no progress is kept without --resume"
        print(f"preprocess: {e}; {hint}", file=sys.stderr)
        return 1
    s, dt = pre.summary, time.monotonic() - t0
    skipped = f", skipped {s['rejected']} ({', '.join(f'{k}: {v}' for k, v in s['counts'].items())})" if s["rejected"] else ""
    rss = peak_rss_bytes() / 2**20
    print(f"preprocess: {s['docs']} docs, {s['tokens']} tokens{skipped} -> {args.output_prefix}_*_document "
          f"in {dt:.2f}s ({s['tokens'] / max(dt, 1e-9):,.0f} tokens/s, peak RSS {rss:.0f} MiB)")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # every output is closed and fsynced: skip the interpreter's teardown (~15 ms)
