"""The training driver: one loop for the pretrain, sft and long_sft stages, on
megatron-core's machinery (DDP, optimizer, scheduler, forward-backward schedule,
dist_checkpointing), as Megatron-LM's ``train_step`` runs it."""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import yaml

from ..distributed import LaggedVote, collective_tensor
from . import checkpoint as ckpt
from .config import TrainConfig, packing_mode, to_dict, validate
from .config_checks import check_vocab_size
from .data import build_datasets, load_train_tokenizer, sample_batches
from .metrics import MetricsLogger, flops_per_token
from .model import build_model, build_model_chunks, init_model_parallel, unwrap, wrap_model
from .optim import build_optimizer, step_if_finite

# re-exported for callers that build models the trainer's way (eval, convert)
__all__ = ["Trainer", "RunState", "build_model", "init_model_parallel"]


@dataclass
class RunState:
    """What a checkpoint restores besides the weights."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0


class Trainer:
    """Runs one stage; see :func:`megatron_ext.train.__main__.main` for the CLI."""

    def __init__(self, cfg: TrainConfig):
        from megatron.core.distributed import finalize_model_grads

        self.cfg = cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.sizes = validate(cfg, self.world)
        self.ps = init_model_parallel(cfg)
        self.tokenizer = load_train_tokenizer(cfg.data.tokenizer_model)
        self.vocab_size = cfg.model.vocab_size or self.tokenizer.vocab_size
        check_vocab_size(self.vocab_size, cfg, "model.vocab_size" if cfg.model.vocab_size
                         else f"the tokenizer {cfg.data.tokenizer_model}")
        chunks, self.bf16 = build_model_chunks(cfg, self.vocab_size)
        self.model = [wrap_model(cfg, chunk, i) for i, chunk in enumerate(chunks)]  # one per virtual stage
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model)
        config = chunks[0].config  # shared by the chunks
        # the interleaved schedule enters every chunk's no_sync (schedules.py:926)
        config.no_sync_func = [m.no_sync for m in self.model] if len(self.model) > 1 else self.model[0].no_sync
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        self.state = RunState()
        c = cfg.checkpoint
        self.saver = ckpt.CheckpointSaver(c.save_dir, c.keep_last, c.format, c.async_save)
        self.stop_requested = False
        self.stop_vote = LaggedVote()  # between micro-batches (_checking_stop)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, *_):
        self.stop_requested = True  # acted on between micro-batches (PP = 1) or iterations, by every rank together

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop (collective, over the world)."""
        stop = collective_tensor([float(self.stop_requested)], torch.float32)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        return bool(stop.item())

    def _checking_stop(self, shards):
        """Yield the micro-batches; every rank votes on the stop flag before each one but the last,
        and reads that vote before the next: a stop abandons the iteration (StopRequested), so the
        last completed iteration is saved. One micro-batch late, so that the check never drains
        the GPU queue (LaggedVote). Only without a pipeline: an all-reduce inside 1F1B would wait
        on a stage that waits on this one's activations."""
        vote = self.stop_vote
        for k, shard in enumerate(shards):
            if k and vote.read():
                raise StopRequested(f"stop requested before micro-batch {k + 1}/{len(shards)}")
            if k + 1 < len(shards):
                vote.post(self.stop_requested)
            yield shard

    # -- checkpoints ------------------------------------------------------------------------
    def restore(self) -> str:
        """Resume from save_dir's newest complete checkpoint, else start from init_from's weights.
        Every rank reads and checks the checkpoint's shape before any collective."""
        c = self.cfg.checkpoint
        path = ckpt.resume_path(c.save_dir, c.skip_broken, note=self._note)
        if path:
            ckpt.check_compatible(path, ckpt.read_common(path), self.cfg.model, self.vocab_size)
            extra = ckpt.load(path, self.model, self.optimizer, self.scheduler)
            self.state = RunState(extra["iteration"], extra["consumed_samples"], extra["skipped_iterations"])
            rng = "" if extra["rng_restored"] else " (RNG states not restored: saved at another layout)"
            return f"resumed from {path} at iteration {self.state.iteration}{rng}"
        if c.init_from:
            src = ckpt.latest_checkpoint(c.init_from)
            if not src:
                raise FileNotFoundError(f"checkpoint.init_from={c.init_from!r} has no complete checkpoint")
            ckpt.check_compatible(src, ckpt.read_common(src), self.cfg.model, self.vocab_size)
            ckpt.load(src, self.model)
            self._reload_main_params()
            return f"initialised weights from {src}"
        return "starting from scratch"

    def _note(self, text: str) -> None:
        if self.rank == 0:
            print(f"[{self.cfg.stage}] {text}", flush=True)

    def _reload_main_params(self) -> None:
        """After loading weights alone, the optimizer's fp32 main params must follow them."""
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if hasattr(opt, "reload_model_params"):
                opt.reload_model_params()

    def save(self) -> str:
        common = {"consumed_samples": self.state.consumed_samples,
                  "skipped_iterations": self.state.skipped_iterations,
                  "config": to_dict(self.cfg), "config_yaml": yaml.safe_dump(to_dict(self.cfg)),
                  "vocab_size": self.vocab_size}
        return self.saver.save(self.state.iteration, self.model, self.optimizer, self.scheduler, common)

    # -- one optimizer step ----------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        """megatron-core forward_step_func: per-token losses and the loss function."""
        local = next(data_iterator)
        per_token = model(local["tokens"], local["position_ids"], None, labels=local["labels"],
                          packed_seq_params=local.get("packed_seq_params"))
        return per_token, partial(self._loss_func, local["loss_mask"])

    def _loss_func(self, loss_mask, per_token):
        from ..megatron.batch import masked_loss_sum

        loss_sum, count = masked_loss_sum(per_token, loss_mask)
        if self.state.iteration + 1 in self.cfg.fault.inject_nan_at:
            loss_sum = loss_sum * float("nan")
        return loss_sum, count.to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), count.to(loss_sum.dtype)])}

    def _shard(self, micro_batch) -> dict:
        """This CP rank's part of a micro-batch ([mbs, S] -> [mbs, S / CP]). Packed samples
        (``doc_lengths``, mbs 1) are padded and sharded per document, with the
        PackedSeqParams (thd) the model needs."""
        from ..megatron.batch import SEQUENCE_KEYS, get_batch_on_this_cp_rank, get_thd_batch_on_this_cp_rank

        device = next(self.model[0].parameters()).device
        cp_group = self.ps.get_context_parallel_group()
        batch = {k: micro_batch[k].to(device) for k in SEQUENCE_KEYS if k in micro_batch}
        if "doc_lengths" not in micro_batch:
            return get_batch_on_this_cp_rank(batch, cp_group)
        (doc_lengths,) = micro_batch["doc_lengths"]  # validate() keeps micro_batch_size at 1
        config = self.model[0].config
        local, params = get_thd_batch_on_this_cp_rank(
            batch, doc_lengths, cp_group, tp_size=self.ps.get_tensor_model_parallel_world_size()
            if config.sequence_parallel else 1, cu_seqlens_device=config.apply_rope_fusion)  # TE's RoPE reads them
        return {**local, "packed_seq_params": params}

    def _run_schedule(self, micro_batches, forward_only: bool):
        """Run megatron-core's forward-backward schedule; returns (loss, tokens) over DP x CP."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        ps = self.ps
        shards = [self._shard(mb) for mb in micro_batches]
        # seq_length: the global one; the schedule divides by CP (and TP with SP). Packed
        # shards differ in length (pads per document), so packing needs PP = 1 (validate()).
        # Interleaved: each chunk walks the same micro-batches, so each gets its own iterator.
        data = [iter(shards) for _ in self.model] if len(self.model) > 1 else iter(shards)
        if not forward_only and ps.get_pipeline_model_parallel_world_size() == 1:
            data = self._checking_stop(shards)
        out = get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=data, model=self.model,
            num_microbatches=len(shards), seq_length=self.cfg.data.seq_length,
            micro_batch_size=shards[0]["tokens"].shape[0], forward_only=forward_only)
        totals = collective_tensor([0.0, 0.0], torch.float64, ps.get_data_parallel_group(with_context_parallel=True))
        for record in out:
            totals += record["lm loss"].to(totals)
        dist.all_reduce(totals, group=ps.get_data_parallel_group(with_context_parallel=True))
        if ps.get_pipeline_model_parallel_world_size() > 1:  # only the last stage has losses; the others hold zeros
            dist.all_reduce(totals, group=ps.get_pipeline_model_parallel_group())
        loss_sum, tokens = totals.tolist()
        return loss_sum / max(tokens, 1.0), tokens

    def step(self, micro_batches) -> dict:
        """Forward/backward over the micro-batches, then megatron-core's optimizer step
        (clipping and the finite check across TP/PP/DP). A non-finite loss, or an inf/NaN
        gradient with a finite loss, skips the step on every rank (the loss and the grad
        check are all-reduced, so all ranks agree)."""
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss, tokens = self._run_schedule(micro_batches, forward_only=False)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        ok, grad_norm = False, float("nan")
        if math.isfinite(loss):  # and every grad finite (step_if_finite), else the step is skipped
            ok, norm = step_if_finite(self.optimizer)
            grad_norm = norm if norm is not None else float("nan")
        if ok:
            self.scheduler.step(increment=1)  # as Megatron-LM: a skipped step does not advance the schedule
        return {"loss": loss, "grad_norm": grad_norm, "finite": bool(ok), "tokens": tokens, "lr": lr}

    def evaluate(self, batches) -> tuple:
        """Validation loss over ``eval_iters`` global batches; returns (loss, ppl)."""
        for chunk in self.model:
            chunk.eval()
        with torch.no_grad():
            sums = [self._run_schedule(next(batches), forward_only=True) for _ in range(self.cfg.logging.eval_iters)]
        for chunk in self.model:
            chunk.train()
        total = sum(t for _, t in sums)
        loss = sum(l * t for l, t in sums) / max(total, 1.0)
        return loss, math.exp(min(loss, 20.0))

    # -- the loop ---------------------------------------------------------------------------
    def _data(self, log=None):
        cfg, o = self.cfg, self.cfg.optim
        cache = cfg.data.cache_dir or os.path.join(cfg.checkpoint.save_dir, "data_cache")
        mode = packing_mode(cfg)
        train_ds, valid_ds = build_datasets(cfg.data, self.tokenizer, cache, valid_samples=self._valid_samples(),
                                            packing=mode)
        if mode == "sft" and log is not None:
            log.info(train_ds.summary())  # the fill rate, once
        dp_rank, dp = self.ps.get_data_parallel_rank(), self.sizes["dp"]
        train = sample_batches(train_ds, self.state.consumed_samples, o.micro_batch_size, dp_rank, dp,
                               self.sizes["grad_accum"])
        valid = (lambda: sample_batches(valid_ds, 0, o.micro_batch_size, dp_rank, dp, self.sizes["grad_accum"])) \
            if valid_ds is not None else None
        return train, valid

    def _valid_samples(self) -> int:
        return self.cfg.logging.eval_iters * self.cfg.optim.global_batch_size

    def _validate(self, valid, log) -> None:
        if valid is None:
            return
        loss, ppl = self.evaluate(valid())  # the same first eval_iters batches each time: comparable
        log.validation(self.state.iteration, loss, ppl)

    def train(self) -> int:
        cfg, o = self.cfg, self.cfg.optim
        log = MetricsLogger(cfg, self.rank, self.world, flops_per_token(cfg, self.vocab_size))
        batches, valid = self._data(log)
        consecutive_bad = 0
        every = cfg.logging.eval_interval
        while self.state.iteration < o.train_iters:
            t0 = time.perf_counter()
            try:
                out = self.step(next(batches))
            except StopRequested as why:  # the weights are still those of the last completed iteration
                self._save_and_stop(log, f"{why} of iteration {self.state.iteration + 1}, which is abandoned")
                break
            self.state.iteration += 1
            self.state.consumed_samples += o.global_batch_size
            consecutive_bad = 0 if out["finite"] else consecutive_bad + 1
            self.state.skipped_iterations += not out["finite"]
            log.iteration(self.state, out, time.perf_counter() - t0, out["lr"])
            if consecutive_bad >= cfg.fault.max_consecutive_nonfinite:
                log.close()
                raise RuntimeError(f"{consecutive_bad} consecutive non-finite steps (loss or grad norm) up to "
                                   f"iteration {self.state.iteration}; stopping. Lower the learning rate or check the data.")
            if every and self.state.iteration % every == 0 and self.state.iteration < o.train_iters:
                self._validate(valid, log)
            self._log_saved(log, self.saver.finalize())  # an async save whose writes all finished
            if self._stop_agreed():
                self._save_and_stop(log, "stop requested")
                break
            if self.state.iteration % cfg.checkpoint.save_interval == 0 or self.state.iteration == o.train_iters:
                path = self.save()
                log.info(f"saving checkpoint {path} in the background" if self.saver.pending()
                         else f"saved checkpoint {path}")
        else:
            self._validate(valid, log)
        self._log_saved(log, self.saver.finalize(blocking=True))
        log.close()
        return 0

    def _save_and_stop(self, log, why: str) -> None:
        """SIGTERM: save the last completed iteration and wait for every rank's write."""
        path = self.save()
        self._log_saved(log, self.saver.finalize(blocking=True))
        log.info(f"SIGTERM: saved at iteration {self.state.iteration}; exiting cleanly ({why}; {path})")

    @staticmethod
    def _log_saved(log, paths) -> None:
        for path in paths:
            log.info(f"saved checkpoint {path}")


