"""aiocoll.sync: every collective and group function, blocking, from any thread; refused inside a
running event loop; sharing one world with the async API. In-process worlds (ranks as tasks of
the test's loop, each rank's blocking calls made from its own thread) for breadth, real
processes over TCP for the whole path."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import aiocoll
import aiocoll.sync as coll
from aiocoll.testing import run_ranks

from _reference import DTYPES, OPS, assert_reduced, data, in_thread, op_valid, reduce_ref

REPO = Path(__file__).resolve().parents[2]


async def sync_ranks(fn: Callable[[int], Any], world_size: int) -> list[Any]:
    """Run the blocking ``fn(rank)`` for every rank of an in-process world, each in a thread."""

    async def body(rank: int) -> Any:
        coll.bind()
        return await in_thread(fn, rank)

    return await run_ranks(body, world_size)


# --------------------------------------------------------------------------- collectives
VALID = [(d, op) for d in DTYPES for op in OPS if op_valid(op, d)]


@pytest.mark.parametrize("dtype_op", VALID, ids=[f"{np.dtype(d).name}-{op}" for d, op in VALID])
async def test_all_reduce_blocks_and_returns_the_reduction(dtype_op):
    dtype, op = dtype_op
    inputs = [data(r, (4, 3), dtype, op) for r in range(3)]
    results = await sync_ranks(lambda r: coll.all_reduce(inputs[r], op), 3)
    for y in results:
        assert_reduced(y, reduce_ref(op, inputs), 3)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.bool_, np.complex128, np.float16], ids=lambda d: np.dtype(d).name)
async def test_every_other_collective_blocking(world_size, dtype):
    w = world_size
    xs = [data(r, (2 * w, 3), dtype) for r in range(w)]
    op = "max" if np.dtype(dtype).kind != "c" else "sum"

    def body(rank: int) -> dict[str, Any]:
        x = xs[rank]
        out: dict[str, Any] = {
            "all_gather": coll.all_gather(x, dim=1),
            "reduce_scatter": coll.reduce_scatter(x, op),
            "all_to_all": coll.all_to_all(x),
            "broadcast": coll.broadcast(x, src=w - 1),
            "reduce": coll.reduce(x, dst=0, op=op),
            "gather": coll.gather(x, dst=1),
            "scatter": coll.scatter(x, src=0),
            "permute": coll.permute(x, [(m + 1) % w for m in range(w)]),
            "ar_coalesced": coll.all_reduce_coalesced([x, x[:1]], op),
            "ag_coalesced": coll.all_gather_coalesced([x, x[:1]]),
            "rs_coalesced": coll.reduce_scatter_coalesced([x, x], op, dims=[0, 0]),
        }
        coll.barrier()
        if rank == 0:
            coll.send(x, dst=1, tag=3)
        elif rank == 1:
            out["recv"] = coll.recv(np.empty_like(x), src=0, tag=3)
        out["objects"] = coll.all_gather_object({"rank": rank})
        out["bcast_object"] = coll.broadcast_object(["from", rank], src=0)
        return out

    results = await sync_ranks(body, w)
    full = reduce_ref(op, xs)
    chunk = full.shape[0] // w
    for r, out in enumerate(results):
        np.testing.assert_array_equal(out["all_gather"], np.concatenate(xs, axis=1))
        assert_reduced(out["reduce_scatter"], full[r * chunk : (r + 1) * chunk], w)
        np.testing.assert_array_equal(out["all_to_all"], np.concatenate([x[2 * r : 2 * r + 2] for x in xs]))
        np.testing.assert_array_equal(out["broadcast"], xs[w - 1])
        if r == 0:
            assert_reduced(out["reduce"], full, w)
        if r == 1:
            np.testing.assert_array_equal(out["gather"], np.concatenate(xs))
        else:
            assert out["gather"] is None
        np.testing.assert_array_equal(out["scatter"], xs[0][2 * r : 2 * r + 2])
        np.testing.assert_array_equal(out["permute"], xs[(r - 1) % w])
        assert_reduced(out["ar_coalesced"][0], full, w)
        assert_reduced(out["ar_coalesced"][1], full[:1], w)
        np.testing.assert_array_equal(out["ag_coalesced"][1], np.concatenate([x[:1] for x in xs]))
        assert_reduced(out["rs_coalesced"][1], full[r * chunk : (r + 1) * chunk], w)
        if r == 1:
            np.testing.assert_array_equal(out["recv"], xs[0])
        assert out["objects"] == [{"rank": p} for p in range(w)]
        assert out["bcast_object"] == ["from", 0]


async def test_torch_tensors_through_the_blocking_api():
    torch = pytest.importorskip("torch", reason="torch is an optional extra; the [test] set-up (.ci/run) installs the CPU build")
    xs = [torch.randn(5, generator=torch.Generator().manual_seed(r)).to(torch.bfloat16) for r in range(2)]
    results = await sync_ranks(lambda r: coll.all_reduce(xs[r], "max"), 2)
    for y in results:
        assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16
        assert torch.equal(y, torch.maximum(xs[0], xs[1]))


# --------------------------------------------------------------------------- threads and loops
async def test_calls_from_many_threads_of_one_rank_run_concurrently():
    """Two threads per rank, each on its own group: neither waits for the other's order."""
    w = 4

    async def body(rank: int) -> tuple[Any, Any]:
        coll.bind()
        evens = aiocoll.new_group([0, 2], tag="evens")
        odds = aiocoll.new_group([1, 3], tag="odds")
        mine = evens if rank % 2 == 0 else odds

        def many(g: Any) -> list[Any]:
            return [coll.all_reduce(np.full(3, rank * 10 + i), group=g) for i in range(20)]

        return await asyncio.gather(in_thread(many, mine), in_thread(many, None))

    results = await run_ranks(body, w)
    for rank, (sub, world) in enumerate(results):
        peers = [0, 2] if rank % 2 == 0 else [1, 3]
        for i in range(20):
            np.testing.assert_array_equal(sub[i], np.full(3, sum(p * 10 + i for p in peers)))
            np.testing.assert_array_equal(world[i], np.full(3, sum(p * 10 + i for p in range(w))))


