"""Misuse of the CP attention API raises a clear error on every rank, fast."""
import time

import pytest
import torch

from megatron_ext.distributed import spawn_ranks
from megatron_ext.attention.exactness import METHODS

# name -> (shapes per rank: q, k, v), expected error type, text the message must contain
MISUSE = {
    "odd_zigzag_length": (lambda r: ((1, 3, 4, 8), (1, 3, 4, 8), (1, 3, 4, 8)), ValueError, "not divisible by 2P=4"),
    "heads_not_multiple": (lambda r: ((1, 4, 6, 8), (1, 4, 4, 8), (1, 4, 4, 8)), ValueError, "multiple of key/value heads h_kv=4"),
    "local_lengths_differ": (lambda r: ((1, 4, 4, 8), (1, 6, 4, 8), (1, 6, 4, 8)), ValueError, "same batch and local length"),
    "ranks_disagree_on_length": (lambda r: ((1, 4 + 4 * r, 4, 8),) + ((1, 4 + 4 * r, 4, 8),) * 2, RuntimeError, "s_q in [4, 8]"),
    "ranks_disagree_on_heads": (lambda r: ((1, 4, 4 * (r + 1), 8),) + ((1, 4, 4, 8),) * 2, RuntimeError, "h in [4, 8]"),
}


def misuse_worker(rank, world_size, method):
    report = {}
    for name, (shapes, _, _) in MISUSE.items():
        q, k, v = (torch.randn(s) for s in shapes(rank))
        t0 = time.monotonic()
        try:
            METHODS[method](q, k, v, causal=True, layout="zigzag")
            report[name] = ("no error", "", 0.0)
        except (ValueError, RuntimeError) as e:
            report[name] = (type(e).__name__, str(e), time.monotonic() - t0)
    # The group must still work after every rank raised.
    x = torch.randn(1, 4, 4, 8)
    report["still_usable"] = METHODS[method](x, x, x).shape == x.shape
    return report


@pytest.mark.parametrize("method", ["ring", "allgather"])
def test_misuse_raises_on_every_rank(method):
    reports = spawn_ranks(misuse_worker, 2, (method,), timeout_s=60)
    for rank, report in enumerate(reports):
        for name, (_, etype, text) in MISUSE.items():
            got_type, msg, seconds = report[name]
            assert got_type == etype.__name__, (rank, name, got_type, msg)
            assert text in msg, (rank, name, msg)
            assert seconds < 10
        assert report["still_usable"]


def check_count_worker(rank, world_size):
    """All-reduces (the shape check's collective) seen over repeated ring calls."""
    import os

    import torch.distributed as dist

    calls = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.device.type)
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    import megatron_ext.distributed as md

    placed, real_device = [], md.collective_device
    md.collective_device = lambda group=None: placed.append(group) or real_device(group)  # noqa: E731
    counts = {}
    x = torch.randn(1, 8, 4, 16, requires_grad=True)
    for _ in range(3):
        METHODS["ring"](x, x, x).sum().backward()
    counts["three_identical"] = len(calls)
    METHODS["ring"](x[:, :4], x[:, :4], x[:, :4])
    counts["new_shape"] = len(calls)
    os.environ["MEGATRON_EXT_SKIP_SHAPE_CHECK"] = "1"
    METHODS["ring"](x[:, :6], x[:, :6], x[:, :6])
    counts["skipped"] = len(calls)
    counts["devices"] = sorted(set(calls))
    counts["placed_by_helper"] = len(placed)
    return counts


def test_shape_check_runs_once_per_signature():
    for counts in spawn_ranks(check_count_worker, 2, timeout_s=60):
        assert counts == {"three_identical": 1, "new_shape": 2, "skipped": 2, "devices": ["cpu"],
                          "placed_by_helper": 2}


def test_single_process_without_distributed():
    q = torch.randn(1, 8, 4, 16)
    out = METHODS["ring"](q, q, q)
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), is_causal=True)
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-6)
