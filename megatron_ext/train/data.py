"""Training data: megatron-core's GPTDataset/BlendedMegatronDatasetBuilder over
our indexed binaries, with the SFT loss mask alongside.

The mask (``*_loss_mask_document``) has the same document lengths as the
tokens, so a second builder over the mask prefixes with the same config yields
the same sample, shuffle and blend indices: sample i of both line up. The mask
is read as raw values (never through GPTDataset's token/label handling, which
rewrites pad ids).

The sample order never depends on ``optim.train_iters``: each split is built for
one epoch of its data (a weighted blend for a fixed size derived from the data),
and a run longer than an epoch walks the same order again. So the first N samples
are the same whatever the run length, and a resumed run with more iterations
continues where it stopped.

``data.packing: sft`` packs whole SFT examples instead (:mod:`.packing`), and
``data.document_masks`` adds each pretraining sample's EOD document lengths; both
give samples a ``doc_lengths`` entry, which the trainer shards the ``thd`` way.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from data_tools.common import load_tokenizer

from .data_spec import describe_data
from .packing import PackedSftDataset, _open_sft, eod_document_lengths


class TrainTokenizer:
    """The tokenizer fields megatron-core's datasets read, over data_tools' tokenizer
    (``PATH.model`` sentencepiece or ``hf:DIR``); EOD is the tokenizer's EOS."""

    def __init__(self, model_path: str):
        self.sp = load_tokenizer(model_path)
        self.vocab_size = self.sp.vocab_size()
        self.eod = self.sp.eos_id()
        self.pad = self.sp.pad_id()
        self.unique_identifiers = OrderedDict(class_name=type(self).__name__, model=os.path.abspath(model_path)
                                              if not model_path.startswith("hf:") else model_path)


def load_train_tokenizer(spec: str):
    """The tokenizer named by ``data.tokenizer_model``."""
    return TrainTokenizer(spec)


def _blend(prefixes_and_weights: List, suffix: str):
    if len(prefixes_and_weights) % 2:
        raise ValueError(f"data.blend must be [weight, prefix, ...], got {prefixes_and_weights}")
    weights = [float(w) for w in prefixes_and_weights[0::2]]
    prefixes = [str(p) + suffix for p in prefixes_and_weights[1::2]]
    for p in prefixes:
        if not (os.path.exists(p + ".bin") and os.path.exists(p + ".idx")):
            raise FileNotFoundError(f"{p}.bin/.idx: not found (run python -m data_tools.preprocess first)")
    return prefixes, weights


