"""shard_sequence / unshard_sequence / position_ids round trips and errors."""
import pytest
import torch

from megatron_ext.sharding import local_chunks, owners, position_ids, shard_sequence, unshard_sequence


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_round_trip(layout, world_size):
    x = torch.randn(2, 48, 3)
    shards = [shard_sequence(x, 1, r, world_size, layout) for r in range(world_size)]
    assert all(s.shape == (2, 48 // world_size, 3) for s in shards)
    assert torch.equal(unshard_sequence(shards, 1, layout), x)
    pos = [position_ids(48, r, world_size, layout) for r in range(world_size)]
    assert torch.equal(torch.sort(torch.cat(pos)).values, torch.arange(48))
    for r in range(world_size):  # a shard holds exactly the tokens at its position ids
        assert torch.equal(shards[r], x[:, pos[r]])


def test_zigzag_layout_is_chunk_r_then_mirror():
    pos = position_ids(16, 1, 4, "zigzag")
    assert pos.tolist() == [2, 3, 12, 13]
    assert position_ids(16, 1, 4, "contiguous").tolist() == [4, 5, 6, 7]


def test_local_chunks_cover_shard():
    chunks = local_chunks(16, 1, 4, "zigzag")
    assert [tuple(c) for c in chunks] == [(0, 2, 2, 4), (2, 4, 12, 14)]


@pytest.mark.parametrize("layout,length,world_size,need", [
    ("zigzag", 30, 4, "2P=8"), ("contiguous", 30, 4, "P=4"), ("zigzag", 10, 3, "2P=6"),
])
def test_indivisible_length_is_a_clear_error(layout, length, world_size, need):
    with pytest.raises(ValueError) as err:
        shard_sequence(torch.zeros(length), 0, 0, world_size, layout)
    msg = str(err.value)
    assert str(length) in msg and need in msg and f"P={world_size}" in msg and layout in msg
    with pytest.raises(ValueError, match="not divisible"):
        position_ids(length, 0, world_size, layout)


def test_bad_layout_and_rank():
    with pytest.raises(ValueError, match="unknown layout"):
        shard_sequence(torch.zeros(8), 0, 0, 2, "striped")
    with pytest.raises(ValueError, match="outside"):
        shard_sequence(torch.zeros(8), 0, 2, 2, "zigzag")


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_owners_maps_global_ranges_to_local_rows(layout):
    seq_len, world_size = 48, 3
    pos = [position_ids(seq_len, r, world_size, layout) for r in range(world_size)]
    for start, stop in [(0, 48), (5, 29), (17, 18), (8, 16)]:
        covered = []
        for off, n, rank, at in owners(start, stop, seq_len, world_size, layout):
            assert pos[rank][at:at + n].tolist() == list(range(start + off, start + off + n))
            covered.extend(range(start + off, start + off + n))
        assert covered == list(range(start, stop))
