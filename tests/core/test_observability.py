"""aiocoll.core.trace: a debug line per collective, each group's flight recorder attached to
every failure, and metrics a service can export."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import aiocoll
from aiocoll.core import trace
from aiocoll.testing import run_ranks

TRANSPORTS = ["inproc", "shm"]  # shm: same-host groups take the shared-memory engine


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_debug_logging_says_group_step_op_bytes_and_time(transport, caplog):
    caplog.set_level(logging.DEBUG, logger="aiocoll.trace")

    async def body(rank: int) -> None:
        for n in (10, 1000):
            await aiocoll.all_reduce(np.ones(n, np.float32))

    await run_ranks(body, 2, transport=transport)
    lines = [r.getMessage() for r in caplog.records if r.name == "aiocoll.trace"]
    for rank in (0, 1):
        mine = [line for line in lines if line.startswith(f"rank {rank}: group 'world' ") and "all_reduce" in line]
        assert [line.split(" step ")[1].split(" ok in ")[0] for line in mine] == [
            "0 all_reduce 40 B", "1 all_reduce 4000 B"
        ], lines
        assert all(line.endswith(" ms") for line in mine)


def test_aiocoll_debug_switches_the_log_on_by_itself():
    code = textwrap.dedent(
        """
        import asyncio, numpy as np, aiocoll
        from aiocoll.testing import run_ranks
        asyncio.run(run_ranks(lambda r: aiocoll.all_reduce(np.ones(4)), 2))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("AIOCOLL_DEBUG", "AIOCOLL_FLIGHT_RECORDER")}
    quiet = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    loud = subprocess.run([sys.executable, "-c", code], env={**env, "AIOCOLL_DEBUG": "1"},
                          capture_output=True, text=True, timeout=120)
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    assert "all_reduce" not in quiet.stderr
    for rank in (0, 1):
        assert f"rank {rank}: group 'world' step 0 all_reduce 32 B ok in" in loud.stderr, loud.stderr


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_mismatch_carries_the_groups_last_collectives(transport):
    async def body(rank: int) -> BaseException:
        for _ in range(3):
            await aiocoll.all_reduce(np.ones(8, np.float64))
        bad = np.ones(8, np.float32 if rank == 0 else np.float64)
        try:
            await aiocoll.all_reduce(bad, timeout=20)
        except aiocoll.MismatchError as exc:
            return exc
        raise AssertionError("no mismatch")

    for rank, exc in enumerate(await run_ranks(body, 3, transport=transport, timeout=20)):
        record = exc.flight_record
        assert [(r.seq, r.op, r.outcome) for r in record] == [
            (0, "all_reduce", "ok"), (1, "all_reduce", "ok"), (2, "all_reduce", "ok"), (3, "all_reduce", "MismatchError"),
        ]
        assert all(r.rank == rank and r.group == "world" and r.duration_s is not None for r in record)
        (note,) = exc.__notes__
        assert note.startswith(f"last 4 collectives of group 'world' on rank {rank}")
        assert " step 2 all_reduce 64 B ok in " in note and " step 3 all_reduce " in note
        assert "flight" not in str(exc)  # the message itself is unchanged


async def test_a_timeout_carries_the_flight_record_too():
    async def body(rank: int) -> BaseException | None:
        await aiocoll.barrier()
        if rank == 1:
            await asyncio.sleep(3.0)  # misses the next collective (its leave()'s barrier comes late)
            return None
        try:
            await aiocoll.all_reduce(np.zeros(3), timeout=0.5)
        except aiocoll.CollectiveTimeoutError as exc:
            return exc
        raise AssertionError("no timeout")

    exc = (await run_ranks(body, 2))[0]
    assert [(r.seq, r.op, r.outcome) for r in exc.flight_record] == [(0, "barrier", "ok"), (1, "all_reduce", "CollectiveTimeoutError")]
    assert "did not complete within 0.5 s" in exc.flight_record[-1].error


async def test_the_flight_recorder_keeps_the_last_n():
    async def body(rank: int) -> int:
        for _ in range(trace.DEFAULT_FLIGHT_RECORDER + 5):
            await aiocoll.barrier()
        kept = trace.flight_record(aiocoll.world())
        assert [r.seq for r in kept] == list(range(5, trace.DEFAULT_FLIGHT_RECORDER + 5))
        return len(kept)

    assert await run_ranks(body, 2) == [trace.DEFAULT_FLIGHT_RECORDER] * 2


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_metrics_count_calls_bytes_and_latency_and_a_hook_sees_each(transport):
    trace.metrics.reset()
    seen: list[trace.Record] = []
    trace.add_hook(seen.append)
    try:
        async def body(rank: int) -> None:
            for _ in range(5):
                await aiocoll.all_reduce(np.full(1000, rank, np.float64))
            await aiocoll.all_gather(np.ones(4, np.int32))

        await run_ranks(body, 2, transport=transport)
    finally:
        trace.remove_hook(seen.append)
    snap = trace.metrics.snapshot()
    ar = snap["all_reduce"]
    assert (ar["count"], ar["errors"], ar["bytes"]) == (10, 0, 10 * 8000)
    assert ar["latency"][-1][1] == 10 and ar["seconds"] > 0
    counts = [n for _, n in ar["latency"]]
    assert counts == sorted(counts)  # cumulative
    assert snap["all_gather"]["count"] == 2
    assert snap["barrier"]["count"] == 2  # the one destroy() makes on each rank
    assert sorted((r.rank, r.op) for r in seen if r.op != "barrier") == sorted([(0, "all_reduce")] * 5 + [(1, "all_reduce")] * 5
                                                          + [(0, "all_gather"), (1, "all_gather")])


async def test_a_failing_hook_is_logged_and_does_not_fail_the_collective(caplog):
    def bad(record: trace.Record) -> None:
        raise RuntimeError("exporter down")

    trace.add_hook(bad)
    try:
        results = await run_ranks(lambda r: aiocoll.all_reduce(np.ones(2)), 2)
    finally:
        trace.remove_hook(bad)
    assert [r.tolist() for r in results] == [[2.0, 2.0]] * 2
    assert any("metrics hook" in r.getMessage() for r in caplog.records)
