"""Host (CPU) memory and write time of one checkpoint save and load, per rank and per node.

The bytes a checkpoint adds on top of the training process, for the two optimizer
formats of megatron-core's distributed optimizer (distrib_optimizer.py, mcore 0.16.1).
``P``: parameters on one GPU of a pipeline stage (memory.stage_params: the one count);
``D``: the optimizer's shard group, DP x CP; ``N``: elements of the largest grad bucket;
``w``: bytes of a model weight (2 bf16, 4 fp32).

* ``fully_reshardable`` (mem_efficient: gloo gather to DP-rank 0 of each TP x PP position,
  ``get_parameter_state_dp_zero``, :977-1120). Save: every rank copies its shard of a
  bucket into three fp32 buffers (12 N / D); the group's rank 0 also holds the three fp32
  "world" tensors of its whole stage (12 P) and, per state key, the gathered list and its
  concatenation while the next key's list is allocated (3 x 4 N); then it writes them,
  and the writer clones every view it writes (filesystem_async.py:136-151): the world
  tensors' slices (12 P more) and its share of the weights (w P / D, views into DDP's
  param buffer; D2H copies on a GPU). Load: every rank allocates the world tensors (12 P),
  reads its share, and receives the rest in the fully-parallel exchange ((D-1)/D x 12 P,
  host buffers on CPU; on a GPU the exchange runs on the device), and its weights (w P).
* ``dp_reshardable`` with the fully-parallel wrappers: each rank writes its own optimizer
  shard and 1/D of the replicated weights, (12 + w) P / D, all staged to the host on a
  GPU (an async save holds the same staged copy); on CPU only views are cloned (the
  weights and, in fp32, the "param" state). Load: into the existing state in place, item
  by item: the largest item's read temporaries (2 x 4 B x its elements).
Ranks are placed as megatron-core orders them (tp-cp-ep-dp-pp) and nodes take
consecutive ranks, so only some nodes hold DP-rank-0 ranks. The figures leave out the
training process itself (Python, CUDA context, data loaders). bench/checkpoint_memory.py
measures them on CPU (docs/checkpoint-memory.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from .layouts import Layout, PlanError, RunShape
from .memory import GIB, stage_params
from .model import ModelShape

FORMATS = ("dp_reshardable", "fully_reshardable")
# Sustained write bandwidth of one node to the checkpoint filesystem (parallel FS client,
# GiB/s). A conservative figure for a Lustre/GPFS/NFS client; override with --ckpt-write-gib-s.
DEFAULT_WRITE_GIB_S = 2.0
# megatron-core DDP: with overlap_grad_reduce, buckets of max(40M, 1M x D) elements
# (distributed_data_parallel.py:64-68), closed after the param that crosses the size.
BUCKET_MIN, BUCKET_PER_RANK = 40_000_000, 1_000_000


@dataclass
class CheckpointHost:
    """A checkpoint's host memory and write time for one layout and format."""

    format: str
    """dp_reshardable or fully_reshardable."""
    save_rank_bytes: float
    """Host bytes the save adds on the fullest rank."""
    load_rank_bytes: float
    """Host bytes the load adds on the fullest rank."""
    save_node_bytes: float
    """Host bytes the save adds on the fullest node."""
    load_node_bytes: float
    """Host bytes the load adds on the fullest node."""
    written_node_bytes: float
    """Bytes the busiest node writes."""
    save_s: float
    """Planned save time: written_node_bytes / write bandwidth per node."""
    write_gib_s: float
    """The write bandwidth per node assumed (GiB/s)."""
    gpus_per_node: int
    """Ranks per node."""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def bucket_elements(shape: ModelShape, run: RunShape, lay: Layout, params: float) -> float:
    """Elements N of the largest grad bucket on one rank: the whole buffer without
    overlap_grad_reduce, else the bucket size plus the largest parameter (a bucket
    closes after the parameter that crosses it)."""
    if not run.overlap_grad_reduce:
        return params
    largest = max(shape.vocab_size * shape.hidden_size, 2 * shape.ffn_hidden_size * shape.hidden_size) / lay.tp
    return min(params, max(BUCKET_MIN, BUCKET_PER_RANK * lay.dp * lay.cp) + largest)


def largest_param(shape: ModelShape, lay: Layout) -> float:
    """Elements of the largest parameter on one rank: a vocabulary matrix or fc1, TP-split."""
    return max(shape.vocab_size * shape.hidden_size,
               (2 if shape.swiglu else 1) * shape.ffn_hidden_size * shape.hidden_size) / lay.tp


