"""SFT packing that never cuts an example.

Each SFT example (prompt + response + EOD, one document of ``{prefix}_text_document``
with its aligned ``{prefix}_loss_mask_document``) is placed whole into a sample of
``seq_length`` tokens by first-fit-decreasing. Inside a sample the examples are
separate documents: attention is masked between them (``doc_lengths`` ->
cu_seqlens), positions restart in each, and the loss never crosses a boundary.
The room left over is one filler document of pad tokens with no loss.

Packing is pure and deterministic: the bins depend only on the example lengths,
the sample order only on ``seed`` (and the epoch), so sample i is the same on
every run and a resumed run continues exactly from its consumed-sample count.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..cli import add_output_flags, quiet_cli
from ..megatron.batch import mask_document_ends


class OverlongExampleError(ValueError):
    """An example does not fit into one sample."""


def first_fit_decreasing(lengths: Sequence[int], capacity: int, drop_overlong: bool = False
                         ) -> Tuple[List[List[int]], List[int]]:
    """Bins of example indices (longest first; ties by index), each summing to <= capacity.

    Returns (bins, dropped): examples longer than ``capacity`` raise OverlongExampleError
    naming the first one, or with ``drop_overlong`` are left out and listed in ``dropped``.
    First fit is found in O(log bins) with a max-tree over the bins' free room.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    dropped = [i for i, n in enumerate(lengths) if n > capacity]
    if dropped and not drop_overlong:
        i = dropped[0]
        raise OverlongExampleError(f"example {i} has {lengths[i]} tokens, more than seq_length={capacity} "
                                   f"({len(dropped)} such examples); set data.drop_overlong=true to skip them")
    order = sorted((i for i, n in enumerate(lengths) if 0 < n <= capacity), key=lambda i: (-lengths[i], i))
    size = 1
    while size < max(1, len(order)):
        size *= 2
    tree = [capacity] * (2 * size)  # tree[size + b]: free room of bin b (every bin starts empty)
    bins: List[List[int]] = []
    for i in order:
        node = 1
        while node < size:  # descend to the leftmost bin with enough room
            node = 2 * node if tree[2 * node] >= lengths[i] else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        tree[node] -= lengths[i]
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins, dropped


def pack_sample(examples: Sequence[Tuple[np.ndarray, np.ndarray]], seq_length: int, pad_token: int = 0
                ) -> Dict[str, object]:
    """One packed sample from (tokens [n], loss mask [n]) examples, sum(n) <= seq_length.

    Returns tokens, labels (LongTensor [seq_length]), loss_mask (float [seq_length], the
    mask of each label token; 0 at every document's last token and on the filler),
    position_ids (restarting per document) and doc_lengths (list of ints, the filler last).
    """
    lengths = [len(t) for t, _ in examples]
    used = sum(lengths)
    if used > seq_length:
        raise ValueError(f"examples hold {used} tokens, more than seq_length={seq_length}")
    doc_lengths = lengths + ([seq_length - used] if used < seq_length else [])
    tokens = np.full(seq_length + 1, pad_token, dtype=np.int64)
    mask = np.zeros(seq_length + 1, dtype=np.float32)
    at = 0
    for t, m in examples:
        tokens[at:at + len(t)] = t
        mask[at:at + len(t)] = m
        at += len(t)
    loss_mask = mask_document_ends(torch.from_numpy(mask[1:]).unsqueeze(0), doc_lengths)[0]
    positions = torch.cat([torch.arange(n) for n in doc_lengths])
    return {"tokens": torch.from_numpy(tokens[:-1]), "labels": torch.from_numpy(tokens[1:]),
            "loss_mask": loss_mask, "position_ids": positions, "doc_lengths": doc_lengths}


def eod_document_lengths(tokens: torch.Tensor, eod: int) -> List[int]:
    """Document lengths of a concatenated pretraining sample (``data.document_masks``): each
    document ends at an EOD token; the rest after the last EOD is one more document.
    tokens: LongTensor [seq_length] -> lengths summing to seq_length."""
    ends = (tokens == eod).nonzero().flatten().add(1).tolist()
    if not ends or ends[-1] != tokens.numel():
        ends.append(tokens.numel())
    return [b - a for a, b in zip([0] + ends[:-1], ends)]


def blend_draws(counts: Sequence[int], weights: Sequence[float], seed: int) -> List[List[int]]:
    """Which examples of each blended prefix one epoch packs, weighted by example count.

    counts: examples per prefix (in this split); weights: the blend's weights. The epoch
    draws ``round(N x w_i / sum(w))`` examples of prefix i (N = all examples): every example
    ``k // n_i`` times, plus ``k % n_i`` more drawn without repeats by ``seed + i``. A lone
    prefix draws each of its examples once. Returns per prefix the example indices, sorted."""
    if len(counts) != len(weights) or any(w <= 0 for w in weights):
        raise ValueError(f"blend weights {list(weights)} must be positive, one per prefix ({len(counts)})")
    total, norm = sum(counts), sum(weights)
    draws = []
    for i, (n, w) in enumerate(zip(counts, weights)):
        k = n if len(counts) == 1 else int(round(total * w / norm))
        if n == 0:
            draws.append([])
            continue
        whole, rest = divmod(k, n)
        extra = np.sort(np.random.RandomState(seed + i).choice(n, size=rest, replace=False)).tolist()
        draws.append(sorted(list(range(n)) * whole + extra))
    return draws


