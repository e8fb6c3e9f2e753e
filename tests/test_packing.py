"""SFT packing: first-fit-decreasing never cuts or loses an example, overlong examples
are named (or dropped and counted), samples are deterministic per seed, and no
response token is trained without its prompt in the same packed sequence."""
import numpy as np
import pytest
import torch

from megatron_ext.train.packing import (OverlongExampleError, PackedSftDataset, eod_document_lengths,
                                        first_fit_decreasing)

EOD = 1


def _write_sft(prefix, lengths, seed=0):
    """Examples of prompt (mask 0; first token 1000 + index) + response (mask 1) + EOD (mask 1)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.RandomState(seed)
    text = IndexedDatasetBuilder(f"{prefix}_text_document.bin", dtype=np.int32)
    mask = IndexedDatasetBuilder(f"{prefix}_loss_mask_document.bin", dtype=np.uint8)
    examples = []
    for i, n in enumerate(lengths):
        p = max(1, n // 3)
        toks = np.concatenate([[1000 + i], rng.randint(10, 50, p - 1), rng.randint(50, 100, n - p - 1), [EOD]])
        m = np.concatenate([np.zeros(p), np.ones(n - p)])
        text.add_document(torch.from_numpy(toks.astype(np.int32)), [n])
        mask.add_document(torch.from_numpy(m.astype(np.uint8)), [n])
        examples.append((toks, m))
    text.finalize(f"{prefix}_text_document.idx")
    mask.finalize(f"{prefix}_loss_mask_document.idx")
    return examples


def test_first_fit_decreasing():
    lengths = [5, 3, 8, 2, 7, 1, 4]
    bins, dropped = first_fit_decreasing(lengths, 10)
    assert bins == [[2, 3], [4, 1], [0, 6, 5]] and dropped == []
    rng = np.random.RandomState(0)
    lengths = rng.randint(1, 300, 2000).tolist()
    bins, _ = first_fit_decreasing(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(2000))  # every example once, whole
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    assert sum(lengths) / (len(bins) * 512) > 0.95
    assert first_fit_decreasing(lengths, 512) == (bins, [])  # pure


def test_overlong_is_named_or_dropped():
    with pytest.raises(OverlongExampleError, match="example 2 has 11 tokens, more than seq_length=10"):
        first_fit_decreasing([3, 4, 11, 12], 10)
    bins, dropped = first_fit_decreasing([3, 4, 11, 12], 10, drop_overlong=True)
    assert dropped == [2, 3] and bins == [[1, 0]]


def test_packed_sft_dataset_masks_and_determinism(tmp_path):
    lengths = [37, 5, 120, 64, 2, 250, 90, 33, 180, 7, 256, 61]
    prefix = str(tmp_path / "sft")
    examples = _write_sft(prefix, lengths + [300])  # the last one is overlong
    with pytest.raises(OverlongExampleError, match="example 12 has 300 tokens"):
        PackedSftDataset(prefix, 256)
    ds = PackedSftDataset(prefix, 256, seed=3, drop_overlong=True)
    assert ds.dropped == [12] and "1 overlong dropped" in ds.summary()
    assert ds.fill_rate == pytest.approx(sum(lengths) / (len(ds) * 256))
    seen = []
    for s in (ds[i] for i in range(len(ds))):
        assert all(s[k].shape == (256,) for k in ("tokens", "labels", "loss_mask", "position_ids"))
        assert sum(s["doc_lengths"]) == 256
        at = 0
        for n in s["doc_lengths"]:
            toks, lm = s["tokens"][at:at + n], s["loss_mask"][at:at + n]
            assert torch.equal(s["position_ids"][at:at + n], torch.arange(n))
            if toks[0] >= 1000:  # a real example: whole, prompt first, as written
                i = int(toks[0]) - 1000
                seen.append(i)
                assert torch.equal(toks, torch.from_numpy(examples[i][0]))
                # the loss of position j is the mask of its label j+1, inside this document only
                assert torch.equal(lm[:-1], torch.from_numpy(examples[i][1][1:]).float()) and lm[-1] == 0
                assert torch.equal(s["labels"][at:at + n - 1], toks[1:])
            else:  # filler: no loss
                assert lm.sum() == 0
            at += n
        trained = s["loss_mask"].nonzero().flatten()
        labels = s["labels"][trained]  # only response tokens and EOD are trained
        assert (labels < 1000).all() and ((labels >= 50) | (labels == EOD)).all()
    assert sorted(seen) == list(range(12))  # every example once, none cut
    again = PackedSftDataset(prefix, 256, seed=3, drop_overlong=True)
    assert all(torch.equal(again[i]["tokens"], ds[i]["tokens"]) for i in range(len(ds) + 2))  # resumes exactly
    other = PackedSftDataset(prefix, 256, seed=4, drop_overlong=True)
    assert any(not torch.equal(other[i]["tokens"], ds[i]["tokens"]) for i in range(len(ds)))


def test_packing_config_defaults_by_stage():
    from megatron_ext.train.config import TrainConfig, packing_mode

    cfg = TrainConfig(stage="sft")
    cfg.data.sft = True
    assert packing_mode(cfg) == "sft"
    cfg.data.packing = "none"
    assert packing_mode(cfg) == "none"
    assert packing_mode(TrainConfig(stage="pretrain")) == "none"
    bad = TrainConfig(stage="pretrain")
    bad.data.packing = "greedy"
    with pytest.raises(ValueError, match="data.packing 'greedy' is not one of none, sft"):
        packing_mode(bad)
    bad.data.packing = "sft"
    with pytest.raises(ValueError, match="needs data.sft=true"):
        packing_mode(bad)


def test_eod_document_lengths():
    assert eod_document_lengths(torch.tensor([5, 6, EOD, 7, EOD, 8, 9]), EOD) == [3, 2, 2]
    assert eod_document_lengths(torch.tensor([5, EOD]), EOD) == [2]
    assert eod_document_lengths(torch.tensor([5, 6]), EOD) == [2]
