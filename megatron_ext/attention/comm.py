"""Communication helpers shared by the context-parallel attention algorithms.

Every P2P exchange posts its operations in one fixed, rank-independent order
(all sends to the next rank, then all receives from the previous rank), and
every returned ``Work`` is waited on. Mismatched orders hang on gloo.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from .stats import count_sent

# Tags keep the KV stream and the dK/dV stream apart when both are in flight.
TAG_KV = 0
TAG_DKV = 1


class RingComm:
    """Rotate tensors one step around ``group``: send to rank+1, receive from rank-1."""

    def __init__(self, group: Optional[dist.ProcessGroup]):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        pg = group if group is not None else dist.group.WORLD
        self.next_peer = dist.get_global_rank(pg, (self.rank + 1) % self.world_size)
        self.prev_peer = dist.get_global_rank(pg, (self.rank - 1) % self.world_size)

    def exchange(self, send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor], tag: int,
                 phase: str = "forward") -> List[dist.Work]:
        """Start sending ``send`` to next and receiving into ``recv`` from prev.

        Returns the pending works; pass them to :func:`wait_all` before touching
        either list again.
        """
        check_backend_device(self.group, send)
        ops = [dist.P2POp(dist.isend, t, self.next_peer, self.group, tag) for t in send]
        ops += [dist.P2POp(dist.irecv, t, self.prev_peer, self.group, tag) for t in recv]
        count_sent(phase, send)
        return dist.batch_isend_irecv(ops)


def check_backend_device(group, tensors: Sequence[torch.Tensor]) -> None:
    """ValueError unless ``tensors`` live where ``group``'s backend communicates: CUDA for
    NCCL, the CPU for gloo (gloo's send/recv take no CUDA tensors; NCCL takes no CPU ones)."""
    backend = str(dist.get_backend(group)).lower()
    want = "cuda" if "nccl" in backend else "cpu" if "gloo" in backend else None
    for t in tensors:
        if want and t.device.type != want:
            raise ValueError(f"context-parallel exchange on a {backend} group got a {t.device.type} tensor "
                             f"{list(t.shape)}: {backend} needs {want} tensors (one CUDA device per rank for NCCL)")


def wait_all(works: Optional[List[dist.Work]]) -> None:
    """Wait on every pending work (``None`` is nothing pending)."""
    for w in works or ():
        w.wait()


def all_gather_into(output: torch.Tensor, tensor: torch.Tensor, group, phase: str = "forward") -> None:
    """All-gather ``tensor`` [n, ...] into ``output`` [P * n, ...] in one collective.

    Counted as a ring all-gather: each rank sends (P-1) blocks of ``tensor``'s size.
    """
    check_backend_device(group, [tensor])
    count_sent(phase, [tensor], dist.get_world_size(group) - 1)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(output, tensor.contiguous(), group=group)


def reduce_scatter_from(output: torch.Tensor, tensor: torch.Tensor, group, phase: str = "backward") -> None:
    """Sum ``tensor`` [P * n, ...] over ranks; rank r keeps block r in ``output`` [n, ...].

    Counted as a ring reduce-scatter: each rank sends (P-1) blocks of ``output``'s size.
    """
    count_sent(phase, [output], dist.get_world_size(group) - 1)
    fn = getattr(dist, "reduce_scatter_single", None)
    if fn is not None:
        fn(output, tensor.contiguous(), group=group)
    else:
        dist.reduce_scatter_tensor(output, tensor.contiguous(), group=group)
