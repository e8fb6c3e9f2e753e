"""The model as Megatron-LM builds it: megatron-core's parallel_state, a GPTModel
with our CP attention and extended RoPE, bf16 parameters under ``Float16Module``,
and megatron-core's ``DistributedDataParallel`` (bucketed grad reduction over DP x CP
into a contiguous fp32 grad buffer). With an interleaved pipeline (VP > 1) a rank
holds VP model chunks, one GPTModel per virtual stage."""
from __future__ import annotations

import math

import torch

from ..distributed import compute_device
from .config import TrainConfig, virtual_pipeline_size
from .config_checks import sequence_parallel


def use_bf16(cfg: TrainConfig) -> bool:
    """bf16 parameters and compute: ``precision: bf16``, or ``auto`` on a GPU."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and default_device().type == "cuda")


def default_device() -> torch.device:
    """The trainer's device: where this process computes (distributed.compute_device: the current
    CUDA device in an NCCL world, the CPU in a gloo world even on a GPU node)."""
    return compute_device()


def transformer_config(cfg: TrainConfig, device=None, init_weights: bool = True):
    """megatron-core's TransformerConfig for ``cfg`` (the one mapping of our keys onto it).
    ``device``: where the parameters are created (default :func:`default_device`); off CUDA,
    megatron-core's CPU initialisation. ``init_weights=False``: megatron-core allocates the
    weights without drawing them (``perform_initialization``), for callers that load every weight
    and never train the model: its init path is also what marks TP-sharded weights
    (``tensor_model_parallel``), which the grad norm of a TP > 1 optimizer reads."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ..rope import attention_scale_factor

    m, p = cfg.model, cfg.parallel
    bf16 = use_bf16(cfg)
    kv = m.hidden_size // m.num_attention_heads
    from ..plan.planner import config_recompute

    rc = config_recompute(cfg)  # the planner models the same choice
    return TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
        init_method_std=m.init_method_std, attention_dropout=0.0, hidden_dropout=0.0,
        tensor_model_parallel_size=p.tensor_model_parallel_size, sequence_parallel=sequence_parallel(cfg),
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size(cfg),  # chunk layer offsets
        # interleaved: unbatched P2P in megatron-core's even/odd order, as Megatron-LM runs it;
        # batched, at PP=2 a rank's activation and gradient sends to its one peer cross over
        overlap_p2p_comm=virtual_pipeline_size(cfg) is not None,
        batch_p2p_comm=virtual_pipeline_size(cfg) is None,
        context_parallel_size=p.context_parallel_size,
        cp_comm_type=p.cp_comm_type if p.context_parallel_size > 1 else None,
        softmax_scale=attention_scale_factor(m.rope) / math.sqrt(kv),
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=torch.device(device or default_device()).type != "cuda",
        perform_initialization=init_weights,
        # per-token loss: the schedule sums token losses and finalize_model_grads divides the
        # grads by the global token count, so DDP sums (not averages) over DP x CP
        calculate_per_token_loss=True,
        recompute_granularity=rc.granularity, recompute_method=rc.method, recompute_num_layers=rc.num_layers,
        recompute_modules=list(rc.modules) if rc.modules else None,
        gated_linear_unit=m.swiglu, activation_func=torch.nn.functional.silu if m.swiglu else torch.nn.functional.gelu,
        # on CUDA as Megatron-LM sets it: a stage frees its sent activations' data after posting the
        # send (the caching allocator orders reuse after it); on CPU an async gloo send may still be
        # reading that memory when it is freed (interleaved runs gave NaN losses)
        deallocate_pipeline_outputs=torch.device(device or default_device()).type == "cuda",
        bias_activation_fusion=False, normalization=m.normalization, add_bias_linear=m.add_bias_linear,
        layernorm_epsilon=m.norm_epsilon, add_qkv_bias=m.add_qkv_bias,
    )


def build_model(cfg: TrainConfig, vocab_size: int, device=None, init_weights: bool = True):
    """The bare megatron-core GPTModel for ``cfg`` (CP attention, extended RoPE), on
    ``device`` (default :func:`default_device`: conversion passes "cpu" explicitly), parameters in fp32. Needs parallel_state initialised with
    cfg.parallel's sizes, without virtual stages (see :func:`build_model_chunks`).
    ``init_weights=False`` skips megatron-core's random init (see :func:`transformer_config`).
    Returns (model, bf16)."""
    if virtual_pipeline_size(cfg):
        raise ValueError(f"build_model builds one model; parallel.virtual_pipeline_model_parallel_size "
                         f"{cfg.parallel.virtual_pipeline_model_parallel_size} needs build_model_chunks")
    chunks, bf16 = build_model_chunks(cfg, vocab_size, device, init_weights)
    return chunks[0], bf16


