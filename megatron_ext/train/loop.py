"""The training driver: one loop for the pretrain, sft and long_sft stages."""
from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import yaml

from . import checkpoint as ckpt
from .config import TrainConfig, to_dict, validate
from .data import SentencePieceTokenizer, build_datasets, sample_batches
from .metrics import MetricsLogger, flops_per_token


@dataclass
class RunState:
    """What a checkpoint restores besides the weights."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0


def build_model(cfg: TrainConfig, vocab_size: int):
    """megatron-core GPTModel for ``cfg`` (CP attention, extended RoPE); returns (model, bf16).
    Needs parallel_state initialised with cfg.parallel's sizes."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ..megatron.model import build_gpt_model
    from ..megatron.specs import get_gpt_layer_cp_spec
    from ..rope import attention_scale_factor

    m, p = cfg.model, cfg.parallel
    model_parallel_cuda_manual_seed(cfg.seed)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())
    kv = m.hidden_size // m.num_attention_heads
    scale = attention_scale_factor(m.rope) / math.sqrt(kv)
    config = TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
        init_method_std=m.init_method_std, attention_dropout=0.0, hidden_dropout=0.0,
        tensor_model_parallel_size=p.tensor_model_parallel_size, context_parallel_size=p.context_parallel_size,
        cp_comm_type=p.cp_comm_type if p.context_parallel_size > 1 else None, softmax_scale=scale,
        # bf16 runs keep fp32 parameters (the optimizer's master copy) and compute under autocast.
        use_cpu_initialization=not torch.cuda.is_available(), params_dtype=torch.float32,
        calculate_per_token_loss=True,
        recompute_granularity="full" if cfg.recompute else None,
        recompute_method="uniform" if cfg.recompute else None, recompute_num_layers=1 if cfg.recompute else None,
        gated_linear_unit=m.swiglu, activation_func=torch.nn.functional.silu if m.swiglu else torch.nn.functional.gelu,
        bias_activation_fusion=False, normalization=m.normalization, add_bias_linear=m.add_bias_linear,
        layernorm_epsilon=m.norm_epsilon, add_qkv_bias=m.add_qkv_bias,
    )
    torch.manual_seed(cfg.seed)
    model = build_gpt_model(config, vocab_size=vocab_size, max_sequence_length=cfg.data.seq_length, rope=m.rope,
                            layer_spec=get_gpt_layer_cp_spec(normalization=m.normalization),
                            share_embeddings_and_output_weights=not m.untie_embeddings)
    return model.cuda() if torch.cuda.is_available() else model, bf16


def init_model_parallel(cfg: TrainConfig):
    """megatron-core's parallel_state for cfg.parallel (torch.distributed already
    initialised; CPU runtime patches applied off CUDA); returns the module."""
    from ..megatron.cpu import enable_cpu_runtime

    enable_cpu_runtime()
    from megatron.core import parallel_state

    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size, context_parallel_size=p.context_parallel_size,
        hierarchical_context_parallel_sizes=[p.ulysses_size, p.context_parallel_size // p.ulysses_size]
        if p.cp_comm_type == "a2a+p2p" else None)
    return parallel_state


