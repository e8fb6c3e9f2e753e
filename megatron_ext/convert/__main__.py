"""``python -m megatron_ext.convert import-hf|export-hf``: Hugging Face <-> megatron_ext checkpoints.

Bad input (unsupported architecture or RoPE, missing/unexpected/mis-shaped
tensors, no weights) prints one line and exits 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..cli import add_output_flags, quiet_cli
from .hf_config import ConversionError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_ext.convert", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-hf",
                         help="HF folder (config.json + safetensors/.bin) -> SAVE_DIR/step-0 + config.yaml")
    imp.add_argument("--hf-dir", required=True, help="local Hugging Face model folder")
    imp.add_argument("--out", required=True, help="save_dir to create (step-0 and config.yaml go here)")
    imp.add_argument("--dtype", choices=("fp32", "bf16"), default="",
                     help="training precision written to config.yaml (default auto); weights are stored in fp32")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=1,
                     help="pad the vocabulary rows to a multiple of this (128: any TP up to 128 splits them), "
                          "repeating the final row as Megatron-LM does; export-hf drops the padding "
                          "(model.true_vocab_size). Default 1: no padding, the model stays exact")
    exp = sub.add_parser("export-hf", help="SAVE_DIR (or step folder) -> HF folder (config.json, model.safetensors, "
                                           "tokenizer files, chat template, generation_config.json)")
    exp.add_argument("--checkpoint", required=True, help="save_dir (newest complete step) or step-N folder")
    exp.add_argument("--out", required=True, help="HF folder to write")
    exp.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="dtype of the written tensors")
    exp.add_argument("--max-shard-size-gib", type=float, default=5.0,
                     help="largest safetensors file; more weights go to model-0000i-of-0000n shards and an index json")
    for cmd in (imp, exp):
        cmd.add_argument("--device", default="cpu",
                         help="where the model is built: cpu (default; no GPU memory needed) or cuda[:N]")
        add_output_flags(cmd)
    return p


def main(argv=None) -> int:
    quiet_cli(argv)
    args = _parser().parse_args(argv)
    from .api import export_hf, import_hf

    try:
        if args.command == "import-hf":
            step = import_hf(args.hf_dir, args.out, args.dtype, device=args.device,
                             make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
            print(f"imported {args.hf_dir} -> {step} (config: {args.out}/config.yaml)")
        else:
            arch = export_hf(args.checkpoint, args.out, args.dtype, device=args.device,
                             max_shard_bytes=int(args.max_shard_size_gib * 2**30))
            print(f"exported {args.checkpoint} -> {args.out} ({arch}: {', '.join(sorted(os.listdir(args.out)))})")
    except (ConversionError, FileNotFoundError, ValueError) as e:  # bad input; a bug raises something else
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
