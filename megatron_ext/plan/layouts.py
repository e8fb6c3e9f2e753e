"""Parallel layouts: what one is, which ones are valid for a model and a GPU
count, and the ``--layout tp=..,pp=..,cp=..[,ulysses=..]`` parser.

Rank order is megatron-core's default ``tp-cp-ep-dp-pp``: TP ranks are adjacent,
then CP, then DP, then PP; this decides which groups stay inside a node.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, List, Optional, Tuple

from .model import ModelShape

CP_COMM_TYPES = ("p2p", "all_gather", "a2a", "a2a+p2p")
MICRO_BATCH_CHOICES = (1, 2, 4)


class PlanError(ValueError):
    """Input the planner cannot work with; the CLI prints it as one line and exits 2."""


@dataclass(frozen=True)
class RunShape:
    """What the config fixes besides the model: sequence, batch, precision, optimizer."""

    seq_length: int
    """Tokens per sample (global, before CP sharding)."""
    global_batch_size: int
    """Samples per optimizer step."""
    bf16: bool
    """bf16 params under Float16Module with fp32 main params; else fp32 throughout."""
    distributed_optimizer: bool
    """fp32 main params and Adam states sharded over DP x CP."""
    overlap_grad_reduce: bool
    """Gradient reduction overlapped with the backward."""
    virtual_pp: int = 1
    """Interleaved pipeline chunks per stage (1: plain 1F1B)."""
    sequence_parallel: bool = True
    """With TP > 1, norm inputs and the layers' inputs are split by TP too."""
    fused_rms_norm: bool = True
    """RMSNorm saves its input and 1/rms only (CUDA: apex or torch's fused kernel); on CPU
    torch's composite rms_norm also saves the normalised input (one more h per norm)."""


RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")
"""megatron-core 0.16.1 ``recompute_modules`` that exist in our dense local layer
(transformer_config.py:411-421; moe*, shared_experts and mla_up_proj need MoE / MLA)."""


@dataclass(frozen=True)
class Recompute:
    """Activation recomputation, in megatron-core's TransformerConfig terms."""

    granularity: Optional[str] = None
    """None (keep every activation), "full" (each recomputed layer keeps only its input) or
    "selective" (recompute ``modules`` inside every layer)."""
    modules: Tuple[str, ...] = ()
    """selective: the submodules recomputed (megatron-core's recompute_modules)."""
    method: Optional[str] = None
    """full: "uniform" (checkpoint groups of ``num_layers`` layers) or "block" (only the
    first ``num_layers`` layers of each pipeline stage are recomputed)."""
    num_layers: Optional[int] = None
    """full: layers per group (uniform) or recomputed layers per stage (block)."""

    def __bool__(self) -> bool:
        return self.granularity is not None

    def label(self) -> str:
        if self.granularity == "full":
            return "recompute" if (self.method, self.num_layers) == ("uniform", 1) else \
                f"recompute-{self.method}{self.num_layers}"
        if self.granularity == "selective":
            return "selective(" + "+".join(self.modules) + ")"
        return "no-recompute"


NO_RECOMPUTE = Recompute()
FULL_RECOMPUTE = Recompute("full", (), "uniform", 1)
# what the planner tries, from most memory to least (and least time to most)
# (layernorm needs TransformerEngine in mcore 0.16.1: CheckpointWithoutOutput reads TE's FP8 state)
RECOMPUTE_CHOICES = (NO_RECOMPUTE, Recompute("selective", ("core_attn",)), Recompute("selective", ("mlp",)),
                     Recompute("selective", ("core_attn", "mlp")), FULL_RECOMPUTE)


def as_recompute(value) -> Recompute:
    """A Recompute from a Recompute or the old boolean (True: full, every layer)."""
    if isinstance(value, Recompute):
        return value
    return FULL_RECOMPUTE if value else NO_RECOMPUTE


