"""Training configuration: dataclasses with a docstring per field, loaded from
YAML, overridden with ``--set a.b=c``; unknown keys are errors that name them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

import yaml

from ..rope import RopeConfig
from .config_checks import (check_heads, check_lr_schedule, check_model_choices, check_virtual_pipeline,
                            check_vocab_size, sequence_parallel, virtual_pipeline_size)


@dataclass
class ParallelConfig:
    """How the world is split. DP is derived: world / (TP * PP * CP)."""

    tensor_model_parallel_size: int = 1
    """TP degree: must divide the attention heads and the query groups."""
    sequence_parallel: Optional[bool] = None
    """Megatron sequence parallelism inside TP (norm/dropout activations split by TP); unset: on when TP > 1."""
    pipeline_model_parallel_size: int = 1
    """PP degree: megatron-core's 1F1B schedule over layer stages; must divide model.num_layers."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Interleaved 1F1B: model chunks per pipeline rank (unset or 1: none); needs PP > 1, PP x this
    dividing model.num_layers, and the micro-batches per step a multiple of PP."""
    context_parallel_size: int = 1
    """CP degree: ranks that share one sequence."""
    cp_comm_type: str = "p2p"
    """p2p (ring), all_gather, a2a (Ulysses) or a2a+p2p (hybrid)."""
    ulysses_size: int = 1
    """Ulysses degree inside CP for a2a+p2p (the ring degree is CP / this)."""
    use_distributed_optimizer: bool = True
    """megatron-core's distributed optimizer: fp32 main params and Adam states sharded over DP x CP."""
    overlap_grad_reduce: bool = False
    """Overlap DDP's bucketed grad reduce-scatter/all-reduce with the backward (worth it on GPUs)."""


@dataclass
class ModelConfig:
    """GPT shape and position embedding."""

    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: int = 256
    """MLP width."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int = 2
    """KV heads (GQA)."""
    vocab_size: int = 0
    """Padded vocabulary; 0 takes the tokenizer's size."""
    true_vocab_size: int = 0
    """Rows of ``vocab_size`` that are real tokens (Megatron-LM's ``--true-vocab-size``): import-hf pads
    a Hugging Face vocabulary to a multiple of ``--make-vocab-size-divisible-by`` and records the original
    size here; export-hf drops the rows above it. 0: every row is real."""
    rope: RopeConfig = field(default_factory=RopeConfig)
    """Rotary embedding and its context extension."""
    init_method_std: float = 0.02
    """Std of the weight initialisation."""
    swiglu: bool = False
    """Gated SiLU MLP (LLaMA/Skywork style: three ffn matrices)."""
    normalization: str = "LayerNorm"
    """LayerNorm or RMSNorm."""
    add_bias_linear: bool = True
    """Biases in the linear layers (LLaMA/Skywork: none)."""
    untie_embeddings: bool = False
    """Separate input embedding and output layer weights."""
    norm_epsilon: float = 1e-5
    """Epsilon of LayerNorm/RMSNorm (Llama: 1e-5 or 1e-6, HF ``rms_norm_eps``)."""
    add_qkv_bias: bool = False
    """Bias on the fused QKV projection only (Qwen2), even when add_bias_linear is off."""
    transformer_impl: str = "local"
    """local (megatron-core's local layer spec) or transformer_engine (its TE spec, our CP core
    attention kept; needs ``pip install 'megatron-ext[gpu]'``)."""
    recompute_granularity: Optional[str] = None
    """Activation recompute, megatron-core's names: full or selective; unset: none (or full when
    the old top-level ``recompute: true`` is set)."""
    recompute_modules: List[str] = field(default_factory=list)
    """selective: core_attn, mlp, layernorm (TE only) (megatron-core's recompute_modules); empty: core_attn."""
    recompute_method: Optional[str] = None
    """full: uniform (groups of recompute_num_layers layers) or block (the first recompute_num_layers
    layers of each pipeline stage); unset: uniform."""
    recompute_num_layers: Optional[int] = None
    """full: layers per group (uniform) or recomputed layers per stage (block); unset: 1."""


