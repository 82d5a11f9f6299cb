"""Cancelling the task awaiting a collective, or an ``asyncio.timeout`` around it.

The documented semantics (RELIABILITY.md, "Cancellation"):

- a cancelled or timed-out *collective* breaks its group on every member: the others' pending
  call on it raises (RemoteAbortError naming the cancelling rank), and every later call on it
  raises GroupBrokenError at once, on every member. Other groups, and the connections, are
  unharmed. Resynchronising is not attempted: a collective's members may be at different
  steps of it, and the caller's output may be half written.
- a cancelled or timed-out *point-to-point* call leaves the group usable. A receive of which
  nothing has arrived gives its message number back, so the next receive (a retry) gets the
  message; one already receiving drops its message when it completes. A cancelled send still
  goes out (bytes handed to a transport are never taken back). The pair stays in step.

Either way nothing is left behind: no task, no posted receive or buffered frame of the group,
no descriptor, and the connections still carry the next collective.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time

import numpy as np
import pytest

import aiocoll
from aiocoll.core.world import current_world
from aiocoll.testing import run_ranks

TRANSPORTS = ["inproc", "tcp", "shm"]
BIG = 4 << 20  # float32 elements: 16 MiB, long enough in flight to be cancelled in the middle


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _leftovers(gid: int) -> list[str]:
    comm = current_world().comm
    out = []
    out += [f"posted {k}" for k in comm._posted if k[1][0] == gid]
    out += [f"unexpected {k}" for k in comm._unexpected if k[1][0] == gid]
    out += [f"active {op.op}" for op in comm._active if op.gid == gid]
    return out


async def _run(body, n, transport):
    kwargs = {"secret": "cancel-test-secret"} if transport != "inproc" else {}
    return await run_ranks(body, n, transport=transport, timeout=20, **kwargs)


@pytest.fixture
async def no_leaks():
    gc.collect()
    before_fds, before_tasks = _fds(), len(asyncio.all_tasks())
    yield
    await asyncio.sleep(0.05)  # transports' close callbacks
    gc.collect()
    assert len(asyncio.all_tasks()) == before_tasks, [t for t in asyncio.all_tasks()]
    left = _fds() - before_fds
    assert not left, {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in left if os.path.exists(f"/proc/self/fd/{fd}")}


def _cancel_by_task(coro):
    async def go():
        task = asyncio.ensure_future(coro)
        await asyncio.sleep(0.02)
        assert not task.done(), "the collective finished before it could be cancelled"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    return go()


async def _cancel_by_timeout(coro):
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.02):
            await coro


@pytest.mark.parametrize("how", [_cancel_by_task, _cancel_by_timeout], ids=["task.cancel", "asyncio.timeout"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_cancelled_collective_breaks_its_group_on_every_member_at_once(transport, how, no_leaks):
    async def body(rank):
        g = aiocoll.new_group([0, 1, 2], tag="c")
        await aiocoll.all_reduce(np.ones(3), group=g)  # set up (the shm fast path makes a segment)
        x = np.ones(BIG, np.float32)
        if rank == 0:
            await how(aiocoll.all_reduce(x, group=g))
        else:
            with pytest.raises((aiocoll.RemoteAbortError, aiocoll.GroupBrokenError)) as info:
                await aiocoll.all_reduce(x, group=g)
            assert info.value.ranks == (0,), info.value
        # every member: the next call fails at once, naming the cancelling rank
        started = time.monotonic()
        with pytest.raises(aiocoll.GroupBrokenError) as info:
            await aiocoll.all_reduce(np.ones(3), group=g)
        assert time.monotonic() - started < 0.1
        assert info.value.ranks == (0,) and "cancel" in str(info.value), info.value
        assert _leftovers(g.gid) == []
        # the world and its connections carry on
        y = await aiocoll.all_reduce(np.full(BIG // 16, rank, np.float32))
        assert (y == 3).all()
        return "ok"

    assert await _run(body, 3, transport) == ["ok"] * 3


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_cancelled_receive_leaves_the_pair_in_step(transport, no_leaks):
    async def body(rank):
        if rank == 1:
            waiting = asyncio.ensure_future(aiocoll.recv(np.empty(4, np.int64), 0, tag=5))
            await asyncio.sleep(0.05)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        await aiocoll.barrier()
        if rank == 0:
            await aiocoll.send(np.full(4, 1, np.int64), 1, tag=5)  # what the cancelled recv waited for
            await aiocoll.send(np.full(4, 2, np.int64), 1, tag=5)
        if rank == 1:
            first = await aiocoll.recv(np.empty(4, np.int64), 0, tag=5, timeout=5)
            second = await aiocoll.recv(np.empty(4, np.int64), 0, tag=5, timeout=5)
            assert (first == 1).all() and (second == 2).all(), (first, second)  # nothing lost
        # the group is still usable by every member, third rank included
        started = time.monotonic()
        y = await aiocoll.all_reduce(np.array([rank]), timeout=5)
        assert int(y[0]) == 3 and time.monotonic() - started < 2
        return "ok"

    assert await _run(body, 3, transport) == ["ok"] * 3


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_timed_out_receive_retried_gets_the_late_message(transport, no_leaks):
    async def body(rank):
        if rank == 1:
            with pytest.raises(aiocoll.CollectiveTimeoutError) as info:
                await aiocoll.recv(np.empty(3, np.int64), 0, tag=2, timeout=0.1)
            assert info.value.ranks == (0,)
            got = await aiocoll.recv(np.empty(3, np.int64), 0, tag=2, timeout=5)  # the retry
            assert (got == 42).all(), got
        if rank == 0:
            await asyncio.sleep(0.3)  # late
            await aiocoll.send(np.full(3, 42, np.int64), 1, tag=2)
        y = await aiocoll.all_reduce(np.array([rank]), timeout=5)
        assert int(y[0]) == 3
        return "ok"

    assert await _run(body, 3, transport) == ["ok"] * 3


@pytest.mark.parametrize("transport", ["inproc", "tcp"])
async def test_a_cancelled_send_still_delivers_and_the_group_stays_usable(transport, no_leaks):
    async def body(rank):
        if rank == 0:
            sending = asyncio.ensure_future(aiocoll.send(np.full(BIG, 7, np.float32), 1, tag=1))
            await asyncio.sleep(0)
            sending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sending
        if rank == 1:
            got = await aiocoll.recv(np.empty(BIG, np.float32), 0, tag=1, timeout=10)
            assert (got == 7).all()
        y = await aiocoll.all_reduce(np.array([rank]), timeout=5)
        assert int(y[0]) == 3
        return "ok"

    assert await _run(body, 3, transport) == ["ok"] * 3


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_many_cancellations_leave_nothing_behind(transport, no_leaks):
    """Cancel a collective at a random moment on one rank, 20 times, each on a fresh group."""
    rng = np.random.default_rng(7)
    delays = rng.uniform(0, 0.01, 20).tolist()

    async def body(rank):
        for i, delay in enumerate(delays):
            g = aiocoll.new_group([0, 1, 2], tag=f"many-{i}")
            # Set the group up first: cancelling the very first fast-path collective of a group
            # hits the shm setup race (test_a_member_that_finds_the_segment_gone_...) below.
            await aiocoll.all_reduce(np.ones(2), group=g)
            task = asyncio.ensure_future(aiocoll.all_reduce(np.ones(1 << 16, np.float32), group=g))
            if rank == i % 3:
                await asyncio.sleep(delay)
                task.cancel()
            try:
                y = await task
                assert (y == 3).all()
            except (asyncio.CancelledError, aiocoll.CollectiveError):
                pass
            assert _leftovers(g.gid) == []
        y = await aiocoll.all_reduce(np.array([1]), timeout=5)
        assert int(y[0]) == 3
        return "ok"

    assert await _run(body, 3, transport) == ["ok"] * 3


async def test_a_member_whose_segment_descriptor_never_came_raises_a_collective_error(monkeypatch, no_leaks):
    """The defensive path of setup, made deterministic: every descriptor a member is handed is
    lost (closed) before it looks, as if its link had dropped it. Every member must raise a
    CollectiveError and nothing may stay open."""
    from aiocoll.transports.shm import ShmTransport

    real_take = ShmTransport.take_fds

    def lose_them(self, want, *, poll=()):
        for fd in real_take(self, want, poll=poll):
            os.close(fd)
        return []

    monkeypatch.setattr(ShmTransport, "take_fds", lose_them)

    async def body(rank):
        g = aiocoll.new_group([0, 1, 2], tag="setup-race")
        try:
            await aiocoll.all_reduce(np.ones(4), group=g, timeout=5)
        except Exception as exc:
            return (exc,)
        return ("no error",)

    results = await _run(body, 3, "shm")
    for rank, (got,) in enumerate(results):
        assert isinstance(got, aiocoll.CollectiveError), f"rank {rank} raised {got!r}"
    assert "descriptor never came" in str(results[1][0])


async def test_closing_the_store_just_after_a_client_left_logs_nothing():
    from aiocoll.core import auth as _auth
    from aiocoll.store.tcp import TcpStoreServer

    loop = asyncio.get_running_loop()
    problems: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: problems.append(str(ctx.get("message"))))
    try:
        for turns in range(10):  # how many loop turns the client's departure gets before aclose()
            server = await TcpStoreServer.start("127.0.0.1", 0, b"secret")
            reader, writer = await asyncio.open_connection(*server.address)
            await _auth.initiate(reader, writer, b"secret", b"store", b"", 5)
            await asyncio.sleep(0.05)
            writer.transport.abort()  # the client leaves
            for _ in range(turns):
                await asyncio.sleep(0)
            await server.aclose()
            await asyncio.sleep(0.02)
    finally:
        loop.set_exception_handler(previous)
    assert problems == []
