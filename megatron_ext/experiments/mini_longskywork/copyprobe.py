"""Can a checkpoint copy from its context? Two probes that need no evaluation template.

1. **Induction on random tokens.** ``L`` token ids drawn uniformly from the vocabulary (ids >= 100,
   away from special pieces), then the same ``L`` ids again. A model with an induction (copy)
   mechanism predicts the second copy far better than the first; one without does equally badly on
   both (about ln(vocab)).
2. **Copy-rich samples** (optional, ``--copy-jsonl``: what ``data_tools.synth copy`` writes). Argmax
   accuracy on the first and the second half of each sample's tokens; the second half holds the
   repeats. Without copying both halves score alike.

``python -m megatron_ext.experiments.mini_longskywork.copyprobe --checkpoint runs/mini/stages/base
--tokenizer-model runs/mini/tok.model --copy-jsonl runs/mini/data/copy.jsonl --out probe.json``
prints a table and writes JSON. One process, CPU, the checkpoint's own RoPE.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Dict, List, Optional

import torch

from data_tools.common import atomic_write, load_tokenizer

from ...cli import quiet_cli
from ...convert.logits import LogitsModel

COPIES_MARGIN = 1.0
"""Nats by which the second copy's loss must undercut the first's to call the model a copier."""


def induction(model: LogitsModel, vocab: int, length: int, trials: int, seed: int = 0) -> Dict[str, float]:
    """Mean next-token loss (nats) on the first and the second copy of ``length`` random ids,
    over ``trials`` sequences [1, 2 * length]; the first position of each copy is left out
    (nothing could predict it)."""
    g = torch.Generator().manual_seed(seed)
    first, second = [], []
    for _ in range(trials):
        seq = torch.randint(100, vocab, (length,), generator=g)
        ids = torch.cat([seq, seq]).unsqueeze(0)
        loss = torch.nn.functional.cross_entropy(model.logits(ids)[0, :-1], ids[0, 1:], reduction="none")
        first.append(loss[: length - 1].mean().item())
        second.append(loss[length:].mean().item())
    return {"first_copy_loss": sum(first) / trials, "second_copy_loss": sum(second) / trials}


def copy_halves(model: LogitsModel, sp, rows: List[dict], max_tokens: int) -> Dict[str, Dict[str, float]]:
    """Per ``meta.kind``: mean argmax accuracy on the first and the second half of each sample
    (tokens [1, <= max_tokens])."""
    out: Dict[str, List[List[float]]] = {}
    for row in rows:
        ids = torch.tensor([sp.encode(row["text"])[:max_tokens]])
        n = ids.shape[1] - 1
        right = (model.logits(ids)[0, :-1].argmax(-1) == ids[0, 1:]).float()
        out.setdefault(row.get("meta", {}).get("kind", "all"), []).append(
            [right[: n // 2].mean().item(), right[n // 2:].mean().item()])
    return {k: {"first_half": sum(a for a, _ in v) / len(v), "second_half": sum(b for _, b in v) / len(v),
                "samples": len(v)} for k, v in out.items()}


def probe(checkpoint: str, tokenizer_model: str, copy_jsonl: Optional[str] = None, samples: int = 60,
          lengths=(16, 64), trials: int = 8, max_tokens: int = 512) -> dict:
    """Both probes on one checkpoint; ``copies`` is True when the second random copy's loss is
    at least :data:`COPIES_MARGIN` nats below the first's at every length."""
    with LogitsModel.load(checkpoint) as model:
        sp = load_tokenizer(tokenizer_model)
        vocab = model.model.vocab_size
        res = {"checkpoint": checkpoint, "vocab": vocab, "uniform_loss": math.log(vocab),
               "induction": {str(n): induction(model, vocab, n, trials, seed=n) for n in lengths}}
        if copy_jsonl:
            with open(copy_jsonl) as f:
                rows = [json.loads(line) for _, line in zip(range(samples), f)]
            res["copy_samples"] = copy_halves(model, sp, rows, max_tokens)
    res["copies"] = all(v["first_copy_loss"] - v["second_copy_loss"] >= COPIES_MARGIN
                        for v in res["induction"].values())
    return res


def table(res: dict) -> str:
    """The probe's result as printed lines."""
    lines = [f"{res['checkpoint']}: uniform guess {res['uniform_loss']:.2f} nats",
             "random ids repeated | loss on 1st copy | loss on 2nd copy"]
    lines += [f"L = {n:>3s}              | {v['first_copy_loss']:16.2f} | {v['second_copy_loss']:16.2f}"
              for n, v in res["induction"].items()]
    for kind, v in res.get("copy_samples", {}).items():
        lines.append(f"copy samples ({kind}, {v['samples']}): argmax accuracy 1st half {v['first_half']:.3f}, "
                     f"2nd half {v['second_half']:.3f}")
    lines.append(f"copies: {'yes' if res['copies'] else 'no'} (2nd copy >= {COPIES_MARGIN} nats below the 1st)")
    return "\n".join(lines)


def main(argv=None) -> int:
    quiet_cli(argv)
    ap = argparse.ArgumentParser(prog="python -m megatron_ext.experiments.mini_longskywork.copyprobe",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="save_dir (newest complete step) or a step-N folder")
    ap.add_argument("--tokenizer-model", required=True, help="the checkpoint's sentencepiece .model (or hf:DIR)")
    ap.add_argument("--copy-jsonl", default=None, help="copy-rich samples to score by halves (synth copy output)")
    ap.add_argument("--samples", type=int, default=60, help="rows of --copy-jsonl to score")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    try:
        res = probe(args.checkpoint, args.tokenizer_model, args.copy_jsonl, args.samples)
    except (OSError, ValueError) as e:
        print(f"copyprobe: {e}", file=sys.stderr)
        return 2
    print(table(res))
    if args.out:
        atomic_write(args.out, (json.dumps(res, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