def _epoch_samples(prefixes: List[str], seq_length: int, split: str) -> List[Optional[int]]:
    """Per split, the samples in one epoch of all ``prefixes`` together (a size that
    depends on the data only, for weighted blends, which need one)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens = 0
    for p in prefixes:
        ds = IndexedDataset(p)  # held while reading: its __del__ closes the mmap that sequence_lengths views
        tokens += int(ds.sequence_lengths.sum())
        del ds
    parts = [float(x) for x in split.replace("/", ",").split(",")]
    return [max(1, int(tokens * part / sum(parts)) // seq_length) if part > 0 else None for part in parts]


def _split_examples(n: int, split: str) -> List[range]:
    """The train and valid example ranges of ``n`` examples by ``data.split`` shares."""
    parts = ([float(x) for x in split.replace("/", ",").split(",")] + [0.0, 0.0])[:3]
    ends = [int(round(n * x / sum(parts))) for x in np.cumsum([0.0] + parts)]
    return [range(ends[0], ends[1]), range(ends[1], ends[2])]


def build_packed_datasets(cfg, valid_samples: int = 0, pad_token: int = 0):
    """(train, valid or None) for ``data.packing: sft``: :class:`PackedSftDataset` over the
    train and valid shares (``cfg.split``, per prefix) of ``cfg.blend``'s examples; a blend of
    several prefixes is drawn by weight, counted in examples (``packing.blend_draws``)."""
    desc = describe_data(cfg, "sft")
    _check_files(desc)
    pairs = list(zip(desc.weights, desc.prefixes))
    counts = [len(_open_sft(p)[3]) for p in desc.prefixes]
    ranges = [_split_examples(n, cfg.split) for n in counts]

    def build(which):
        if len(pairs) == 1:
            return PackedSftDataset(desc.prefixes[0], cfg.seq_length, cfg.seed, cfg.drop_overlong, pad_token,
                                    ranges[0][which])
        return PackedSftDataset(pairs, cfg.seq_length, cfg.seed, cfg.drop_overlong, pad_token,
                                [r[which] for r in ranges])

    train = build(0)
    if valid_samples and not any(len(r[1]) for r in ranges):
        raise ValueError(f"logging.eval_iters > 0 needs a valid share in data.split (got {cfg.split!r})")
    return train, build(1) if valid_samples else None


def _check_files(desc) -> None:
    """FileNotFoundError naming the first missing file of the data description."""
    missing = desc.missing()
    if missing:
        raise FileNotFoundError(f"{missing[0]}: not found ({len(missing)} data files missing; run "
                                f"python -m data_tools.preprocess first)")


def build_datasets(cfg, tokenizer, cache_dir: str, valid_samples: int = 0, packing: str = "none"):
    """(train, valid or None): :class:`Samples` over ``cfg.blend`` (and its loss masks
    when ``cfg.sft``), or with ``packing == "sft"`` :func:`build_packed_datasets`. The valid
    split exists when ``cfg.split`` gives it a share and ``valid_samples`` > 0."""
    if packing == "sft":
        return build_packed_datasets(cfg, valid_samples)
    _check_files(describe_data(cfg, packing))
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes, weights = _blend(cfg.blend, "_text_document")
    one = len(prefixes) == 1
    sizes = [None, None, None] if one else _epoch_samples(prefixes, cfg.seq_length, cfg.split)
    if valid_samples and sizes[1] is None and not one:
        raise ValueError(f"logging.eval_iters > 0 needs a valid share in data.split (got {cfg.split!r})")
    # no test split is used; a weighted blend needs a size (0) for a split without a share
    sizes = [sizes[0], sizes[1] if one or sizes[1] is not None else 0, 0]

    def build(suffix):
        p, w = _blend(cfg.blend, suffix)
        config = GPTDatasetConfig(
            random_seed=cfg.seed, sequence_length=cfg.seq_length, blend=(p, None if one else w), split=cfg.split,
            path_to_cache=cache_dir, tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
            eod_mask_loss=False, create_attention_mask=False, mid_level_dataset_surplus=0.005,
        )
        return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()

    text = build("_text_document")
    mask = build("_loss_mask_document") if cfg.sft else [None, None, None]
    eod = tokenizer.eod if cfg.document_masks else None
    train = Samples(text[0], mask[0], "train", eod)
    if valid_samples and (text[1] is None or len(text[1]) == 0):
        raise ValueError(f"logging.eval_iters > 0 needs a valid share in data.split (got {cfg.split!r})")
    valid = Samples(text[1], mask[1], "valid", eod) if valid_samples else None
    return train, valid


def _raw_sample(dataset, index: int) -> np.ndarray:
    """Sample ``index``'s raw token values (seq_length + 1), bypassing label handling."""
    if hasattr(dataset, "dataset_index"):  # BlendedDataset
        dataset, index = dataset.datasets[dataset.dataset_index[index]], dataset.dataset_sample_index[index]
    return dataset._query_document_sample_shuffle_indices(index)[0]


class Samples:
    """Sample i of a split as [S] tensors: tokens, labels, loss_mask, position_ids; the
    SFT mask multiplies the loss mask at the label positions. Index i wraps around
    the epoch. With ``eod`` (``data.document_masks``) a sample also has ``doc_lengths``,
    its documents split after each EOD token."""

    def __init__(self, text, mask, name: str, eod: Optional[int] = None):
        if text is None or len(text) == 0:
            raise ValueError(f"the {name} split has no samples: check data.split and data.blend")
        self.text, self.mask, self.name, self.eod = text, mask, name, eod

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        i = index % len(self.text)
        item = self.text[i]
        out = {k: item[k] for k in ("tokens", "labels", "loss_mask", "position_ids")}
        if self.mask is not None:
            values = torch.from_numpy(np.asarray(_raw_sample(self.mask, i)[1:], dtype=np.float32))
            out["loss_mask"] = out["loss_mask"] * values.to(out["loss_mask"].dtype)
        if self.eod is not None:
            out["doc_lengths"] = eod_document_lengths(out["tokens"], self.eod)
        return out


def sample_batches(samples: Samples, start_sample: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                   grad_accum: int) -> Iterator[List[Dict[str, torch.Tensor]]]:
    """Per optimizer step, this DP rank's micro-batches ([mbs, S] tensors; ``doc_lengths``,
    where samples have them, stays a list of mbs lists).

    Global sample ids are consecutive from ``start_sample``; step k takes
    global_batch = mbs * dp * accum of them, and DP rank r takes every dp-th
    micro-batch slot, so the global batch is the same at any DP size.
    """
    gbs = micro_batch_size * dp_size * grad_accum
    step = start_sample // gbs
    while True:
        base = step * gbs
        micro = []
        for a in range(grad_accum):
            first = base + (a * dp_size + dp_rank) * micro_batch_size
            items = [samples[i] for i in range(first, first + micro_batch_size)]
            micro.append({k: torch.stack([it[k] for it in items]) if torch.is_tensor(items[0][k])
                          else [it[k] for it in items] for k in items[0]})
        yield micro
        step += 1