@dataclass(frozen=True)
class Layout:
    """One way to split the world; DP is what is left."""

    tp: int
    """Tensor parallel (sequence parallel on when > 1)."""
    pp: int
    """Pipeline stages."""
    cp: int
    """Context parallel ranks per sequence."""
    dp: int
    """Data parallel replicas."""
    cp_comm_type: str = "p2p"
    """p2p (ring), all_gather, a2a (Ulysses over all of CP) or a2a+p2p (hybrid)."""
    ulysses: int = 1
    """Ulysses degree: CP for a2a, the inner factor for a2a+p2p, 1 otherwise."""
    micro_batch: int = 1
    """Samples per micro-batch."""
    recompute: Recompute = FULL_RECOMPUTE
    """Activation recomputation; True/False (the old boolean) mean full (every layer) / none."""

    def __post_init__(self):
        object.__setattr__(self, "recompute", as_recompute(self.recompute))

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def label(self) -> str:
        comm = self.cp_comm_type + (f" U={self.ulysses}" if self.cp_comm_type == "a2a+p2p" else "")
        return (f"TP={self.tp} PP={self.pp} CP={self.cp} DP={self.dp} ({comm}) mbs={self.micro_batch} "
                f"{self.recompute.label()}")

    def micro_batches(self, run: RunShape) -> int:
        """Micro-batches per optimizer step on one DP replica."""
        return run.global_batch_size // (self.micro_batch * self.dp)


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_problem(shape: ModelShape, run: RunShape, lay: Layout, gpus: int, gpus_per_node: int) -> Optional[str]:
    """Why ``lay`` is not a valid layout, or None."""
    h, g = shape.num_attention_heads, shape.num_query_groups
    if lay.world != gpus:
        return f"TP x PP x CP x DP = {lay.world} is not the GPU count {gpus}"
    if h % lay.tp or g % lay.tp:
        return f"TP={lay.tp} must divide the heads ({h}) and query groups ({g})"
    if lay.tp > gpus_per_node:
        return f"TP={lay.tp} spans nodes ({gpus_per_node} GPUs per node): TP traffic needs NVLink"
    if shape.num_layers % (lay.pp * run.virtual_pp):
        return f"PP={lay.pp} x virtual {run.virtual_pp} must divide the {shape.num_layers} layers"
    if run.seq_length % (2 * lay.cp):
        return f"seq_length {run.seq_length} must divide by 2 x CP = {2 * lay.cp} (zigzag)"
    if lay.cp_comm_type not in CP_COMM_TYPES:
        return f"cp_comm_type {lay.cp_comm_type!r} is not one of {', '.join(CP_COMM_TYPES)}"
    heads_local = h // lay.tp
    if lay.cp_comm_type == "a2a" and (lay.ulysses != lay.cp or heads_local % lay.cp):
        return f"a2a (Ulysses) needs CP={lay.cp} to divide the heads per TP rank h/TP = {heads_local}"
    if lay.cp_comm_type == "a2a+p2p":
        if lay.cp % lay.ulysses or heads_local % lay.ulysses or not 1 < lay.ulysses < lay.cp:
            return (f"a2a+p2p needs 1 < ulysses={lay.ulysses} < CP={lay.cp}, dividing CP and the heads "
                    f"per TP rank h/TP = {heads_local}")
    if lay.cp_comm_type in ("p2p", "all_gather") and lay.ulysses != 1:
        return f"ulysses={lay.ulysses} needs cp_comm_type a2a or a2a+p2p"
    if run.global_batch_size % (lay.micro_batch * lay.dp):
        return (f"global batch {run.global_batch_size} is not a multiple of micro-batch x DP = "
                f"{lay.micro_batch} x {lay.dp}")
    return None


def _comm_choices(shape: ModelShape, tp: int, cp: int):
    if cp == 1:
        yield "p2p", 1
        return
    yield "p2p", 1
    yield "all_gather", 1
    heads_local = shape.num_attention_heads // tp
    if heads_local % cp == 0:
        yield "a2a", cp
    for u in _divisors(cp):
        if 1 < u < cp and heads_local % u == 0:
            yield "a2a+p2p", u


def enumerate_layouts(shape: ModelShape, run: RunShape, gpus: int, gpus_per_node: int) -> Iterator[Layout]:
    """Every valid layout: TP | heads and groups (inside a node), PP | layers, zigzag CP,
    each CP method the heads allow, DP from the rest, micro-batch and recompute choices."""
    for tp in _divisors(gpus):
        for pp in _divisors(gpus // tp):
            for cp in _divisors(gpus // (tp * pp)):
                dp = gpus // (tp * pp * cp)
                for comm, u in _comm_choices(shape, tp, cp):
                    for mbs in MICRO_BATCH_CHOICES:
                        for recompute in RECOMPUTE_CHOICES:
                            lay = Layout(tp, pp, cp, dp, comm, u, mbs, recompute)
                            if layout_problem(shape, run, lay, gpus, gpus_per_node) is None:
                                yield lay


def parse_layout(text: str, gpus: int, defaults: Layout) -> Layout:
    """``tp=2,pp=1,cp=4[,ulysses=2][,cp_comm_type=p2p][,mbs=1][,recompute=0|1]`` -> Layout;
    DP = gpus / (TP PP CP); unset keys come from ``defaults`` (the config)."""
    keys = {"tp": 1, "pp": 1, "cp": 1}
    extra = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("tp", "pp", "cp", "ulysses", "cp_comm_type", "mbs", "recompute"):
            raise PlanError(f"--layout: bad item {item!r}; expected tp=..,pp=..,cp=..[,ulysses=..]"
                            f"[,cp_comm_type=..][,mbs=..][,recompute=0|1]")
        if key == "cp_comm_type":
            extra[key] = value.strip()
            continue
        try:
            number = int(value)
        except ValueError:
            raise PlanError(f"--layout: {key}={value!r} is not an integer") from None
        if number < (0 if key == "recompute" else 1):
            raise PlanError(f"--layout: {key}={number} must be positive")
        (keys if key in keys else extra)[key] = number
    model_parallel = keys["tp"] * keys["pp"] * keys["cp"]
    if gpus % model_parallel:
        raise PlanError(f"--layout: TP x PP x CP = {model_parallel} does not divide --gpus {gpus}")
    ulysses = extra.get("ulysses", 1)
    single = defaults.cp_comm_type if defaults.cp_comm_type in ("p2p", "all_gather") else "p2p"
    comm = extra.get("cp_comm_type") or (single if ulysses == 1 else "a2a" if ulysses == keys["cp"] else "a2a+p2p")
    return replace(defaults, tp=keys["tp"], pp=keys["pp"], cp=keys["cp"], dp=gpus // model_parallel,
                   cp_comm_type=comm, ulysses=ulysses, micro_batch=extra.get("mbs", defaults.micro_batch),
                   recompute=as_recompute(bool(extra["recompute"])) if "recompute" in extra else defaults.recompute)
