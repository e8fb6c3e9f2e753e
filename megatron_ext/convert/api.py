"""import-hf and export-hf: a Hugging Face folder <-> a megatron_ext checkpoint."""
from __future__ import annotations

import dataclasses
import os

import torch
import yaml

from data_tools.common import atomic_write, progress
from ..train.config import CheckpointConfig, to_dict
from .hf_config import ConversionError, architecture, hf_config_from_train, train_config_from_hf
from .hf_files import token_ids, tokenizer_source, write_tokenizer_files
from .io import SHARD_BYTES, open_tensors, read_hf_config, write_hf_folder
from .runtime import (build_fp32_model, existing_checkpoints, load_model_weights, read_checkpoint,
                      save_model_checkpoint, single_process)
from .weights import check_tensors, expected_hf_shapes, hf_to_mcore, mcore_to_hf, padded_vocab_size

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""Training precisions import-hf writes into config.yaml."""
EXPORT_DTYPES = {**DTYPES, "fp16": torch.float16}
"""Tensor dtypes export-hf writes (fp16 keeps an fp16 source's bits that bf16 would cut)."""


def import_hf(hf_dir: str, out: str, dtype: str = "", device: str = "cpu",
              make_vocab_size_divisible_by: int = 1) -> str:
    """Convert the HF folder ``hf_dir`` into ``out/step-0`` plus ``out/config.yaml``; returns
    the step folder. ``dtype`` (fp32|bf16) is the training precision written to the
    config (default auto); weights are stored in fp32, an exact upcast. ``device``: where the
    model is built (default the CPU). ``make_vocab_size_divisible_by`` > 1 pads the vocabulary
    rows to a multiple of it (128 lets any TP up to 128 split them), the final row repeated as
    Megatron-LM's converters do; ``model.true_vocab_size`` keeps the original size for export.
    The default 1 keeps the model exact: padding rows take part in the training softmax (each
    has the final token's logit), so the first loss moves a little off the HF model's."""
    if dtype and dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    hf = read_hf_config(hf_dir)
    cfg = train_config_from_hf(hf, os.path.join(hf_dir, "config.json"))
    tensors = open_tensors(hf_dir)
    check_tensors({name: shape for name, (shape, _) in tensors.items()}, expected_hf_shapes(cfg.model), hf_dir)
    if make_vocab_size_divisible_by < 1:
        raise ConversionError(f"--make-vocab-size-divisible-by must be >= 1, got {make_vocab_size_divisible_by}")
    true_vocab = cfg.model.vocab_size
    rows = padded_vocab_size(true_vocab, make_vocab_size_divisible_by)
    if rows != true_vocab:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=rows, true_vocab_size=true_vocab))
    out = os.path.abspath(out)
    if existing_checkpoints(out):
        raise ConversionError(f"{out} already holds checkpoints {existing_checkpoints(out)}; "
                              f"import into an empty folder")
    tokenizer = f"hf:{os.path.abspath(hf_dir)}" if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")) else ""
    cfg = dataclasses.replace(cfg, precision=dtype or "auto",
                              data=dataclasses.replace(cfg.data, tokenizer_model=tokenizer),
                              checkpoint=CheckpointConfig(save_dir=out + "-pretrain", init_from=out))
    with single_process(device):
        model = build_fp32_model(cfg, cfg.model.vocab_size, device=device)
        params = dict(model.named_parameters())
        done = set()
        with torch.no_grad(), progress(total=len(params), unit="tensor", desc="import-hf") as bar:
            for name, tensor in hf_to_mcore(lambda n: tensors[n][1]().float(), cfg.model, params):
                params[name].copy_(tensor)
                done.add(name)
                bar.update(1)
        if done != set(params):  # the mapping and the builder disagree: a bug, not bad input
            raise RuntimeError(f"HF mapping left {sorted(set(params) - done)} unset and produced "
                               f"{sorted(done - set(params))}")
        step = save_model_checkpoint(out, 0, model, to_dict(cfg))
    atomic_write(os.path.join(out, "config.yaml"), yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
    return step


def export_hf(checkpoint: str, out: str, dtype: str = "fp32", device: str = "cpu",
              max_shard_bytes: int = SHARD_BYTES) -> str:
    """Write ``out/config.json`` (with bos/eos/pad ids) and the weights (``dtype`` fp32|bf16|fp16:
    ``model.safetensors``, or shards of at most ``max_shard_bytes`` with
    ``model.safetensors.index.json``) for the checkpoint at ``checkpoint``, plus every tokenizer
    file, the chat template and generation_config.json of the tokenizer the config names
    (:mod:`.hf_files`). Returns the architecture written. ``device``: where the model is built
    (default the CPU); memory there is the fp32 model, and on the host one shard more."""
    if dtype not in EXPORT_DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    cfg, rows, step = read_checkpoint(checkpoint)
    vocab = cfg.model.true_vocab_size or rows  # import's padding rows stay behind
    source = tokenizer_source(cfg.data.tokenizer_model)
    ids = token_ids(cfg.data.tokenizer_model, source) if source else {}
    hf = {**hf_config_from_train(cfg, vocab, str(EXPORT_DTYPES[dtype]).removeprefix("torch.")), **ids}
    with single_process(device), progress(total=3, unit="step", desc="export-hf") as bar:  # load, map, write
        model = build_fp32_model(cfg, rows, device=device)
        load_model_weights(step, model)
        bar.update(1)
        m = dataclasses.replace(cfg.model, vocab_size=vocab)
        shapes, make = expected_hf_shapes(m), mcore_to_hf(dict(model.named_parameters()), m)
        bar.update(1)
        with torch.no_grad():
            write_hf_folder(out, hf, {k: (shapes[k], f) for k, f in make.items()}, EXPORT_DTYPES[dtype], max_shard_bytes)
        bar.update(1)
    if source:
        write_tokenizer_files(source, out, ids)
    return architecture(hf, out)
