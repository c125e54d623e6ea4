"""launch(): real gloo process groups on 127.0.0.1, failures and hangs stop every rank."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from graphpress.export.distributed import DistributedError, init_from_env, launch
from graphpress.graph.errors import GraphpressError


def _all_reduce(rank: int, world: int, scale: float) -> tuple:
    value = torch.tensor([float(rank + 1)]) * scale
    dist.all_reduce(value)
    return value, os.getpid(), torch.get_num_threads(), os.environ["RANK"]


def _raises_on_one(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("rank one is broken on purpose")
    dist.barrier()  # rank 0 would wait forever for rank 1


def _hangs_on_one(rank: int, world: int) -> None:
    if rank == 1:
        time.sleep(600)


def _dies(rank: int, world: int) -> None:
    if rank == 0:
        os._exit(3)
    time.sleep(600)


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.append(pid)
    return alive


def _failing(fn, world: int, **kw) -> str:
    """Run a launch that must fail; check that no rank survives it; return the error text."""
    import multiprocessing

    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(DistributedError) as info:
        launch(fn, world, **kw)
    assert not [p for p in multiprocessing.active_children() if p.pid not in before]
    return str(info.value)


def test_all_reduce_on_two_ranks_returns_each_result():
    results = launch(_all_reduce, 2, 2.0, timeout=60)
    assert [r[0].item() for r in results] == [6.0, 6.0]  # (1 + 2) * 2 on both ranks
    assert results[0][1] != results[1][1] != os.getpid()  # separate processes
    assert [r[2] for r in results] == [1, 1]  # one intra-op thread per rank
    assert [r[3] for r in results] == ["0", "1"]
    assert not _alive([r[1] for r in results])


def test_failing_rank_is_named_with_its_traceback():
    start = time.monotonic()
    text = _failing(_raises_on_one, 2, timeout=60)
    assert time.monotonic() - start < 30  # rank 0, blocked in barrier, is stopped at once
    first = text.splitlines()[0]
    assert first.startswith("rank 1 of 2 failed: ValueError: rank one is broken on purpose")
    assert "Traceback" in text and "_raises_on_one" in text


def test_hanging_rank_times_out_within_the_bound_and_is_stopped():
    start = time.monotonic()
    text = _failing(_hangs_on_one, 2, timeout=10)
    assert time.monotonic() - start < 10 + 10  # deadline + stack dump + stopping
    assert text.startswith("distributed run timed out after 10 s: rank(s) [1] of 2 did not finish (returned and waiting for them: [0])")
    assert "Stack of rank 1" in text and "_hangs_on_one" in text  # where it was blocked


def test_rank_that_dies_is_reported_with_its_exit_code():
    text = _failing(_dies, 2, timeout=60)
    assert text.startswith("rank 0 of 2 died without a result (exit code 3)")


def test_errors_are_graphpress_errors_and_init_from_env_needs_torchrun(monkeypatch):
    assert issubclass(DistributedError, GraphpressError)
    with pytest.raises(DistributedError, match="world_size must be at least 1"):
        launch(_all_reduce, 0)
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    if not dist.is_initialized():
        with pytest.raises(DistributedError, match="torchrun"):
            init_from_env()
