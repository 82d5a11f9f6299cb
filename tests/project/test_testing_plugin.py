"""aiocoll.testing for users' own tests: the pytest plugin's fixtures, run_ranks stopping on the
first failure, real processes, the blocking-code helper and fault injection."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import pytest

import aiocoll
import aiocoll.sync
from aiocoll.testing import RankKilled, RanksFailed, faults, run_blocking_ranks, run_ranks

TRANSPORTS = ["inproc", "tcp"]


# --------------------------------------------------------------------------- the plugin
@pytest.mark.aiocoll(world_size=3)
async def test_the_plugins_fixture_runs_the_marked_number_of_ranks(aiocoll_ranks, aiocoll_world_size):
    # No import of the plugin here: pytest found it through the pytest11 entry point.
    assert aiocoll_world_size == 3
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal(5) for _ in range(3)]
    results = await aiocoll_ranks(lambda rank: aiocoll.all_reduce(xs[rank]))
    for r in results:
        np.testing.assert_allclose(r, xs[0] + xs[1] + xs[2], rtol=1e-12)
    assert len(await aiocoll_ranks(lambda rank: aiocoll.barrier(), world_size=2)) == 2


async def test_the_fixture_defaults_to_two_ranks(aiocoll_ranks):
    assert await aiocoll_ranks(lambda rank: asyncio.sleep(0, result=rank)) == [0, 1]


# --------------------------------------------------------------------------- run_ranks
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("others", ["hang", "wait_in_a_collective"])
async def test_the_first_failure_cancels_the_other_ranks_quietly(transport, others, caplog):
    async def body(rank: int) -> None:
        if rank == 2:
            raise ValueError("rank 2 is broken")
        if others == "hang":
            await asyncio.Event().wait()  # never ends: only cancelling it can
        else:
            await aiocoll.all_reduce(np.ones(4), timeout=60)

    caplog.set_level(logging.INFO, logger="aiocoll")
    async with asyncio.timeout(20):
        with pytest.raises(ValueError, match="rank 2 is broken"):
            await run_ranks(body, 4, transport=transport, timeout=60)
    noisy = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert noisy == []


async def test_return_exceptions_still_waits_for_every_rank():
    async def body(rank: int) -> int:
        if rank == 0:
            raise KeyError("zero")
        await asyncio.sleep(0.05)
        return rank

    results = await run_ranks(body, 3, return_exceptions=True)
    assert isinstance(results[0], KeyError) and results[1:] == [1, 2]


async def test_blocking_code_runs_as_ranks_on_threads():
    xs = [np.arange(6, dtype=np.int64) * (r + 1) for r in range(3)]
    results = await run_blocking_ranks(lambda rank: aiocoll.sync.all_reduce(xs[rank]), 3)
    for r in results:
        np.testing.assert_array_equal(r, np.arange(6) * 6)


# --------------------------------------------------------------------------- faults
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_killed_rank_is_named_by_every_survivor(transport):
    async def body(rank: int) -> str:
        if rank == 1:
            faults.kill()
        try:
            await aiocoll.all_reduce(np.ones(3), timeout=20)
        except aiocoll.PeerFailureError as exc:
            return f"{type(exc).__name__} {list(exc.ranks)}"
        return "completed"

    results = await run_ranks(body, 3, transport=transport, timeout=20)
    assert isinstance(results[1], RankKilled)
    assert results[0] == results[2] == "PeerFailureError [1]"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_cut_link_fails_the_collective_on_every_member(transport):
    async def body(rank: int) -> str:
        if rank == 0:
            faults.cut_link(1)
        try:
            await aiocoll.all_reduce(np.ones(3), timeout=20)
        except aiocoll.CollectiveError as exc:
            return type(exc).__name__
        return "completed"

    results = await run_ranks(body, 3, transport=transport, timeout=20)
    assert set(results) <= {"PeerFailureError", "RemoteAbortError"} and "completed" not in results, results


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_delayed_rank_slows_the_collective_but_not_its_result(transport):
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal(100) for _ in range(3)]

    async def body(rank: int) -> tuple[np.ndarray, float]:
        undo = faults.delay_sends(0.3) if rank == 1 else None
        t0 = time.perf_counter()
        y = await aiocoll.all_reduce(xs[rank], timeout=30)
        if undo is not None:
            undo()
        return y, time.perf_counter() - t0

    results = await run_ranks(body, 3, transport=transport, timeout=30)
    for y, took in results:
        np.testing.assert_allclose(y, xs[0] + xs[1] + xs[2], rtol=1e-12)
        assert took >= 0.29
    # and the delay is gone once undone
    assert (await run_ranks(lambda r: aiocoll.all_reduce(np.ones(2)), 2, transport=transport))[0].tolist() == [2, 2]


async def test_stop_refuses_in_the_shared_process_harness():
    async def body(rank: int) -> None:
        with pytest.raises(RuntimeError, match="run_processes"):
            faults.stop(0.1)

    await run_ranks(body, 2)


# --------------------------------------------------------------------------- processes
def stopped_rank_body(rank: int) -> list:
    """One process per rank: rank 1 freezes (SIGSTOP) for 0.5 s before the collective."""
    import aiocoll.sync

    if rank == 1:
        faults.stop(0.5)
    t0 = time.perf_counter()
    y = aiocoll.sync.all_reduce(np.array([rank + 1.0]))
    return [float(y[0]), time.perf_counter() - t0]


def failing_rank_body(rank: int) -> None:
    import aiocoll.sync

    if rank == 1:
        raise ValueError("boom in rank 1")
    aiocoll.sync.all_reduce(np.ones(1))


async def test_processes_fixture_runs_a_stopped_rank_to_the_right_result(aiocoll_processes):
    results = await aiocoll_processes(stopped_rank_body, 2, transport="tcp", timeout=30)
    assert [r[0] for r in results] == [3.0, 3.0]
    assert results[0][1] >= 0.4  # rank 0 waited for the frozen rank


async def test_a_failing_process_is_named_with_its_error():
    from aiocoll.testing import run_processes

    with pytest.raises(RanksFailed) as info:
        await run_processes(failing_rank_body, 2, transport="tcp", timeout=30)
    assert str(info.value).startswith("aiocoll run: rank 1 failed with exit code 1: ValueError: boom in rank 1")
    assert info.value.exit_code == 1
