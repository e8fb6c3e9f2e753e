"""One tokenizer interface for the data tools, the trainer and the evaluation.

``--tokenizer-model`` takes either a sentencepiece ``PATH.model`` or ``hf:DIR``,
a Hugging Face folder whose ``tokenizer.json`` is run by the ``tokenizers``
package (Rust, batch encode on its own thread pool). :func:`load_tokenizer`
returns a :class:`Tokenizer` for either. The method names follow
sentencepiece's (``vocab_size()``, ``eos_id()``, ``pad_id()``) so code written
against a ``SentencePieceProcessor`` keeps working. Ids never include BOS or
other special tokens the tokenizer's template would add: documents get only
the EOS (the EOD id) that preprocess appends.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import List, Optional, Sequence

HF_PREFIX = "hf:"
# Looked up in the vocabulary when tokenizer_config.json names no EOS.
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


def _file_digest(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class Tokenizer:
    """Text <-> token ids. Subclasses set ``name`` (what the user gave) and ``files``
    (what the ids depend on)."""

    name: str
    files: List[str]

    def vocab_size(self) -> int:
        """Ids are in [0, vocab_size())."""
        raise NotImplementedError

    def eos_id(self) -> int:
        """End of sequence: the EOD id of the datasets."""
        raise NotImplementedError

    def bos_id(self) -> int:
        """Beginning of sequence, -1 if the tokenizer has none."""
        raise NotImplementedError

    def pad_id(self) -> int:
        """Padding, -1 if the tokenizer has none."""
        raise NotImplementedError

    def encode(self, text: str) -> List[int]:
        """One text -> its ids (no BOS/EOS)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> List[List[int]]:
        """Texts -> ids, one list per text, in order (no BOS/EOS). ``num_threads``
        is the sentencepiece thread count; ``tokenizers`` uses its own pool."""
        raise NotImplementedError

    def encode_batch_int32(self, texts: Sequence[str], num_threads: int = 1) -> Optional[list]:
        """Texts -> one buffer of native int32 ids per text (same ids as :meth:`encode_batch`),
        with no Python int per token; None where the tokenizer cannot."""
        return None

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """sha256 of the files the ids depend on (resume and caches compare it)."""
        return _file_digest(self.files)

    def chat_prompt(self, user_text: str) -> str:
        """``user_text`` as one user turn in the tokenizer's own chat template, ending where the
        assistant's reply starts (add_generation_prompt). Only hf:DIR tokenizers have one."""
        raise ValueError(f"{self.name}: a sentencepiece model has no chat template; --chat-template needs "
                         f"hf:DIR (a Hugging Face tokenizer folder with a chat template)")

    def chat_template_digest(self) -> str:
        """sha256 of the chat template text (raises ValueError when there is none)."""
        self.chat_prompt("")
        return ""


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model``."""

    def __init__(self, path: str):
        import sentencepiece as spm

        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: tokenizer model not found "
                                    f"(train one with python -m data_tools.tokenizer train, or give hf:DIR)")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a sentencepiece model ({e})") from e
        self.name, self.files = path, [path]
        self._buffers = self._buffer_encoder()

    def _buffer_encoder(self):
        """sentencepiece's C++ batch encode behind ``encode(..., return_type="numpy")``, called
        without numpy (it returns int32 buffers); kept only if it gives ``encode``'s ids on a probe."""
        fn = getattr(getattr(self.sp, "_processor", None), "_EncodeAsBufferBatch", None)
        probe = ["Hello, world: 123 \u2603 caf\u00e9.", "x", " tail  "]
        try:  # input, threads, pool, sampling, nbest, alpha, bos, eos, reverse: encode()'s defaults
            call = (lambda texts, threads: fn(texts, threads, None, False, -1, 0.1, False, False, False))
            if fn and [memoryview(b).tolist() for b in call(probe, 1)] == self.sp.encode(probe):
                return call
        except (TypeError, ValueError, RuntimeError):
            pass
        return None

    def encode_batch_int32(self, texts: Sequence[str], num_threads: int = 1) -> Optional[list]:
        return self._buffers(texts, num_threads) if self._buffers else None

    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def eos_id(self) -> int:
        return self.sp.eos_id()

    def bos_id(self) -> int:
        return self.sp.bos_id()

    def pad_id(self) -> int:
        return self.sp.pad_id()

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> List[List[int]]:
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))


