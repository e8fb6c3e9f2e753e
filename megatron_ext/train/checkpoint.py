"""Checkpoints through megatron-core's ``dist_checkpointing`` (``torch_dist`` format).

``save_dir/step-N`` holds the model's ``sharded_state_dict`` (TP shards as global
tensors), the distributed optimizer in ``checkpoint.format`` (see
:mod:`.checkpoint_state`), every rank's RNG states, and common entries rank 0 writes:
iteration, consumed samples, the scheduler, the config and the layout. With an
interleaved pipeline each model chunk's state sits under ``model0`` .. ``modelN`` (as
Megatron-LM saves it), else under ``model``. Every rank writes and reads its own part
(megatron-core's ``FullyParallelSaveStrategyWrapper`` / ``FullyParallelLoadStrategyWrapper``
over the DP x CP group), and with ``checkpoint.async_save`` the files are written by a
forked process (megatron-core's ``AsyncCallsQueue``) while training goes on.

A save goes to ``step-N.partial``. Only after every rank's write has finished (the
async request's finalize step, on every rank) does rank 0 write ``COMPLETE`` into it and
rename it to ``step-N``; so a folder named ``step-N`` is always complete, a crash
mid-save leaves only a ``.partial`` folder that resume ignores, and a complete folder
is never overwritten or deleted, except by the ``keep_last`` rotation.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from functools import partial
from typing import Callable, List, Optional

import torch.distributed as dist

from data_tools.common import atomic_write

from .checkpoint_state import RNG_KEY, chunks_of, layout, layout_mismatch, load_optimizer, model_keys, \
    set_rng_states, sharded_state

MARKER = "COMPLETE"
FORMAT = "megatron_ext/torch_dist/1"
_STEP = re.compile(r"^step-(\d+)$")
# files every complete torch_dist folder has besides the shards the metadata lists
_REQUIRED = (MARKER, "metadata.json", "common.pt", ".metadata")
# model fields a checkpoint must agree with (the vocabulary is checked separately)
SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "swiglu", "normalization", "add_bias_linear", "untie_embeddings")


class BrokenCheckpointError(RuntimeError):
    """A complete-looking checkpoint folder with a missing or truncated file."""


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank (disk full, ...); its ``.partial`` folder was removed and
    the previous complete checkpoint is untouched."""


