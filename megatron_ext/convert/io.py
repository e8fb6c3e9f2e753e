"""Read and write Hugging Face model folders, safely.

Weights come from ``*.safetensors`` (read with ``safetensors``) or
``pytorch_model*.bin`` (``torch.load(weights_only=True)``: tensors only, no
arbitrary unpickling), single-file or sharded with an index json. Tensors are
opened lazily: shapes are checked before anything large is read.
"""
from __future__ import annotations

import glob
import json
import math
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


SHARD_BYTES = 5 * 2**30
"""Largest weight file :func:`write_hf_folder` writes (transformers' shard naming and index;
a single tensor larger than this gets a file of its own)."""
INDEX = "model.safetensors.index.json"


def shard_files(sizes: Dict[str, int], max_bytes: int) -> Dict[str, List[str]]:
    """File name -> tensor names, in order, each file at most ``max_bytes`` (unless one tensor
    is larger): ``model.safetensors`` when all fit, else ``model-0000i-of-0000n.safetensors``."""
    groups: List[List[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if groups[-1] and used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    n = len(groups)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


def write_hf_folder(out_dir: str, config: Dict, tensors: Dict[str, Tuple[Tuple[int, ...], Callable[[], torch.Tensor]]],
                    dtype: torch.dtype, max_shard_bytes: int = SHARD_BYTES) -> List[str]:
    """``out_dir/config.json`` and the weights (name -> (shape, make())) as ``dtype`` in
    safetensors files of at most ``max_shard_bytes`` (:func:`shard_files`; with an index json
    when there are several). One file's tensors are on the host at a time; each file is
    written under a temp name, fsynced and renamed. Weight files of an earlier export that
    this one does not rewrite are removed. Returns the weight files written."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    elem = dtype.itemsize
    sizes = {name: math.prod(shape) * elem for name, (shape, _) in tensors.items()}
    files = shard_files(sizes, max_shard_bytes)
    # an earlier export's index (and its single file, if this one shards) go first: until the new
    # set is whole, a reader finds nothing to load rather than a mix of old and new weights
    for old in [INDEX] + (["model.safetensors"] if len(files) > 1 else []):
        if os.path.exists(os.path.join(out_dir, old)):
            os.remove(os.path.join(out_dir, old))
    for fname, names in files.items():
        shard = {n: tensors[n][1]().detach().to("cpu", dtype, copy=True).contiguous() for n in names}
        wrong = [f"{n}: {tuple(t.shape)} vs {tensors[n][0]}" for n, t in shard.items() if tuple(t.shape) != tuple(tensors[n][0])]
        if wrong:  # the mapping and the shapes disagree: a bug, not bad input
            raise RuntimeError(f"export made tensors of unexpected shapes: {wrong}")
        target, tmp = os.path.join(out_dir, fname), os.path.join(out_dir, f"{fname}.tmp.{os.getpid()}")
        save_file(shard, tmp, metadata={"format": "pt"})
        del shard
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {n: fname for fname, names in files.items() for n in names}}
        atomic_write(os.path.join(out_dir, INDEX), (json.dumps(index, indent=2) + "\n").encode())
    keep = set(files) | ({INDEX} if len(files) > 1 else set())
    for path in glob.glob(os.path.join(out_dir, "model*.safetensors")) + [os.path.join(out_dir, INDEX)]:
        if os.path.basename(path) not in keep and os.path.exists(path):
            os.remove(path)  # an earlier export's shards: not ours
    atomic_write(os.path.join(out_dir, "config.json"), (json.dumps(config, indent=2) + "\n").encode())
    return list(files)