def _optimizer(cfg: TrainConfig, model):
    o = cfg.optim
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=1e-8)

    def factor(it):  # linear warmup, then cosine from lr to min_lr
        if it < o.warmup_iters:
            return (it + 1) / o.warmup_iters
        progress = min(1.0, (it - o.warmup_iters) / max(1, o.train_iters - o.warmup_iters))
        return (o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))) / o.lr

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Trainer:
    """Runs one stage; see :func:`megatron_ext.train.__main__.main` for the CLI."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.sizes = validate(cfg, self.world)
        self.ps = init_model_parallel(cfg)
        self.tokenizer = SentencePieceTokenizer(cfg.data.tokenizer_model)
        vocab = cfg.model.vocab_size or self.tokenizer.vocab_size
        self.model, self.bf16 = build_model(cfg, vocab)
        self.optimizer, self.scheduler = _optimizer(cfg, self.model)
        self.state = RunState()
        self.stop_requested = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, *_):
        self.stop_requested = True  # acted on at the end of the current iteration, by every rank together

    def restore(self) -> str:
        """Resume from save_dir's newest complete checkpoint, else start from init_from's weights."""
        c = self.cfg.checkpoint
        tp = self.cfg.parallel.tensor_model_parallel_size
        path = ckpt.latest_checkpoint(c.save_dir)
        if path:
            extra = ckpt.load(path, self.model, self.optimizer, self.scheduler, tp)
            self.state = RunState(extra["iteration"], extra["consumed_samples"], extra["skipped_iterations"])
            return f"resumed from {path} at iteration {self.state.iteration}"
        if c.init_from:
            src = ckpt.latest_checkpoint(c.init_from)
            if not src:
                raise FileNotFoundError(f"checkpoint.init_from={c.init_from!r} has no complete checkpoint")
            ckpt.load(src, self.model, tp_size=tp, weights_only=True)
            return f"initialised weights from {src}"
        return "starting from scratch"

    def save(self) -> str:
        extra = {"iteration": self.state.iteration, "consumed_samples": self.state.consumed_samples,
                 "skipped_iterations": self.state.skipped_iterations,
                 "config_yaml": yaml.safe_dump(to_dict(self.cfg))}
        c = self.cfg.checkpoint
        return ckpt.save(c.save_dir, self.state.iteration, self.model, self.optimizer, self.scheduler, extra,
                         c.keep_last, self.cfg.parallel.tensor_model_parallel_size)

    # -- one optimizer step ----------------------------------------------------------------
    def step(self, micro_batches) -> dict:
        """Forward/backward over the micro-batches, then a finite-checked optimizer step."""
        from ..megatron.batch import get_batch_on_this_cp_rank, global_token_count, reduce_gradients

        ps = self.ps
        cp_group, dp_cp = ps.get_context_parallel_group(), ps.get_data_parallel_group(with_context_parallel=True)
        device = next(self.model.parameters()).device
        shards = [{k: v.to(device) for k, v in get_batch_on_this_cp_rank(mb, cp_group).items()} for mb in micro_batches]
        # One token count for the whole step, so accumulation gives the token mean of the global batch.
        total = global_token_count([local["loss_mask"] for local in shards], dp_cp)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for local in shards:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
                per_token = self.model(local["tokens"], local["position_ids"], None, labels=local["labels"])
            masked = (per_token.float() * local["loss_mask"]).sum()
            if self.state.iteration + 1 in self.cfg.fault.inject_nan_at:
                masked = masked * float("nan")
            (masked / max(total, 1.0)).backward()
            loss_sum += masked.detach().double()
        dist.all_reduce(loss_sum, group=dp_cp)
        reduce_gradients(self.model.parameters(), dp_cp)
        grad_norm = self._clip()
        finite = torch.tensor([1.0 if math.isfinite(loss_sum.item()) and math.isfinite(grad_norm) else 0.0])
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank skips together
        if finite.item() > 0:
            self.optimizer.step()
        self.scheduler.step()
        return {"loss": loss_sum.item() / max(total, 1.0), "grad_norm": grad_norm,
                "finite": finite.item() > 0, "tokens": total}

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.optim.clip_grad if self.cfg.optim.clip_grad > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))  # TP=1: replicated grads, local norm

    # -- the loop ---------------------------------------------------------------------------
    def train(self) -> int:
        cfg, o = self.cfg, self.cfg.optim
        gbs = o.global_batch_size
        cache = cfg.data.cache_dir or os.path.join(cfg.checkpoint.save_dir, "data_cache")
        text, mask = build_datasets(cfg.data, o.train_iters * gbs, self.tokenizer, cache)
        dp_rank = self.ps.get_data_parallel_rank()
        batches = sample_batches(text, mask, self.state.consumed_samples, o.micro_batch_size, dp_rank,
                                 self.sizes["dp"], self.sizes["grad_accum"])
        log = MetricsLogger(cfg, self.rank, self.world, flops_per_token(cfg, self.tokenizer.vocab_size))
        consecutive_bad = 0
        while self.state.iteration < o.train_iters:
            t0 = time.perf_counter()
            out = self.step(next(batches))
            self.state.iteration += 1
            self.state.consumed_samples += gbs
            consecutive_bad = 0 if out["finite"] else consecutive_bad + 1
            self.state.skipped_iterations += not out["finite"]
            log.iteration(self.state, out, time.perf_counter() - t0, self.scheduler.get_last_lr()[0])
            if consecutive_bad >= cfg.fault.max_consecutive_nonfinite:
                log.close()
                raise RuntimeError(f"{consecutive_bad} consecutive non-finite steps (loss or grad norm) up to "
                                   f"iteration {self.state.iteration}; stopping. Lower the learning rate or check the data.")
            stop = torch.tensor([float(self.stop_requested)])
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
            if stop.item() or self.state.iteration % cfg.checkpoint.save_interval == 0 \
                    or self.state.iteration == o.train_iters:
                path = self.save()
                log.info(f"saved checkpoint {path}")
            if stop.item():
                log.info(f"SIGTERM: saved at iteration {self.state.iteration}; exiting cleanly")
                break
        log.close()
        return 0
