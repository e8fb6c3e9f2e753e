"""optim.lr_decay_style: our config drives megatron-core's own OptimizerParamScheduler (WSD and cosine)."""
import math

import pytest
import torch

from megatron_ext.train.config import OptimConfig, TrainConfig
from megatron_ext.train.config_checks import check_lr_schedule as _check_lr_schedule
from megatron_ext.train.optim import scheduler_kwargs


def _lrs(optim: OptimConfig):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.0)
    sched = OptimizerParamScheduler(opt, **scheduler_kwargs(TrainConfig(optim=optim)))
    out = []
    for _ in range(optim.train_iters):
        sched.step(1)
        out.append(opt.param_groups[0]["lr"])
    return out


def test_wsd_is_constant_then_decays_at_the_end():
    o = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_iters=4, train_iters=20, lr_decay_style="WSD", lr_wsd_decay_iters=5)
    _check_lr_schedule(o)
    lrs = _lrs(o)
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3], rel=1e-12)  # linear warmup (step i: i/4 lr)
    assert lrs[4:15] == [1e-3] * 11  # constant until 20 - 5
    assert lrs[15:] == pytest.approx([1e-4 + 9e-4 * (1 - k / 5) for k in range(1, 6)], rel=1e-12)  # linear decay
    cos = _lrs(OptimConfig(lr=1e-3, min_lr=1e-4, warmup_iters=4, train_iters=20))
    assert cos[9] == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 6 / 16)), rel=1e-12)


def test_lr_schedule_errors_name_the_key():
    with pytest.raises(ValueError, match="optim.lr_decay_style 'wsd' is not one of cosine, linear, constant, WSD"):
        _check_lr_schedule(OptimConfig(lr_decay_style="wsd"))
    with pytest.raises(ValueError, match=r"optim.lr_wsd_decay_iters 0 must be in 1..train_iters - warmup_iters = 10"):
        _check_lr_schedule(OptimConfig(lr_decay_style="WSD", train_iters=20, warmup_iters=10))
    with pytest.raises(ValueError, match="optim.lr_wsd_decay_style 'step'"):
        _check_lr_schedule(OptimConfig(lr_decay_style="WSD", lr_wsd_decay_iters=2, lr_wsd_decay_style="step"))