def rank_bytes(shape: ModelShape, run: RunShape, lay: Layout, fmt: str, stage: int, group_rank0: bool,
               on_device: bool) -> Dict[str, float]:
    """Host bytes one rank adds during save and load, and the bytes it writes. ``stage``:
    its pipeline stage; ``group_rank0``: rank 0 of its DP x CP group; ``on_device``: its
    tensors live on a GPU (what it writes is staged to the host)."""
    p = stage_params(shape, lay, stage == 0, stage == lay.pp - 1)
    d, w = lay.dp * lay.cp, (2.0 if run.bf16 else 4.0)
    # its 1/D of the replicated weights: a D2H copy, or on CPU a clone (they are views into
    # DDP's contiguous param buffer, and the writer clones views: filesystem_async.py:136-151)
    weights = w * p / d
    if fmt == "fully_reshardable":
        n = bucket_elements(shape, run, lay, p)
        if group_rank0:  # max(gather, write: the world tensors' slices are views, cloned)
            save = max(12.0 * p + 12.0 * n / d + 12.0 * n, 24.0 * p + weights)
            written = 12.0 * p + weights
        else:
            save, written = max(12.0 * n / d, weights), weights
        # every rank allocates the world tensors (12 P); the fully-parallel load reads 1/D
        # and exchanges the rest: on CPU the received (D-1)/D are host buffers too, on a GPU
        # the exchange runs on the device and the host holds the read share
        exchange = 12.0 * p * ((d - 1) / d if not on_device else 1 / d)
        load = 12.0 * p + exchange + (w * p if not on_device else weights)
        return {"save": save, "load": load, "written": written}
    if fmt == "dp_reshardable":
        written = (12.0 + w) * p / d
        # on a device everything written is staged; on CPU the views: the weights and, in
        # fp32, the "param" state (the model's own buffer)
        save = written if on_device else weights + (0.0 if run.bf16 else 4.0 * p / d)
        # read temporaries of the largest item (bytes and tensor); on CPU the larger of two
        # phases that a GPU keeps in device memory: the dummy Adam step creating the states to
        # load into (zero grads of the shard), and the weights' exchange ((D-1)/D received)
        big = largest_param(shape, lay)
        load = 8.0 * big if on_device else max(4.0 * p / d + 8.0 * big, w * p * (d - 1) / d + 4.0 * big)
        return {"save": save, "load": load, "written": written}
    raise PlanError(f"checkpoint format {fmt!r}: expected one of {FORMATS}")


def rank_position(rank: int, lay: Layout) -> tuple:
    """(tp, cp, dp, pp) indices of global ``rank`` in megatron-core's tp-cp-ep-dp-pp order."""
    tp, rest = rank % lay.tp, rank // lay.tp
    cp, rest = rest % lay.cp, rest // lay.cp
    dp, pp = rest % lay.dp, rest // lay.dp
    return tp, cp, dp, pp


def checkpoint_host_memory(shape: ModelShape, run: RunShape, lay: Layout, fmt: str, gpus_per_node: int = 8,
                           on_device: bool = True, write_gib_s: float = DEFAULT_WRITE_GIB_S) -> CheckpointHost:
    """Host memory of a save and a load of ``lay`` in format ``fmt``, fullest rank and node."""
    if write_gib_s <= 0:
        raise PlanError(f"checkpoint write bandwidth {write_gib_s:g} GiB/s must be positive")
    per_node = min(gpus_per_node, lay.world)
    nodes: Dict[int, Dict[str, float]] = {}
    worst = {"save": 0.0, "load": 0.0}
    for rank in range(lay.world):
        _, cp, dp, pp = rank_position(rank, lay)
        b = rank_bytes(shape, run, lay, fmt, pp, cp == 0 and dp == 0, on_device)
        node = nodes.setdefault(rank // per_node, {"save": 0.0, "load": 0.0, "written": 0.0})
        for key in node:
            node[key] += b[key]
        worst = {k: max(v, b[k]) for k, v in worst.items()}
    written = max(n["written"] for n in nodes.values())
    return CheckpointHost(fmt, worst["save"], worst["load"], max(n["save"] for n in nodes.values()),
                          max(n["load"] for n in nodes.values()), written, written / (write_gib_s * GIB),
                          write_gib_s, per_node)


def config_format(cfg) -> str:
    """The config's ``checkpoint.format``; a trainer without the key saves fully_reshardable."""
    return getattr(cfg.checkpoint, "format", "fully_reshardable")


def host_memory_lines(shape: ModelShape, run: RunShape, lay: Layout, gpus_per_node: int, current: str,
                      write_gib_s: float = DEFAULT_WRITE_GIB_S, limit_tib: float = 1.0) -> List[str]:
    """The report's lines, one per format (``current``: the config's, marked); the first is
    ``host memory per node during checkpoint: X GiB`` of the current format (the larger
    of save and load on the fullest node)."""
    est = {f: checkpoint_host_memory(shape, run, lay, f, gpus_per_node, True, write_gib_s) for f in FORMATS}
    cur = est[current]
    peak = max(cur.save_node_bytes, cur.load_node_bytes)
    verdict = "under" if peak < limit_tib * 2 ** 40 else "OVER"
    lines = [f"  host memory per node during checkpoint: {peak / GIB:.1f} GiB ({current}, fullest "
             f"{cur.gpus_per_node}-GPU node; {verdict} {limit_tib:g} TiB)"]
    for f in FORMATS:
        e = est[f]
        lines.append(f"    {f + (' (config)' if f == current else ''):<28} save {e.save_node_bytes / GIB:7.1f} GiB/node "
                     f"({e.save_rank_bytes / GIB:.1f}/rank), load {e.load_node_bytes / GIB:7.1f} GiB/node "
                     f"({e.load_rank_bytes / GIB:.1f}/rank); writes {e.written_node_bytes / GIB:.1f} GiB/node, "
                     f"save ~{e.save_s:.0f} s at {write_gib_s:g} GiB/s per node")
    return lines
