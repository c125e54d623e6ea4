"""launch(): real gloo process groups on 127.0.0.1, failures and hangs stop every rank.

The successful run (an all-reduce) is part of the 2-rank launch shared with the other
distributed tests (``_distributed_checks``); each failure needs a launch of its own, with rank
functions from the light ``_launch_ranks`` module.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from graphpress.export.distributed import DistributedError, init_from_env, launch
from graphpress.graph.errors import GraphpressError

sys.path.insert(0, str(Path(__file__).parent))
from _launch_ranks import dies, hangs_on_one, raises_on_one  # noqa: E402


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


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    """Per rank: ``_distributed_checks._all_reduce``, run in the 2-rank launch shared with the
    other distributed tests (starting ranks costs seconds per launch)."""
    from _distributed_checks import two_rank_results

    return [result["launch"] for result in two_rank_results()]


@pytest.fixture(scope="module")
def raised() -> tuple[str, float]:
    """The launch in which rank 1 raises: its error text and how long it took (seconds)."""
    start = time.monotonic()
    text = _failing(raises_on_one, 2, timeout=60)
    return text, time.monotonic() - start


def test_all_reduce_on_two_ranks_returns_each_result(two_ranks):
    assert [r["value"].item() for r in two_ranks] == [6.0, 6.0]  # (1 + 2) * 2 on both ranks
    assert two_ranks[0]["pid"] != two_ranks[1]["pid"] != os.getpid()  # separate processes
    assert [r["threads"] for r in two_ranks] == [1, 1]  # one intra-op thread per rank
    assert [r["rank_env"] for r in two_ranks] == ["0", "1"]
    assert not _alive([r["pid"] for r in two_ranks])


def test_failing_rank_is_named_with_its_traceback(raised):
    text, elapsed = raised
    assert elapsed < 30  # rank 0, blocked in barrier, is stopped at once
    first = text.splitlines()[0]
    assert first.startswith("rank 1 of 2 failed: ValueError: rank one is broken on purpose")
    assert "Traceback" in text and "raises_on_one" in text


def test_hanging_rank_times_out_within_the_bound_and_is_stopped(raised):
    # The deadline counts from the start, so both ranks must start (and rank 0 return) within
    # it: the bound is the time the failing launch took on this machine (start-up, then an
    # immediate error) plus a margin. If load still delays the start past it (rank 0 named as
    # running, or rank 1's stack not yet in hangs_on_one), it is repeated with a longer bound.
    startup = raised[1]
    for timeout in (math.ceil(1.5 * startup) + 1, math.ceil(3 * startup) + 5):
        start = time.monotonic()
        text = _failing(hangs_on_one, 2, timeout=timeout)
        assert time.monotonic() - start < timeout + 10  # deadline + stack dump + stopping
        slow_start = "rank(s) [0, 1] of 2" in text or "hangs_on_one" not in text
        if not slow_start:
            break
    assert text.startswith(f"distributed run timed out after {timeout} s: rank(s) [1] of 2 did "
                           "not finish (returned and waiting for them: [0])"), text[:300]
    assert "Stack of rank 1" in text and "hangs_on_one" in text  # where it was blocked


def test_rank_that_dies_is_reported_with_its_exit_code():
    text = _failing(dies, 2, timeout=60)
    assert text.startswith("rank 0 of 2 died without a result (exit code 3)")


def test_errors_are_graphpress_errors_and_init_from_env_needs_torchrun(monkeypatch):
    assert issubclass(DistributedError, GraphpressError)
    with pytest.raises(DistributedError, match="world_size must be at least 1"):
        launch(hangs_on_one, 0)
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    if not dist.is_initialized():
        with pytest.raises(DistributedError, match="torchrun"):
            init_from_env()
