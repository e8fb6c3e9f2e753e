"""One-process model runtime for conversion: a 1-rank gloo group, megatron-core's
parallel_state at TP = CP = 1, the trainer's model builder, and its checkpoints
(megatron-core dist_checkpointing, through megatron_ext.train.checkpoint).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Tuple

import torch
import torch.distributed as dist

from ..train.config import ParallelConfig, TrainConfig


@contextlib.contextmanager
def single_process(device="cpu"):
    """A 1-rank gloo group and parallel_state (TP = CP = 1) for the block, unless they
    exist already; what this created is torn down on exit. The caller's torch RNG
    state is restored on exit (the model builder seeds torch). ``device``: where the
    model will compute (megatron-core's CPU patches apply for the CPU, even where CUDA exists)."""
    with process_group(device):
        with torch.random.fork_rng(devices=[]):
            yield


@contextlib.contextmanager
def process_group(device="cpu"):
    """:func:`single_process` without the RNG fork: for a model that outlives one call
    (:class:`~megatron_ext.convert.logits.LogitsModel` holds it open). A "cuda:N" ``device``
    is CUDA's current device meanwhile (megatron-core allocates there)."""
    from ..distributed import current_cuda_device
    from ..train.model import init_model_parallel

    created_group = not dist.is_initialized()
    if created_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError(f"conversion runs in one process; this process group has {dist.get_world_size()} ranks")
    from megatron.core import parallel_state

    created_state = not parallel_state.model_parallel_is_initialized()
    try:
        with current_cuda_device(device):
            if created_state:
                init_model_parallel(TrainConfig(), device)
            yield
    finally:
        if created_state:
            parallel_state.destroy_model_parallel()
        if created_group:
            dist.destroy_process_group()


def build_fp32_model(cfg: TrainConfig, vocab_size: int, seq_length: int = 0, device="cpu"):
    """Our GPTModel for ``cfg.model`` at TP = CP = 1, fp32, eval mode, on ``device`` (default the
    CPU: a 13B model is ~52 GB in fp32; "cuda[:N]" builds on that GPU), inside :func:`single_process`.
    Its weights are allocated, not drawn (every caller loads or copies all of them: a random
    init of a 70B model costs minutes)."""
    from ..train.model import build_model

    cfg = dataclasses.replace(cfg, parallel=ParallelConfig(), precision="fp32",
                              data=dataclasses.replace(cfg.data, seq_length=max(seq_length, cfg.data.seq_length)))
    model, _ = build_model(cfg, vocab_size, device=device, init_weights=False)
    if getattr(model.config, "rotary_interleaved", False):
        raise ValueError("the model rotates interleaved pairs; HF Llama checkpoints rotate halves (rotate_half)")
    return model.eval()


# -- checkpoints: megatron_ext.train.checkpoint's weights-only calls ---------------------------------
def save_model_checkpoint(save_dir: str, iteration: int, model, config: dict) -> str:
    """Weights and ``config`` (a TrainConfig dict) as ``save_dir/step-N`` (with its COMPLETE marker)."""
    from ..train import checkpoint as ckpt

    return ckpt.save_model_checkpoint(save_dir, iteration, model, config)


def load_model_weights(path: str, model) -> None:
    """Weights of the checkpoint at ``path`` (save_dir or step folder) into ``model``."""
    from ..train import checkpoint as ckpt

    ckpt.load_model_weights(path, model)


def read_checkpoint(path: str) -> Tuple[TrainConfig, int, str]:
    """(stored TrainConfig, vocabulary rows, step folder) of the checkpoint at ``path``."""
    from ..eval.model import read_checkpoint as read

    info = read(path)
    return info.config, info.vocab_size, info.path


def existing_checkpoints(save_dir: str):
    """Complete step numbers already in ``save_dir``."""
    from ..train import checkpoint as ckpt

    return ckpt.complete_steps(save_dir)
