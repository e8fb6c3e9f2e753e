"""Score an answer after a prompt, teacher-forced, in one context-parallel forward.

Greedy decoding reproduces the answer exactly when, at every answer position,
the argmax of the next-token distribution is the next answer token; both are
read off one forward over ``prompt + answer``. The sequence is padded at the end
to a multiple of 2 x CP (causal attention: padding never reaches earlier
positions), sharded zigzag, and run through the model's CP attention (the ring
forward for cp_comm_type p2p). Logits are formed only at the answer positions,
so a long prompt never materialises [S, vocab].
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist

from ..attention.checks import rank_and_size
from ..sharding import position_ids, shard_sequence


@dataclass
class AnswerScore:
    """The teacher-forced verdict on one answer."""

    greedy_match: bool
    """Greedy decoding would produce exactly the answer tokens."""
    mean_logprob: float
    """Mean log-probability of the answer tokens (natural log)."""
    first_mismatch: int
    """Index of the first answer token greedy decoding gets wrong; -1 if none."""
    argmax_tokens: List[int]
    """The model's argmax at each answer position (equals greedy output up to first_mismatch)."""


def _padded(seq: List[int], cp_size: int) -> List[int]:
    """End-padded to a multiple of 2 x CP (zigzag); causal attention never reads the pad."""
    return seq + [0] * (-len(seq) % (2 * cp_size))


@contextlib.contextmanager
def _hidden_states_only(model):
    """GPTModel returns its final (normed) hidden states instead of logits while
    ``post_process`` is off; the flag is read only at the end of forward."""
    saved = model.post_process
    model.post_process = False
    try:
        yield
    finally:
        model.post_process = saved


def _output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """hidden: [n, b, h] -> logits [n, b, vocab], through GPTModel's own output layer."""
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    logits, _ = model.output_layer(hidden, weight=weight, runtime_gather_output=True)
    return logits


@torch.no_grad()
def score_answer(model, prompt_ids: Sequence[int], answer_ids: Sequence[int], cp_group=None,
                 bf16: bool = False) -> AnswerScore:
    """Teacher-forced greedy match and mean log-prob of ``answer_ids`` after ``prompt_ids``.

    Every rank of ``cp_group`` (CP = P) passes the same token lists; the model sees
    tokens [1, S / P] (S = len(prompt + answer) padded to a multiple of 2P) and
    returns hidden states [S / P, 1, h]. One all-reduce of [2, len(answer)] float64
    combines what each rank's answer positions found.
    """
    if not prompt_ids or not answer_ids:
        raise ValueError(f"score_answer needs a prompt and an answer, got {len(prompt_ids)} and {len(answer_ids)} tokens")
    rank, size = rank_and_size(cp_group)
    seq = _padded(list(prompt_ids) + list(answer_ids), size)
    device = next(model.parameters()).device
    tokens = torch.tensor([seq], dtype=torch.long, device=device)
    positions = position_ids(len(seq), rank, size, "zigzag").to(device)
    local_tokens = shard_sequence(tokens, 1, rank, size, "zigzag")
    # The prediction for answer token j comes from position len(prompt) - 1 + j.
    first, n = len(prompt_ids) - 1, len(answer_ids)
    owned = ((positions >= first) & (positions < first + n)).nonzero().flatten()
    with _hidden_states_only(model), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = model(local_tokens, positions.unsqueeze(0), None)
        logits = _output_logits(model, hidden[owned]).float()[:, 0]
    found = torch.zeros(2, n, dtype=torch.float64, device=device)
    if owned.numel():
        j = positions[owned] - first
        targets = tokens[0, positions[owned] + 1]
        found[0, j] = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0].double()
        found[1, j] = logits.argmax(dim=-1).double()
    if size > 1:
        dist.all_reduce(found, group=cp_group)  # each answer position lives on exactly one rank
    argmax = [int(t) for t in found[1].tolist()]
    wrong = [j for j, (a, t) in enumerate(zip(argmax, answer_ids)) if a != t]
    return AnswerScore(not wrong, float(found[0].mean()), wrong[0] if wrong else -1, argmax)


@torch.no_grad()
def greedy_decode(model, prompt_ids: Sequence[int], max_new_tokens: int) -> Tuple[List[int], List[float]]:
    """Reference decoding on one rank (CP = 1): ``max_new_tokens`` steps, each a full
    forward (logits [1, s, vocab]) over the sequence so far (end-padded to an even
    length, which causal attention never looks at), taking the argmax.
    Returns the tokens and their log-probabilities."""
    device = next(model.parameters()).device
    seq, logprobs = list(prompt_ids), []
    for _ in range(max_new_tokens):
        padded = _padded(seq, 1)  # the zigzag CP attention wants an even length, even at P = 1
        tokens = torch.tensor([padded], dtype=torch.long, device=device)
        logits = model(tokens, torch.arange(len(padded), device=device).unsqueeze(0), None)[0, len(seq) - 1].float()
        nxt = int(logits.argmax())
        logprobs.append(float(torch.log_softmax(logits, dim=-1)[nxt]))
        seq.append(nxt)
    return seq[len(prompt_ids):], logprobs