class StopRequested(Exception):
    """Raised between micro-batches when every rank agreed to stop (SIGTERM)."""


def run_stage(cfg: TrainConfig) -> int:
    """One stage on every rank of an initialised world: build, restore (resume or
    init_from), train. Returns the exit code (2: an overlong SFT example). Several
    stages may run one after another in one process (megatron_ext.experiments)."""
    from .packing import OverlongExampleError

    try:
        trainer = Trainer(cfg)
        if dist.get_rank() == 0:
            print(f"[{cfg.stage}] config:\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False), flush=True)
        note = trainer.restore()
        if dist.get_rank() == 0:
            print(f"[{cfg.stage}] {note}", flush=True)
        return trainer.train()
    except OverlongExampleError as err:  # every rank reads the same data and stops here
        if dist.get_rank() == 0:
            print(f"train: data error: {err}", file=sys.stderr, flush=True)
        return 2
    except ckpt.CheckpointSaveError as err:  # raised on every rank (disk full, ...)
        if dist.get_rank() == 0:
            print(f"train: checkpoint error: {err}", file=sys.stderr, flush=True)
        return 3


def model_of(trainer: Trainer):
    """The bare GPTModel a trainer trains (for tests and tools); with an interleaved
    pipeline, the list of this rank's chunks (GPTModels)."""
    chunks = unwrap(trainer.model)
    return chunks[0] if len(chunks) == 1 else chunks
