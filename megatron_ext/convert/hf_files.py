"""What an exported Hugging Face folder needs besides its weights: the tokenizer's files,
its chat template, the bos/eos/pad ids and the generation settings.

The source is the tokenizer the checkpoint names (``data.tokenizer_model``): for
``hf:DIR`` (what import-hf writes) every tokenizer file of DIR is copied as is,
chat template included (``chat_template.jinja``, ``chat_template.json``,
``additional_chat_templates/``, or the ``chat_template`` key that
tokenizer_config.json carries), and DIR's ``generation_config.json`` too, so the
export stops at the same end-of-turn ids as the original. The ids come from DIR's
``config.json`` when it has them, else from the tokenizer; without a
generation_config.json in DIR one is written from those ids.

A sentencepiece ``.model`` (what ``data_tools.tokenizer train`` writes) is copied as
``tokenizer.model`` and gives the ids. transformers (>= 5) converts it and writes
``tokenizer.json`` and ``tokenizer_config.json`` beside it (``PreTrainedTokenizerFast``, whose
config names it ``TokenizersBackend``: the generic ``tokenizers`` backend), so that
``AutoTokenizer`` gives sentencepiece's ids:
- the generic converter keeps the model's normalizer (``nmt_nfkc``'s precompiled map,
  whitespace runs collapsed, newlines and tabs as spaces). ``LlamaTokenizer`` has none (its
  Metaspace step fits Llama's identity-normalized .model), and its ``legacy`` and
  ``add_prefix_space`` do not bring it back: double spaces, newlines and NFKC forms differ;
- no bos or eos is added (``add_bos_token``/``add_eos_token`` off; the post-processor adds
  nothing), as ``sp.encode`` and our preprocessing, which appends only eos, at document end;
- ``split_special_tokens``: a literal ``<s>`` in text is text, as sentencepiece reads it
  (for BPE models, the default; a unigram model's converted vocabulary still matches
  ``<s>``/``</s>`` written in text as one piece, where sentencepiece spells them out);
- unk/bos/eos/pad are the model's pieces for its ids (a disabled id, -1, names none).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
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
        written += ["tokenizer.model"] + _sentencepiece_files(source, out)
        generation = ""
    if generation and os.path.isfile(generation):
        _copy(generation, os.path.join(out, "generation_config.json"))
    else:
        atomic_write(os.path.join(out, "generation_config.json"), (json.dumps(dict(ids), indent=2) + "\n").encode())
    return written + ["generation_config.json"]


def _sentencepiece_files(model: str, out: str) -> List[str]:
    """Have transformers convert the sentencepiece ``model`` (settings in the module docstring)
    and copy the files it saves (tokenizer.json, tokenizer_config.json) into ``out``."""
    import sentencepiece as spm
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:  # 4.x cannot build a fast tokenizer from a bare .model
        # the weights are already written: say what is missing rather than fail the whole export
        print(f"export-hf: tokenizer.json/tokenizer_config.json not written: converting the sentencepiece model "
              f"{model} needs transformers>=5 (found {transformers.__version__}); AutoTokenizer will read "
              "tokenizer.model with LlamaTokenizer, whose normalization differs (whitespace runs, newlines)",
              file=sys.stderr)
        return []
    sp = spm.SentencePieceProcessor(model_file=model)
    special = {f"{name}_token": sp.id_to_piece(i) if i >= 0 else None
               for name, i in (("unk", sp.unk_id()), ("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id()))}
    with tempfile.TemporaryDirectory(prefix="mext-spm-export-") as tmp:
        shutil.copyfile(model, os.path.join(tmp, "tokenizer.model"))
        tok = transformers.PreTrainedTokenizerFast.from_pretrained(
            tmp, add_bos_token=False, add_eos_token=False, split_special_tokens=True, **special)
        saved = tok.save_pretrained(os.path.join(tmp, "saved"))
        names = sorted(os.path.basename(p) for p in saved if os.path.basename(p) != "tokenizer.model")
        for name in names:
            _copy(os.path.join(tmp, "saved", name), os.path.join(out, name))
    return names


def _copy(src: str, dst: str) -> None:
    tmp = f"{dst}.tmp.{os.getpid()}"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
