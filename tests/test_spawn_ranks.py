"""megatron_ext.distributed.spawn_ranks: the start methods, the caller's environment in every
rank, and the limit that kills ranks which do not finish (the suite runs on it)."""
import os
import sys
import time

import pytest

from megatron_ext.distributed import spawn_ranks


def _what_rank_sees(rank, world):
    import torch.distributed as dist

    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "probe": os.environ.get("MEXT_SPAWN_PROBE"),
            "mcore_loaded_before_use": "megatron.core" in sys.modules}


def _sleep_on_rank_1(rank, world):
    if rank == 1:
        time.sleep(60)
    return rank


def test_forkserver_ranks_see_the_callers_environment_and_the_preload(monkeypatch):
    monkeypatch.setenv("MEGATRON_EXT_START_METHOD", "forkserver")
    spawn_ranks(_what_rank_sees, 1)  # the server is up (it may have been already) ...
    monkeypatch.setenv("MEXT_SPAWN_PROBE", "set after the server started")  # ... before this exists
    got = spawn_ranks(_what_rank_sees, 2)
    assert [(g["rank"], g["world"]) for g in got] == [(0, 2), (1, 2)]
    assert all(g["probe"] == "set after the server started" for g in got), got
    # conftest preloads megatron-core in the server; nothing in this module or the rank's path imports it
    assert all(g["mcore_loaded_before_use"] for g in got) == ("megatron.core" in os.environ.get(
        "MEGATRON_EXT_FORKSERVER_PRELOAD", "")), got


def test_spawn_ranks_import_afresh(monkeypatch):
    monkeypatch.setenv("MEXT_SPAWN_PROBE", "spawn")
    got = spawn_ranks(_what_rank_sees, 2, start_method="spawn")  # the argument wins over the suite's forkserver
    assert [g["probe"] for g in got] == ["spawn", "spawn"]
    assert not any(g["mcore_loaded_before_use"] for g in got), got


def test_unknown_start_method_is_named(monkeypatch):
    monkeypatch.setenv("MEGATRON_EXT_START_METHOD", "fork")
    with pytest.raises(ValueError, match="start method 'fork' .*: use spawn or forkserver"):
        spawn_ranks(_what_rank_sees, 1)
    with pytest.raises(ValueError, match="start method 'thread' .*: use spawn or forkserver"):
        spawn_ranks(_what_rank_sees, 1, start_method="thread")


def test_a_rank_past_the_limit_is_killed_and_named():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[1\] of 2 did not finish within 5s running _sleep_on_rank_1"):
        spawn_ranks(_sleep_on_rank_1, 2, timeout_s=5)
    assert time.monotonic() - t0 < 30
