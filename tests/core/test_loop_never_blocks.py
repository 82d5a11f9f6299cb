"""A large frame that arrives before its receive is posted never stalls the event loop.

Such a frame waits in scratch memory; when the receive is posted it is copied into the
receive's buffer. Copied in one go, that held the loop for the whole copy (0.8-2.1 s for a 1 GiB
all_reduce over tcp) and kept the scratch and the destination resident together. These tests
check that the copy is made a slice per loop turn, that scratch memory is given back as it goes,
that a receive cancelled during the copy neither gets the message nor has its memory written
afterwards, and, with real processes (scripts/loop_stall.py), the heartbeat gap and the peak
memory of a whole all_reduce and of a point-to-point receive.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import aiocoll
from aiocoll.core.world import current_world
from aiocoll.testing import run_ranks

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "loop_stall.py"
MIB = 1 << 20

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; Linux only (CI runs Linux)")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


async def _until_unexpected(peer: int, nbytes: int) -> None:
    """Wait until a frame of ``nbytes`` from ``peer`` has fully arrived with no receive for it."""
    comm = current_world().comm
    async with asyncio.timeout(60):
        while not any(p == peer and data.nbytes == nbytes for (p, _), (_, data) in comm._unexpected.items()):
            await asyncio.sleep(0.005)


class _Turns:
    """Counts turns of the event loop (a callback that reschedules itself) while it runs."""

    def __init__(self) -> None:
        self.count = 0
        self._on = True
        asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        if self._on:
            self.count += 1
            asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> int:
        self._on = False
        return self.count


async def test_an_early_large_frame_is_copied_a_slice_per_loop_turn_and_its_scratch_returned():
    n = 64 * MIB // 4

    async def body(rank: int) -> str:
        if rank == 0:
            await aiocoll.send(np.random.default_rng(7).standard_normal(n).astype(np.float32), 1)
            await aiocoll.barrier()
            return "sent"
        expected = np.random.default_rng(7).standard_normal(n).astype(np.float32)
        await _until_unexpected(0, n * 4)
        out = np.empty(n, np.float32)  # not touched yet: its pages come in as the copy writes them
        _reset_peak()
        before = _status("VmRSS")
        turns = _Turns()
        got = await aiocoll.recv(out, 0, out=out)
        during = turns.stop()
        grown = _status("VmHWM") - before
        await aiocoll.barrier()
        assert got is out
        np.testing.assert_array_equal(out, expected)
        # One go: the loop never turned, and the destination came in while all of the scratch
        # was still held (+64 MiB). Sliced: 64 turns, and scratch leaves as the copy goes.
        assert during >= 16, f"the loop turned {during} times during a 64 MiB copy"
        assert grown < 16 * MIB, f"resident memory grew by {grown / MIB:.1f} MiB during the copy"
        return "received"

    assert await run_ranks(body, 2, transport="tcp", secret="loop-test", timeout=60) == ["sent", "received"]


async def test_a_receive_cancelled_during_the_copy_drops_that_message_and_leaves_its_memory_alone():
    n = 64 * MIB // 4
    small = np.arange(10, dtype=np.float32)

    async def body(rank: int) -> str:
        if rank == 0:
            await aiocoll.send(np.ones(n, np.float32), 1)
            await aiocoll.send(small, 1)
            await aiocoll.barrier()
            return "sent"
        await _until_unexpected(0, n * 4)
        out = np.zeros(n, np.float32)
        task = asyncio.create_task(aiocoll.recv(out, 0, out=out))
        for _ in range(4):  # a few slices in
            await asyncio.sleep(0)
        assert not task.done(), "the copy of 64 MiB finished within four loop turns"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        written = int(np.count_nonzero(out))
        assert 0 < written < n
        for _ in range(20):
            await asyncio.sleep(0)
        assert int(np.count_nonzero(out)) == written, "the cancelled receive's memory was written after it returned"
        # The message had arrived: it is gone with the cancelled receive, and the next one
        # gets the next message (the numbering of messages stays in step with the sender).
        got = await aiocoll.recv(np.empty_like(small), 0)
        np.testing.assert_array_equal(got, small)
        await aiocoll.barrier()
        return "received"

    assert await run_ranks(body, 2, transport="tcp", secret="loop-test", timeout=60) == ["sent", "received"]


def _stall(transport: str, mib: int, op: str, out: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "AIOCOLL_SECRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "aiocoll", "run", "-n", "2", "--transport", transport, "--timeout", "120",
         str(SCRIPT), "--mib", str(mib), "--op", op, "--out", out],
        capture_output=True, text=True, timeout=280, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line.split("] ", 1)[1]) for line in proc.stdout.splitlines() if '"rank"' in line]
    assert sorted(r["rank"] for r in rows) == [0, 1], proc.stdout
    assert all(r["ok"] for r in rows), rows
    return rows


# What fails on a copy made in one go is the memory: the destination's pages come in while the
# whole scratch copy is still held (2x the payload on the late rank, receiving into new memory).
# The loop's stalls are bounded on the CPU time its thread spent between two heartbeats, not on
# wall-clock gaps: on a loaded 2-core machine the OS alone keeps a process off the CPU for up to
# a second (seen in 1 of 10 runs beside two busy loops).
@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_a_late_rank_holds_no_more_than_the_frame_and_its_loop_keeps_ticking(transport):
    rows = _stall(transport, 256, "recv", "fresh")
    late = next(r for r in rows if r["late"])
    assert late["extra_x"] < 1.5, json.dumps(rows)  # in one go: 2.0 (scratch + destination)
    assert all(r["cpu_gap_ms"] < 250 for r in rows), json.dumps(rows)
    # The same for a whole all_reduce, measured as the issue does: peak resident memory minus
    # the memory before (the input) minus the result (written during the call, so in extra_x).
    rows = _stall(transport, 256, "all_reduce", "fresh")
    assert all(r["extra_x"] - 1.0 < 1.0 for r in rows), json.dumps(rows)  # under 1x the payload
    assert all(r["cpu_gap_ms"] < 250 for r in rows), json.dumps(rows)


def test_scratch_memory_is_private_so_that_released_pages_are_freed():
    """Anonymous shared memory (mmap's default) is a shmem file: MADV_DONTNEED only unmaps its
    pages, which stay allocated until the munmap frees them all at once (40 ms for 256 MiB)."""
    import ctypes

    from aiocoll.core.comm import Communicator

    view = Communicator(0, 2)._scratch(1, 8 * MIB)
    start = ctypes.addressof(ctypes.c_char.from_buffer(view))
    for line in Path("/proc/self/maps").read_text().splitlines():
        lo, hi = (int(a, 16) for a in line.split()[0].split("-"))
        if lo <= start < hi:
            assert line.split()[1][3] == "p", line
            break
    else:
        raise AssertionError("the scratch mapping is not in /proc/self/maps")


@pytest.mark.stress
@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_a_1_gib_all_reduce_keeps_every_heartbeat_gap_under_50_ms(transport):
    """The issue's bar on a quiet machine with a few free cores (not a loaded 2-core CI box)."""
    rows = _stall(transport, 1024, "all_reduce", "touched")
    assert all(r["wall_gap_ms"] < 50 for r in rows), json.dumps(rows)
    assert all(r["extra_x"] < 1 for r in rows), json.dumps(rows)
