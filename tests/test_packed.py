"""Packed documents under CP: per-document zigzag sharding, and document-masked
exact attention for all four CP methods against a float64 per-document causal
reference at real (non-pad) rows. Tolerance: fp32 <= 1e-5 absolute on out, dq, dk, dv."""
import pytest
import torch

from megatron_ext.attention.exactness import Case, exactness_worker
from megatron_ext.distributed import spawn_ranks
from megatron_ext.sharding import (pad_packed_lengths, packed_position_ids, shard_packed, shard_sequence,
                                   unshard_packed)

DOCS = (37, 5, 120, 64, 1, 250)  # a length-1 document and one shorter than 2P before padding
TENSORS = ("out", "dq", "dk", "dv")
FP32_TOL = 1e-5


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_packed_round_trip_and_positions(world_size):
    cu = pad_packed_lengths(DOCS, world_size)
    assert cu.dtype == torch.int32 and cu[0] == 0
    pad = (cu[1:] - cu[:-1]).tolist()
    assert all(p % (2 * world_size) == 0 and 0 <= p - n < 2 * world_size for p, n in zip(pad, DOCS))
    x = torch.randn(2, int(cu[-1]), 3)
    shards = [shard_packed(x, 1, cu, r, world_size) for r in range(world_size)]
    assert torch.equal(unshard_packed(shards, 1, cu), x)
    for r in range(world_size):
        pos = packed_position_ids(cu, r, world_size)
        # rank r holds chunk r then 2P-1-r of every document; positions restart per document
        want = torch.cat([shard_sequence(torch.arange(n), 0, r, world_size) for n in pad])
        assert torch.equal(pos, want)
    one = pad_packed_lengths([48], world_size)  # one document: plain zigzag
    assert torch.equal(shard_packed(x[:, :48], 1, one, 0, world_size), shard_sequence(x[:, :48], 1, 0, world_size))


def test_packed_bad_lengths_name_the_document():
    with pytest.raises(ValueError, match="document 2 has length 0"):
        pad_packed_lengths([3, 4, 0], 2)
    with pytest.raises(ValueError, match="document 0 has length -1"):
        pad_packed_lengths([-1], 2)
    with pytest.raises(ValueError, match="no documents"):
        pad_packed_lengths([], 2)
    with pytest.raises(ValueError, match="document 1 has padded length 6"):
        shard_packed(torch.zeros(10), 0, torch.tensor([0, 4, 10]), 0, 2)


def test_packed_attention_misuse():
    from megatron_ext.attention import allgather_attention, ring_attention, ulysses_attention

    cu = pad_packed_lengths([5, 3], 1)
    q = torch.randn(1, int(cu[-1]), 2, 8)
    for fn in (ring_attention, allgather_attention, ulysses_attention):
        with pytest.raises(ValueError, match="causal=True"):
            fn(q, q, q, causal=False, cu_seqlens=cu)
        with pytest.raises(ValueError, match="layout='zigzag'"):
            fn(q, q, q, layout="contiguous", cu_seqlens=cu)
        with pytest.raises(ValueError, match="ends at"):
            fn(q[:, :4], q[:, :4], q[:, :4], cu_seqlens=cu)


def _cases(world_size):
    cases = [Case(m, h=8, h_kv=2, d=16, doc_lengths=DOCS) for m in ("ring", "allgather")]
    cases.append(Case("ring", h=8, h_kv=2, d=16, doc_lengths=DOCS, kv_chunks=5))  # waves cut documents
    # Ulysses needs h % P == 0: 6/2 heads at P = 3
    cases.append(Case("ulysses", h=8 if world_size != 3 else 6, h_kv=2, d=16, doc_lengths=DOCS))
    cases.append(Case("hybrid", h=8, h_kv=2, d=16, doc_lengths=DOCS, ulysses_size=2 if world_size % 2 == 0 else 1))
    return cases


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_packed_attention_exact(world_size):
    cases = _cases(world_size)
    results = spawn_ranks(exactness_worker, world_size, (cases,), timeout_s=90)
    table = []
    for case in cases:
        worst = {n: max(r[case.key][n] for r in results) for n in TENSORS}
        table.append(f"P={world_size} {case.method} hybrid_U={case.ulysses_size} kv_chunks={case.kv_chunks}: "
                     + " ".join(f"{n}={worst[n]:.2e}" for n in TENSORS))
        assert all(r[case.key]["dtype_ok"] and r[case.key]["shape_ok"] for r in results), case.key
        assert max(worst.values()) <= FP32_TOL, table[-1]
    print("\n" + "\n".join(table))
