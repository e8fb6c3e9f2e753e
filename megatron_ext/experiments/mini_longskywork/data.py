"""The experiment's data, built with the real tools (data_tools CLIs), each product once.

Training documents and the needle haystack are disjoint slices of one corpus (the
demo's: Debian changelogs, or Python's docs on a slim image), split by content:
Debian ships one changelog under several packages, so the split is over distinct
texts and no text is on both sides. The passkey filler,
the needle sentence and the evaluation questions never appear in any training file.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from typing import Dict, List, Tuple

from data_tools.common import atomic_write, load_tokenizer
from data_tools.segments import encode_pair
from data_tools.synth.copytext import eval_hits

from ...demo import corpus
from .config import ExperimentConfig


def tool(*args: str) -> str:
    """Run ``python -m <args>``; raise with its stderr tail on failure."""
    res = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{' '.join(args[:2])} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return res.stdout


def content_key(line: str) -> str:
    """sha256 of a JSONL document's text with runs of whitespace collapsed: copies of one text
    (one changelog shipped by several packages) share it."""
    text = " ".join(json.loads(line)["text"].split())
    return hashlib.sha256(text.encode()).hexdigest()


def split_held_out(lines: List[str], n_held: int) -> Tuple[List[str], List[str], int]:
    """(held-out haystack, training documents, copies dropped from the haystack) from JSONL lines.

    The split is over distinct contents (:func:`content_key`), every k-th in first-seen order
    so the haystack is not one package family: a held-out content keeps one copy in the
    haystack and none in training. Raises RuntimeError with fewer than 2 x ``n_held`` contents."""
    groups: Dict[str, List[int]] = {}
    for i, line in enumerate(lines):
        groups.setdefault(content_key(line), []).append(i)
    distinct = list(groups)
    if len(distinct) < 2 * n_held:
        raise RuntimeError(f"only {len(distinct)} distinct documents ({len(lines)} with copies); the experiment "
                           f"needs more than {2 * n_held} (train + held-out haystack)")
    step = max(2, len(distinct) // n_held)
    held = distinct[::step][:n_held]
    held_set = set(held)
    haystack = [lines[groups[k][0]] for k in held]
    train = [lines[i] for i in sorted(i for k in distinct if k not in held_set for i in groups[k])]  # input order
    return haystack, train, sum(len(groups[k]) - 1 for k in held)


def _split_corpus(cfg: ExperimentConfig, root: str) -> str:
    """docs.jsonl (training) and haystack.jsonl (held out); returns what the corpus is."""
    every = f"{root}/corpus.jsonl"
    what = corpus(every, max_docs=cfg.train_docs + cfg.haystack_docs)
    haystack, train, dropped = split_held_out(open(every).read().splitlines(), cfg.haystack_docs)
    atomic_write(f"{root}/haystack.jsonl", ("\n".join(haystack) + "\n").encode())
    atomic_write(f"{root}/docs.jsonl", ("\n".join(train) + "\n").encode())
    return (f"{what}: {len(train)} for training, {len(haystack)} held out as the needle haystack (split by "
            f"content hash: no text on both sides; {dropped} duplicate copies of held-out texts dropped)")


def _synl(tok: str, out: str, n: int, target: int, seed: int, weights: str = "") -> None:
    tool("data_tools.synth", "synl", "--output", out, "--num-samples", str(n), "--target-tokens", str(target),
         "--tokenizer-model", tok, "--seed", str(seed), "--question-weights", weights)


def template_hits(copy_path: str, haystack_path: str) -> List[str]:
    """What of the evaluation a copy-text file holds: passkey/needle wording (synth copy's EVAL_PHRASES)
    and lines (30+ characters) found only in the held-out haystack; [] when clean. ``FILE:LINE: what``."""
    haystack = [json.loads(x)["text"] for x in open(haystack_path)]
    hay_lines = {ln.strip() for t in haystack for ln in t.splitlines() if len(ln.strip()) >= 30}
    hits = []
    for i, raw in enumerate(open(copy_path), 1):
        text = json.loads(raw)["text"]
        found = eval_hits(text) + sorted(ln for ln in hay_lines if ln in text)[:1] + [
            "a whole haystack document" for t in haystack if t.strip() and t.strip() in text][:1]
        hits += [f"{copy_path}:{i}: {h!r}" for h in found]
    return hits


def _copy_text(cfg: ExperimentConfig, root: str, tok: str) -> str:
    """Copy-rich base pretraining text from the training documents only; raises if it holds any of the
    evaluation (template wording or haystack text)."""
    out = f"{root}/data/copy.jsonl"
    if cfg.copy_tokens > cfg.l0 // 2:
        raise ValueError(f"copy_tokens {cfg.copy_tokens} must be at most L0 / 2 = {cfg.l0 // 2}, so every L0 window "
                         "of the copy dataset holds a whole sample")
    # enough samples that no window repeats: windows x L0 tokens, samples a little under copy_tokens
    n = max(30, int(cfg.base.iters * cfg.base.global_batch * cfg.copy_share * cfg.l0 / cfg.copy_tokens * 1.15) + 1)
    tool("data_tools.synth", "copy", "--input", f"{root}/docs.jsonl", "--output", out, "--num-samples", str(n),
         "--target-tokens", str(cfg.copy_tokens), "--span-tokens", cfg.copy_span_tokens, "--tokenizer-model", tok,
         "--seed", "400", "--kinds", cfg.copy_kinds)
    hay_only = _haystack_only(root)
    hits = template_hits(out, hay_only)
    os.remove(hay_only)
    if hits:
        raise RuntimeError(f"copy text holds evaluation text ({len(hits)} hits):\n" + "\n".join(hits[:10]))
    return out


def _haystack_only(root: str) -> str:
    """haystack.jsonl with every line that also occurs in a training document blanked (shared boilerplate).

    "Occurs" is a substring test: a wrapped boilerplate line ("* Set upstream metadata fields: Bug-Database,")
    is training text when a training document holds it inside a longer line."""
    train = "\n".join(json.loads(x)["text"] for x in open(f"{root}/docs.jsonl"))
    rows = [json.loads(x)["text"] for x in open(f"{root}/haystack.jsonl")]
    keep = ["\n".join(ln for ln in t.splitlines() if ln.strip() not in train) for t in rows]
    path = f"{root}/data/haystack_only.jsonl"
    atomic_write(path, "".join(json.dumps({"text": t}) + "\n" for t in keep).encode())
    return path


def supervised_tokens(tok: str, path: str) -> float:
    """Mean tokens per SFT sample that carry loss (separator + response, the suffix rule's cut)."""
    sp = load_tokenizer(tok)
    rows = [json.loads(x) for x in open(path)]
    return sum(len(encode_pair(sp, r["prompt"], r["response"])[1]) for r in rows) / max(1, len(rows))


def _cat(out: str, parts: List[str]) -> None:
    atomic_write(out, b"".join(open(p, "rb").read() for p in parts))


def _sft_examples(cfg: ExperimentConfig, tok: str, d: str, name: str, seed: int) -> str:
    """Short SynL examples at the sizes of ``cfg.sft_targets``, mixed in one file."""
    parts = []
    per = max(1, cfg.sft_examples // len(cfg.sft_targets))
    for i, target in enumerate(cfg.sft_targets):
        parts.append(f"{d}/{name}_{target}.jsonl")
        _synl(tok, parts[-1], per, target, seed + i, cfg.sft_question_weights)
    _cat(f"{d}/{name}.jsonl", parts)
    return f"{d}/{name}.jsonl"


def build_template(cfg: ExperimentConfig, root: str) -> str:
    """The diagnostic arm's long SFT data: the main long mix plus passkey and needle samples
    made with the evaluation's own templates (other keys, depths and a training-document
    haystack). Returns its prefix; built once."""
    d, tok = f"{root}/data", f"{root}/tok.model"
    prefix = f"{d}/long_template"
    if os.path.exists(f"{prefix}_text_document.idx"):
        return prefix
    lengths = ",".join(str(n) for n in sorted({cfg.l0, cfg.l1 // 4, cfg.l1 // 2, cfg.l1 - 96}))
    parts = []
    for kind, seed in (("passkey", 7), ("needle", 8), ("passkey", 9), ("needle", 10)):
        parts.append(f"{d}/template_{kind}_{seed}.jsonl")
        extra = ["--haystack", f"{root}/docs.jsonl"] if kind == "needle" else []
        tool("data_tools.synth", "needle", "--output", parts[-1], "--lengths", lengths, "--depths", "2.5:97.5:5",
             "--tokenizer-model", tok, "--kind", kind, "--seed", str(seed), *extra)
    _cat(f"{d}/long_template.jsonl", [f"{d}/long_mix.jsonl"] + parts)
    tool("data_tools.preprocess", "--input", f"{d}/long_template.jsonl", "--output-prefix", prefix,
         "--tokenizer-model", tok, "--sft")
    return prefix


def _copy_and_sft_setup(cfg: ExperimentConfig, tok: str, copy: str, sft: Dict[str, str]) -> List[str]:
    """The report's setup lines on the tokenizer, the copy-rich share and schedule of the base, and the SFT mix."""
    metas = [json.loads(x)["meta"] for x in open(copy)]
    per = {k: sum(m["kind"] == k for m in metas) for k in dict.fromkeys(m["kind"] for m in metas)}
    sup = {n: supervised_tokens(tok, p) for n, p in sft.items()}
    return [f"Tokenizer: sentencepiece BPE, {cfg.vocab_size} pieces, trained on the training documents only"
            f"{', digits split (one piece per digit)' if cfg.split_digits else ''}.",
            f"Base pretraining: {cfg.copy_share:.0%} of samples from copy-rich text ({len(metas)} samples of "
            f"<= {cfg.copy_tokens} tokens, so every {cfg.l0}-token window holds a whole one, made by "
            "`data_tools.synth copy` from the training documents: "
            + ", ".join(f"{n} {k}" for k, n in per.items()) + f"; span: a {cfg.copy_span_tokens.replace(':', '-')}"
            "-token span recurs later, repeat: "
            "a document twice, keys: labelled random strings named again), the rest training documents. "
            "Scanned: no passkey/needle wording, no haystack text.",
            f"Base schedule: {cfg.base.iters} steps of {cfg.base.global_batch} x {cfg.l0} tokens, lr {cfg.base.lr} "
            + (f"constant, decaying over the last {cfg.base.wsd_decay} (WSD)." if cfg.base.wsd_decay else
               "with cosine decay."),
            f"SynL question weights (SFT and long SFT): {cfg.sft_question_weights or 'uniform'}; supervised "
            "tokens per sample (separator + answer): " + ", ".join(f"{n} {v:.1f}" for n, v in sup.items()) + "."]


def build(cfg: ExperimentConfig, root: str, log=print) -> Dict[str, str]:
    """Every dataset prefix the stages read, keyed by name; skips what exists (resume)."""
    d = f"{root}/data"
    os.makedirs(d, exist_ok=True)
    tok = f"{root}/tok.model"
    done = f"{d}/DONE.json"
    names = ("docs", "copy", "cip", "concat", "sft", "long_mix", "long_nosynl")
    prefixes = {name: f"{d}/{name}" for name in names}
    if os.path.exists(done):
        return dict(prefixes, tokenizer=tok, haystack=f"{root}/haystack.jsonl")
    setup = [f"Corpus: {_split_corpus(cfg, root)}."]
    log(f"data: {setup[0]}")
    tool("data_tools.tokenizer", "train", "--input", f"{root}/docs.jsonl", "--vocab-size", str(cfg.vocab_size),
         "--output-prefix", f"{root}/tok", *(["--split-digits"] if cfg.split_digits else []))
    copy = _copy_text(cfg, root, tok)
    n_cpt = cfg.cpt.iters * cfg.cpt.global_batch
    for mode in ("cip", "concat"):  # the same documents, interleaved or whole
        tool("data_tools.synth", "cip", "--input", f"{root}/docs.jsonl", "--output", f"{d}/{mode}.jsonl",
             "--target-tokens", str(cfg.l1), "--tokenizer-model", tok, "--seed", "0", "--mode", mode,
             "--num-samples", str(n_cpt), "--allow-reuse")
    sft = _sft_examples(cfg, tok, d, "sft", seed=100)
    other = _sft_examples(cfg, tok, d, "sft_long_share", seed=200)  # fresh tables for the long stage
    _synl(tok, f"{d}/synl_long.jsonl", cfg.long_synl_examples, int(cfg.l1 * 0.95), seed=300,
          weights=cfg.sft_question_weights)
    _cat(f"{d}/long_mix.jsonl", [f"{d}/synl_long.jsonl", other])
    _cat(f"{d}/long_nosynl.jsonl", [other])
    jobs = [("docs", f"{root}/docs.jsonl", "--append-eod"), ("copy", copy, "--append-eod"),
            ("cip", f"{d}/cip.jsonl", "--append-eod"),
            ("concat", f"{d}/concat.jsonl", "--append-eod"), ("sft", sft, "--sft"),
            ("long_mix", f"{d}/long_mix.jsonl", "--sft"), ("long_nosynl", f"{d}/long_nosynl.jsonl", "--sft")]
    for name, src, flag in jobs:
        tool("data_tools.preprocess", "--input", src, "--output-prefix", prefixes[name], "--tokenizer-model", tok,
             flag)
    setup += _copy_and_sft_setup(cfg, tok, copy, {"SFT": sft, "long SFT": f"{d}/long_mix.jsonl"})
    setup += [f"Continual pretraining data: {n_cpt} samples of {cfg.l1} tokens, CIP (arm no-cip: the same "
              f"documents concatenated whole), from the training documents.",
              f"SFT data: short SynL tables of {list(cfg.sft_targets)} tokens, {cfg.sft_examples} examples.",
              f"Long SFT data: {cfg.long_synl_examples} SynL tables of ~{int(cfg.l1 * 0.95)} tokens plus "
              f"{cfg.sft_examples} fresh short SFT examples, packed to {cfg.l1} (arm no-synl: the short ones only).",
              "The six main arms never train on the passkey filler and wording, the needle sentence and "
              "question, the haystack documents or the held-out SynL tables (string seeds); only the "
              "labelled diagnostic arm full+retrieval-data trains on the passkey/needle templates."]
    atomic_write(done, json.dumps({"setup": setup}).encode())
    return dict(prefixes, tokenizer=tok, haystack=f"{root}/haystack.jsonl")
