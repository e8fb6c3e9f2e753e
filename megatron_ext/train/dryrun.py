"""``--dry-run``: validate a config without GPUs and print, per GPU, each part of
its memory from the planner's model (megatron_ext.plan: one model, not two)."""
from __future__ import annotations

from typing import Tuple

from ..plan.host_memory import DEFAULT_WRITE_GIB_S, config_format, host_memory_lines
from ..plan.model import model_shape, parameter_count
from ..plan.planner import config_layout, evaluate, memory_lines, recompute_lines, run_shape
from ..plan.time import hardware
from .config import TrainConfig, packing_mode, validate
from .data_spec import describe_data


def dry_run(cfg: TrainConfig, world_size: int, vocab_size: int = 0, gpu_memory_gib: float = 80.0,
            gpu: str = "H100", gpus_per_node: int = 8,
            ckpt_write_gib_s: float = DEFAULT_WRITE_GIB_S) -> Tuple[str, bool]:
    """(report, fits): the layout, parameters and memory parts per GPU; the report's last
    line is ``memory per GPU: X GiB of B GiB: fits`` (or ``: does not fit``). Before it, the
    host memory per node of a checkpoint save/load and the planned save time at
    ``ckpt_write_gib_s`` GiB/s per node (megatron_ext.plan.host_memory)."""
    sizes = validate(cfg, world_size)
    p = cfg.parallel
    shape, run = model_shape(cfg, vocab_size), run_shape(cfg)
    lay = config_layout(cfg, world_size)
    ev = evaluate(shape, run, lay, hardware(gpu, {}), gpus_per_node, gpu_memory_gib)
    rope = cfg.model.rope
    virtual = f" (virtual {run.virtual_pp})" if run.virtual_pp > 1 else ""
    lines = [
        f"dry run: stage={cfg.stage} world={world_size}: TP={lay.tp} (sequence parallel "
        f"{'on' if run.sequence_parallel and lay.tp > 1 else 'off'}) PP={lay.pp}{virtual} CP={lay.cp} ({p.cp_comm_type}) "
        f"DP={sizes['dp']} grad_accum={sizes['grad_accum']}",
        f"  sequence {run.seq_length} tokens -> {run.seq_length // lay.cp} per CP rank; rope {rope.scaling} "
        f"(base {rope.base:g}" + (f", abf_base {rope.abf_base:g}" if rope.scaling == "abf" else "") + ")",
        f"  parameters: {parameter_count(shape) / 1e9:.2f} B; {'bf16 params, fp32 grads and main params' if run.bf16 else 'fp32'}; "
        f"distributed optimizer {'on (sharded over DP x CP = ' + str(lay.dp * lay.cp) + ')' if run.distributed_optimizer else 'off'}; "
        f"recompute {lay.recompute.label()}, micro batch {lay.micro_batch}",
    ]
    desc = describe_data(cfg.data, packing_mode(cfg))  # what the run builds (validate() checked its rules)
    missing = desc.missing()
    lines += [f"  {desc.summary()}",
              f"  data files: {len(desc.files()) - len(missing)} of {len(desc.files())} found on this machine"
              + (f" (first missing: {missing[0]}; the run checks them at start)" if missing else "")]
    lines += memory_lines(ev)
    lines += recompute_lines(shape, run, lay, hardware(gpu, {}), gpus_per_node, gpu_memory_gib)
    lines += host_memory_lines(shape, run, lay, gpus_per_node, config_format(cfg), ckpt_write_gib_s)
    if cfg.expected:
        lines.append(f"  expect: {cfg.expected.strip()}")
    lines.append(f"memory per GPU: {ev.gib:.1f} GiB of {gpu_memory_gib:g} GiB: {'fits' if ev.fits else 'does not fit'}")
    return "\n".join(lines), ev.fits