async def test_blocking_call_inside_a_running_loop_points_to_the_async_api():
    async def body(rank: int) -> None:
        coll.bind()
        with pytest.raises(RuntimeError, match=r"await aiocoll\.all_reduce"):
            coll.all_reduce(np.zeros(2))
        with pytest.raises(RuntimeError, match=r"await aiocoll\.barrier"):
            coll.barrier()
        with pytest.raises(RuntimeError, match="running"):
            coll.run(asyncio.sleep(0))
        # nothing was sent: the world still works
        np.testing.assert_array_equal(await aiocoll.all_reduce(np.ones(2)), np.full(2, 2.0))

    await run_ranks(body, 2)


async def test_an_async_world_serves_blocking_calls_from_threads_without_bind():
    # init() records the loop that owns the world, so a worker thread's blocking call runs there
    async def body(rank: int) -> Any:
        return await in_thread(coll.all_reduce, np.array([rank + 1.0]))

    assert [float(r[0]) for r in await run_ranks(body, 2)] == [3.0, 3.0]


async def test_groups_made_by_either_api_serve_both():
    w = 4

    async def body(rank: int) -> tuple[Any, ...]:
        coll.bind()
        g_sync = await in_thread(coll.new_group, [0, 1, 2], tag="a")
        assert g_sync is aiocoll.find_group([2, 1, 0], tag="a")  # one registry
        mine, subs = await in_thread(coll.new_subgroups, 2, "pairs")
        assert mine is aiocoll.find_or_create_group(mine.ranks, "pairs")
        tag, ranks, size = await in_thread(coll.expand_group, [[0, 1], [2, 3]], "t")
        assert (tag, ranks, size) == ("t", [0, 1, 2, 3], 2)
        mesh = await in_thread(coll.init_device_mesh, (2, 2), ("dp", "tp"))
        a = b = None
        if rank < 3:
            a = await aiocoll.all_reduce(np.array([rank]), group=g_sync)  # async on a sync-made group
            b = await in_thread(coll.all_reduce, np.array([rank]), group=g_sync)
        c = await in_thread(coll.all_reduce, np.array([rank]), group=(mesh, "tp"))
        d = await in_thread(coll.all_reduce, np.array([rank]), group=mine)
        return a, b, c, d

    for rank, (a, b, c, d) in enumerate(await run_ranks(body, w)):
        if rank < 3:
            assert int(a[0]) == int(b[0]) == 3
        pair = [rank - rank % 2, rank - rank % 2 + 1]
        assert int(c[0]) == sum(pair) and int(d[0]) == sum(pair)


