"""Failures raise on every member, naming who is at fault; nothing hangs (inproc ranks)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import aiocoll
from aiocoll.core.world import current_world
from aiocoll.testing import run_ranks


async def test_different_ops_raise_mismatch_on_every_rank():
    async def body(rank):
        return await aiocoll.all_reduce(np.ones(4, np.float32), "sum" if rank != 1 else "max")

    results = await run_ranks(body, 3, return_exceptions=True)
    for r in results:
        assert isinstance(r, aiocoll.MismatchError), r
    assert any(1 in r.ranks for r in results)


@pytest.mark.parametrize(
    "odd",
    [
        lambda: aiocoll.all_reduce(np.ones(4, np.float64)),  # dtype
        lambda: aiocoll.all_reduce(np.ones(5, np.float32)),  # count
        lambda: aiocoll.all_gather(np.ones(4, np.float32)),  # another collective
    ],
    ids=["dtype", "count", "collective"],
)
async def test_mismatch_kinds(odd):
    async def body(rank):
        if rank == 2:
            return await odd()
        return await aiocoll.all_reduce(np.ones(4, np.float32))

    results = await run_ranks(body, 3, return_exceptions=True)
    assert all(isinstance(r, aiocoll.MismatchError) for r in results), results
    # no rank got a result, and the group refuses further work at once
    async def again(rank):
        await aiocoll.all_reduce(np.ones(1))


async def test_timeout_names_the_missing_rank():
    async def body(rank):
        if rank == 2:
            await asyncio.sleep(0.6)  # never calls the collective
            return "absent"
        return await aiocoll.all_reduce(np.ones(3), timeout=0.3)

    results = await run_ranks(body, 3, return_exceptions=True)
    for r in results[:2]:
        assert isinstance(r, aiocoll.CollectiveTimeoutError), r
        assert 2 in r.ranks
        assert r.group == "world" and r.op == "all_reduce" and r.seq == 0
    assert results[2] == "absent"


async def test_cancellation_aborts_everyone_and_breaks_the_group():
    async def body(rank):
        g = aiocoll.new_group([0, 1, 2])
        if rank == 0:
            task = asyncio.create_task(aiocoll.all_reduce(np.ones(3), group=g))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        elif rank == 1:
            with pytest.raises(aiocoll.RemoteAbortError, match="cancelled"):
                await aiocoll.all_reduce(np.ones(3), group=g)
        else:
            await asyncio.sleep(0.2)  # joins late: the abort is already there
            with pytest.raises((aiocoll.GroupBrokenError, aiocoll.RemoteAbortError)):
                await aiocoll.all_reduce(np.ones(3), group=g)
        with pytest.raises(aiocoll.GroupBrokenError):
            await aiocoll.all_reduce(np.ones(3), group=g)
        # other groups (the world) are untouched
        return await aiocoll.all_reduce(np.array([rank]))

    results = await run_ranks(body, 3)
    assert [int(r[0]) for r in results] == [3, 3, 3]


async def test_dead_peer_is_named_on_every_survivor():
    async def body(rank):
        if rank == 1:
            await asyncio.sleep(0.05)
            current_world().comm.abort()  # as if killed: connections drop
            raise RuntimeError("rank 1 died")
        return await aiocoll.all_reduce(np.ones(3), timeout=10)

    results = await run_ranks(body, 4, return_exceptions=True)
    for rank, r in enumerate(results):
        if rank != 1:
            assert isinstance(r, aiocoll.PeerFailureError), r
            assert r.ranks == (1,)


async def test_no_task_left_behind_after_failures():
    before = len(asyncio.all_tasks())

    async def body(rank):
        return await aiocoll.all_reduce(np.ones(2), "sum" if rank else "max")

    await run_ranks(body, 3, return_exceptions=True)
    await asyncio.sleep(0.05)
    assert len(asyncio.all_tasks()) == before


@pytest.mark.parametrize("order", ["world_first", "sub_first"])
async def test_concurrent_collectives_on_overlapping_groups(order):
    async def body(rank):
        a = aiocoll.new_group([0, 1, 2])
        b = aiocoll.new_group([1, 2, 3])
        calls = []
        x = np.arange(5, dtype=np.int64) + rank
        if rank in a.ranks:
            calls.append(("a", aiocoll.all_reduce(x, group=a)))
        if rank in b.ranks:
            calls.append(("b", aiocoll.all_gather(x, group=b)))
        calls.append(("w", aiocoll.all_reduce(x, "max")))
        calls.append(("w2", aiocoll.broadcast(x, src=3)))
        if order == "sub_first":
            pass
        else:
            calls.reverse()
        # many in flight at once; each group's order is the same on all its members
        names = [n for n, _ in calls]
        outs = await asyncio.gather(*(c for _, c in calls))
        return dict(zip(names, outs))

    # within a group, issue order must match on every member: keep "w" before "w2" everywhere
    async def ordered(rank):
        return await body(rank)

    results = await run_ranks(ordered, 4, return_exceptions=True)
    base = np.arange(5, dtype=np.int64)
    for rank, r in enumerate(results):
        if isinstance(r, Exception):
            # reversing puts w2 before w on every rank alike, which is still a consistent order
            raise r
        if "a" in r:
            np.testing.assert_array_equal(r["a"], 3 * base + 3)
        if "b" in r:
            np.testing.assert_array_equal(r["b"], np.concatenate([base + 1, base + 2, base + 3]))
        np.testing.assert_array_equal(r["w"], base + 3)
        np.testing.assert_array_equal(r["w2"], base + 3)


async def test_many_collectives_in_flight_on_one_group():
    async def body(rank):
        xs = [np.full(7, rank * 10 + i, np.int32) for i in range(20)]
        return await asyncio.gather(*(aiocoll.all_reduce(x) for x in xs))

    results = await run_ranks(body, 5)
    for outs in results:
        for i, y in enumerate(outs):
            np.testing.assert_array_equal(y, np.full(7, sum(r * 10 + i for r in range(5)), np.int32))


async def test_bad_inputs_fail_fast_on_the_calling_rank():
    async def body(rank):
        with pytest.raises(ValueError, match="unknown reduce op"):
            await aiocoll.all_reduce(np.ones(2), "median")
        with pytest.raises(ValueError, match="bitwise"):
            await aiocoll.all_reduce(np.ones(2), "bxor")
        with pytest.raises(ValueError, match="src=7 is out of range"):
            await aiocoll.broadcast(np.ones(2), 7)
        with pytest.raises(ValueError, match="dst=-1 is out of range"):
            await aiocoll.reduce(np.ones(2), -1)
        with pytest.raises(ValueError, match="add up"):
            await aiocoll.all_to_all(np.ones(4), input_split_sizes=[1, 1], output_split_sizes=[2, 2])
        with pytest.raises(ValueError, match="entries"):
            await aiocoll.all_to_all(np.ones(4), input_split_sizes=[4], output_split_sizes=[2, 2])
        with pytest.raises(ValueError, match="not divisible"):
            await aiocoll.reduce_scatter(np.ones(3))
        with pytest.raises(ValueError, match="not a member"):
            await aiocoll.all_reduce(np.ones(2), group=aiocoll.new_group([1 - rank]))
        with pytest.raises(ValueError, match="permutation"):
            await aiocoll.permute(np.ones(2), [0, 0])
        with pytest.raises(ValueError, match="tag"):
            await aiocoll.send(np.ones(2), 1 - rank, tag=-1)
        with pytest.raises(ValueError, match="timeout"):
            await aiocoll.barrier(timeout=0)
        with pytest.raises(TypeError, match="not supported"):
            await aiocoll.all_reduce(np.array(["a", "b"]))
        with pytest.raises(TypeError, match="buffer protocol"):
            await aiocoll.all_reduce(object())
        # none of it touched the wire: the world still works
        return await aiocoll.all_reduce(np.array([rank + 1]))

    results = await run_ranks(body, 2)
    assert [int(r[0]) for r in results] == [3, 3]
