"""Learning parity on copy tasks: megatron-core's GPTModel with our layer spec against a plain
PyTorch GPT of the same shape, trained side by side on the same synthetic batches.

Why: the Mini-LongSkywork base never learned to copy (experiments/mini_longskywork/ANALYSIS.md).
This separates "our stack cannot learn it" from "this budget cannot": both models see the same
token stream, optimizer and steps, and the table shows whether, and when, each learns to copy.

Tasks (token ids drawn uniformly from [4, vocab); windows of ``--seq`` ids):
- ``fixed``: seq/2 random ids, then the same ids again. The repeat sits at one fixed distance,
  so attending a fixed relative position is enough (no content matching).
- ``periodic``: a random prefix of 0-39 ids, then a random run of 8-48 ids repeated to the end.
  The period varies per window: predicting the repeats needs content matching (an induction head).

Both models: pre-LN, RoPE (base 10000, full head dim), GELU MLP of 4 x width, tied embeddings,
init std 0.02; AdamW (lr 1e-3, betas 0.9/0.95, weight decay 0.1), fp32, one process, CPU.
"Copyable" loss: the mean next-token loss on the ids a copier could predict; ln(vocab) without.

    python -m bench.copy_learning [--steps 600] [--tasks fixed,periodic] [--models torch,mcore]

prints a table and writes bench/results/copy_learning.json.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import print_table, write_json

COPIES_BELOW = 1.0
"""Copyable loss (nats) under which a model counts as copying."""


def batch(task: str, g: torch.Generator, bs: int, seq: int, vocab: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """ids [bs, seq + 1] and the copyable mask of their targets [bs, seq] (target t = ids[:, t + 1])."""
    rows, masks = [], []
    for _ in range(bs):
        mask = torch.zeros(seq, dtype=torch.bool)
        if task == "fixed":
            half = seq // 2 + 1
            r = torch.randint(4, vocab, (half,), generator=g)
            ids = torch.cat([r, r])[: seq + 1]
            mask[half:] = True  # targets ids[half + 1:], the repeat after its first id
        elif task == "periodic":
            start, period = int(torch.randint(0, 40, (1,), generator=g)), int(torch.randint(8, 49, (1,), generator=g))
            run = torch.randint(4, vocab, (period,), generator=g).repeat(seq // period + 2)
            ids = torch.cat([torch.randint(4, vocab, (start,), generator=g), run])[: seq + 1]
            mask[start + period:] = True  # targets after the first full period
        else:
            raise ValueError(f"task {task!r} is not fixed or periodic")
        rows.append(ids)
        masks.append(mask)
    return torch.stack(rows), torch.stack(masks)


class ReferenceGPT(nn.Module):
    """Plain PyTorch GPT: ids [b, s] -> logits [b, s, vocab]."""

    def __init__(self, vocab: int, layers: int, hidden: int, heads: int, seq: int):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(hidden), qkv=nn.Linear(hidden, 3 * hidden), proj=nn.Linear(hidden, hidden),
            ln2=nn.LayerNorm(hidden), fc1=nn.Linear(hidden, 4 * hidden), fc2=nn.Linear(4 * hidden, hidden)))
            for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
        d = hidden // heads
        inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = torch.arange(seq, dtype=torch.float64)[:, None] * inv[None]
        ang = torch.cat([ang, ang], -1)
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)

    def _rope(self, t: torch.Tensor) -> torch.Tensor:
        a, b = t.chunk(2, -1)
        return t * self.cos[: t.shape[-2]] + torch.cat([-b, a], -1) * self.sin[: t.shape[-2]]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, s = ids.shape
        h = self.emb(ids)
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](h)).view(b, s, 3, self.heads, -1).unbind(2)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, s, d]
            o = F.scaled_dot_product_attention(self._rope(q), self._rope(k), v, is_causal=True)
            h = h + blk["proj"](o.transpose(1, 2).reshape(b, s, -1))
            h = h + blk["fc2"](F.gelu(blk["fc1"](blk["ln2"](h))))
        return self.ln_f(h) @ self.emb.weight.T


def _mcore_model(args):
    """Our GPTModel (megatron_ext.train.model.build_model, CP=1, fp32) in a one-process gloo world;
    returns per_token_loss(ids [b, s + 1]) -> [b, s]."""
    import torch.distributed as dist

    from megatron_ext.train import model as M
    from megatron_ext.train.config import TrainConfig

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29000 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)
    cfg = TrainConfig()
    m = cfg.model
    m.num_layers, m.hidden_size, m.ffn_hidden_size = args.layers, args.hidden, 4 * args.hidden
    m.num_attention_heads = m.num_query_groups = args.heads
    cfg.data.seq_length, cfg.precision = args.seq, "fp32"
    M.init_model_parallel(cfg)
    model, _ = M.build_model(cfg, args.vocab, device="cpu")
    pos = torch.arange(args.seq)[None]

    def loss(ids):
        return model(ids[:, :-1], pos.expand(ids.shape[0], -1), None, labels=ids[:, 1:])
    return model, loss


def _reference_model(args):
    model = ReferenceGPT(args.vocab, args.layers, args.hidden, args.heads, args.seq)

    def loss(ids):
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(ids.shape[0], -1)
    return model, loss


def train(task: str, which: str, args) -> Dict:
    """Train one model on one task; the copyable and other loss every ``--every`` steps."""
    torch.manual_seed(args.seed)
    model, loss_fn = (_mcore_model if which == "mcore" else _reference_model)(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(args.seed + 1)
    curve, first, t0 = [], None, time.perf_counter()
    for step in range(1, args.steps + 1):
        ids, mask = batch(task, g, args.batch, args.seq, args.vocab)
        per_token = loss_fn(ids)
        opt.zero_grad()
        per_token.mean().backward()
        opt.step()
        if step % args.every == 0 or step == args.steps:
            copy, other = per_token[mask].mean().item(), per_token[~mask].mean().item()
            curve.append({"step": step, "copyable_loss": copy, "other_loss": other})
            print(f"{task} {which} step {step}: copyable loss {copy:.3f}, other {other:.3f}", flush=True)
            if first is None and copy < COPIES_BELOW:
                first = step
    return {"task": task, "model": which, "curve": curve, "copies_at_step": first,
            "final_copyable_loss": curve[-1]["copyable_loss"], "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="fixed,periodic")
    ap.add_argument("--models", default="torch,mcore", help="torch (plain reference) and/or mcore (our GPTModel)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=50, help="steps between loss records")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    runs = [train(t, m, args) for t in args.tasks.split(",") for m in args.models.split(",")]
    rows = [[r["task"], r["model"], args.steps, r["final_copyable_loss"], r["copies_at_step"] or "-", r["seconds"]]
            for r in runs]
    print_table(f"Copy learning: {args.layers} layers, width {args.hidden}, {args.batch} x {args.seq} ids a step, "
                f"vocab {args.vocab} (no copying: ln(vocab) = {math.log(args.vocab):.2f} nats)",
                ["task", "model", "steps", "copyable loss", f"copies (< {COPIES_BELOW} nat) at step", "seconds"], rows)
    path = write_json("copy_learning", {"config": vars(args), "runs": runs})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