async def test_group_functions_need_no_thread_hop_inside_a_loop():
    async def body(rank: int) -> Any:
        g = coll.new_group([0, 1], tag="inside")  # never blocks, so allowed in a loop
        return g is aiocoll.find_group([0, 1], tag="inside")

    assert await run_ranks(body, 2) == [True, True]


def test_world_of_one_in_this_process_and_run_shares_it():
    with pytest.raises(aiocoll.NotInitializedError):
        coll.world()
    pg = coll.init()
    try:
        assert coll.world() is pg and pg.size == 1
        np.testing.assert_array_equal(coll.all_reduce(np.arange(3)), np.arange(3))
        with pytest.raises(RuntimeError, match="already initialised"):
            coll.init()
        g = coll.new_group([0], tag="solo")

        async def mixed() -> Any:
            assert aiocoll.world() is pg
            return await aiocoll.all_gather(np.arange(2), group=g)

        np.testing.assert_array_equal(coll.run(mixed()), np.arange(2))
        seen = []
        t = threading.Thread(target=lambda: seen.append(coll.broadcast(np.ones(2), src=0)))
        t.start()
        t.join()
        np.testing.assert_array_equal(seen[0], np.ones(2))
    finally:
        coll.destroy()
    coll.destroy()  # twice is fine
    with pytest.raises(aiocoll.NotInitializedError):
        coll.all_reduce(np.zeros(1))
    assert coll.init().size == 1  # and again
    coll.destroy()


def test_signatures_and_docs_follow_the_async_api():
    import inspect

    for name in ["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "recv", "permute"]:
        twin, orig = getattr(coll, name), getattr(aiocoll, name)
        assert inspect.signature(twin) == inspect.signature(orig)
        assert "Blocking" in twin.__doc__ and "Raises" in twin.__doc__
    assert set(coll.__all__) >= {
        "init", "destroy", "world", "all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast",
        "reduce", "gather", "scatter", "barrier", "send", "recv", "permute", "all_reduce_coalesced",
        "all_gather_coalesced", "reduce_scatter_coalesced", "new_group", "find_group", "find_or_create_group",
        "new_subgroups", "destroy_group", "expand_group", "init_device_mesh", "DeviceMesh",
    }


# --------------------------------------------------------------------------- real processes
SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, threading
    import numpy as np
    import aiocoll, aiocoll.sync as coll

    pg = coll.init()                       # from the launcher's environment
    r, w = pg.rank, pg.size
    x = np.arange(6, dtype=np.float64) + r
    assert np.array_equal(coll.all_reduce(x), sum(np.arange(6.0) + p for p in range(w)))
    assert np.array_equal(coll.all_gather(np.array([r])), np.arange(w))
    assert np.array_equal(coll.broadcast(np.array([r, r]), src=w - 1), [w - 1, w - 1])
    g = coll.new_group(list(range(0, w, 2)), tag="evens")

    async def mixed():               # the async API on the same world and group
        if r % 2 == 0:
            return await aiocoll.all_reduce(np.array([r]), group=g)
        return None
    got = coll.run(mixed())
    if r % 2 == 0:
        assert int(got[0]) == sum(range(0, w, 2)), got
    out = []                         # from another thread
    t = threading.Thread(target=lambda: out.append(coll.all_reduce(np.array([1]))))
    t.start(); t.join()
    assert int(out[0][0]) == w
    async def inside():
        coll.barrier()
    try:
        asyncio.run(inside())
    except RuntimeError as exc:
        assert "await aiocoll.barrier" in str(exc)
    else:
        raise AssertionError("a blocking call inside a running loop must raise")
    coll.destroy()
    print(f"rank {r} sync ok", flush=True)
    """
)


def launch(n: int, script: Path, transport: str = "tcp", timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("AIOCOLL_SECRET", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "aiocoll", "run", "-n", str(n), "--transport", transport, "--timeout", "60", str(script)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO,
    )


@pytest.mark.parametrize("transport, n", [("tcp", 2), ("tcp", 4), ("shm", 2)])
def test_blocking_api_across_processes(transport, n, tmp_path):
    script = tmp_path / "sync_script.py"
    script.write_text(SCRIPT)
    proc = launch(n, script, transport)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in range(n):
        assert f"rank {r} sync ok" in proc.stdout
