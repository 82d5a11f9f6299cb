"""A collective made of several steps claims every place it needs in its group's order (sequence
numbers, turns on the shared-memory engine) before its first await, so collectives started
concurrently meet the same partners on every member whatever the interleaving of tasks.

Each test forces an interleaving that differs between the members (one waits until the other's
frames are already there, or starts its tasks in another order) while both issue the same
collectives in the same order, as the contract allows, and checks every result against numpy.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import aiocoll
from aiocoll.collectives.codec import encode
from aiocoll.core.world import current_world
from aiocoll.testing import run_ranks

from _reference import data


async def _until_frames_from(peer: int, seqs: set[int], gid: int, timeout: float = 10.0) -> None:
    """Wait until frames of collectives ``seqs`` of group ``gid`` from ``peer`` sit in this rank's
    unexpected store, i.e. arrived before anything here asked for them."""
    comm = current_world().comm
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while {k[1][1] for k in comm._unexpected if k[0] == peer and k[1][0] == gid} < seqs:
        assert loop.time() < deadline, f"frames of steps {seqs} from rank {peer} never came"
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("transport", ["inproc", "tcp"])
async def test_broadcast_object_beside_a_broadcast_whose_frames_came_first(transport):
    """broadcast_object used to be two broadcasts with an await between them: on a member whose
    frames were already there, the first finished without yielding and the second took the
    concurrent broadcast's place, so each got the other's bytes."""
    obj = {"step": 7, "lr": 0.1}
    n = 1 + len(encode(obj))  # the object's payload, b"S" + encoding: the same size on the wire
    arr = (np.arange(n) % 50 + 100).astype(np.uint8)

    async def body(rank):
        g = aiocoll.world()
        await aiocoll.barrier()
        if rank == 1:
            await _until_frames_from(0, {g._seq, g._seq + 1}, g.gid)
        return await asyncio.gather(
            aiocoll.broadcast_object(obj if rank == 0 else None, 0),
            aiocoll.broadcast(arr if rank == 0 else np.zeros(n, np.uint8), 0),
        )

    for got_obj, got_arr in await run_ranks(body, 2, transport=transport, secret="s", timeout=10):
        assert got_obj == obj
        np.testing.assert_array_equal(got_arr, arr)


async def _until_done(seq: int, gid: int, timeout: float = 10.0) -> None:
    """Wait until this rank has no collective ``seq`` of group ``gid`` in flight."""
    comm = current_world().comm
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while any(op.gid == gid and op.seq == seq for op in comm._active):
        assert loop.time() < deadline, f"step {seq} never ended"
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("transport", ["inproc", "tcp"])
async def test_all_gather_object_beside_an_all_gather_started_after_its_first_step(transport):
    """all_gather_object used to be two all_gathers (sizes, then payloads): an all_gather called
    while it was on its first step took the second's place on that member only."""
    objs = [{"rank": r, "pad": "x" * (3 + r)} for r in range(2)]

    async def body(rank):
        g = aiocoll.world()
        mine = data(rank, (4,), np.float64)
        await aiocoll.barrier()
        first = g._seq
        objects = asyncio.create_task(aiocoll.all_gather_object(objs[rank]))
        if rank == 0:
            await asyncio.sleep(0)
            await _until_done(first, g.gid)
        arrays = asyncio.create_task(aiocoll.all_gather(mine))
        return await objects, await arrays

    for got_objs, got_arr in await run_ranks(body, 2, transport=transport, secret="s", timeout=10):
        assert got_objs == objs
        np.testing.assert_array_equal(got_arr, np.concatenate([data(r, (4,), np.float64) for r in range(2)]))


@pytest.fixture
def fastpath_on(monkeypatch):
    # Settings are read at init: with the variable unset, every world here has the engine on.
    monkeypatch.delenv("AIOCOLL_SHM_FASTPATH", raising=False)


@pytest.mark.parametrize("world_size", [2, 3])
async def test_engine_runs_collectives_in_the_order_they_claimed_their_steps(fastpath_on, world_size):
    """all_reduce_coalesced claims its step, then runs its all_reduce in a task; a plain
    all_reduce started meanwhile claims the next step. On rank 0 the coalesced one reaches the
    shared-memory engine first, elsewhere the plain one does. Both are float32 of one size, so
    an engine that ran them in arrival order would reduce one member's input with another's
    other input, silently."""
    n = 1000

    async def body(rank):
        a, c = data(rank, (n,), np.float32), data(rank, (n,), np.float32, seed=1)
        await aiocoll.all_reduce(np.ones(2, np.float32))  # the engine and its segment are set up
        coalesced = asyncio.create_task(aiocoll.all_reduce_coalesced([a]))
        if rank == 0:
            await asyncio.sleep(0)  # the coalesced one is in its task before the plain one starts
        plain = asyncio.create_task(aiocoll.all_reduce(c))
        return (await coalesced)[0], await plain

    results = await run_ranks(body, world_size, transport="shm", secret="s", timeout=10)
    want_a = np.sum([data(r, (n,), np.float32) for r in range(world_size)], axis=0, dtype=np.float64)
    want_c = np.sum([data(r, (n,), np.float32, seed=1) for r in range(world_size)], axis=0, dtype=np.float64)
    for got_a, got_c in results:
        np.testing.assert_allclose(got_a, want_a, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(got_c, want_c, rtol=1e-5, atol=1e-3)


async def test_reduce_scatter_coalesced_claims_every_step_before_a_concurrent_collective(fastpath_on):
    n = 64

    async def body(rank):
        xs = [data(rank, (2 * n,), np.float32, seed=s) for s in range(3)]
        c = data(rank, (n,), np.float32, seed=9)
        await aiocoll.all_reduce(np.ones(2, np.float32))
        many = asyncio.create_task(aiocoll.reduce_scatter_coalesced(xs))
        if rank == 1:
            await asyncio.sleep(0)
        plain = asyncio.create_task(aiocoll.all_reduce(c))
        return await many, await plain

    results = await run_ranks(body, 2, transport="shm", secret="s", timeout=10)
    for rank, (many, plain) in enumerate(results):
        for s, got in enumerate(many):
            full = data(0, (2 * n,), np.float32, seed=s) + data(1, (2 * n,), np.float32, seed=s)
            np.testing.assert_allclose(got, full[rank * n : (rank + 1) * n], rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(plain, data(0, (n,), np.float32, seed=9) + data(1, (n,), np.float32, seed=9),
                                   rtol=1e-5, atol=1e-3)
