"""Narrow, idempotent patches that let megatron-core (0.16) run on CPU with gloo.

megatron-core assumes CUDA in a few places that a CPU run reaches. Each patch
below names its target, checks that the target still exists (and raises a
RuntimeError naming it when a new megatron-core moved it), and is applied only
in a process that computes on the CPU (no CUDA, or a gloo world on a GPU node:
resharding and conversion); a process that computes on CUDA never has them.

1. RNG tracker: ``tensor_parallel.random`` keeps CUDA generator states; on CPU
   the tracker forks torch's CPU generator instead, so
   ``model_parallel_cuda_manual_seed`` and ``get_cuda_rng_tracker().fork()`` work.
2. ``torch.cuda.current_device()`` in the rotary embedding (moving ``inv_freq``),
   in ``GlobalMemoryBuffer`` and in the DDP grad buffers: those modules see a
   ``torch`` whose ``cuda.current_device()`` is ``"cpu"``; nothing else changes.
3. The default causal mask that ``FusedScaleMaskSoftmax`` builds on "cuda" is
   built on the CPU.
4. CP RoPE slicing (``get_pos_emb_on_this_cp_rank``) pins memory and calls
   ``.cuda()``; on CPU it takes the zigzag shard with :func:`shard_sequence`.
5. Activation recomputation (``CheckpointFunction``) saves and restores the
   "CUDA" RNG state around the recomputed forward; on CPU that is torch's CPU
   generator (``_get_cuda_rng_state`` / ``_set_cuda_rng_state``).
6. ``device='cuda'`` tensor factories and ``torch.cuda.synchronize`` in the
   optimizer (``optimizer/optimizer.py:473,481,485,907,1141``, ``grad_scaler.py:15,88,91,94``,
   ``clip_grads.py:90,103,115,174,207``, ``utils.py:1207``), the pipeline schedules
   (``schedules.py:596,983,2138`` ``total_num_tokens``) and P2P
   (``p2p_communication.py:190-202,242,313,321,398``), the distributed optimizer's
   ``load_state_dict`` (``distrib_optimizer.py:791``), sequence parallelism's
   reduce-scatter/all-gather buffers (``tensor_parallel/mappings.py:91,141,148,181,442``,
   ``tensor_parallel/layers.py:261,552,597,607,873,899``) and dist_checkpointing's
   savers (``filesystem_async.py:230``, ``state_dict_saver.py:204,252``): those
   modules see a ``torch`` whose factories put ``cuda`` tensors on the CPU.
7. ``Tensor.type()`` compared with ``'torch.cuda.*Tensor'`` strings while the
   optimizers sort parameters by dtype (``distrib_optimizer.py:361,420,582``,
   ``optimizer.py:671,690``, ``clip_grads.py:167``): inside exactly those
   functions a CPU tensor reports the CUDA type name of its dtype.
8. ``torch.autocast("cuda")`` in the schedules' ``forward_step``
   (``schedules.py:418``, only with ``config.enable_autocast``) autocasts on the CPU.
9. Pipeline parallelism with tied embeddings: ``LanguageModule.setup_embeddings_and_output_layer``
   moves the shared weight with ``.cuda()`` before all-reducing it over the embedding group
   (``language_module.py:244``); inside exactly that method ``Tensor.cuda()`` keeps a CPU
   tensor where it is.
10. dist_checkpointing's fully parallel load and asynchronous save: the loaded shards are
   exchanged on "cuda" (``exchange_utils.py:98-110,326,336,499``: ``init_data("cuda")``,
   ``empty(device="cuda")``, ``.cuda()``), the wrappers synchronise
   (``fully_parallel.py:272,281``) and the async queue all-reduces its done flags on
   ``current_device()`` (``async_utils.py:165,212,604``). Those modules see the CPU
   ``torch`` of patch 6, and inside exactly ``exchange_by_distribution`` ``Tensor.cuda()``
   keeps a CPU tensor and ``ShardedTensor.init_data("cuda")`` allocates on the CPU.
"""
from __future__ import annotations

import contextlib
import importlib
import types

import torch

from ..distributed import compute_device
from ..sharding import shard_sequence

_APPLIED = []


def _target(module_name: str, attr: str):
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RuntimeError(f"enable_cpu_runtime: cannot import {module_name} ({e}); "
                           f"this megatron-core version moved a patched target") from e
    if not hasattr(module, attr):
        raise RuntimeError(f"enable_cpu_runtime: {module_name}.{attr} is gone in this megatron-core "
                           f"version; update megatron_ext/megatron/cpu.py")
    return module


