"""Conversion at scale: export in bounded shards with transformers' index, fp16, stale files
removed; vocabulary rows padded for TP at import and dropped at export."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from megatron_ext.convert import export_hf, forward_logits, import_hf  # noqa: E402
from tests.test_convert import _hf_logits, _hf_model, _save  # noqa: E402


def test_export_shards_bounded_files_with_an_index_and_clears_stale_ones(tmp_path):
    """Shards of at most 40 KB (one tensor of 64 KB gets a file of its own) and transformers'
    index; fp16 keeps the exact fp16 bits; a second export into the folder, unsharded,
    removes the first one's shards and index, and no temp file is left."""
    model = _hf_model("llama", seed=3)
    import_hf(_save(model, tmp_path / "hf"), str(tmp_path / "ours"))
    out = tmp_path / "back"
    export_hf(str(tmp_path / "ours"), str(out), "fp16", max_shard_bytes=40_000)
    index = json.load(open(out / "model.safetensors.index.json"))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[-1] == f"model-{len(files):05d}-of-{len(files):05d}.safetensors"
    sizes = {f: os.path.getsize(out / f) for f in files}
    exported = {}
    for f in files:
        shard = load_file(str(out / f))
        assert sizes[f] <= 40_000 + 4096 or (len(shard) == 1 and next(iter(shard.values())).nbytes > 40_000), (f, sizes[f])
        exported.update(shard)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in exported.values())
    assert sorted(exported) == sorted(index["weight_map"]) == sorted(model.state_dict())
    assert all(t.dtype == torch.float16 and torch.equal(t, model.state_dict()[k].half()) for k, t in exported.items())
    assert json.load(open(out / "config.json"))["torch_dtype"] == "float16"
    again = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).state_dict()
    assert all(torch.equal(again[k], t.float()) for k, t in exported.items())  # transformers follows the index

    export_hf(str(tmp_path / "ours"), str(out), "bf16")  # one file now: the shards and index must go
    left = sorted(f for f in os.listdir(out) if f.startswith("model"))
    assert left == ["model.safetensors"], left
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    export_hf(str(tmp_path / "ours"), str(out), "fp16", max_shard_bytes=40_000)  # and back: the single file goes
    assert "model.safetensors" not in os.listdir(out) and sorted(
        f for f in os.listdir(out) if f.startswith("model-")) == files


def test_import_pads_the_vocabulary_for_tp_and_export_drops_the_padding(tmp_path):
    """501 tokens (odd): rows padded to 512 with the final row repeated (Megatron-LM's converters),
    so TP splits them; logits and export are the 501 real tokens, bit for bit."""
    from megatron_ext.train.config import load_config, validate

    model = _hf_model("llama", seed=4, vocab_size=501)
    src = _save(model, tmp_path / "hf")
    import_hf(src, str(tmp_path / "ours"), make_vocab_size_divisible_by=128)
    cfg = load_config(str(tmp_path / "ours" / "config.yaml"), ["parallel.tensor_model_parallel_size=2",
                                                               "parallel.context_parallel_size=1"])
    assert (cfg.model.vocab_size, cfg.model.true_vocab_size) == (512, 501)
    validate(cfg, 2)  # 501 rows would not split over TP = 2
    import dataclasses

    for true, rows in ((513, 512), (-1, 512), (501, 0)):
        with pytest.raises(ValueError, match=f"model.true_vocab_size {true} must be 0, or between 1 and model.vocab_size {rows}"):
            validate(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, true_vocab_size=true, vocab_size=rows)), 2)
    from megatron_ext.convert import LogitsModel

    with LogitsModel.load(str(tmp_path / "ours")) as held:
        emb = held.model.embedding.word_embeddings.weight
        assert emb.shape[0] == 512 and torch.equal(emb[501:], emb[500:501].expand(11, -1))
    ids = torch.randint(0, 501, (2, 9))
    ours = forward_logits(str(tmp_path / "ours"), ids)
    assert ours.shape == (2, 9, 501) and (ours - _hf_logits(model, ids)).abs().max().item() <= 1e-4
    from bench.gpu_check.logits import process_logits  # gpu-check's other-process call, with a device

    assert torch.equal(process_logits(str(tmp_path / "ours"), ids, device="cpu"), ours)
    export_hf(str(tmp_path / "ours"), str(tmp_path / "back"))
    exported = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert all(torch.equal(exported[k], v) for k, v in model.state_dict().items())
    assert json.load(open(tmp_path / "back" / "config.json"))["vocab_size"] == 501

    import_hf(src, str(tmp_path / "unpadded"))  # the default: no padding
    unpadded = load_config(str(tmp_path / "unpadded" / "config.yaml"), ["parallel.tensor_model_parallel_size=2",
                                                                          "parallel.context_parallel_size=1"])
    assert unpadded.model.vocab_size == 501
    with pytest.raises(ValueError, match="501 vocabulary rows, which do not divide by tensor_model_parallel_size 2.*"
                                         "--make-vocab-size-divisible-by 128"):
        validate(unpadded, 2)
