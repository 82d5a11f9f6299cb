"""Groups release what they hold: ``destroy_group``, and untagged groups nobody references.

A same-host group holds a shared segment, a doorbell and perhaps a thread. The processes
tests make and drop thousands of groups over shm (ranks started without the launcher) and count
what the process holds before and after: descriptors, shared mappings and the resident shared
memory of group segments. The in-process tests pin down what ``destroy_group`` means.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import socket
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import numpy as np
import pytest

import aiocoll
from aiocoll.testing import run_ranks

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="shm and /proc need Linux")

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(aiocoll.__file__)))

# --------------------------------------------------------------------------- real processes
CYCLES_SCRIPT = textwrap.dedent(
    """
    import asyncio, gc, json, os, sys
    import numpy as np
    import aiocoll

    def fds():
        return len(os.listdir("/proc/self/fd"))

    def shared():
        # (number of shared-memory mappings, kB resident in group segments, kB resident in all)
        maps = group_kb = total_kb = 0
        current = None
        with open("/proc/self/smaps") as f:
            for line in f:
                if "memfd:" in line or "/dev/shm/" in line:
                    maps += 1
                    current = "group" if "aiocoll-g" in line else "other"
                elif current and line.startswith("Rss:"):
                    kb = int(line.split()[1])
                    total_kb += kb
                    group_kb += kb if current == "group" else 0
                    current = None
        return maps, group_kb, total_kb

    def sample():
        return dict(zip(("fds", "maps", "group_kb", "shm_kb"), (fds(), *shared())))

    async def main():
        rank, size, port, cycles, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
        await aiocoll.init(rank=rank, world_size=size, store=f"tcp://127.0.0.1:{port}", transport="shm",
                           timeout=60, secret="lifetime-test")
        expect = size * (size + 1) // 2
        small, big = np.full(100, rank + 1, np.float32), np.full(1 << 18, rank + 1, np.float32)
        y = await aiocoll.all_reduce(big)  # the world's segment is made (and touched) before we count
        before = sample()
        await aiocoll.barrier()  # nobody passes us the first group's segment before we have counted
        peak = dict(before)
        for i in range(cycles):
            g = aiocoll.new_group(range(size), tag=f"t{i % 7}" if mode == "tagged" else None)
            x = big if i % 50 == 0 else small  # now and then a pipelined one, touching more pages
            y = await aiocoll.all_reduce(x, group=g)
            assert y[0] == expect and y[-1] == expect, (i, y[:3])
            if mode in ("destroy", "tagged"):
                aiocoll.destroy_group(g)
            del g
            if i % 100 == 0:
                now = sample()
                peak = {k: max(peak[k], now[k]) for k in peak}
        await asyncio.sleep(0.01)  # the last group's engine closes on the loop's next turn
        gc.collect()
        after = sample()
        print("RESULT " + json.dumps({"rank": rank, "before": before, "after": after, "peak": peak}), flush=True)
        await aiocoll.destroy()

    def sync_main():
        # The blocking API: groups are dropped in this thread while the engines live on the
        # background loop, so they are released from another thread than theirs.
        import aiocoll.sync as coll
        rank, size, port, cycles = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
        coll.init(rank=rank, world_size=size, store=f"tcp://127.0.0.1:{port}", transport="shm",
                  timeout=60, secret="lifetime-test")
        x = np.full(100, rank + 1, np.float32)
        coll.all_reduce(x)
        before = sample()
        coll.barrier()  # nobody passes us the first group's segment before we have counted
        peak = dict(before)
        for i in range(cycles):
            g = coll.new_group(range(size))
            assert coll.all_reduce(x, group=g)[0] == size * (size + 1) // 2
            del g
            if i % 100 == 0:
                now = sample()
                peak = {k: max(peak[k], now[k]) for k in peak}
        gc.collect()
        coll.barrier()  # a turn of the loop after the releases it was handed
        after = sample()
        print("RESULT " + json.dumps({"rank": rank, "before": before, "after": after, "peak": peak}), flush=True)
        coll.destroy()

    if sys.argv[5] == "sync":
        sync_main()
    else:
        asyncio.run(main())
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("AIOCOLL_SECRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, str(TESTS), env.get("PYTHONPATH", "")) if p)
    return env


def _limit_fds(n: int):  # type: ignore[no-untyped-def]
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

    return apply


def _cycle(tmp_path: Path, mode: str, cycles: int, *, ranks: int = 2, fd_limit: int | None = None) -> list[dict]:
    script = tmp_path / "cycles.py"
    script.write_text(CYCLES_SCRIPT)
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(ranks), str(port), str(cycles), mode],
            env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=_limit_fds(fd_limit) if fd_limit else None,
        )
        for r in range(ranks)
    ]
    try:
        outs = [p.communicate(timeout=280) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    return results


def _check_flat(results: list[dict], ring_kb: int) -> None:
    for res in results:
        before, after, peak = res["before"], res["after"], res["peak"]
        assert after["fds"] == before["fds"], res
        assert after["maps"] == before["maps"], res  # no segment of a dropped group still mapped
        assert after["group_kb"] == before["group_kb"], res  # only the world's segment is resident
        assert peak["fds"] <= before["fds"] + 6 and peak["maps"] <= before["maps"] + 2, res
        # What else grows is the links' rings filling up with setup frames, bounded by their size.
        assert after["shm_kb"] - before["shm_kb"] <= ring_kb, res


RING_KB = 2 * (4 << 10)  # a world of 2: two one-way links of 4 MiB rings


@pytest.mark.parametrize("mode", ["drop", "destroy", "tagged", "sync"])
def test_a_thousand_groups_made_and_dropped_under_ulimit_n_256_hold_nothing(tmp_path, mode):
    """Before groups had a lifetime each held three descriptors and its whole segment until the
    world ended: a process limited to 256 descriptors died after about 80 groups."""
    _check_flat(_cycle(tmp_path, mode, 1200, fd_limit=256), RING_KB)


@pytest.mark.stress
def test_ten_thousand_group_cycles_keep_descriptors_and_shared_memory_flat(tmp_path):
    _check_flat(_cycle(tmp_path, "drop", 10_000), RING_KB)


# --------------------------------------------------------------------------- in one process
async def shm_ranks(body, n: int, **kwargs):
    return await run_ranks(body, n, transport="shm", secret="lifetime", timeout=20, **kwargs)


async def _engine_turns() -> None:
    # A released engine closes on a turn of the loop of its own (see _fastpath._retire_soon).
    for _ in range(3):
        await asyncio.sleep(0)


async def test_destroy_group_releases_the_engine_and_later_use_raises_a_clear_error():
    async def body(rank):
        g = aiocoll.new_group([0, 1, 2])
        y = await aiocoll.all_reduce(np.full(10, rank, np.int64), group=g)
        engine = g.fast_engine
        assert engine is not None and not engine.closed
        aiocoll.destroy_group(g)
        assert engine.closed and g.destroyed
        for call in (
            lambda: aiocoll.all_reduce(np.ones(3), group=g),
            lambda: aiocoll.broadcast(np.ones(3), 0, group=g),
            lambda: aiocoll.send(np.ones(3), (rank + 1) % 3, group=g),
            lambda: aiocoll.all_reduce(np.ones(3), group=g.name),
        ):
            with pytest.raises(ValueError, match=r"destroyed by aiocoll.destroy_group|no group named"):
                await call()
        assert aiocoll.find_group([0, 1, 2], "untagged:" + g.name) is None
        aiocoll.destroy_group(g)  # twice: nothing
        z = await aiocoll.all_reduce(np.full(10, rank, np.int64))  # the world is untouched
        return int(y[0]), int(z[0])

    assert await shm_ranks(body, 3) == [(3, 3)] * 3


async def test_destroy_group_refuses_the_world_and_what_is_not_a_group():
    async def body(rank):
        with pytest.raises(ValueError, match="aiocoll.destroy()"):
            aiocoll.destroy_group(aiocoll.world())
        with pytest.raises(ValueError, match="no group named 'nope'"):
            aiocoll.destroy_group("nope")
        with pytest.raises(TypeError, match="ProcessGroup or a group name"):
            aiocoll.destroy_group([0, 1])  # type: ignore[arg-type]
        g = aiocoll.new_group([0, 1], name="pair")
        aiocoll.destroy_group("pair")
        return g.destroyed

    assert await shm_ranks(body, 2) == [True, True]


async def test_a_destroyed_tagged_group_is_made_anew_and_works_even_after_it_broke():
    async def body(rank):
        g = aiocoll.new_group([0, 1], tag="t")
        if rank < 2:
            call = aiocoll.all_reduce(np.ones(4), group=g) if rank == 0 else aiocoll.all_gather(np.ones(4), group=g)
            with pytest.raises(aiocoll.MismatchError):
                await call
            with pytest.raises(aiocoll.GroupBrokenError):
                await aiocoll.all_reduce(np.ones(4), group=g)
        aiocoll.destroy_group(g)
        again = aiocoll.new_group([1, 0], tag="t")
        assert again is not g and again.gid != g.gid and again is aiocoll.find_group([0, 1], "t")
        if rank < 2:
            x = np.arange(5000, dtype=np.int64) * (rank + 1)
            y = await aiocoll.all_reduce(x, group=again)
            np.testing.assert_array_equal(y, np.arange(5000) * 3)
        return again.gid

    gids = await shm_ranks(body, 3)
    assert len(set(gids)) == 1  # every member derived the same new id


async def test_collectives_running_when_the_group_is_destroyed_finish_first():
    async def body(rank):
        g = aiocoll.new_group([0, 1, 2])
        xs = [np.full(n, rank + i, np.float64) for i, n in enumerate([7, 300_000, 5])]
        running = [asyncio.ensure_future(aiocoll.all_reduce(x, group=g)) for x in xs]
        await asyncio.sleep(0)  # started (sequence numbers claimed), not finished
        engine = g.fast_engine
        aiocoll.destroy_group(g)
        results = await asyncio.gather(*running)
        await _engine_turns()
        assert engine is not None and engine.closed
        return [float(r[0]) for r in results]

    for got in await shm_ranks(body, 3):
        assert got == [3.0, 6.0, 9.0]


async def test_an_untagged_group_nobody_references_releases_its_engine():
    async def body(rank):
        world_engine = aiocoll.world().fast_engine
        g = aiocoll.new_group([0, 1, 2])  # not the first untagged group of these ranks: the world is
        await aiocoll.all_reduce(np.ones(1000), group=g)
        engine, ref = g.fast_engine, weakref.ref(g)
        del g
        gc.collect()
        await _engine_turns()
        assert ref() is None and engine is not None and engine.closed
        await aiocoll.barrier()
        return world_engine is None or not world_engine.closed

    assert await shm_ranks(body, 3) == [True] * 3


async def test_the_first_untagged_group_of_some_ranks_is_kept_for_lookups_and_rank_lists():
    async def body(rank):
        if rank == 2:
            return None
        first_gid = aiocoll.new_group([0, 1]).gid  # dropped at once, but it is what [0, 1] means
        second = aiocoll.new_group([0, 1])
        name = second.name
        del second
        gc.collect()
        kept = aiocoll.find_group([1, 0])
        assert kept is not None and kept.gid == first_gid
        assert aiocoll.find_group([0, 1], "untagged:" + name) is None  # dropped: gone for good
        y = await aiocoll.all_reduce(np.array([rank + 1]), group=[0, 1])
        assert aiocoll.find_group([0, 1]) is kept
        return int(y[0])

    assert await shm_ranks(body, 3) == [3, 3, None]
