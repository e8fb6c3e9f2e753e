"""Host memory of ``import-hf`` and ``export-hf`` on a ~170M-parameter Llama, against the
fp32 model's size (4 bytes a parameter).

    python -m bench.convert_memory [--layers 8] [--hidden 1024] [--shard-mib 64]

Each call runs in a fresh process. The process writes ``5`` to ``/proc/self/clear_refs``
just before the call, which resets VmHWM to the current VmRSS, and reads VmHWM when the
call returns. The figure is the peak minus the RSS just before the call: the host bytes the
conversion added at its peak. glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_),
so large buffers go back to the kernel when they are freed. VmHWM also counts file-backed
pages: the HF shards that safetensors maps during import, about 1x, which the kernel can drop.

Expected: the model, built once in fp32, plus megatron-core's checkpoint load (about 0.6x)
plus one output shard for export; for import, the model, the mapped HF shards (about 1x) and
the checkpoint save. Before the streaming writer, export held the model, a clone of every
tensor and a bf16 copy at once. To measure an older checkout, run this
file with that checkout first on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile

from bench.common import print_table, write_json

MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def make_hf(path: str, layers: int, hidden: int) -> int:
    """A random untied Llama (vocab 32000, GQA 16/4, SwiGLU 2.75 x hidden) saved at ``path``;
    returns its parameter count."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                                   num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def _measured(call: str) -> int:
    """Run ``call`` (Python, megatron_ext.convert imported as ``api``) in a fresh process;
    the bytes it added to the resident set at its peak."""
    code = ("import json, sys\nfrom data_tools.sysinfo import peak_rss_bytes, reset_peak_rss\n"
            "import megatron_ext.convert.api as api\nimport torch, safetensors.torch, transformers\n"
            f"before = reset_peak_rss()\n{call}\nprint(json.dumps(peak_rss_bytes() - before))\n")
    env = dict(os.environ, **MMAP_ENV, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1200)
    if res.returncode:
        raise RuntimeError(f"{call} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--shard-mib", type=int, default=64, help="shard size of the sharded export case")
    args = ap.parse_args(argv)
    from megatron_ext.convert import api

    sharding = "max_shard_bytes" in inspect.signature(api.export_hf).parameters
    with tempfile.TemporaryDirectory() as tmp:
        params = make_hf(f"{tmp}/hf", args.layers, args.hidden)
        fp32 = 4 * params
        cases = [("import-hf", f"api.import_hf({tmp + '/hf'!r}, {tmp + '/ours'!r})"),
                 ("export-hf fp32, one file", f"api.export_hf({tmp + '/ours'!r}, {tmp + '/e1'!r}, 'fp32')"),
                 ("export-hf bf16, one file", f"api.export_hf({tmp + '/ours'!r}, {tmp + '/e2'!r}, 'bf16')")]
        if sharding:
            cases.append((f"export-hf bf16, {args.shard_mib} MiB shards",
                          f"api.export_hf({tmp + '/ours'!r}, {tmp + '/e3'!r}, 'bf16', "
                          f"max_shard_bytes={args.shard_mib << 20})"))
        rows, out = [], {"params": params, "fp32_model_bytes": fp32, "cases": {}}
        for name, call in cases:
            added = _measured(call)
            out["cases"][name] = {"added_bytes": added, "x_fp32_model": added / fp32}
            rows.append([name, f"{added / 2**20:.0f}", f"{added / fp32:.2f}"])
    print_table(f"conversion host memory: {params / 1e6:.0f}M parameters, fp32 model {fp32 / 2**20:.0f} MiB",
                ["call", "peak added (MiB)", "x fp32 model"], rows)
    print(f"\nwrote {write_json('convert_memory', out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