def _special(folder: str, key: str) -> Optional[str]:
    """A special token's text from tokenizer_config.json or special_tokens_map.json."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                value = json.load(f).get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return value
    return None


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` run by the ``tokenizers`` package."""

    def __init__(self, folder: str):
        from tokenizers import Tokenizer as RustTokenizer

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: not found (hf:DIR needs a Hugging Face tokenizer folder)")
        try:
            self.tok = RustTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises its own Exception subclass for a bad file
            raise ValueError(f"{path}: not a tokenizers tokenizer.json ({e})") from e
        self.name, self.folder = HF_PREFIX + folder, folder
        self.files = [path] + [p for p in (os.path.join(folder, n) for n in ("tokenizer_config.json",
                                                                              "special_tokens_map.json"))
                               if os.path.exists(p)]
        self._size = self.tok.get_vocab_size(with_added_tokens=True)
        self._eos = self._id(folder, "eos_token", EOS_NAMES)
        if self._eos < 0:
            raise ValueError(f"{folder}: no EOS token (set eos_token in tokenizer_config.json, or add one of "
                             f"{', '.join(EOS_NAMES)}); the EOD id is the tokenizer's EOS")
        self._bos, self._pad = self._id(folder, "bos_token"), self._id(folder, "pad_token")
        config = os.path.join(folder, "tokenizer_config.json")
        if os.path.exists(config):  # transformers' flag: special tokens written in the text are text
            with open(config, encoding="utf-8") as f:
                self.tok.encode_special_tokens = bool(json.load(f).get("split_special_tokens", False))
        self._batch = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)  # fast: no offsets

    def _id(self, folder: str, key: str, fallbacks=()) -> int:
        text = _special(folder, key)
        for name in ([text] if text else []) + list(fallbacks):
            i = self.tok.token_to_id(name)
            if i is not None:
                return i
        if text:
            raise ValueError(f"{folder}: {key} {text!r} is not in tokenizer.json's vocabulary")
        return -1

    def vocab_size(self) -> int:
        return self._size

    def eos_id(self) -> int:
        return self._eos

    def bos_id(self) -> int:
        return self._bos

    def pad_id(self) -> int:
        return self._pad

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> List[List[int]]:
        return [e.ids for e in self._batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def _transformers(self):
        """The folder as a ``transformers`` tokenizer (it reads tokenizer_config.json's chat_template
        or chat_template.jinja); loaded on first use, with a clear error if it has no template."""
        if getattr(self, "_hf", None) is None:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(self.folder)
        if not getattr(self._hf, "chat_template", None):
            raise ValueError(f"{self.folder}: no chat template (neither chat_template.jinja nor a chat_template "
                             f"key in tokenizer_config.json); drop --chat-template")
        return self._hf

    def chat_prompt(self, user_text: str) -> str:
        return self._transformers().apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                                        add_generation_prompt=True)

    def chat_template_digest(self) -> str:
        template = self._transformers().chat_template
        text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def canonical_spec(spec: str) -> str:
    """``spec`` with its path made absolute (``hf:DIR`` -> ``hf:/abs/DIR``): the same tokenizer
    gives the same string from any working directory."""
    if spec.startswith(HF_PREFIX):
        return HF_PREFIX + os.path.abspath(spec[len(HF_PREFIX):])
    return os.path.abspath(spec)


def load_tokenizer(spec: str, threads: Optional[int] = None) -> Tokenizer:
    """``PATH.model`` (sentencepiece) or ``hf:DIR`` (tokenizer.json) -> a Tokenizer, with
    a clear error naming the file when it is missing or broken. ``threads`` sizes the
    ``tokenizers`` pool (RAYON_NUM_THREADS, unless already set) before its first use."""
    if spec.startswith(HF_PREFIX):
        if threads:
            os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
        return HFTokenizer(spec[len(HF_PREFIX):])
    return SentencePieceTokenizer(spec)
