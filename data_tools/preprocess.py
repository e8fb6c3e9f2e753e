"""Pre-tokenize JSONL into Megatron indexed binaries, streaming and resumable.

    python -m data_tools.preprocess --input A.jsonl [B.jsonl.gz ...] --output-prefix P --tokenizer-model M
        [--json-keys text] [--append-eod] [--workers N] [--sft] [--resume] [--skip-invalid]

Writes ``P_{key}_document.bin/.idx`` (with ``--sft`` also the aligned uint8
``P_loss_mask_document``: 1 on response tokens and the EOD). Memory stays flat:
text is read, tokenized (sentencepiece, ``--workers`` threads) and appended in
batches while the next batch is parsed. Output goes to temp names and is
renamed at the end, ``.idx`` last. After each batch a progress file records
where input and output stand, so ``--resume`` continues a killed run to a
byte-identical result. A bad line stops the run (exit 2, ``FILE:LINE: reason``,
no output) unless ``--skip-invalid``, which counts and lists rejects in
``P.rejects.jsonl``.
"""
from __future__ import annotations

import argparse
import array
import concurrent.futures
import hashlib
import json
import itertools
import os
import sys
import time
from typing import Dict, Iterator, List, Tuple

import numpy as np

from .common import atomic_write, load_tokenizer, open_binary, progress
from .indexed import index_bytes, token_dtype
from .records import REASONS, BadRecord, document_segments, sft_segments
from .sysinfo import peak_rss_bytes

MASK_DATASET = "loss_mask"


def _read_lines(paths, start_file=0, start_offset=0, start_line=0) -> Iterator[Tuple[int, int, bytes, int]]:
    """(file index, 1-based line, raw line, offset just past it), from a resume point."""
    for fi in range(start_file, len(paths)):
        offset, lineno = (start_offset, start_line) if fi == start_file else (0, 0)
        with open_binary(paths[fi]) as f:
            if offset:
                f.seek(offset)
            rest = b""
            while True:
                chunk = f.read(1 << 22)
                if not chunk:
                    break
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                for raw in lines:
                    offset += len(raw) + 1
                    lineno += 1
                    yield fi, lineno, raw.rstrip(b"\r"), offset
            if rest:
                offset += len(rest)
                yield fi, lineno + 1, rest.rstrip(b"\r"), offset


class Output:
    """One dataset being written: PREFIX.bin.tmp plus a running lengths file."""

    def __init__(self, prefix: str, dtype):
        self.prefix, self.dtype = prefix, dtype
        self.bin_tmp, self.len_tmp = prefix + ".bin.tmp", prefix + ".lengths.tmp"

    def open(self, resume_state=None):
        for path, key in ((self.bin_tmp, "bin_bytes"), (self.len_tmp, "len_bytes")):
            if resume_state is None:
                open(path, "wb").close()
            else:
                with open(path, "r+b") as f:  # drop whatever was appended after the checkpoint
                    f.truncate(resume_state[key])
        self.bin, self.lens = open(self.bin_tmp, "ab"), open(self.len_tmp, "ab")

    def append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.lens.write(lengths.astype(np.int32, copy=False).tobytes())

    def sync(self) -> dict:
        for f in (self.bin, self.lens):
            f.flush()
            os.fsync(f.fileno())
        return {"bin_bytes": self.bin.tell(), "len_bytes": self.lens.tell()}

    def finish(self) -> int:
        """Rename into place, .idx last; returns the token count."""
        self.bin.close()
        self.lens.close()
        lengths = np.fromfile(self.len_tmp, dtype=np.int32)
        os.replace(self.bin_tmp, self.prefix + ".bin")
        atomic_write(self.prefix + ".idx", index_bytes(self.dtype, lengths))
        os.remove(self.len_tmp)
        return int(lengths.sum())

    def discard(self) -> None:
        for f in (getattr(self, "bin", None), getattr(self, "lens", None)):
            if f:
                f.close()
        for p in (self.bin_tmp, self.len_tmp):
            if os.path.exists(p):
                os.remove(p)


def _flatten(ids: List[List[int]], eod=None) -> Tuple[np.ndarray, np.ndarray]:
    """Token lists -> (flat int32 tokens, int32 lengths), an ``eod`` id after each when given."""
    lengths = np.fromiter(map(len, ids), np.int32, len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum()))
    if eod is not None:
        tokens = np.insert(tokens, np.cumsum(lengths), eod)
        lengths += 1
    return tokens, lengths


