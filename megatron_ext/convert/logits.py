"""``forward_logits``: our GPTModel's logits from a checkpoint, to compare with anyone's."""
from __future__ import annotations

import torch

from .runtime import build_fp32_model, load_model_weights, read_checkpoint, single_process


def forward_logits(checkpoint_dir: str, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the checkpoint's model: input_ids LongTensor [b, s] -> FloatTensor [b, s, vocab].

    CPU, fp32, one process (a 1-rank gloo group is made if none exists). The CP
    attention at P = 1 still cuts the sequence into 2 zigzag chunks, so an odd s
    is padded by one token at the end and that position dropped: causal attention
    keeps the other positions exact, and dynamic-NTK RoPE is told the real length.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [b, s], got shape {tuple(input_ids.shape)}")
    cfg, vocab, step = read_checkpoint(checkpoint_dir)
    b, s = input_ids.shape
    pad = s % 2
    tokens = torch.nn.functional.pad(input_ids.long().cpu(), (0, pad))
    positions = torch.arange(s + pad).unsqueeze(0).expand(b, -1)
    with single_process():
        model = build_fp32_model(cfg, vocab, seq_length=s + pad)
        load_model_weights(step, model)
        model.rotary_pos_emb.scaling_length = s
        with torch.no_grad():
            logits = model(tokens, positions, None)  # [b, s + pad, vocab]
    return logits[:, :s].float().contiguous()