@dataclass
class DataConfig:
    """What to train on."""

    blend: List[Any] = field(default_factory=list)
    """[weight, prefix, weight, prefix, ...] of ``*_text_document`` prefixes (without the suffix)."""
    tokenizer_model: str = ""
    """sentencepiece .model used to build the data."""
    seq_length: int = 1024
    """Tokens per sample (global, before CP sharding); must divide by 2 * CP."""
    sft: bool = False
    """Use the ``_loss_mask_document`` alongside the tokens (loss on response tokens only)."""
    split: str = "100,0,0"
    """train,valid,test document split."""
    cache_dir: str = ""
    """Where GPTDataset caches its indices (default: next to the checkpoints)."""
    seed: int = 1234
    """Sample order seed."""
    packing: str = ""
    """none (Megatron's concatenation) or sft (whole examples packed into seq_length, documents
    masked from each other; needs sft data). Empty: sft for the sft and long_sft stages, else none."""
    drop_overlong: bool = False
    """packing=sft: skip (and count) examples longer than seq_length instead of raising."""
    document_masks: bool = False
    """packing=none: mask attention at document (EOD) boundaries inside each sample too."""


def packing_mode(cfg) -> str:
    """data.packing resolved for the stage of ``cfg`` (a TrainConfig): "none" or "sft"."""
    mode = cfg.data.packing or ("sft" if cfg.stage in ("sft", "long_sft") else "none")
    if mode not in ("none", "sft"):
        raise ValueError(f"data.packing {mode!r} is not one of none, sft")
    if mode == "sft" and not cfg.data.sft:
        raise ValueError("data.packing=sft needs data.sft=true (examples come with their loss masks)")
    return mode


@dataclass
class OptimConfig:
    """AdamW with linear warmup, then megatron-core's OptimizerParamScheduler decay (cosine by default)."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Final learning rate."""
    warmup_iters: int = 10
    """Linear warmup iterations."""
    lr_decay_style: str = "cosine"
    """megatron-core lr_decay_style after warmup: cosine, linear, constant or WSD (constant, then decay
    over the last ``lr_wsd_decay_iters`` iterations)."""
    lr_wsd_decay_iters: int = 0
    """WSD only: final iterations over which the lr falls to min_lr (megatron-core wsd_decay_steps)."""
    lr_wsd_decay_style: str = "linear"
    """WSD only: shape of that final decay (megatron-core lr_wsd_decay_style: linear, cosine, exponential,
    minus_sqrt)."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    clip_grad: float = 1.0
    """Global grad-norm clip (0: off)."""
    micro_batch_size: int = 1
    """Samples per rank per micro step."""
    global_batch_size: int = 2
    """Samples per optimizer step over all DP ranks."""
    train_iters: int = 20
    """Optimizer steps in this stage."""


@dataclass
class CheckpointConfig:
    """torch.distributed.checkpoint folders ``save_dir/step-N``."""

    save_dir: str = "runs/tiny"
    """Checkpoints, logs and wandb files go here."""
    save_interval: int = 10
    """Save every N iterations (and at the end, and on SIGTERM)."""
    keep_last: int = 2
    """Complete checkpoints kept."""
    init_from: str = ""
    """A previous stage's save_dir (or step folder): load the weights only, start at iteration 0."""
    # -- format, asynchronous save and recovery (docs/checkpoints.md; the planner's save-time and
    # host-memory model reads format and async_save) --
    format: str = "dp_reshardable"
    """Distributed-optimizer state layout: dp_reshardable (each rank writes its own bucket slice; loads at
    any DP x CP, at the saved TP/PP/VP only; `python -m megatron_ext.train.reshard` rewrites it for another
    layout) or fully_reshardable (per-parameter, loads at any layout; DP rank 0 gathers its TP shard)."""
    async_save: bool = True
    """Write the shards from a forked process while training goes on (megatron-core's AsyncCallsQueue);
    the COMPLETE marker and the rename follow once every rank's write finished."""
    skip_broken: bool = False
    """On resume, a newest complete checkpoint with a missing or truncated file is skipped (and named)
    for the previous complete one, instead of stopping with an error that names the file."""


