"""Rewrite a checkpoint for another parallel layout, offline, on CPU with gloo.

    python -m megatron_ext.train.reshard --checkpoint C --to-layout tp=1,pp=1,cp=4,dp=1 [--out DIR]
                                         [--to-format dp_reshardable|fully_reshardable]

A ``dp_reshardable`` checkpoint (the default ``checkpoint.format``) loads at any DP x CP
but only at the TP, PP and VP it was saved at. This tool loads it at its own TP x PP
(x VP) on TP x PP processes (DP = CP = 1: the format reshards over DP x CP), writes the
``fully_reshardable`` per-parameter form, then loads that at the target TP x PP (x VP)
and writes ``--to-format`` there. Weights, optimizer, scheduler, iteration and consumed
samples carry over; per-rank RNG states do not (they belong to the old layout's ranks).
The output is a save_dir with one ``step-N``: resume with ``checkpoint.save_dir=DIR``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

LAYOUT_KEYS = ("tp", "pp", "cp", "dp", "vp")


def parse_layout(text: str) -> dict:
    """``tp=1,pp=2,cp=4,dp=1[,vp=2]`` -> {"tp": 1, ...}; unknown or missing keys raise ValueError."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        key = key.strip().lower()
        if key not in LAYOUT_KEYS or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--to-layout: {item!r} is not one of {'/'.join(LAYOUT_KEYS)}=N (N >= 1)")
        out[key] = int(value)
    missing = [k for k in ("tp", "pp") if k not in out]
    if missing:
        raise ValueError(f"--to-layout {text!r}: needs {' and '.join(missing)}")
    return {"cp": 1, "dp": 1, "vp": None, **out}


def _config_at(common: dict, tp: int, pp: int, vp):
    """The checkpoint's TrainConfig at TP x PP (x VP), CP = DP = 1."""
    from .config import config_from_dict

    cfg = config_from_dict(common["config"])
    p = cfg.parallel
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = tp, pp
    p.virtual_pipeline_model_parallel_size, p.context_parallel_size = vp, 1
    p.sequence_parallel = None if tp > 1 else False
    cfg.checkpoint.async_save = False
    return cfg


def _rewrite_worker(rank, world, src: str, out_dir: str, tp: int, pp: int, vp, fmt: str) -> str:
    """On TP x PP gloo ranks: load checkpoint folder ``src`` at TP x PP (x VP) and save it
    as ``out_dir/step-N`` in ``fmt``; returns the folder."""
    from . import checkpoint as ckpt
    from .config import to_dict
    from .model import build_model_chunks, init_model_parallel, wrap_model
    from .optim import build_optimizer

    common = ckpt.read_common(src)
    cfg = _config_at(common, tp, pp, vp)
    init_model_parallel(cfg)
    chunks, _ = build_model_chunks(cfg, common["vocab_size"])
    model = [wrap_model(cfg, chunk, i) for i, chunk in enumerate(chunks)]
    optimizer, scheduler = build_optimizer(cfg, model)
    ckpt.load(src, model, optimizer, scheduler)
    keep = {k: common[k] for k in ("consumed_samples", "skipped_iterations", "vocab_size") if k in common}
    keep["config"] = to_dict(cfg)
    saver = ckpt.CheckpointSaver(out_dir, keep_last=0, fmt=fmt)
    return saver.save(common["iteration"], model, optimizer, scheduler, keep, with_rng=False)


def reshard(checkpoint: str, to: dict, out_dir: str, to_format: str = "dp_reshardable",
            timeout_s: float = 1800.0) -> str:
    """Rewrite the newest complete checkpoint under ``checkpoint`` for layout ``to``
    (see :func:`parse_layout`) as ``out_dir/step-N`` in ``to_format``; returns the folder."""
    from ..distributed import spawn_ranks
    from . import checkpoint as ckpt

    src = ckpt.latest_checkpoint(checkpoint)
    if src is None:
        raise FileNotFoundError(f"{checkpoint}: no complete checkpoint (a step-N folder with a COMPLETE marker)")
    ckpt.verify(src)
    common = ckpt.read_common(src)
    saved = common.get("layout") or {}
    if os.path.exists(os.path.join(out_dir, os.path.basename(src))):
        raise FileExistsError(f"{out_dir}/{os.path.basename(src)} exists; choose another --out")
    _check_target(common, to)
    with tempfile.TemporaryDirectory(prefix="reshard-", dir=os.path.dirname(os.path.abspath(out_dir))) as tmp:
        if common.get("optimizer_format", "fully_reshardable") != "fully_reshardable":
            tp, pp, vp = saved["tp"], saved["pp"], saved.get("vp")
            (src,) = set(spawn_ranks(_rewrite_worker, tp * pp, (src, tmp, tp, pp, vp, "fully_reshardable"),
                                     timeout_s=timeout_s))
        tp, pp, vp = to["tp"], to["pp"], to["vp"]
        (final,) = set(spawn_ranks(_rewrite_worker, tp * pp, (src, out_dir, tp, pp, vp, to_format),
                                   timeout_s=timeout_s))
    return final


def _check_target(common: dict, to: dict) -> None:
    """The target layout against the model (heads, layers) and the sequence length."""
    from .config import config_from_dict, validate

    cfg = config_from_dict(common["config"])
    p = cfg.parallel
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = to["tp"], to["pp"]
    p.context_parallel_size, p.virtual_pipeline_model_parallel_size = to["cp"], to["vp"]
    p.sequence_parallel = None if to["tp"] > 1 else False
    dp = to["dp"]
    cfg.optim.global_batch_size = cfg.optim.micro_batch_size * dp * max(to["pp"], 1)
    validate(cfg, to["tp"] * to["pp"] * to["cp"] * dp)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_ext.train.reshard", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a save_dir or step-N folder")
    ap.add_argument("--to-layout", required=True, help="tp=..,pp=..,cp=..,dp=..[,vp=..] of the run that resumes")
    ap.add_argument("--out", default="", help="save_dir to write (default: CHECKPOINT's save_dir + -tpXppY)")
    ap.add_argument("--to-format", default="dp_reshardable", choices=("dp_reshardable", "fully_reshardable"))
    args = ap.parse_args(argv)
    try:
        to = parse_layout(args.to_layout)
        base = args.checkpoint.rstrip("/")
        if os.path.exists(os.path.join(base, "COMPLETE")):
            base = os.path.dirname(base)
        out = args.out or f"{base}-tp{to['tp']}pp{to['pp']}" + (f"vp{to['vp']}" if to["vp"] else "")
        final = reshard(args.checkpoint, to, out, args.to_format)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"reshard: {e}", file=sys.stderr)
        return 2
    print(f"reshard: wrote {final} ({args.to_format}) for {args.to_layout}; resume with checkpoint.save_dir={out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
