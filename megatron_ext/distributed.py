"""Process groups for local runs and torchrun entry points.

:func:`spawn_ranks` runs a function on P local gloo processes and collects what
each rank returns (tests, demo, benchmarks). Rendezvous is a ``file://`` path;
each rank's result (or traceback) comes back through a file. A rank that does
not finish within ``timeout_s`` makes the call raise ``TimeoutError`` naming
it, after every child has been killed: nothing hangs. Ranks start with
``spawn`` unless ``MEGATRON_EXT_START_METHOD=forkserver``: then they fork from
one server per parent process that imported ``MEGATRON_EXT_FORKSERVER_PRELOAD``
(comma-separated modules) once, which saves each rank those imports (the test
suite uses it). Each rank gets the caller's environment either way.
:func:`init_distributed_from_env` starts the group of a torchrun (or plain
single-process) entry point.
:func:`collective_device` / :func:`collective_tensor` are the one place that
decides where a tensor handed to a collective lives (cuda for nccl, cpu for gloo).
"""
from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import tempfile
import time
import traceback
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.distributed as dist


def _rank_main(fn, rank, world_size, init_file, out_dir, args, threads, timeout_s, environ):
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        # A forkserver child has the server's environment from when it started, not the caller's.
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        try:
            result = {"ok": fn(rank, world_size, *args)}
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        result = {"error": traceback.format_exc()}
    torch.save(result, path + ".tmp")
    os.replace(path + ".tmp", path)


def _context(method: Optional[str]):
    """The multiprocessing context of the ranks: spawn, or forkserver with its preload (see the module doc)."""
    method = method or os.environ.get("MEGATRON_EXT_START_METHOD", "spawn")
    if method not in ("spawn", "forkserver"):
        raise ValueError(f"start method {method!r} (MEGATRON_EXT_START_METHOD or start_method=): "
                         "use spawn or forkserver")
    ctx = mp.get_context(method)
    if method == "forkserver":  # read when the server starts: the first call in this process
        ctx.set_forkserver_preload([m for m in os.environ.get("MEGATRON_EXT_FORKSERVER_PRELOAD", "").split(",") if m])
    return ctx


def spawn_ranks(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (), *,
                timeout_s: float = 60.0, threads_per_rank: int = 1, start_method: Optional[str] = None) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes.

    ``fn`` must be importable (module level). Returns the per-rank results in rank
    order; raises RuntimeError with the first failing rank's traceback.
    ``start_method``: "spawn" or "forkserver"; None reads MEGATRON_EXT_START_METHOD.
    Pass "spawn" where a rank needs what only a fresh process reads (glibc's
    MALLOC_* settings, for example).
    """
    ctx = _context(start_method)
    with tempfile.TemporaryDirectory(prefix="mext-spawn-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_rank_main, args=(fn, r, world_size, init_file, tmp, tuple(args),
                                                threads_per_rank, timeout_s, dict(os.environ)),
                        daemon=False)  # ranks may start helpers (dist_checkpointing does)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        stuck = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if stuck:
            raise TimeoutError(f"ranks {stuck} of {world_size} did not finish within {timeout_s:.0f}s running {fn.__name__}")
        results = []
        for r, p in enumerate(procs):
            path = os.path.join(tmp, f"rank{r}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} exited with code {p.exitcode} and no result running {fn.__name__}")
            res = torch.load(path, weights_only=False)
            if "error" in res:
                raise RuntimeError(f"rank {r} of {world_size} failed in {fn.__name__}:\n{res['error']}")
            results.append(res["ok"])
        return results


def init_distributed_from_env() -> None:
    """init_process_group on a store namespaced by torchrun's restart count: after a
    restart, gloo must not find the previous attempt's addresses under the same keys."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    timeout = datetime.timedelta(minutes=10)
    if "MASTER_ADDR" not in os.environ:  # a plain single process
        dist.init_process_group(backend, init_method="tcp://127.0.0.1:0", rank=0, world_size=1, timeout=timeout)
        return
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"megatron_ext/attempt-{attempt}", store),
                            rank=rank, world_size=world, timeout=timeout)


def collective_device(group=None) -> torch.device:
    """The device a collective on ``group`` needs its tensors on: ``cuda`` (this
    process's current device) for NCCL, ``cpu`` for gloo or no process group."""
    if dist.is_available() and dist.is_initialized():
        backend = str(dist.get_backend(group)).lower()
        if "nccl" in backend:
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def collective_tensor(data, dtype: Optional[torch.dtype] = None, group=None) -> torch.Tensor:
    """``torch.tensor(data, dtype)`` on :func:`collective_device` of ``group``: every
    small tensor the code hands to a collective comes from here."""
    return torch.tensor(data, dtype=dtype, device=collective_device(group))


def compute_device() -> torch.device:
    """Where this process computes: the device its process group's collectives need
    (:func:`collective_device`: NCCL -> the current CUDA device, gloo -> the CPU), or, before
    any group exists, the current CUDA device when CUDA exists, else the CPU. So gloo ranks on
    a GPU node (:func:`spawn_ranks`: resharding; one-process conversion) compute on the CPU."""
    if dist.is_available() and dist.is_initialized():
        return collective_device()
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@contextlib.contextmanager
def current_cuda_device(device):
    """Make ``device`` (e.g. "cuda:1") CUDA's current device for the block, then restore the
    previous one; a no-op for the CPU or a bare "cuda". Code that allocates on
    ``torch.cuda.current_device()`` (megatron-core's weights without CPU initialisation, and
    its rotary table's ``inv_freq``) then lands on ``device``, not on GPU 0."""
    device = torch.device(device)
    if device.type != "cuda" or device.index is None:
        yield
        return
    previous = torch.cuda.current_device()
    torch.cuda.set_device(device)
    try:
        yield
    finally:
        torch.cuda.set_device(previous)


class LaggedVote:
    """Whether any rank of the world raised a flag, agreed (MAX all-reduce) without draining the
    GPU queue: :meth:`post` starts the all-reduce and a non-blocking copy to pinned host memory;
    :meth:`read`, called one step later, waits only for that copy, not for the work queued since.
    Every rank posts and reads at the same points, so all agree on the same post."""

    def __init__(self, group=None):
        self.group = group
        device = collective_device(group)
        self.flag = torch.zeros(1, device=device)
        self.host = torch.zeros(1, pin_memory=device.type == "cuda")
        self.ready = None

    def post(self, raised: bool) -> None:
        """Start agreeing on this rank's ``raised`` (no host sync: fill_ takes a Python scalar)."""
        self.flag.fill_(float(raised))
        dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group)
        self.host.copy_(self.flag, non_blocking=True)
        if self.flag.is_cuda:
            self.ready = torch.cuda.Event()
            self.ready.record()

    def read(self) -> bool:
        """The agreed result of the last :meth:`post`."""
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None
        return bool(self.host[0])
