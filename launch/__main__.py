"""Render or submit cluster jobs for megatron_ext.train.

    python -m launch render --template slurm|k8s|trainjob|hostfile --config launch/configs/X.yaml --nodes N
                            --gpus-per-node G [--nproc-per-node N] [--device cuda|cpu] [--partition P]
                            [--time T] [--account A] [--job-name J] [--log-dir D] [--image I] [--max-restarts R]
                            [--runtime NAME] [--set key=value ...] [--out FILE]
    python -m launch submit ... [--dry-run]      # renders a SLURM script and calls sbatch

The layout is checked first: TP x CP x PP x DP must equal nodes x processes per
node, and the sequence length must divide by 2 x CP.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from data_tools.common import atomic_write
from data_tools.quiet import add_output_flags, quiet_cli

from .render import JobSpec, TEMPLATES, job_grace, render


class _OneLineParser(argparse.ArgumentParser):
    """Bad flags get one line on stderr and exit code 2 (not argparse's usage block)."""

    def error(self, message):
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def _add_common(p: argparse.ArgumentParser, template_choice: bool) -> None:
    if template_choice:
        p.add_argument("--template", required=True, choices=sorted(TEMPLATES))
    p.add_argument("--config", required=True)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nproc-per-node", type=int, default=None, help="default: --gpus-per-node")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu requests no GPUs and uses gloo")
    p.add_argument("--partition", default="")
    p.add_argument("--time", default="24:00:00")
    p.add_argument("--account", default="")
    p.add_argument("--job-name", default="megatron-ext")
    p.add_argument("--log-dir", default="logs")
    p.add_argument("--image", default="megatron-ext:latest", help="container image (k8s, trainjob)")
    p.add_argument("--max-restarts", type=int, default=3, help="k8s, trainjob: restarts of the whole job")
    p.add_argument("--python", default=sys.executable, help="interpreter on the nodes")
    p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="trainer override")
    p.add_argument("--gpu", default="H100", help="GPU type the planner times an iteration on (stop grace period)")
    p.add_argument("--ckpt-write-gib-s", type=float, default=0.0,
                   help="checkpoint write bandwidth per node, GiB/s (stop grace period; default: the planner's)")


def _spec(args, template: str) -> JobSpec:
    return JobSpec(template=template, config=args.config, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                   nproc_per_node=args.nproc_per_node, device=args.device, job_name=args.job_name,
                   partition=args.partition, time=args.time, account=args.account, log_dir=args.log_dir,
                   image=args.image, sets=args.set, python=args.python, repo=args.repo,
                   runtime=getattr(args, "runtime", ""), max_restarts=args.max_restarts, gpu=args.gpu,
                   ckpt_write_gib_s=args.ckpt_write_gib_s)


def main(argv=None) -> int:
    quiet_cli(argv)
    ap = _OneLineParser(prog="python -m launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="write a job file")
    _add_common(r, template_choice=True)
    r.add_argument("--out", default="", help="file to write (default: stdout)")
    r.add_argument("--runtime", default="", metavar="NAME",
                   help="trainjob: use this installed ClusterTrainingRuntime (default: write one)")
    s = sub.add_parser("submit", help="render a SLURM script and sbatch it")
    _add_common(s, template_choice=False)
    s.add_argument("--dry-run", action="store_true", help="print the script instead of submitting")
    add_output_flags(r)
    add_output_flags(s)
    args = ap.parse_args(argv)
    template = args.template if args.command == "render" else "slurm"
    try:
        spec = _spec(args, template)
        text = render(spec)
        print(f"launch {args.command}: stop grace period {job_grace(spec).why}", file=sys.stderr)
    except (ValueError, FileNotFoundError) as e:
        print(f"launch {args.command}: {e}", file=sys.stderr)
        return 2
    if args.command == "render":
        if args.out:
            atomic_write(args.out, text.encode())
            if template not in ("k8s", "trainjob"):  # scripts are executable, manifests are not
                os.chmod(args.out, 0o755)
            print(f"launch render: wrote {args.out} ({template}, {args.nodes} node(s))")
        else:
            sys.stdout.write(text)
        return 0
    if args.dry_run:
        sys.stdout.write(text)
        return 0
    os.makedirs(args.log_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", dir=args.log_dir, delete=False) as f:
        f.write(text)
    res = subprocess.run(["sbatch", "--parsable", f.name], capture_output=True, text=True)
    if res.returncode:
        print(f"launch submit: sbatch failed: {res.stderr.strip()}", file=sys.stderr)
        return res.returncode
    job_id = res.stdout.strip().split(";")[0]
    print(job_id)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