class _CpuCuda:
    """``torch.cuda`` as seen by a patched module: the current device is the CPU and
    device-wide synchronisation is a no-op (CPU ops are synchronous)."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(*args, **kwargs):
        return None

    @staticmethod
    def empty_cache():
        return None


def _cpu_device(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _on_cpu(factory):
    def make(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return factory(*args, **kwargs)

    return make


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like")


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by a patched module: everything forwards, except ``cuda``,
    the tensor factories (``device='cuda'`` -> CPU) and ``autocast('cuda')``."""

    cuda = _CpuCuda()

    def __getattr__(self, name):
        value = getattr(torch, name)
        return _on_cpu(value) if name in _FACTORIES else value

    @staticmethod
    def autocast(device_type, *args, **kwargs):
        return torch.autocast(_cpu_device(device_type), *args, **kwargs)


def _cpu_rng_tracker_class():
    random = _target("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker")

    class CpuRNGStatesTracker(random.CudaRNGStatesTracker):
        """Named RNG states on torch's CPU generator (same interface as mcore's tracker)."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise RuntimeError(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise RuntimeError(f"cpu rng state {name} already exists")
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name=random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise KeyError(f"cpu rng state {name} is not added")
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    return CpuRNGStatesTracker


def _patch_rng_tracker():
    random = _target("megatron.core.tensor_parallel.random", "initialize_rng_tracker")
    original = random.initialize_rng_tracker
    tracker_class = _cpu_rng_tracker_class()

    def initialize_rng_tracker(*args, **kwargs):
        original(*args, **kwargs)
        if not isinstance(random._CUDA_RNG_STATE_TRACKER, tracker_class):
            random._CUDA_RNG_STATE_TRACKER = tracker_class()

    initialize_rng_tracker.__wrapped__ = original
    random.initialize_rng_tracker = initialize_rng_tracker


def _patch_recompute_rng_state():
    random = _target("megatron.core.tensor_parallel.random", "_get_cuda_rng_state")
    _target("megatron.core.tensor_parallel.random", "_set_cuda_rng_state")

    def _get_cuda_rng_state(*args, **kwargs):
        return torch.get_rng_state()

    def _set_cuda_rng_state(new_state, *args, **kwargs):
        torch.set_rng_state(new_state)

    random._get_cuda_rng_state, random._set_cuda_rng_state = _get_cuda_rng_state, _set_cuda_rng_state


def _patch_current_device():
    for name in ("megatron.core.models.common.embeddings.rotary_pos_embedding", "megatron.core.utils",
                 "megatron.core.distributed.param_and_grad_buffer",
                 "megatron.core.distributed.distributed_data_parallel"):
        _target(name, "torch").torch = _CpuTorch("torch")


_CUDA_TYPE_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
                    torch.bfloat16: "torch.cuda.BFloat16Tensor"}


@contextlib.contextmanager
def _cuda_type_names():
    """While active, ``Tensor.type()`` (no arguments) of a CPU float tensor returns
    the CUDA type name its dtype would have; nothing else changes."""
    original = torch.Tensor.type

    def type_(self, *args, **kwargs):
        if not args and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return original(self, *args, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn):
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn
    wrapper.__name__ = fn.__name__
    return wrapper


@contextlib.contextmanager
def _cuda_is_cpu():
    """While active, ``Tensor.cuda()`` returns the tensor itself (CPU stays CPU)."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _patch_tied_embedding_setup():
    module = _target("megatron.core.models.common.language_module.language_module", "LanguageModule")
    cls = module.LanguageModule
    original = cls.setup_embeddings_and_output_layer

    def setup_embeddings_and_output_layer(self, *args, **kwargs):
        with _cuda_is_cpu():
            return original(self, *args, **kwargs)

    setup_embeddings_and_output_layer.__wrapped__ = original
    cls.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


def _patch_device_factories():
    for name in ("megatron.core.tensor_parallel.mappings", "megatron.core.tensor_parallel.layers",
                 "megatron.core.optimizer.optimizer", "megatron.core.optimizer.grad_scaler",
                 "megatron.core.optimizer.clip_grads",
                 "megatron.core.optimizer.distrib_optimizer", "megatron.core.pipeline_parallel.schedules",
                 "megatron.core.pipeline_parallel.p2p_communication",
                 "megatron.core.dist_checkpointing.strategies.filesystem_async",
                 "megatron.core.dist_checkpointing.strategies.state_dict_saver",
                 "megatron.core.dist_checkpointing.strategies.fully_parallel",
                 "megatron.core.dist_checkpointing.strategies.async_utils",
                 "megatron.core.dist_checkpointing.exchange_utils"):
        _target(name, "torch").torch = _CpuTorch("torch")


