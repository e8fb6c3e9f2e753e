"""Training data: megatron-core's GPTDataset/BlendedMegatronDatasetBuilder over
our indexed binaries, with the SFT loss mask alongside.

The mask (``*_loss_mask_document``) has the same document lengths as the
tokens, so a second builder over the mask prefixes with the same config
yields the same sample, shuffle and blend indices: sample i of both line up.
Order is deterministic (seeded); a run resumes by starting at its consumed
sample count.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Dict, Iterator, List

import torch

from data_tools.common import load_tokenizer


class SentencePieceTokenizer:
    """The tokenizer fields megatron-core's datasets read."""

    def __init__(self, model_path: str):
        self.sp = load_tokenizer(model_path)
        self.vocab_size = self.sp.vocab_size()
        self.eod = self.sp.eos_id()
        self.pad = self.sp.pad_id()
        self.unique_identifiers = OrderedDict(class_name=type(self).__name__, model=os.path.abspath(model_path))


def _blend(prefixes_and_weights: List, suffix: str):
    if len(prefixes_and_weights) % 2:
        raise ValueError(f"data.blend must be [weight, prefix, ...], got {prefixes_and_weights}")
    weights = [float(w) for w in prefixes_and_weights[0::2]]
    prefixes = [str(p) + suffix for p in prefixes_and_weights[1::2]]
    for p in prefixes:
        if not (os.path.exists(p + ".bin") and os.path.exists(p + ".idx")):
            raise FileNotFoundError(f"{p}.bin/.idx: not found (run python -m data_tools.preprocess first)")
    return prefixes, weights


def build_datasets(cfg, num_samples: int, tokenizer: SentencePieceTokenizer, cache_dir: str):
    """(text dataset, mask dataset or None), each with at least ``num_samples`` samples."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    def build(suffix):
        prefixes, weights = _blend(cfg.blend, suffix)
        config = GPTDatasetConfig(
            random_seed=cfg.seed, sequence_length=cfg.seq_length, blend=(prefixes, weights), split=cfg.split,
            path_to_cache=cache_dir, tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
            eod_mask_loss=False, create_attention_mask=False, mid_level_dataset_surplus=0.005,
        )
        train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()
        return train

    text = build("_text_document")
    mask = build("_loss_mask_document") if cfg.sft else None
    return text, mask


def sample_batches(text, mask, start_sample: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                   grad_accum: int) -> Iterator[List[Dict[str, torch.Tensor]]]:
    """Per optimizer step, this DP rank's micro-batches ([mbs, S] tensors).

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
            items = [_sample(text, mask, i) for i in range(first, first + micro_batch_size)]
            micro.append({k: torch.stack([it[k] for it in items]) for k in items[0]})
        yield micro
        step += 1


def _sample(text, mask, index: int) -> Dict[str, torch.Tensor]:
    if index >= len(text):
        raise IndexError(f"sample {index} is past the dataset's {len(text)} samples")
    item = text[index]
    out = {k: item[k] for k in ("tokens", "labels", "loss_mask", "position_ids")}
    if mask is not None:  # the mask's "labels" are the mask values at the label positions
        out["loss_mask"] = out["loss_mask"] * mask[index]["labels"].to(out["loss_mask"].dtype)
    return out
