"""Training data: the SFT mask is read as raw values (a pad id of 1 must not zero it),
and the sample order does not depend on optim.train_iters."""
import numpy as np
import torch

from megatron_ext.distributed import spawn_ranks
from tests.test_train_core import _cfg


def test_sft_mask_survives_a_pad_id_of_one(data, tmp_path):
    from megatron_ext.train.data import _raw_sample, build_datasets, load_train_tokenizer

    cfg = _cfg(dict(data, pre=data["sft"]), str(tmp_path), ["data.sft=true", "data.packing=none"])
    tok = load_train_tokenizer(data["tok"])
    tok.pad = 1  # a tokenizer whose pad id is 1: GPTDataset rewrites labels equal to it
    samples, _ = build_datasets(cfg.data, tok, str(tmp_path / "cache"))
    trained = 0
    for i in range(8):
        item = samples[i]
        raw = np.asarray(_raw_sample(samples.mask, i)[1:], dtype=np.float32)
        text_mask = samples.text[i]["loss_mask"]
        assert torch.equal(item["loss_mask"], text_mask * torch.from_numpy(raw))
        trained += int(item["loss_mask"].sum())
    assert trained > 0  # through the label path every mask value 1 (== pad id) became 0


def _first_batches(rank, world, data, save, iters):
    from megatron_ext.train.loop import Trainer

    trainer = Trainer(_cfg(data, save, [f"optim.train_iters={iters}", "parallel.context_parallel_size=1"]))
    batches, _ = trainer._data()
    return [next(batches)[0]["tokens"] for _ in range(3)]


def test_sample_order_does_not_depend_on_train_iters(data, tmp_path):
    short = spawn_ranks(_first_batches, 1, (data, str(tmp_path / "a"), 3), timeout_s=120)[0]
    long = spawn_ranks(_first_batches, 1, (data, str(tmp_path / "b"), 500), timeout_s=120)[0]
    assert all(torch.equal(a, b) for a, b in zip(short, long))