class Preprocessor:
    """The streaming pipeline; see the module docstring."""

    def __init__(self, args):
        self.args = args
        self.sp = load_tokenizer(args.tokenizer_model)
        self.eod = self.sp.eos_id()
        dtype = token_dtype(self.sp.vocab_size())
        keys = ["text"] if args.sft else args.json_keys
        self.outputs = {k: Output(f"{args.output_prefix}_{k}_document", dtype) for k in keys}
        if args.sft:
            self.outputs[MASK_DATASET] = Output(f"{args.output_prefix}_{MASK_DATASET}_document", np.uint8)
        self.progress_path = args.output_prefix + ".progress.json"
        self.rejects_tmp = args.output_prefix + ".rejects.jsonl.tmp"
        self.counts = {r: 0 for r in REASONS}
        self.docs = self.tokens = 0
        self.last_checkpoint = time.monotonic()

    def fingerprint(self) -> str:
        a = self.args
        spec = [a.input, a.json_keys, a.append_eod, a.sft, a.skip_invalid, os.path.getsize(a.tokenizer_model)]
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()

    # -- batches -------------------------------------------------------------------------
    def parse(self, raw: bytes):
        return sft_segments(raw) if self.args.sft else document_segments(raw, self.args.json_keys)

    def encode(self, records) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
        """records: parsed lines -> {dataset: (tokens, lengths)}."""
        n = self.args.workers
        if not self.args.sft:
            eod = self.eod if self.args.append_eod else None
            return {key: _flatten(self.sp.encode([r[i] for r in records], num_threads=n), eod)
                    for i, key in enumerate(self.args.json_keys)}
        ids = iter(self.sp.encode([text for r in records for text, _ in r], num_threads=n))
        tokens, mask, lengths = array.array("i"), array.array("B"), []
        for r in records:
            start = len(tokens)
            for _, trained in r:
                seg = next(ids)
                tokens.extend(seg)
                mask.extend([trained] * len(seg))
            tokens.append(self.eod)
            mask.append(1)
            lengths.append(len(tokens) - start)
        lengths = np.asarray(lengths, dtype=np.int32)
        return {"text": (np.frombuffer(tokens, np.int32), lengths),
                MASK_DATASET: (np.frombuffer(mask, np.uint8), lengths)}

    def write(self, encoded, position, rejects: List[dict]) -> None:
        for name, (tokens, lengths) in encoded.items():
            self.outputs[name].append(tokens, lengths)
        self.rejects.write("".join(json.dumps(r) + "\n" for r in rejects).encode())
        self.docs += len(next(iter(encoded.values()))[1]) if encoded else 0
        self.tokens += int(next(iter(encoded.values()))[1].sum()) if encoded else 0
        final = position[0] >= len(self.args.input)
        if not final and time.monotonic() - self.last_checkpoint < self.args.checkpoint_seconds:
            return
        self.last_checkpoint = time.monotonic()
        state = {name: o.sync() for name, o in self.outputs.items()}
        self.rejects.flush()
        os.fsync(self.rejects.fileno())
        atomic_write(self.progress_path, json.dumps({
            "fingerprint": self.fingerprint(), "position": position, "outputs": state, "docs": self.docs,
            "tokens": self.tokens, "counts": self.counts, "rejects_bytes": self.rejects.tell()}).encode())

    # -- the run -------------------------------------------------------------------------
    def _resume_state(self):
        if not (self.args.resume and os.path.exists(self.progress_path)):
            return None
        with open(self.progress_path) as f:
            state = json.load(f)
        if state["fingerprint"] != self.fingerprint():
            raise SystemExit(f"{self.progress_path}: was written for other inputs or options; "
                             f"delete it or rerun without --resume")
        self.docs, self.tokens, self.counts = state["docs"], state["tokens"], state["counts"]
        return state

    def run(self) -> int:
        state = self._resume_state()
        for name, out in self.outputs.items():
            out.open(state["outputs"][name] if state else None)
        if state:
            with open(self.rejects_tmp, "r+b") as f:
                f.truncate(state["rejects_bytes"])
        self.rejects = open(self.rejects_tmp, "ab" if state else "wb")
        start = state["position"] if state else (0, 0, 0)
        paths = self.args.input
        pool = concurrent.futures.ThreadPoolExecutor(1)
        pending, batch, size, rejects = None, [], 0, []
        # Input bytes give an ETA (not for .gz, whose uncompressed size is unknown); docs and tokens ride along.
        total = None if any(p.endswith(".gz") for p in paths) else sum(os.path.getsize(p) for p in paths)
        bar = progress(total=total, unit="B", desc="preprocess", unit_scale=True)
        bar.update(start[1] if start[0] == 0 else 0)
        try:
            for fi, lineno, raw, end in _read_lines(paths, *start):
                try:
                    batch.append(self.parse(raw))
                    size += len(raw)
                except BadRecord as e:
                    if not self.args.skip_invalid:
                        raise SystemExit(f"{paths[fi]}:{lineno}: {e}") from None
                    self.counts[e.kind] += 1
                    rejects.append({"file": paths[fi], "line": lineno, "reason": str(e)})
                if size >= self.args.batch_bytes:
                    pending = self._submit(pool, pending, batch, (fi, end, lineno), rejects, bar, size)
                    batch, size, rejects = [], 0, []
            if batch or rejects or pending is None:
                pending = self._submit(pool, pending, batch, (len(paths), 0, 0), rejects, bar, size)
            pending.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
            if not self.args.resume or not isinstance(sys.exc_info()[1], KeyboardInterrupt):
                self._discard()
            raise
        pool.shutdown()
        bar.close()
        return self._finish()

    def _submit(self, pool, pending, batch, position, rejects, bar, size):
        if pending is not None:
            pending.result()  # keep order and at most two batches in memory

        def job():
            self.write(self.encode(batch) if batch else {}, position, rejects)
            bar.update(size)
            elapsed = max(bar.format_dict["elapsed"], 1e-9)
            bar.set_postfix(docs=self.docs, tok_per_s=f"{self.tokens / elapsed:,.0f}", refresh=False)

        return pool.submit(job)

    def _discard(self) -> None:
        for out in self.outputs.values():
            out.discard()
        for p in (self.rejects_tmp, self.progress_path):
            if os.path.exists(p):
                os.remove(p)

    def _finish(self) -> int:
        tokens = {name: out.finish() for name, out in self.outputs.items()}
        self.rejects.close()
        rejected = sum(self.counts.values())
        if rejected:
            os.replace(self.rejects_tmp, self.args.output_prefix + ".rejects.jsonl")
        else:
            os.remove(self.rejects_tmp)
        os.remove(self.progress_path)
        first = next(iter(self.outputs))
        self.summary = {"docs": self.docs, "tokens": tokens[first], "rejected": rejected,
                        "counts": {k: v for k, v in self.counts.items() if v}}
        return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m data_tools.preprocess", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="JSONL files, .gz accepted, read in order")
    ap.add_argument("--output-prefix", required=True)
    ap.add_argument("--tokenizer-model", required=True, help="sentencepiece .model")
    ap.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize (one dataset each)")
    ap.add_argument("--append-eod", action="store_true", help="end every document with the EOS id")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer threads")
    ap.add_argument("--sft", action="store_true", help="prompt/response or messages; writes the loss mask too")
    ap.add_argument("--resume", action="store_true", help="continue a killed run from its progress file")
    ap.add_argument("--skip-invalid", action="store_true", help="skip bad lines, list them in PREFIX.rejects.jsonl")
    ap.add_argument("--batch-bytes", type=int, default=1 << 20,
                    help="text per tokenizer batch (small batches overlap parsing and encoding better)")
    ap.add_argument("--checkpoint-seconds", type=float, default=2.0,
                    help="save resume progress at most this often (and at the end)")
    return ap


def main(argv=None) -> int:
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
    s, dt = pre.summary, time.monotonic() - t0
    skipped = f", skipped {s['rejected']} ({', '.join(f'{k}: {v}' for k, v in s['counts'].items())})" if s["rejected"] else ""
    rss = peak_rss_bytes() / 2**20
    print(f"preprocess: {s['docs']} docs, {s['tokens']} tokens{skipped} -> {args.output_prefix}_*_document "
          f"in {dt:.2f}s ({s['tokens'] / max(dt, 1e-9):,.0f} tokens/s, peak RSS {rss:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