class PackedSftDataset(torch.utils.data.Dataset):
    """Packed SFT samples from ``{prefix}_text_document`` + ``{prefix}_loss_mask_document``.

    ``prefix`` is one prefix, or a blend: a list of (weight, prefix) pairs, drawn by
    :func:`blend_draws` (weighted by example count, deterministic in ``seed``) and packed
    together. ``examples`` (one range of example indices, default all; for a blend, one
    range per prefix) is the split packed; errors and ``dropped`` name examples by their
    index in their prefix (``dropped``: (prefix, index) pairs for a blend).
    ``dataset[i]`` is :func:`pack_sample` of bin ``order[i % n_bins]``; each pass over the
    bins (epoch) has its own order, drawn from ``seed + epoch``. ``fill_rate`` is real
    tokens / (bins x seq_length).
    """

    def __init__(self, prefix, seq_length: int, seed: int = 1234, drop_overlong: bool = False,
                 pad_token: int = 0, examples=None):
        blend = not isinstance(prefix, str)
        pairs = [(float(w), str(p)) for w, p in prefix] if blend else [(1.0, prefix)]
        ranges = (list(examples) if examples is not None else [None] * len(pairs)) if blend else [examples]
        self.sources = [_open_sft(p) for _, p in pairs]  # (prefix, text, mask, lengths)
        counts, pools = [], []
        for (name, _, _, lengths), rng in zip(self.sources, ranges):
            pool = list(rng) if rng is not None else list(range(len(lengths)))
            pools.append(pool)
            counts.append(len(pool))
        picks = blend_draws(counts, [w for w, _ in pairs], seed)
        self.draws = [(s, pools[s][j]) for s, chosen in enumerate(picks) for j in chosen]  # (source, example)
        lengths = [self.sources[s][3][j] for s, j in self.draws]
        try:
            self.bins, dropped = first_fit_decreasing(lengths, seq_length, drop_overlong)
        except OverlongExampleError:
            s, j = self.draws[next(i for i, n in enumerate(lengths) if n > seq_length)]
            many = sum(n > seq_length for n in lengths)
            raise OverlongExampleError(f"{self.sources[s][0]}: example {j} has {self.sources[s][3][j]} tokens, more "
                                       f"than seq_length={seq_length} ({many} such examples); set "
                                       f"data.drop_overlong=true to skip them") from None
        named = sorted({self.draws[i] for i in dropped})
        self.dropped = [(self.sources[s][0], j) for s, j in named] if blend else [j for _, j in named]
        if not self.bins:
            raise ValueError(f"{', '.join(p for _, p in pairs)}: no example fits into seq_length={seq_length}")
        self.seq_length, self.seed, self.pad_token = seq_length, seed, pad_token
        self.real_tokens = sum(lengths[i] for b in self.bins for i in b)
        self.fill_rate = self.real_tokens / (len(self.bins) * seq_length)
        self._orders: Dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.bins)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders[epoch] = np.random.RandomState(self.seed + epoch).permutation(len(self.bins))
        return self._orders[epoch]

    def __getitem__(self, index: int) -> Dict[str, object]:
        epoch, i = divmod(int(index), len(self.bins))
        examples = []
        for d in self.bins[self._order(epoch)[i]]:
            s, j = self.draws[d]
            _, text, mask, _ = self.sources[s]
            examples.append((np.asarray(text[j], dtype=np.int64), np.asarray(mask[j], dtype=np.float32)))
        return pack_sample(examples, self.seq_length, self.pad_token)

    def summary(self) -> str:
        """One log line: bins, fill rate, dropped examples."""
        blend = f" from {len(self.sources)} prefixes" if len(self.sources) > 1 else ""
        return (f"packing=sft: {sum(len(b) for b in self.bins)} examples{blend} in {len(self.bins)} samples of "
                f"{self.seq_length} tokens, fill rate {self.fill_rate:.3f} (real tokens / seq_length), "
                f"{len(self.dropped)} overlong dropped")


def _open_sft(prefix: str):
    """(prefix, text IndexedDataset, mask IndexedDataset, example lengths) of one SFT prefix;
    the two must hold the same example lengths."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    text = IndexedDataset(f"{prefix}_text_document")
    mask = IndexedDataset(f"{prefix}_loss_mask_document")
    lengths = [int(n) for n in text.sequence_lengths]
    mask_lengths = [int(n) for n in mask.sequence_lengths]
    if lengths != mask_lengths:
        bad = next(i for i, (a, b) in enumerate(zip(lengths, mask_lengths)) if a != b) \
            if len(lengths) == len(mask_lengths) else min(len(lengths), len(mask_lengths))
        raise ValueError(f"{prefix}: _text_document and _loss_mask_document differ at example {bad} "
                         f"({len(lengths)} vs {len(mask_lengths)} examples)")
    return prefix, text, mask, lengths


def main(argv=None) -> int:
    quiet_cli(argv)
    ap = argparse.ArgumentParser(prog="python -m megatron_ext.train.packing",
                                 description="Pack SFT examples and print the fill rate.")
    ap.add_argument("prefix", help="data prefix (without _text_document)")
    ap.add_argument("--seq-length", type=int, required=True)
    ap.add_argument("--drop-overlong", action="store_true")
    add_output_flags(ap)
    args = ap.parse_args(argv)
    try:
        ds = PackedSftDataset(args.prefix, args.seq_length, drop_overlong=args.drop_overlong)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(ds.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
