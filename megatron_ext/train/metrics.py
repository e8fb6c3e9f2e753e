"""Rank 0's iteration line, wandb (offline unless WANDB_MODE says otherwise),
and optional TensorBoard. No progress bar: the log keeps Megatron's line format."""
from __future__ import annotations

import json
import os

from ..plan.model import flops_per_token  # noqa: F401  (the one formula; loop.py imports it from here)
from ..sysinfo import peak_rss_bytes
from .config import to_dict


def peak_memory_bytes() -> int:
    """Peak memory of the device this rank computes on: the CUDA allocator's peak on a GPU,
    else the process's peak RSS (a gloo rank on a GPU node computes on the CPU)."""
    import torch

    from ..distributed import compute_device

    device = compute_device()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


class MetricsLogger:
    """Prints (rank 0), appends metrics.jsonl, and feeds wandb/TensorBoard."""

    def __init__(self, cfg, rank: int, world: int, flops_token: float):
        self.cfg, self.rank, self.world, self.flops_token = cfg, rank, world, flops_token
        self.wandb = self.tb = None
        if rank != 0:
            return
        os.makedirs(cfg.checkpoint.save_dir, exist_ok=True)
        self.jsonl = open(os.path.join(cfg.checkpoint.save_dir, "metrics.jsonl"), "a")
        if cfg.logging.wandb:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", cfg.logging.wandb_project),
                                    dir=cfg.checkpoint.save_dir, config=to_dict(cfg), name=cfg.stage, reinit=True)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(cfg.checkpoint.save_dir, "tensorboard"))

    def info(self, text: str) -> None:
        if self.rank == 0:
            print(f"[{self.cfg.stage}] {text}", flush=True)

    def iteration(self, state, out: dict, seconds: float, lr: float) -> None:
        if self.rank != 0:
            return
        tokens_per_rank = out["tokens"] / self.world  # unmasked tokens are what the loss sees
        seq_tokens = self.cfg.optim.global_batch_size * self.cfg.data.seq_length / self.world
        peak = peak_memory_bytes() / 2**20
        rec = {"iteration": state.iteration, "consumed_samples": state.consumed_samples, "ms_per_iter": 1000 * seconds,
               "tokens_per_s_per_rank": seq_tokens / seconds, "tflops_per_rank": seq_tokens * self.flops_token / seconds / 1e12,
               "lr": lr, "loss": out["loss"], "grad_norm": out["grad_norm"], "skipped": state.skipped_iterations,
               "nan": 0 if out["finite"] else 1, "peak_mem_mib": peak, "loss_tokens_per_rank": tokens_per_rank}
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        if self.wandb:
            self.wandb.log(rec, step=state.iteration)
        if self.tb:
            for k, v in rec.items():
                self.tb.add_scalar(k, v, state.iteration)
        if state.iteration % self.cfg.logging.log_interval == 0:
            print(f" [{self.cfg.stage}] iteration {state.iteration:6d}/{self.cfg.optim.train_iters} | consumed samples: "
                  f"{state.consumed_samples} | elapsed time per iteration (ms): {rec['ms_per_iter']:.1f} | tokens/s/rank: "
                  f"{rec['tokens_per_s_per_rank']:.0f} | TFLOP/s/rank: {rec['tflops_per_rank']:.4f} | learning rate: "
                  f"{lr:.3E} | lm loss: {out['loss']:.6E} | grad norm: {out['grad_norm']:.3f} | skipped iterations: "
                  f"{state.skipped_iterations} | nan iterations: {rec['nan']} | peak memory (MiB): {peak:.0f}", flush=True)

    def validation(self, iteration: int, loss: float, ppl: float) -> None:
        """Megatron-LM's validation line, also to metrics.jsonl and wandb."""
        if self.rank != 0:
            return
        rec = {"iteration": iteration, "valid_loss": loss, "valid_ppl": ppl}
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        if self.wandb:
            self.wandb.log({"validation/lm loss": loss, "validation/lm loss PPL": ppl}, step=iteration)
        if self.tb:
            self.tb.add_scalar("validation/lm loss", loss, iteration)
        print(f" [{self.cfg.stage}] validation loss at iteration {iteration} | lm loss: {loss:.6E} | "
              f"lm loss PPL: {ppl:.6E}", flush=True)

    def close(self) -> None:
        if self.rank != 0:
            return
        self.jsonl.close()
        if self.wandb:
            self.wandb.finish()
        if self.tb:
            self.tb.close()