@contextlib.contextmanager
def _sharded_init_on_cpu():
    """While active, ``ShardedTensor.init_data`` puts a "cuda" allocation on the CPU."""
    mapping = _target("megatron.core.dist_checkpointing.mapping", "ShardedTensor")
    original = mapping.ShardedTensor.init_data

    def init_data(self, device, init_fn=torch.empty):
        return original(self, _cpu_device(device), init_fn)

    mapping.ShardedTensor.init_data = init_data
    try:
        yield
    finally:
        mapping.ShardedTensor.init_data = original


def _patch_fully_parallel_exchange():
    exchange = _target("megatron.core.dist_checkpointing.exchange_utils", "exchange_by_distribution")
    fully_parallel = _target("megatron.core.dist_checkpointing.strategies.fully_parallel", "exchange_by_distribution")
    original = exchange.exchange_by_distribution

    def exchange_by_distribution(*args, **kwargs):
        with _cuda_is_cpu(), _sharded_init_on_cpu():
            return original(*args, **kwargs)

    exchange_by_distribution.__wrapped__ = original
    exchange.exchange_by_distribution = fully_parallel.exchange_by_distribution = exchange_by_distribution


def _patch_type_names():
    distrib = _target("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer")
    optim = _target("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params")
    clip = _target("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32")
    cls = distrib.DistributedOptimizer
    # a staticmethod/classmethod keeps its kind: wrap the function inside it
    raw = cls.__dict__["_build_model_and_main_param_groups"]
    kind = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
    inner = raw.__func__ if kind else raw
    cls._build_model_and_main_param_groups = kind(_with_cuda_type_names(inner)) if kind else _with_cuda_type_names(inner)
    cls.__init__ = _with_cuda_type_names(cls.__init__)
    optim.Float16OptimizerWithFloat16Params.__init__ = _with_cuda_type_names(
        optim.Float16OptimizerWithFloat16Params.__init__)
    wrapped = _with_cuda_type_names(clip.clip_grad_by_total_norm_fp32)
    clip.clip_grad_by_total_norm_fp32 = optim.clip_grad_by_total_norm_fp32 = wrapped


def _patch_causal_mask():
    fused = _target("megatron.core.fusions.fused_softmax", "get_default_causal_mask")

    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.ones(sq, sq, dtype=torch.bool).triu(diagonal=1)

    fused.get_default_causal_mask = get_default_causal_mask


def _patch_cp_rope_slicing():
    def get_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
        if cp_group is None:
            raise ValueError("cp_group must be provided to get positional embedding per CP rank")
        return shard_sequence(pos_emb, seq_dim, cp_group.rank(), cp_group.size(), "zigzag")

    for name in ("megatron.core.models.common.embeddings.rope_utils",
                 "megatron.core.models.common.embeddings.rotary_pos_embedding",
                 "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding"):
        setattr(_target(name, "get_pos_emb_on_this_cp_rank"), "get_pos_emb_on_this_cp_rank",
                get_pos_emb_on_this_cp_rank)


def enable_cpu_runtime(device=None) -> bool:
    """Apply the CPU patches once when this process computes on the CPU; returns True when
    they are active. ``device``: where it computes (default
    :func:`~megatron_ext.distributed.compute_device`: a gloo world computes on the CPU even
    where CUDA exists). The patches are process-wide and stay: a process that applied them
    refuses a CUDA device (RuntimeError) instead of running megatron-core half-patched."""
    device = torch.device(device) if device is not None else compute_device()
    if device.type != "cpu":
        if _APPLIED:
            raise RuntimeError(f"enable_cpu_runtime: this process applied megatron-core's CPU patches for a CPU "
                               f"run earlier; it cannot also compute on {device}: use a fresh process")
        return False
    if not _APPLIED:
        for patch in (_patch_rng_tracker, _patch_current_device, _patch_causal_mask, _patch_cp_rope_slicing,
                      _patch_recompute_rng_state, _patch_device_factories, _patch_type_names,
                      _patch_tied_embedding_setup, _patch_fully_parallel_exchange):
            patch()
        _APPLIED.append(True)
    return True