def complete_steps(save_dir: str):
    """Sorted iterations with a complete checkpoint in ``save_dir``."""
    if not os.path.isdir(save_dir):
        return []
    steps = []
    for name in os.listdir(save_dir):
        m = _STEP.match(name)
        if m and os.path.exists(os.path.join(save_dir, name, MARKER)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_checkpoint(path: str) -> Optional[str]:
    """``path`` itself if it is a complete step folder, else its newest complete step-N."""
    if os.path.exists(os.path.join(path, MARKER)):
        return path
    steps = complete_steps(path)
    return os.path.join(path, f"step-{steps[-1]}") if steps else None


def verify(path: str) -> None:
    """Check complete folder ``path`` without reading tensors: the marker, megatron-core's
    and torch's metadata, and every shard file the metadata lists, at least as long as
    the bytes it needs. Raises BrokenCheckpointError naming the first bad file."""
    from torch.distributed.checkpoint import FileSystemReader

    for name in _REQUIRED:
        if not os.path.isfile(os.path.join(path, name)):
            raise BrokenCheckpointError(f"{os.path.join(path, name)}: missing (a complete checkpoint has it)")
    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as e:  # a truncated pickle raises one of several types
        raise BrokenCheckpointError(f"{os.path.join(path, '.metadata')}: unreadable ({type(e).__name__}: {e})") from e
    need = {}
    for info in metadata.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in sorted(need.items()):
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            raise BrokenCheckpointError(f"{file}: shard file missing (listed in {path}/.metadata)")
        have = os.path.getsize(file)
        if have < size:
            raise BrokenCheckpointError(f"{file}: truncated shard file: {have} bytes, the metadata needs {size}")


def resume_path(save_dir: str, skip_broken: bool, note: Callable[[str], None] = print) -> Optional[str]:
    """The newest complete checkpoint under ``save_dir`` that :func:`verify` accepts, or None.
    A broken newest one raises, unless ``skip_broken``: then it is named through ``note``
    and the previous complete one is tried. File reads only (no collective)."""
    for step in reversed(complete_steps(save_dir)):
        path = os.path.join(save_dir, f"step-{step}")
        try:
            verify(path)
            read_common(path)
            return path
        except (BrokenCheckpointError, OSError, EOFError, RuntimeError) as e:
            if not skip_broken:
                raise BrokenCheckpointError(f"{e}. Restore the file, or set checkpoint.skip_broken=true "
                                            f"(--skip-broken) to resume from the previous complete checkpoint") from e
            note(f"skipping broken checkpoint {path}: {e}")
    return None


def read_common(path: str) -> dict:
    """The common (non-sharded) entries of complete checkpoint ``path``: iteration,
    consumed_samples, config, vocab_size, layout, optimizer_format ... Reads files only
    (no collective), so every rank can check a checkpoint before the first collective."""
    from megatron.core import dist_checkpointing

    if not os.path.exists(os.path.join(path, MARKER)):
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception as e:
        raise BrokenCheckpointError(f"{os.path.join(path, 'common.pt')}: unreadable ({type(e).__name__}: {e})") from e
    if common.get("format") != FORMAT:
        raise ValueError(f"{path}: not a megatron_ext {FORMAT} checkpoint (format {common.get('format')!r}); "
                         f"checkpoints from before the dist_checkpointing trainer cannot be loaded")
    return common


def read_checkpoint_config(path: str) -> dict:
    """The TrainConfig (as a dict) stored in checkpoint ``path`` (save_dir or step folder)."""
    step = latest_checkpoint(path)
    if step is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint (a step-N folder with a {MARKER} marker)")
    return read_common(step)["config"]


def check_compatible(path: str, common: dict, model_cfg, vocab_size: int) -> None:
    """Raise ValueError naming every model key in which checkpoint ``path`` differs."""
    stored = common["config"]["model"]
    wrong = [f"model.{k}: checkpoint {stored.get(k)!r}, config {getattr(model_cfg, k)!r}"
             for k in SHAPE_KEYS if stored.get(k) != getattr(model_cfg, k)]
    if common.get("vocab_size") != vocab_size:
        wrong.append(f"vocab size: checkpoint {common.get('vocab_size')}, this run {vocab_size}")
    if wrong:
        raise ValueError(f"{path}: checkpoint of another model shape: " + "; ".join(wrong))


def _dp_cp_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group(with_context_parallel=True)


_MANAGERS = []  # keeps the results queue's manager alive for the process's lifetime


def _die_with_parent() -> None:
    """Runs in the manager process: Linux's PR_SET_PDEATHSIG, so it dies with its rank."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the manager outlives a killed rank, as in megatron-core


def _results_queue_dies_with_rank() -> None:
    """megatron-core collects the async writers' results in a queue served by a spawned
    ``Manager`` process (``filesystem_async.py:51-56``) that outlives a rank killed with
    SIGKILL, holding the job's stdout and memory. Create that queue first, from a manager
    that dies with its rank."""
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fs

    if fs._results_queue is None:
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=_die_with_parent)
        _MANAGERS.append(manager)
        fs._results_queue = manager.Queue()


class CheckpointSaver:
    """Writes ``save_dir/step-N``; with ``async_save`` the shards are written in the
    background and :meth:`finalize` completes them. Every method is collective."""

    def __init__(self, save_dir: str, keep_last: int, fmt: str = "dp_reshardable", async_save: bool = False):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.save_dir, self.keep_last, self.fmt = save_dir, keep_last, fmt
        self.queue = AsyncCallsQueue() if async_save else None
        _results_queue_dies_with_rank()
        self.completed: List[str] = []  # folders completed since the last finalize()
        self.inflight: Optional[str] = None  # the final folder of the save not yet completed

    def save(self, iteration: int, model, optimizer, scheduler, common: dict, with_rng: bool = True) -> str:
        """Start (async) or do (sync) the save of ``iteration``; returns the final folder name.
        A save still in flight is finalized first: at most one is pending. A failed write
        raises CheckpointSaveError on every rank."""
        if self.queue is not None and self.queue.get_num_unfinalized_calls():
            with self._reporting():
                self.queue.maybe_finalize_async_calls(blocking=True)  # reported by the next finalize()
        final = os.path.join(self.save_dir, f"step-{iteration}")
        if os.path.exists(os.path.join(final, MARKER)):
            return final  # this step is saved already; a complete folder is never rewritten
        partial_dir = final + ".partial"
        if dist.get_rank() == 0:
            self._remove_leftovers(final)
            os.makedirs(partial_dir)
        dist.barrier()
        self.inflight = final
        with self._reporting():
            self._start(iteration, partial_dir, final, model, optimizer, scheduler, common, with_rng)
        return final

    def _start(self, iteration, partial_dir, final, model, optimizer, scheduler, common, with_rng) -> None:
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

        with_rng = with_rng and optimizer is not None  # this rank's RNG states, restored with the optimizer
        state = sharded_state(model, optimizer, is_loading=False, fmt=self.fmt, with_rng=with_rng)
        state.update(common, format=FORMAT, iteration=iteration, layout=layout(), optimizer_format=self.fmt,
                     rng_per_rank=with_rng,
                     scheduler=scheduler.state_dict() if scheduler is not None else None)
        strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), _dp_cp_group())
        request = dist_checkpointing.save(state, partial_dir, strategy, async_sharded_save=self.queue is not None)
        complete = partial(self._complete, partial_dir, final, iteration)
        if self.queue is None:
            complete()
        else:
            request.add_finalize_fn(complete)
            self.queue.schedule_async_request(request)

    def finalize(self, blocking: bool = False) -> List[str]:
        """Complete the saves whose writes finished on every rank (all of them when
        ``blocking``); returns their folders. A failed write raises on every rank."""
        if self.queue is not None and self.queue.get_num_unfinalized_calls():
            with self._reporting():
                self.queue.maybe_finalize_async_calls(blocking=blocking)
        done, self.completed = self.completed, []
        return done

    @contextlib.contextmanager
    def _reporting(self):
        """Turn a failed save into CheckpointSaveError naming the folder and the checkpoint
        kept; rank 0 removes the failed ``.partial`` folder to free its space."""
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        try:
            yield
        except (Exception, CheckpointException) as e:
            final, self.inflight = self.inflight, None
            # a full disk often surfaces as a short write inside torch's writer, not ENOSPC: say how full it is
            free_mib = shutil.disk_usage(self.save_dir).free / 2**20
            if final:
                remove_partial(final)
            kept = latest_checkpoint(self.save_dir)
            raise CheckpointSaveError(f"saving {final} failed ({type(e).__name__}: {e}); {free_mib:.1f} MiB were free "
                                      f"on the checkpoint filesystem; its partial folder was removed; the newest "
                                      f"complete checkpoint, {kept or 'none'}, is intact") from e

    def pending(self) -> bool:
        """Whether an async save is still being written."""
        return self.queue is not None and self.queue.get_num_unfinalized_calls() > 0

    def abort(self) -> None:
        """Stop a background write (its ``.partial`` folder stays, and is never resumed from)."""
        if self.queue is not None:
            self.queue.close(abort=True)

    def _remove_leftovers(self, final: str) -> None:
        """Rank 0, before a save: ``.partial`` folders of earlier attempts (no save of this
        job is in flight now) and an incomplete ``step-N`` of this step."""
        for name in os.listdir(self.save_dir) if os.path.isdir(self.save_dir) else []:
            if name.endswith(".partial") and _STEP.match(name[:-len(".partial")]):
                shutil.rmtree(os.path.join(self.save_dir, name), ignore_errors=True)
        if os.path.exists(final):
            shutil.rmtree(final)

    def _complete(self, partial_dir: str, final: str, iteration: int) -> None:
        """After every rank's write: marker, atomic rename, rotation (rank 0), then a barrier."""
        dist.barrier()
        if dist.get_rank() == 0:
            atomic_write(os.path.join(partial_dir, MARKER), f"{iteration}\n".encode())
            os.replace(partial_dir, final)
            for old in complete_steps(self.save_dir)[:-self.keep_last] if self.keep_last > 0 else []:
                shutil.rmtree(os.path.join(self.save_dir, f"step-{old}"), ignore_errors=True)
        dist.barrier()
        self.completed.append(final)
        self.inflight = None


def remove_partial(final: str) -> None:
    """Rank 0: delete the ``.partial`` folder of a failed save of ``final`` (frees the space)."""
    if dist.get_rank() == 0:
        shutil.rmtree(final + ".partial", ignore_errors=True)


def save(save_dir: str, iteration: int, model, optimizer, scheduler, common: dict, keep_last: int,
         fmt: str = "dp_reshardable") -> str:
    """Synchronous save of ``model`` (DDP-wrapped or bare GPTModel, or a list of model
    chunks) and, if given, the optimizer and scheduler as ``save_dir/step-{iteration}``;
    returns the folder. Collective: every rank calls."""
    return CheckpointSaver(save_dir, keep_last, fmt).save(iteration, model, optimizer, scheduler, common)


def load(path: str, model, optimizer=None, scheduler=None) -> dict:
    """Load complete checkpoint ``path`` into ``model`` (a module or a list of model chunks;
    and the optimizer, scheduler and this rank's RNG states when an optimizer is given)
    at this run's layout; returns the common entries (``rng_restored`` says whether the
    per-rank RNG states were restored: only at the layout they were saved at). Collective."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    common = read_common(path)
    fmt = common.get("optimizer_format", "fully_reshardable")  # checkpoints before checkpoint.format
    if optimizer is not None:
        why = layout_mismatch(common.get("layout"), fmt)
        if why:
            now = layout()
            raise ValueError(f"{path}: the optimizer state is dp_reshardable, which loads only at the TP, PP and VP "
                             f"it was saved at ({why}). Rewrite it for this layout first: python -m "
                             f"megatron_ext.train.reshard --checkpoint {path} --to-layout tp={now['tp']},"
                             f"pp={now['pp']},cp={now['cp']},dp={now['dp']}")
    # per-rank RNG states belong to their rank's place in the layout: restored only at that layout
    with_rng = optimizer is not None and common.get("rng_per_rank", False) and common.get("layout") == layout()
    state = sharded_state(model, optimizer, is_loading=True, fmt=fmt, with_rng=with_rng)
    strategy = FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(path), _dp_cp_group())
    state = dist_checkpointing.load(state, path, strategy)
    chunks = chunks_of(model)
    for key, chunk in zip(model_keys(chunks), chunks):
        chunk.load_state_dict(state[key], strict=True)
    if optimizer is not None:
        load_optimizer(optimizer, state["optimizer"])
        if scheduler is not None and common.get("scheduler") is not None:
            scheduler.load_state_dict(common["scheduler"])
        if with_rng:
            set_rng_states(state[RNG_KEY])
    return {**common, "rng_restored": with_rng}


def save_model_checkpoint(save_dir: str, iteration: int, model, config: dict) -> str:
    """Weights-only checkpoint ``save_dir/step-N`` of ``model`` (e.g. an imported Hugging
    Face model) with its TrainConfig dict; training starts from it with
    ``checkpoint.init_from``. Needs torch.distributed and parallel_state initialised."""
    vocab = chunks_of(model)[0].vocab_size
    common = {"config": config, "vocab_size": vocab, "consumed_samples": 0, "skipped_iterations": 0}
    return save(save_dir, iteration, model, None, None, common, keep_last=0)


def load_model_weights(path: str, model) -> dict:
    """Load only the weights of the newest complete checkpoint under ``path`` (save_dir or
    step folder) into ``model`` at its current layout; returns the common entries."""
    step = latest_checkpoint(path)
    if step is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint (a step-N folder with a {MARKER} marker)")
    return load(step, model)
