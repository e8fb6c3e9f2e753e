"""Read and write Hugging Face model folders, safely.

Weights come from ``*.safetensors`` (read with ``safetensors``) or
``pytorch_model*.bin`` (``torch.load(weights_only=True)``: tensors only, no
arbitrary unpickling), single-file or sharded with an index json. Tensors are
opened lazily: shapes are checked before anything large is read.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Callable, Dict, List, Tuple

import torch

from data_tools.common import atomic_write
from .hf_config import ConversionError

INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE = ("model.safetensors", "pytorch_model.bin")


def read_hf_config(hf_dir: str) -> Dict:
    """``hf_dir/config.json`` as a dict."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{hf_dir}: no config.json (expected a Hugging Face model folder)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def weight_files(hf_dir: str) -> List[str]:
    """The weight files of ``hf_dir``: an index's shards, else the single file, else all
    ``*.safetensors`` / ``pytorch_model*.bin`` shards."""
    for index in INDEXES:
        path = os.path.join(hf_dir, index)
        if os.path.isfile(path):
            with open(path) as f:
                names = sorted(set(json.load(f).get("weight_map", {}).values()))
            absent = [n for n in names if not os.path.isfile(os.path.join(hf_dir, n))]
            if absent:
                raise ConversionError(f"{path} names shard files that are missing: {absent}")
            return [os.path.join(hf_dir, n) for n in names]
    for single in SINGLE:
        if os.path.isfile(os.path.join(hf_dir, single)):
            return [os.path.join(hf_dir, single)]
    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))) or \
        sorted(glob.glob(os.path.join(hf_dir, "pytorch_model*.bin")))
    if not files:
        raise ConversionError(f"{hf_dir}: no weights (*.safetensors or pytorch_model*.bin)")
    return files


def open_tensors(hf_dir: str) -> Dict[str, Tuple[Tuple[int, ...], Callable[[], torch.Tensor]]]:
    """name -> (shape, load()) over every weight file; a name in two files is an error."""
    from safetensors import safe_open

    out: Dict[str, Tuple[Tuple[int, ...], Callable[[], torch.Tensor]]] = {}
    for path in weight_files(hf_dir):
        if path.endswith(".safetensors"):
            handle = safe_open(path, framework="pt")
            entries = {n: (tuple(handle.get_slice(n).get_shape()), lambda n=n, h=handle: h.get_tensor(n))
                       for n in handle.keys()}
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - anything that is not plain tensors is refused
                raise ConversionError(f"{path}: cannot be read as tensors only (weights_only=True): {e}") from None
            entries = {n: (tuple(t.shape), lambda t=t: t) for n, t in state.items()}
        twice = sorted(set(entries) & set(out))
        if twice:
            raise ConversionError(f"{path}: tensors {twice} appear in another weight file too")
        out.update(entries)
    return out


def write_hf_folder(out_dir: str, config: Dict, tensors: Dict[str, torch.Tensor]) -> None:
    """``out_dir/config.json`` and ``out_dir/model.safetensors``, each written to a temp file then renamed."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, "model.safetensors")
    save_file(tensors, target + ".tmp", metadata={"format": "pt"})
    os.replace(target + ".tmp", target)
    atomic_write(os.path.join(out_dir, "config.json"), (json.dumps(config, indent=2) + "\n").encode())
