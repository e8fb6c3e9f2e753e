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


class PackedSftDataset(torch.utils.data.Dataset):
    """Packed SFT samples from ``{prefix}_text_document`` + ``{prefix}_loss_mask_document``.

    ``examples`` (a range of example indices, default all) is the split packed; errors and
    ``dropped`` name examples by their index in the prefix.
    ``dataset[i]`` is :func:`pack_sample` of bin ``order[i % n_bins]``; each pass over the
    bins (epoch) has its own order, drawn from ``seed + epoch``. ``fill_rate`` is real
    tokens / (bins x seq_length); ``dropped`` lists skipped overlong example indices.
    """

    def __init__(self, prefix: str, seq_length: int, seed: int = 1234, drop_overlong: bool = False,
                 pad_token: int = 0, examples: Optional[range] = None):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.text = IndexedDataset(f"{prefix}_text_document")
        self.mask = IndexedDataset(f"{prefix}_loss_mask_document")
        lengths = [int(n) for n in self.text.sequence_lengths]
        mask_lengths = [int(n) for n in self.mask.sequence_lengths]
        if lengths != mask_lengths:
            bad = next(i for i, (a, b) in enumerate(zip(lengths, mask_lengths)) if a != b) \
                if len(lengths) == len(mask_lengths) else min(len(lengths), len(mask_lengths))
            raise ValueError(f"{prefix}: _text_document and _loss_mask_document differ at example {bad} "
                             f"({len(lengths)} vs {len(mask_lengths)} examples)")
        if examples is not None:  # a split: the other examples get length 0, so indices stay global
            keep = set(examples)
            lengths = [n if i in keep else 0 for i, n in enumerate(lengths)]
        try:
            self.bins, self.dropped = first_fit_decreasing(lengths, seq_length, drop_overlong)
        except OverlongExampleError as err:
            raise OverlongExampleError(f"{prefix}: {err}") from None
        if not self.bins:
            raise ValueError(f"{prefix}: no example fits into seq_length={seq_length}")
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
        examples = [(np.asarray(self.text[j], dtype=np.int64), np.asarray(self.mask[j], dtype=np.float32))
                    for j in self.bins[self._order(epoch)[i]]]
        return pack_sample(examples, self.seq_length, self.pad_token)

    def summary(self) -> str:
        """One log line: bins, fill rate, dropped examples."""
        return (f"packing=sft: {sum(len(b) for b in self.bins)} examples in {len(self.bins)} samples of "
                f"{self.seq_length} tokens, fill rate {self.fill_rate:.3f} (real tokens / seq_length), "
                f"{len(self.dropped)} overlong dropped")


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
