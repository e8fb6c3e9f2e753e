"""Load a megatron_ext.train checkpoint for evaluation, at any CP size.

Everything that can be wrong with the request is checked from the files alone
(:func:`read_checkpoint`, :func:`check_tokenizer`, :func:`eval_rope`), so every
rank raises the same error before any process group or collective exists.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple


from ..rope import RopeConfig
from ..train import checkpoint as ckpt
from ..train.config import ParallelConfig, TrainConfig, config_from_dict

EXTENSIONS = ("linear", "ntk", "yarn")


@dataclass
class CheckpointInfo:
    """What an evaluation needs to know about a checkpoint before loading it."""

    path: str
    """The complete step-N folder."""
    iteration: int
    """Training iteration it was saved at."""
    config: TrainConfig
    """The training config stored in it."""
    vocab_size: int
    """Rows of its word embedding."""


def read_checkpoint(path: str) -> CheckpointInfo:
    """``path`` is a save_dir (newest complete step-N is used) or a step-N folder."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    step = ckpt.latest_checkpoint(path)
    if step is None:
        raise FileNotFoundError(f"checkpoint {path!r} holds no complete checkpoint (a step-N folder with a "
                                f"{ckpt.MARKER} marker, as megatron_ext.train writes)")
    common = ckpt.read_common(step)
    return CheckpointInfo(step, int(common["iteration"]), config_from_dict(common["config"]),
                          int(common["vocab_size"]))


def check_tokenizer(tokenizer_model: str, info: CheckpointInfo):
    """The tokenizer (data_tools.common.load_tokenizer), if its vocabulary fits the checkpoint's embedding."""
    from data_tools.common import load_tokenizer

    sp = load_tokenizer(tokenizer_model)
    n, trained = sp.vocab_size(), info.config.data.tokenizer_model
    fixed_vocab = info.config.model.vocab_size
    if (fixed_vocab and n > info.vocab_size) or (not fixed_vocab and n != info.vocab_size):
        raise ValueError(f"tokenizer {tokenizer_model} has {n} pieces but checkpoint {info.path} has a vocabulary "
                         f"of {info.vocab_size} (trained with data.tokenizer_model={trained}); use that tokenizer")
    return sp


def rope_range(cfg: TrainConfig) -> int:
    """Longest context the checkpoint's RoPE covers: its training sequence length, or
    original_max_position x factor when it was trained with linear/NTK/YaRN scaling."""
    rope = cfg.model.rope
    extended = int(rope.original_max_position * rope.factor) if rope.scaling in EXTENSIONS else 0
    return max(cfg.data.seq_length, extended)


def eval_rope(cfg: TrainConfig, lengths: Sequence[int], scaling: str = "none",
              factor: float = 1.0) -> Tuple[RopeConfig, int]:
    """RoPE for the evaluation and the range it covers. ``scaling`` (linear, ntk or
    yarn) extends the checkpoint's RoPE by ``factor`` at evaluation time; lengths
    beyond the range raise ValueError."""
    rope, trained = cfg.model.rope, rope_range(cfg)
    if scaling == "none":
        limit = trained
    elif scaling in EXTENSIONS:
        if factor <= 1.0:
            raise ValueError(f"--rope-factor must be > 1 with --rope-scaling {scaling}, got {factor}")
        base = rope.abf_base if rope.scaling == "abf" else rope.base
        rope = RopeConfig(base=base, scaling=scaling, factor=factor, original_max_position=trained)
        limit = int(trained * factor)
    else:
        raise ValueError(f"--rope-scaling must be none or one of {EXTENSIONS}, got {scaling!r}")
    beyond = [n for n in lengths if n > limit]
    if beyond:
        how = ("pass --rope-scaling yarn --rope-factor F to extend it at evaluation time" if scaling == "none"
               else "raise --rope-factor")
        raise ValueError(f"lengths {beyond} exceed the model's RoPE range of {limit} tokens (trained at "
                         f"data.seq_length={cfg.data.seq_length}, rope scaling {cfg.model.rope.scaling}"
                         f"{'' if scaling == 'none' else f', extended by {scaling} x{factor}'}); {how}")
    return rope, limit


def load_model(info: CheckpointInfo, cp_size: int, cp_comm_type: str = "p2p", rope: Optional[RopeConfig] = None,
               max_length: int = 0):
    """GPTModel in eval mode with the checkpoint's weights, for CP = ``cp_size`` over the
    whole world (TP = DP = 1). Initialises megatron-core's parallel_state. Returns
    (model, bf16)."""
    from ..train.model import build_model, init_model_parallel

    cfg = info.config
    model_cfg = dataclasses.replace(cfg.model, rope=rope or cfg.model.rope)
    cfg = dataclasses.replace(
        cfg, model=model_cfg, data=dataclasses.replace(cfg.data, seq_length=max(max_length, cfg.data.seq_length)),
        parallel=ParallelConfig(context_parallel_size=cp_size, cp_comm_type=cp_comm_type))
    init_model_parallel(cfg)
    model, bf16 = build_model(cfg, info.vocab_size, init_weights=False)  # the load sets every weight
    ckpt.load(info.path, model)
    if bf16:  # as training's Float16Module: norms too (bf16 linears, fp32 norms miss the fused kernels)
        model.bfloat16()
    return model.eval(), bf16
