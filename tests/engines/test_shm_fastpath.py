"""The same-host fast path (aiocoll.engines.shm.engine) against numpy, and how it fails.

Ranks run as tasks of one process over the shm transport (their engines share memory exactly
as separate processes would). Small parts (4 KiB) make even small arrays take many pipelined
rounds, wrap around the buffer slots, and split unevenly between ranks.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

import aiocoll
from aiocoll.engines import select as _fastpath
from aiocoll.engines.shm.engine import ShmEngine
from aiocoll.core.world import current_world
from aiocoll.testing import run_ranks

from _reference import DTYPES, OPS, assert_reduced, data, op_valid, reduce_ref


@pytest.fixture(autouse=True)
def _small_parts(monkeypatch):
    monkeypatch.setenv("AIOCOLL_SHM_PART_BYTES", "4096")
    monkeypatch.setenv("AIOCOLL_SHM_DIRECT_MAX", "256")
    monkeypatch.delenv("AIOCOLL_SHM_FASTPATH", raising=False)
    monkeypatch.delenv("AIOCOLL_SHM_THREAD_MIN", raising=False)


async def shm_ranks(body, world_size, **kwargs):
    return await run_ranks(body, world_size, transport="shm", secret="s", **kwargs)


def engine_of(group=None) -> ShmEngine | None:
    g = group if group is not None else aiocoll.world()
    engine = _fastpath.engine_for(g, "all_reduce", 1 << 20)
    return engine if isinstance(engine, ShmEngine) else None


VALID = [(d, op) for d in DTYPES for op in OPS if op_valid(op, d)]
COUNTS = [1, 7, 64, 1000, 4099]  # direct (<= 256 B) and pipelined, over several rounds, uneven


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("dtype_op", VALID, ids=[f"{np.dtype(d).name}-{op}" for d, op in VALID])
async def test_all_reduce_matches_numpy(world_size, dtype_op):
    dtype, op = dtype_op

    async def body(rank):
        assert isinstance(engine_of(), ShmEngine)
        out = []
        for count in COUNTS:
            inputs = [data(r, (count,), dtype, op) for r in range(world_size)]
            x = inputs[rank]
            before = x.copy()
            out.append((inputs, await aiocoll.all_reduce(x, op)))
            np.testing.assert_array_equal(x, before)
        return out

    results = await shm_ranks(body, world_size)
    for i, _ in enumerate(COUNTS):
        inputs = results[0][i][0]
        want = reduce_ref(dtype_op[1], inputs)
        for rank_results in results:
            assert_reduced(rank_results[i][1], want, world_size)
            np.testing.assert_array_equal(rank_results[i][1], results[0][i][1])  # same bits everywhere


@pytest.mark.parametrize("world_size", [2, 4])
async def test_all_reduce_into_its_own_input(world_size):
    async def body(rank):
        out = []
        for count in (3, 5000):
            x = np.arange(count, dtype=np.int64) * (rank + 1)
            y = await aiocoll.all_reduce(x, out=x)
            assert y is x
            out.append(x.copy())
        return out

    total = sum(range(1, world_size + 1))
    for res in await shm_ranks(body, world_size):
        np.testing.assert_array_equal(res[0], np.arange(3) * total)
        np.testing.assert_array_equal(res[1], np.arange(5000) * total)


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.complex128, np.bool_, np.longdouble])
async def test_all_gather_matches_numpy(world_size, dtype):
    shapes = [(1,), (5, 3), (2000,), (3, 1001)]

    async def body(rank):
        got = []
        for shape in shapes:
            got.append(await aiocoll.all_gather(data(rank, shape, dtype)))
        got.append(await aiocoll.all_gather(data(rank, (4, 6), dtype), dim=1))
        return got

    for res in await shm_ranks(body, world_size):
        for shape, y in zip(shapes, res):
            np.testing.assert_array_equal(y, np.concatenate([data(r, shape, dtype) for r in range(world_size)]))
        np.testing.assert_array_equal(res[-1], np.concatenate([data(r, (4, 6), dtype) for r in range(world_size)], axis=1))


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("dtype_op", [(np.float64, "sum"), (np.int32, "max"), (np.uint8, "bxor"),
                                      (np.float32, "avg"), (np.complex64, "product"), (np.bool_, "sum")],
                         ids=lambda v: f"{np.dtype(v[0]).name}-{v[1]}")
async def test_reduce_scatter_matches_numpy(world_size, dtype_op):
    dtype, op = dtype_op
    rows = [1, 7, 1500]

    async def body(rank):
        got = []
        for r_ in rows:
            got.append(await aiocoll.reduce_scatter(data(rank, (world_size * r_, 3), dtype, op), op))
        got.append(await aiocoll.reduce_scatter(data(rank, (2, world_size * 5), dtype, op), op, dim=1))
        return got

    results = await shm_ranks(body, world_size)
    for rank, res in enumerate(results):
        for r_, y in zip(rows, res):
            full = reduce_ref(op, [data(p, (world_size * r_, 3), dtype, op) for p in range(world_size)])
            assert_reduced(y, full[rank * r_ : (rank + 1) * r_], world_size)
        full = reduce_ref(op, [data(p, (2, world_size * 5), dtype, op) for p in range(world_size)])
        assert_reduced(res[-1], full[:, rank * 5 : (rank + 1) * 5], world_size)


@pytest.mark.parametrize("world_size", [2, 3])
async def test_broadcast_from_every_root(world_size):
    shapes = [(1,), (999,), (50, 41)]

    async def body(rank):
        got = []
        for root in range(world_size):
            for shape in shapes:
                got.append(await aiocoll.broadcast(data(rank, shape, np.float64), root))
        return got

    for res in await shm_ranks(body, world_size):
        i = 0
        for root in range(world_size):
            for shape in shapes:
                np.testing.assert_array_equal(res[i], data(root, shape, np.float64))
                i += 1


async def test_many_collectives_in_flight_on_one_group_run_in_call_order():
    async def body(rank):
        xs = [np.full(n, rank + i, np.int64) for i, n in enumerate([3, 3000, 10, 7000, 1])]
        return await asyncio.gather(*(aiocoll.all_reduce(x) for x in xs), aiocoll.all_gather(np.array([rank])))

    for res in await shm_ranks(body, 3):
        for i, n in enumerate([3, 3000, 10, 7000, 1]):
            np.testing.assert_array_equal(res[i], np.full(n, sum(r + i for r in range(3))))
        np.testing.assert_array_equal(res[-1], [0, 1, 2])


async def test_subgroups_get_engines_of_their_own_and_run_concurrently():
    async def body(rank):
        mine, _ = aiocoll.new_subgroups(2)
        world_engine, sub_engine = engine_of(), engine_of(mine)
        assert world_engine is not sub_engine and isinstance(sub_engine, ShmEngine)
        a, b = await asyncio.gather(
            aiocoll.all_reduce(np.full(5000, rank, np.int64), group=mine),
            aiocoll.all_reduce(np.full(5000, rank, np.int64)),
        )
        return a[0], b[0]

    results = await shm_ranks(body, 4)
    assert [r[0] for r in results] == [1, 1, 5, 5]
    assert all(r[1] == 6 for r in results)


async def test_worker_thread_driver_gives_the_same_results(monkeypatch):
    monkeypatch.setenv("AIOCOLL_SHM_THREAD_MIN", "1")

    async def body(rank):
        assert engine_of().thread_min == 1
        x = data(rank, (20_001,), np.float64)
        return (await aiocoll.all_reduce(x), await aiocoll.all_gather(x[:777]),
                await aiocoll.reduce_scatter(x[:20_001 - 20_001 % 3]), await aiocoll.broadcast(x, 2))

    results = await shm_ranks(body, 3)
    inputs = [data(r, (20_001,), np.float64) for r in range(3)]
    for rank, (ar, ag, rs, bc) in enumerate(results):
        assert_reduced(ar, reduce_ref("sum", inputs), 3)
        np.testing.assert_array_equal(ag, np.concatenate([x[:777] for x in inputs]))
        n = (20_001 - 20_001 % 3) // 3
        assert_reduced(rs, reduce_ref("sum", [x[: 3 * n] for x in inputs])[rank * n : (rank + 1) * n], 3)
        np.testing.assert_array_equal(bc, inputs[2])


async def test_the_engine_can_be_turned_off_and_sized_per_world(monkeypatch):
    async def engines(rank):
        w = aiocoll.world()
        return [type(_fastpath.engine_for(w, "all_reduce", n)).__name__ for n in (1000, 1024)]

    assert await shm_ranks(engines, 2) == [["ShmEngine", "ShmEngine"]] * 2
    off = aiocoll.Settings(shm_engine=False)
    assert await shm_ranks(engines, 2, settings=off) == [["MessageEngine", "MessageEngine"]] * 2
    sized = aiocoll.Settings(shm_engine_min_bytes={"all_reduce": 1024})
    assert await shm_ranks(engines, 2, settings=sized) == [["MessageEngine", "ShmEngine"]] * 2
    monkeypatch.setenv("AIOCOLL_SHM_FASTPATH_MIN_ALL_REDUCE", "1024")  # the same, from the environment
    assert await shm_ranks(engines, 2) == [["MessageEngine", "ShmEngine"]] * 2
    with pytest.raises(ValueError, match="runs no 'all_to_all'"):
        aiocoll.Settings(shm_engine_min_bytes={"all_to_all": 1})


async def test_no_fast_path_over_inproc_links():
    async def body(rank):
        return engine_of()

    assert await run_ranks(body, 2) == [None, None]


# --------------------------------------------------------------------------- failures
@pytest.mark.parametrize(
    "odd",
    [
        lambda: aiocoll.all_reduce(np.ones(4, np.float64)),  # dtype
        lambda: aiocoll.all_reduce(np.ones(5, np.float32)),  # count
        lambda: aiocoll.all_reduce(np.ones(4, np.float32), "max"),  # op
        lambda: aiocoll.all_gather(np.ones(4, np.float32)),  # another collective
        lambda: aiocoll.all_reduce(np.ones(5000, np.float32)),  # another algorithm
    ],
    ids=["dtype", "count", "op", "collective", "algorithm"],
)
async def test_mismatches_raise_on_every_rank_and_name_the_odd_one(odd):
    async def body(rank):
        await aiocoll.all_reduce(np.ones(4, np.float32))  # the segment is set up and working
        if rank == 2:
            return await odd()
        return await aiocoll.all_reduce(np.ones(4, np.float32))

    results = await shm_ranks(body, 3, timeout=10.0, return_exceptions=True)
    for r in results:
        assert isinstance(r, aiocoll.CollectiveError) and not isinstance(r, aiocoll.CollectiveTimeoutError), r
    assert any(isinstance(r, aiocoll.MismatchError) and 2 in r.ranks for r in results), results


async def test_a_missing_rank_times_out_on_the_others_naming_it():
    async def body(rank):
        await aiocoll.all_reduce(np.ones(4, np.float32))
        if rank == 1:
            await asyncio.sleep(1.0)
            return None
        with pytest.raises(aiocoll.CollectiveTimeoutError) as info:
            await aiocoll.all_reduce(np.ones(3000, np.float32), timeout=0.3)
        assert info.value.ranks == (1,), info.value
        assert "ranks [1] had not arrived" in str(info.value)
        with pytest.raises(aiocoll.GroupBrokenError):
            await aiocoll.all_reduce(np.ones(4, np.float32))
        return "timed out"

    results = await shm_ranks(body, 3, return_exceptions=True)
    assert results[0] == results[2] == "timed out"


async def test_a_timeout_during_setup_names_the_ranks_not_heard_from():
    async def body(rank):
        if rank == 2:
            await asyncio.sleep(0.8)
            return None
        with pytest.raises(aiocoll.CollectiveTimeoutError) as info:
            await aiocoll.all_reduce(np.ones(4, np.float32), timeout=0.3)
        return info.value.ranks

    results = await shm_ranks(body, 3, return_exceptions=True)
    assert results[0] == (2,)  # rank 0 waited for rank 2's "attached"


@pytest.mark.parametrize("thread_min", ["1", str(1 << 62)], ids=["thread", "loop"])
async def test_cancelling_one_rank_aborts_the_others_and_breaks_the_group(monkeypatch, thread_min):
    monkeypatch.setenv("AIOCOLL_SHM_THREAD_MIN", thread_min)

    async def body(rank):
        await aiocoll.all_reduce(np.ones(4, np.float32))
        if rank == 0:
            task = asyncio.ensure_future(aiocoll.all_reduce(np.ones(50_000, np.float32), timeout=20))
            await asyncio.sleep(0.2)  # the others are waiting in the engine for rank 0's... no: rank 0 waits
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            await asyncio.sleep(0.05)
            if rank == 1:
                await asyncio.sleep(5)  # never arrives in time: rank 0 and 2 wait for it
                return "slept"
            with pytest.raises(aiocoll.RemoteAbortError):
                await aiocoll.all_reduce(np.ones(50_000, np.float32), timeout=20)
        with pytest.raises(aiocoll.GroupBrokenError):
            await aiocoll.all_reduce(np.ones(4, np.float32))
        return "broken"

    results = await shm_ranks(body, 3, return_exceptions=True)
    assert results[0] == "broken" and results[2] == "broken", results


async def test_a_dead_peer_fails_the_collective_instead_of_hanging():
    async def body(rank):
        await aiocoll.all_reduce(np.ones(4, np.float32))
        if rank == 1:
            current_world().comm.abort()  # as if the process died: its links break
            return "dead"
        with pytest.raises(aiocoll.PeerFailureError) as info:
            await aiocoll.all_reduce(np.ones(30_000, np.float32), timeout=20)
        assert 1 in info.value.ranks
        return "failed"

    results = await shm_ranks(body, 3, return_exceptions=True)
    assert results == ["failed", "dead", "failed"], results


async def test_engines_and_their_threads_end_with_the_world(monkeypatch):
    monkeypatch.setenv("AIOCOLL_SHM_THREAD_MIN", "1")
    engines = []

    async def body(rank):
        await aiocoll.all_reduce(np.ones(10_000, np.float32))
        engines.append(engine_of())
        return None

    await shm_ranks(body, 2)
    assert all(e.closed for e in engines)
    assert not [t for t in threading.enumerate() if t.name.startswith("aiocoll-shm")]


async def test_torch_bfloat16_through_the_fast_path():
    torch = pytest.importorskip("torch", reason="torch is an optional extra; the [test] set-up (.ci/run) installs the CPU build")

    async def body(rank):
        x = torch.full((3000,), 0.5 + rank, dtype=torch.bfloat16)
        return await aiocoll.all_reduce(x)

    for y in await shm_ranks(body, 2):
        assert y.dtype == torch.bfloat16 and torch.all(y == 2.0)


async def test_auto_links_ranks_of_one_host_by_shm_and_the_rest_by_tcp(monkeypatch):
    pytest.importorskip("aiocoll.transports.tcp", reason="the tcp transport ships with aiocoll; runs everywhere")
    from aiocoll.core import world as _world

    def fake_host_key() -> str:
        # ranks 0 and 1 share a host, rank 2 lives elsewhere (the harness names its tasks)
        rank = int(asyncio.current_task().get_name().rsplit("-", 1)[1])
        return "host-a" if rank < 2 else "host-b"

    monkeypatch.setattr(_world, "host_key", fake_host_key)

    async def body(rank):
        links = dict(current_world().transport_names)
        pair = aiocoll.new_group([0, 1])
        whole = engine_of()
        sub = engine_of(pair) if rank < 2 else None
        y = await aiocoll.all_reduce(np.full(5000, rank, np.int64))  # mixed links, message path
        z = await aiocoll.all_reduce(np.full(5000, rank, np.int64), group=pair) if rank < 2 else None
        return links, whole, sub, y, z

    results = await run_ranks(body, 3, transport="auto", secret="s")
    assert results[0][0] == {1: "shm", 2: "tcp"}
    assert results[1][0] == {0: "shm", 2: "tcp"}
    assert results[2][0] == {0: "tcp", 1: "tcp"}
    for rank, (_, whole, sub, y, z) in enumerate(results):
        assert whole is None  # rank 2 is on another host: no shared segment for the world
        assert (sub is not None) == (rank < 2)
        np.testing.assert_array_equal(y, np.full(5000, 3))
        if rank < 2:
            np.testing.assert_array_equal(z, np.full(5000, 1))


async def test_empty_arrays_go_through_every_fast_collective():
    async def body(rank):
        e = np.empty((0, 3), np.float32)
        return (await aiocoll.all_reduce(e), await aiocoll.all_gather(e), await aiocoll.reduce_scatter(e),
                await aiocoll.broadcast(e, 1), await aiocoll.all_reduce(np.ones(3, np.float32)))

    for ar, ag, rs, bc, after in await shm_ranks(body, 3):
        assert ar.shape == (0, 3) and ag.shape == (0, 3) and rs.shape == (0, 3) and bc.shape == (0, 3)
        np.testing.assert_array_equal(after, [3, 3, 3])  # and the group still works