def init_seed(cfg: TrainConfig) -> int:
    """The init seed of this rank: ``cfg.seed + 100 x pipeline rank``, as Megatron-LM seeds,
    so pipeline stages do not draw their layers from the same random stream (DP and TP
    ranks share it: DP replicas must start equal; TP shards come from one master weight)."""
    from megatron.core import parallel_state

    return cfg.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()


def build_model_chunks(cfg: TrainConfig, vocab_size: int, device=None, init_weights: bool = True):
    """This rank's model chunks: one GPTModel per virtual pipeline stage (one without
    interleaving), each holding its stage's layers at their global offsets. Seeds once,
    so the chunks draw different initial weights. ``device``, ``init_weights``: as in :func:`build_model`.
    Returns (chunks, bf16)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    seed = init_seed(cfg)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    device = torch.device(device or default_device())
    config = transformer_config(cfg, device, init_weights)
    vp = virtual_pipeline_size(cfg)
    chunks = [_build_chunk(cfg, config, vocab_size, i if vp else None).to(device) for i in range(vp or 1)]
    return chunks, use_bf16(cfg)


def _build_chunk(cfg: TrainConfig, config, vocab_size: int, vp_stage):
    """One GPTModel: the first (virtual) stage embeds, the last has the output layer and loss."""
    from megatron.core import parallel_state

    from ..megatron.model import build_gpt_model
    from ..megatron.specs import get_gpt_layer_cp_spec

    m = cfg.model
    te = m.transformer_impl == "transformer_engine"
    if te:
        require_transformer_engine()
    model = build_gpt_model(config, vocab_size=vocab_size, max_sequence_length=cfg.data.seq_length,
                            rope=m.rope, layer_spec=get_gpt_layer_cp_spec(normalization=m.normalization,
                                                                          use_transformer_engine=te),
                            use_transformer_engine=te,
                            share_embeddings_and_output_weights=not m.untie_embeddings,
                            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                                               vp_stage=vp_stage),
                            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                                               vp_stage=vp_stage),
                            vp_stage=vp_stage)
    return model


def require_transformer_engine() -> None:
    """ImportError in one line, naming what to install, unless TransformerEngine imports
    (``model.transformer_impl: transformer_engine``: megatron-core's TE layer spec with our
    ContextParallelAttention as its core attention; see docs/training-gpu.md)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError as err:
        raise ImportError(f"model.transformer_impl=transformer_engine needs TransformerEngine ({err}): "
                          f"pip install 'megatron-ext[gpu]' (transformer-engine[pytorch]), or set "
                          f"model.transformer_impl=local") from None


def wrap_model(cfg: TrainConfig, model, chunk: int = 0):
    """``Float16Module`` (bf16) and megatron-core DDP around ``model``; returns the DDP
    module. Grads are reduced in fp32 buckets over DP x CP (reduce-scatter with the
    distributed optimizer). ``chunk``: the model chunk's index; chunks after the first
    get one bucket (no bucketing), as Megatron-LM's get_model does, since their
    reduction overlaps the other chunks' compute anyway."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    config = model.config
    if config.bf16:
        model = Float16Module(config, model)
    p = cfg.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=p.overlap_grad_reduce,
        use_distributed_optimizer=p.use_distributed_optimizer)
    return DistributedDataParallel(config, ddp_config, model, disable_bucketing=chunk > 0)


def init_model_parallel(cfg: TrainConfig, device=None):
    """megatron-core's parallel_state for cfg.parallel (torch.distributed already
    initialised; the CPU runtime patches applied when this process computes on the CPU:
    ``device``, default :func:`default_device`); returns the module."""
    from ..megatron.cpu import enable_cpu_runtime

    enable_cpu_runtime(device)
    from megatron.core import parallel_state

    p = cfg.parallel
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size, context_parallel_size=p.context_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size(cfg),
        hierarchical_context_parallel_sizes=[p.ulysses_size, p.context_parallel_size // p.ulysses_size]
        if p.cp_comm_type == "a2a+p2p" else None)
    return parallel_state


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers; for a list of model chunks, the
    list of their GPTModels."""
    if isinstance(model, (list, tuple)):
        return [unwrap(chunk) for chunk in model]
    while hasattr(model, "module"):
        model = model.module
    return model
