"""Our GPTModel's logits from a checkpoint, to compare with anyone's: :class:`LogitsModel`
loads once for repeated calls; :func:`forward_logits` is the one-call form."""
from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch

from .runtime import build_fp32_model, load_model_weights, process_group, read_checkpoint


class LogitsModel:
    """A checkpoint's model, built and loaded once (fp32, eval mode, one process).

    ``LogitsModel.load(ckpt)`` holds a 1-rank gloo group and megatron-core's
    parallel_state (made if none exist) until :meth:`close` or the end of a
    ``with`` block; ``.logits(ids)`` may be called any number of times in between.
    """

    def __init__(self, model, path: str, stack: contextlib.ExitStack, device: torch.device, vocab: int = 0):
        self.model, self.path, self.device = model, path, device  # GPTModel, its step folder, its device
        self.vocab = vocab or model.vocab_size  # real tokens: import-hf's padding rows are left out
        self._stack = stack  # what close() releases

    @classmethod
    def load(cls, checkpoint_dir: str, device: Optional[Union[str, torch.device]] = None) -> "LogitsModel":
        """Build the checkpoint's model (save_dir: its newest complete step; or a step-N folder)
        and load its weights, once. ``device`` (default cpu) is where it runs."""
        cfg, vocab, step = read_checkpoint(checkpoint_dir)
        stack = contextlib.ExitStack()
        stack.enter_context(process_group(device or "cpu"))
        try:
            with torch.random.fork_rng(devices=[]):  # the builder seeds torch; leave the caller's generator alone
                model = build_fp32_model(cfg, vocab)
            load_model_weights(step, model)
            device = torch.device(device or "cpu")
            model.to(device)
        except BaseException:
            stack.close()
            raise
        return cls(model, step, stack, device, cfg.model.true_vocab_size)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids LongTensor [b, s] -> FloatTensor [b, s, vocab] (fp32, on ``self.device``; vocab
        counts real tokens, without import-hf's padding rows).

        The CP attention at P = 1 still cuts the sequence into 2 zigzag chunks, so an odd s
        is padded by one token at the end and that position dropped: causal attention keeps
        the other positions exact, and dynamic-NTK RoPE is told the real length."""
        if self._stack is None:
            raise RuntimeError(f"LogitsModel for {self.path} is closed")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [b, s], got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        pad = s % 2
        tokens = torch.nn.functional.pad(input_ids.long().to(self.device), (0, pad))
        positions = torch.arange(s + pad, device=self.device).unsqueeze(0).expand(b, -1)
        rope = self.model.rotary_pos_emb
        if rope.scaling_length != s:  # megatron-core caches the RoPE table by length, not by scaling length
            rope.scaling_length = s
            type(rope).forward.cache_clear()
        logits = self.model(tokens, positions, None)  # [b, s + pad, vocab]
        return logits[:, :s, :self.vocab].float().contiguous()

    def close(self) -> None:
        """Release the model and the process group / parallel_state it made."""
        if self._stack is not None:
            self.model, stack, self._stack = None, self._stack, None
            stack.close()

    def __enter__(self) -> "LogitsModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def forward_logits(checkpoint_dir: str, input_ids: torch.Tensor,
                   device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Logits of the checkpoint's model: input_ids LongTensor [b, s] -> FloatTensor [b, s, vocab]
    on the CPU, fp32, one process; a :class:`LogitsModel` loaded for this one call, computing on
    ``device`` (default the CPU; "cuda[:N]" needs a process without the CPU patches)."""
    with LogitsModel.load(checkpoint_dir, device) as model:
        return model.logits(input_ids).cpu()
