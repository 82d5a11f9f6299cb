"""Who gets named when things go wrong: the culprit, not a bystander (ranks as tasks, inproc).

- in a ring every member waits for its neighbour, so at a timeout "the rank I wait for" is
  usually another victim of the same stall: members tell each other they are waiting shortly
  before the timeout, and name those not heard from;
- a survivor that leaves right after seeing a crash is not the culprit: it tells the others
  which rank it lost before it goes;
- a mismatch names both sides, even when the two sides exchange no frame at all.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

import aiocoll
from aiocoll.core.world import current_world
from aiocoll.testing import run_ranks


@pytest.fixture
def ring() -> aiocoll.Settings:
    return aiocoll.Settings(algorithms={"all_reduce": "ring"})


async def test_a_ring_timeout_names_the_absent_rank_on_every_member(ring):
    absent = 2

    async def body(rank):
        if rank == absent:
            await asyncio.sleep(1.6)  # never calls the collective
            return "absent"
        started = time.monotonic()
        with pytest.raises(aiocoll.CollectiveTimeoutError) as info:
            await aiocoll.all_reduce(np.ones(1 << 16, np.float32), timeout=1.0)
        return info.value, time.monotonic() - started

    results = await run_ranks(body, 5, return_exceptions=True, timeout=5, settings=ring)
    assert results[absent] == "absent"
    for rank, got in enumerate(results):
        if rank == absent:
            continue
        err, took = got
        assert err.ranks == (absent,), f"rank {rank} named {err.ranks}: {err}"
        assert took < 1.5, f"rank {rank} raised after {took:.2f} s, timeout 1.0 s"


async def test_without_the_waiting_notices_a_ring_would_blame_bystanders(ring, monkeypatch):
    """The control experiment: silence the notices and the neighbours get named."""
    from aiocoll.core import comm as _comm

    monkeypatch.setattr(_comm.Communicator, "announce_waiting", lambda self, op: None)
    absent = 2

    async def body(rank):
        if rank == absent:
            await asyncio.sleep(1.6)
            return None
        with pytest.raises(aiocoll.CollectiveTimeoutError) as info:
            await aiocoll.all_reduce(np.ones(1 << 16, np.float32), timeout=1.0)
        return info.value.ranks

    named = await run_ranks(body, 5, return_exceptions=True, timeout=5, settings=ring)
    assert any(r is not None and r != (absent,) and r != tuple(p for p in range(5) if p != rank)
               for rank, r in enumerate(named)), named


async def test_a_survivor_that_leaves_at_once_is_not_blamed_for_the_crash():
    """Rank 1 crashes; rank 2 sees it and leaves at once (abort, no goodbye). Rank 0 is busy
    meanwhile and sees both losses together: it must name rank 1 on every collective."""

    async def body(rank):
        g = aiocoll.new_group([0, 1, 2], tag="t")
        if rank == 1:
            await asyncio.sleep(0.1)
            current_world().comm.abort()  # as if SIGKILLed: links drop without goodbye
            return "crashed"
        if rank == 2:
            with pytest.raises(aiocoll.PeerFailureError) as info:
                await aiocoll.all_reduce(np.ones(4), group=g, timeout=5)
            assert info.value.ranks == (1,)
            await aiocoll.destroy(abort=True)  # leaves at once
            return "left"
        task = asyncio.ensure_future(aiocoll.all_reduce(np.ones(4), group=g, timeout=5))
        await asyncio.sleep(0.05)
        time.sleep(0.3)  # busy: both losses arrive while this rank does not look
        with pytest.raises(aiocoll.PeerFailureError) as info:
            await task
        with pytest.raises(aiocoll.CollectiveError) as later:
            await aiocoll.barrier(timeout=5)
        return info.value.ranks, later.value.ranks

    results = await run_ranks(body, 3, return_exceptions=True, timeout=5)
    assert results[1:] == ["crashed", "left"], results
    in_flight, later = results[0]
    assert in_flight == (1,)
    assert 1 in later and 2 not in later, later


async def test_a_mismatch_names_both_sides_on_every_member():
    async def body(rank):
        x = np.ones(8, np.float32 if rank != 1 else np.float64)
        with pytest.raises(aiocoll.MismatchError) as info:
            await aiocoll.all_reduce(x, timeout=5)
        return (info.value,)  # in a tuple: run_ranks re-raises exceptions returned bare

    for rank, (err,) in enumerate(await run_ranks(body, 4, timeout=5)):
        assert 1 in err.ranks and len(err.ranks) == 2, (rank, err)
        other = [r for r in err.ranks if r != 1][0]
        assert "float64 on rank 1" in str(err) and f"float32 on rank {other}" in str(err), str(err)


async def test_a_mismatch_with_no_frame_exchanged_is_still_a_mismatch():
    """Rank 0 gathers (it only receives) while the others wait in a scatter from rank 0 (they
    only receive): no frame ever flows. Before the timeout the members say where they wait,
    and that is where the difference shows."""

    async def body(rank):
        started = time.monotonic()
        with pytest.raises(aiocoll.MismatchError) as info:
            if rank == 0:
                await aiocoll.gather(np.ones(2), 0, timeout=2.0)
            else:
                await aiocoll.scatter(np.ones(6), 0, timeout=2.0)
        return info.value, time.monotonic() - started

    for rank, (err, took) in enumerate(await run_ranks(body, 3, timeout=5)):
        assert 0 in err.ranks and len(err.ranks) == 2, (rank, err)
        assert "gather" in str(err) and "scatter" in str(err), str(err)
        assert took < 2.0, f"rank {rank}: {took:.2f} s, the timeout was 2 s"


async def test_a_member_behind_finishes_the_steps_before_the_failure_and_raises_at_it():
    """Ranks 0 and 1 finish step 0 (a broadcast rank 2 has not joined yet) and mismatch at step
    1. Rank 2, behind, must still get step 0 right, raise the mismatch at step 1 (its own call of
    the failed collective), and GroupBrokenError after: the group breaks at the step that failed,
    not at whatever step a member happens to be in when it hears of it."""

    async def body(rank):
        g = aiocoll.new_group([0, 1, 2], tag="behind")
        if rank == 2:
            await asyncio.sleep(0.3)  # the others are done with step 0 and failed step 1 by now
        got = await aiocoll.broadcast(np.arange(4) if rank == 0 else np.zeros(4, np.int64), 0, g)
        assert (got == np.arange(4)).all(), (rank, got)
        with pytest.raises(aiocoll.MismatchError) as info:
            await aiocoll.all_reduce(np.ones(3, np.float64 if rank == 1 else np.float32), group=g, timeout=5)
        assert set(info.value.ranks) in ({0, 1}, {1, 2}), info.value
        with pytest.raises(aiocoll.GroupBrokenError):
            await aiocoll.barrier(g)
        return "ok"

    assert await run_ranks(body, 3, timeout=5) == ["ok"] * 3


async def test_news_of_a_death_passed_between_survivors_still_names_the_dead_rank():
    """Rank 1 dies. Rank 2 hears of it only through rank 3 (rank 3's ABORT of a collective that
    failed for want of rank 1), then rank 3 and rank 2 go away without a goodbye (aborted, or
    stopped by a launcher) before this rank saw rank 1's own link end. Whatever this rank calls
    next on a group of all four must name rank 1, the one death, not a survivor that left."""
    from aiocoll.core.comm import Communicator
    from aiocoll.core.wire import FLAG_CONTROL, FrameKey, Kind
    from aiocoll.core.errors import TransportError
    import json

    comm = Communicator(0, 4)

    def control(peer, key, body):
        raw = key.pack()
        buf = comm.frame_buffer(peer, raw, len(body))
        buf[:] = body
        comm.frame_received(peer, raw, buf)

    gid = 77
    lost_key = FrameKey(0, 0, 0, Kind.LOST, 0, 0, FLAG_CONTROL, 0)
    abort_key = FrameKey(gid, 5, 0, Kind.ABORT, 0, 0, FLAG_CONTROL, 0)
    control(3, abort_key, json.dumps({"code": "peer", "message": "rank 1 was lost", "ranks": [1], "origin": 3}).encode())
    control(2, lost_key, json.dumps({"lost": 3, "reason": "was lost (no goodbye)"}).encode())
    comm.peer_lost(3, TransportError("rank 3 closed the connection without saying goodbye"))
    comm.peer_lost(2, TransportError("rank 2 closed the connection without saying goodbye"))
    await asyncio.sleep(0)  # losses are handled a loop turn later
    with pytest.raises(aiocoll.PeerFailureError) as info:
        comm.begin("all", 99, 0, "all_reduce", frozenset(range(4)))
    assert info.value.ranks == (1,), info.value