@dataclass
class LoggingConfig:
    """What rank 0 reports."""

    log_interval: int = 1
    """Print a Megatron-style line every N iterations."""
    eval_interval: int = 0
    """Validation loss every N iterations (and at the end); 0: only at the end, if eval_iters > 0."""
    eval_iters: int = 0
    """Batches of the valid split (data.split) per validation; 0: no validation."""
    wandb: bool = True
    """Log to wandb; offline unless WANDB_MODE says otherwise."""
    wandb_project: str = "megatron-ext"
    """Default project (WANDB_PROJECT wins)."""
    tensorboard: bool = False
    """Also write TensorBoard events (needs the tensorboard package)."""


@dataclass
class FaultConfig:
    """Non-finite losses."""

    max_consecutive_nonfinite: int = 3
    """Stop after this many non-finite steps in a row (each one is skipped)."""
    inject_nan_at: List[int] = field(default_factory=list)
    """Testing aid: make the loss NaN at these iterations."""


@dataclass
class TrainConfig:
    """One stage of the LongSkywork recipe."""

    stage: str = "pretrain"
    """pretrain, sft or long_sft."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
    fault: FaultConfig = field(default_factory=FaultConfig)
    """Fault handling."""
    precision: str = "auto"
    """fp32, bf16, or auto (fp32 on CPU, bf16 on GPU)."""
    recompute: bool = False
    """Old switch, kept as an alias: true = model.recompute_granularity full (every layer)."""
    seed: int = 1234
    """Model init seed."""
    expected: str = ""
    """What a user should expect from this config (free text, printed at start)."""


def _build(cls, data: Dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown config keys {[f'{where}{k}' for k in unknown]}; "
                         f"{where or 'top level'} takes {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        default = known[name].default_factory() if known[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}{name}.")
        else:
            kwargs[name] = _typed(value, str(known[name].type), f"{where}{name}")
    return cls(**kwargs)


def _typed(value: Any, annotation: str, key: str) -> Any:
    """A scalar field's value in its declared type. YAML 1.1 reads ``1e-3`` as text, so
    numbers written that way are converted; anything ambiguous raises, naming the key."""
    def bad():
        return ValueError(f"config key {key}: expected {annotation}, got {value!r}")

    if annotation.startswith("Optional[") and annotation.endswith("]"):
        return None if value is None else _typed(value, annotation[len("Optional["):-1], key)
    if annotation.startswith("List[") and annotation.endswith("]"):
        # ``--set fault.inject_nan_at=5`` reads as a scalar: one element; each element typed
        items = value if isinstance(value, (list, tuple)) else [value]
        if isinstance(value, (dict, set)) or value is None:
            raise bad()
        inner = annotation[len("List["):-1]
        return [_typed(v, inner, f"{key}[{i}]") for i, v in enumerate(items)]
    if annotation in ("float", "int"):
        if isinstance(value, bool):
            raise bad()
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad() from None
        if annotation == "float":
            return number
        if not number.is_integer():
            raise bad()
        return int(number)
    if annotation == "bool" and not isinstance(value, bool):
        raise bad()
    if annotation == "str":
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise bad()
        return str(value)
    return value


def _set(tree: Dict[str, Any], dotted: str, raw: str) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = yaml.safe_load(raw)


def load_config(path: Optional[str], overrides: List[str] = ()) -> TrainConfig:
    """YAML file plus ``key.path=value`` overrides -> a validated-shape TrainConfig."""
    tree = {}
    if path:
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set needs key=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set(tree, key.strip(), raw)
    return config_from_dict(tree)


def config_from_dict(tree: Dict[str, Any]) -> TrainConfig:
    """A TrainConfig from nested dicts (e.g. the YAML a checkpoint stores)."""
    return _build(TrainConfig, tree, "")


def to_dict(cfg) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def validate(cfg: TrainConfig, world_size: int) -> Dict[str, int]:
    """Check the layout against the world size; returns the derived sizes."""
    p = cfg.parallel
    if cfg.stage not in ("pretrain", "sft", "long_sft"):
        raise ValueError(f"stage {cfg.stage!r} is not one of pretrain, sft, long_sft")
    if p.pipeline_model_parallel_size < 1 or cfg.model.num_layers % p.pipeline_model_parallel_size:
        raise ValueError(f"parallel.pipeline_model_parallel_size {p.pipeline_model_parallel_size} must divide "
                         f"model.num_layers {cfg.model.num_layers}")
    check_virtual_pipeline(cfg)
    check_heads(cfg)
    check_lr_schedule(cfg.optim)
    check_model_choices(cfg)
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    if world_size % model_parallel:
        raise ValueError(f"TP x PP x CP = {p.tensor_model_parallel_size} x {p.pipeline_model_parallel_size} x "
                         f"{p.context_parallel_size} = {model_parallel} does not divide the world size {world_size}")
    dp = world_size // model_parallel
    if cfg.data.seq_length % (2 * p.context_parallel_size):
        raise ValueError(f"data.seq_length {cfg.data.seq_length} must divide by 2 x CP = {2 * p.context_parallel_size}")
    tp, local = p.tensor_model_parallel_size, cfg.data.seq_length // p.context_parallel_size
    if tp > 1 and sequence_parallel(cfg) and local % tp:
        raise ValueError(f"sequence parallelism splits a CP rank's {local} tokens (data.seq_length / CP) over "
                         f"TP = {tp}: they must divide by it (tensor_parallel/mappings.py scatters evenly)")
    if cfg.model.vocab_size:
        check_vocab_size(cfg.model.vocab_size, cfg)
    true = cfg.model.true_vocab_size
    if true < 0 or (true and not 0 < true <= cfg.model.vocab_size):
        raise ValueError(f"model.true_vocab_size {true} must be 0, or between 1 and model.vocab_size "
                         f"{cfg.model.vocab_size} (set with it): the real tokens are the first rows of the padded "
                         f"vocabulary")
    per_step = cfg.optim.micro_batch_size * dp
    if cfg.optim.global_batch_size % per_step:
        raise ValueError(f"global_batch_size {cfg.optim.global_batch_size} must be a multiple of "
                         f"micro_batch_size x DP = {per_step}")
    grad_accum = cfg.optim.global_batch_size // per_step
    pp, vp = p.pipeline_model_parallel_size, virtual_pipeline_size(cfg)
    # megatron-core's interleaved schedule (schedules.py:995-1015), micro-batch groups of PP
    if vp and (grad_accum < pp or grad_accum % pp):
        raise ValueError(f"parallel.virtual_pipeline_model_parallel_size {vp}: the interleaved schedule needs the "
                         f"micro-batches per step, optim.global_batch_size / (optim.micro_batch_size x DP) = "
                         f"{cfg.optim.global_batch_size} / {per_step} = {grad_accum}, to be a multiple of "
                         f"parallel.pipeline_model_parallel_size {pp}")
    if cfg.checkpoint.format not in ("dp_reshardable", "fully_reshardable"):
        raise ValueError(f"checkpoint.format {cfg.checkpoint.format!r} is not dp_reshardable or fully_reshardable")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision {cfg.precision!r} is not auto, fp32 or bf16")
    mode = packing_mode(cfg)
    from .data_spec import describe_data

    if cfg.data.blend:  # the run builds from this description: its rules apply here too (benches bring no data)
        describe_data(cfg.data, mode)
    key = "data.packing=sft" if mode == "sft" else "data.document_masks=true" if cfg.data.document_masks else ""
    if key and cfg.optim.micro_batch_size != 1:
        raise ValueError(f"optim.micro_batch_size must be 1 with {key} (a packed sequence goes through the thd "
                         f"path alone; raise global_batch_size instead), got {cfg.optim.micro_batch_size}")
    if key and p.pipeline_model_parallel_size != 1:  # stages exchange fixed shapes; packed shards vary in length
        raise ValueError(f"parallel.pipeline_model_parallel_size must be 1 with {key} (packed sequences through a "
                         f"pipeline are not supported yet), got {p.pipeline_model_parallel_size}; or set "
                         f"data.packing=none")
    return {"dp": dp, "grad_accum": grad_accum}
