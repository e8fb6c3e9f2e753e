"""The optimizer and schedule as Megatron-LM builds them: megatron-core's
``get_megatron_optimizer`` (Adam with decoupled weight decay, global-norm clipping
and the finite check across TP/PP/DP, the distributed optimizer sharding fp32 main
params and Adam states over DP x CP) and ``OptimizerParamScheduler`` (linear warmup,
then ``optim.lr_decay_style``'s decay to min_lr, in iterations)."""
from __future__ import annotations

from .config import TrainConfig
from .model import use_bf16


def optimizer_config(cfg: TrainConfig):
    """megatron-core's OptimizerConfig for ``cfg``."""
    import torch
    from megatron.core.optimizer import OptimizerConfig

    o, bf16 = cfg.optim, use_bf16(cfg)
    return OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, adam_eps=1e-8, clip_grad=o.clip_grad, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        # a constant scale of 1 makes the mixed-precision and distributed optimizers check
        # their grads for inf/NaN and skip the step, in fp32 too (loss_scale=None checks nothing)
        loss_scale=1.0,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)


def scheduler_kwargs(cfg: TrainConfig) -> dict:
    """megatron-core OptimizerParamScheduler arguments (all but the optimizer) from ``cfg.optim``."""
    o = cfg.optim
    return dict(
        init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.warmup_iters,
        lr_decay_steps=max(o.train_iters, o.warmup_iters + 1), lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=o.train_iters, wd_incr_style="constant",
        # a resumed run may change train_iters (and so the decay length): the config wins,
        # the step count comes from the checkpoint
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
        wsd_decay_steps=o.lr_wsd_decay_iters or None, lr_wsd_decay_style=o.lr_wsd_decay_style)


def build_optimizer(cfg: TrainConfig, model_chunks):
    """(MegatronOptimizer, OptimizerParamScheduler) for the DDP-wrapped ``model_chunks``."""
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optimizer = get_megatron_optimizer(optimizer_config(cfg), model_chunks)
    scheduler = OptimizerParamScheduler(optimizer, **scheduler_kwargs(cfg))
    return optimizer, scheduler


def step_if_finite(optimizer):
    """megatron-core's optimizer step, skipped when any gradient is inf/NaN (a finite loss
    can still have them). Returns (stepped, grad_norm or None).

    The mixed-precision and distributed optimizers check their grads through the constant
    grad scaler (``loss_scale=1``, all-reduced over the model-parallel group). mcore's
    ``FP32Optimizer`` (fp32 without the distributed optimizer) has no scaler and would step
    on inf grads: there the global grad norm (mcore's ``get_grad_norm``, the same
    collective clipping uses) is checked first."""
    import math

    from megatron.core.optimizer.optimizer import FP32Optimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    if any(isinstance(opt, FP32Optimizer) for opt in parts):
        optimizer.prepare_grads()  # main_grad -> grad, so the norm sees this step's grads
        norm = float(optimizer.get_grad_norm())
        if not math.isfinite(norm):
            return False, norm
    ok, norm, _ = optimizer.step()
    return bool(ok), (float(norm) if norm is not None else None)
