"""What an exported Hugging Face folder needs besides its weights: the tokenizer's files,
its chat template, the bos/eos/pad ids and the generation settings.

The source is the tokenizer the checkpoint names (``data.tokenizer_model``): for
``hf:DIR`` (what import-hf writes) every tokenizer file of DIR is copied as is,
chat template included (``chat_template.jinja``, ``chat_template.json``,
``additional_chat_templates/``, or the ``chat_template`` key that
tokenizer_config.json carries), and DIR's ``generation_config.json`` too, so the
export stops at the same end-of-turn ids as the original. The ids come from DIR's
``config.json`` when it has them, else from the tokenizer; without a
generation_config.json in DIR one is written from those ids. A sentencepiece
``.model`` is copied as ``tokenizer.model`` and gives the ids.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Optional

from data_tools.common import atomic_write

from .hf_config import ConversionError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
TEMPLATE_DIR = "additional_chat_templates"
ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def tokenizer_source(spec: str) -> Optional[str]:
    """The folder (hf:DIR) or .model file the checkpoint's tokenizer lives in; None when it names
    none; ConversionError when it names one that is gone."""
    if not spec:
        return None
    path = spec[3:] if spec.startswith("hf:") else spec
    if not os.path.exists(path):
        raise ConversionError(f"the checkpoint's data.tokenizer_model {spec!r} does not exist; the export needs its "
                              f"tokenizer files (restore it, or convert with the config pointing at it)")
    return path


def token_ids(spec: str, source: str) -> Dict[str, object]:
    """bos/eos/pad ids for config.json: the source folder's config.json when it has them (the
    original's, e.g. an eos list), else the tokenizer's (-1 = none, left out)."""
    config = os.path.join(source, "config.json") if os.path.isdir(source) else ""
    if config and os.path.isfile(config):
        with open(config) as f:
            found = {k: v for k, v in json.load(f).items() if k in ID_KEYS and v is not None}
        if found:
            return found
    from data_tools.common import load_tokenizer

    tok = load_tokenizer(spec)
    ids = {"bos_token_id": tok.bos_id(), "eos_token_id": tok.eos_id(), "pad_token_id": tok.pad_id()}
    return {k: v for k, v in ids.items() if v is not None and v >= 0}


def write_tokenizer_files(source: str, out: str, ids: Dict[str, object]) -> List[str]:
    """Copy the tokenizer files and chat templates of ``source`` into ``out`` (each via a temp
    name) and its generation_config.json, or write one from ``ids``. Returns the names written."""
    written = []
    if os.path.isdir(source):
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source, name)):
                _copy(os.path.join(source, name), os.path.join(out, name))
                written.append(name)
        extra = os.path.join(source, TEMPLATE_DIR)
        if os.path.isdir(extra):
            os.makedirs(os.path.join(out, TEMPLATE_DIR), exist_ok=True)
            for name in sorted(os.listdir(extra)):
                _copy(os.path.join(extra, name), os.path.join(out, TEMPLATE_DIR, name))
                written.append(f"{TEMPLATE_DIR}/{name}")
        generation = os.path.join(source, "generation_config.json")
    else:  # a sentencepiece model
        _copy(source, os.path.join(out, "tokenizer.model"))
        written.append("tokenizer.model")
        generation = ""
    if generation and os.path.isfile(generation):
        _copy(generation, os.path.join(out, "generation_config.json"))
    else:
        atomic_write(os.path.join(out, "generation_config.json"), (json.dumps(dict(ids), indent=2) + "\n").encode())
    return written + ["generation_config.json"]


def _copy(src: str, dst: str) -> None:
    tmp = f"{dst}.tmp.{os.getpid()}"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
