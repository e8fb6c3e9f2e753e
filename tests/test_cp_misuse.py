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


def test_single_process_without_distributed():
    q = torch.randn(1, 8, 4, 16)
    out = METHODS["ring"](q, q, q)
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), is_causal=True)
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-6)
