"""Members that disagree on what a collective's frame counts cannot show (shape at one element
count, dim, src/dst, the collective itself where one member only sends) raise MismatchError on
every member, at once, naming both sides.

Every case runs at world sizes 2, 3 and 5 on inproc, tcp and shm (ranks as tasks of one
process; on shm, all_gather and broadcast take the shared-memory fast path, which exchanges no
frames). Rank ODD calls the variant, the others the common call.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

import aiocoll
from aiocoll.testing import run_ranks

from _reference import data

ODD = 1
TIMEOUT = 20.0
TRANSPORTS = ["inproc", "tcp", "shm"]
SIZES = [2, 3, 5]


@pytest.fixture(autouse=True)
def _fastpath_on(monkeypatch):
    # Settings are read at init: with the variable unset, every world here has the engine on.
    monkeypatch.delenv("AIOCOLL_SHM_FASTPATH", raising=False)


def _x(rank: int, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    return data(rank, shape, np.float32)


# case -> (call of the others, call of rank ODD, (what differs, ODD's value, the others' value))
CASES: dict[str, Any] = {
    "all_gather shape": (
        lambda r: aiocoll.all_gather(_x(r, (2, 3)), timeout=TIMEOUT),
        lambda r: aiocoll.all_gather(_x(r, (3, 2)), timeout=TIMEOUT),
        ("shape", "(3, 2)", "(2, 3)"),
    ),
    "all_gather dim": (
        lambda r: aiocoll.all_gather(_x(r, (2, 2)), dim=0, timeout=TIMEOUT),
        lambda r: aiocoll.all_gather(_x(r, (2, 2)), dim=1, timeout=TIMEOUT),
        ("dim", "1", "0"),
    ),
    "all_reduce shape": (
        lambda r: aiocoll.all_reduce(_x(r, (2, 3)), timeout=TIMEOUT),
        lambda r: aiocoll.all_reduce(_x(r, (6,)), timeout=TIMEOUT),
        ("shape", "(6,)", "(2, 3)"),
    ),
    "broadcast src": (
        lambda r: aiocoll.broadcast(_x(r), 0, timeout=TIMEOUT),
        lambda r: aiocoll.broadcast(_x(r), 1, timeout=TIMEOUT),
        ("src", "1", "0"),
    ),
    "reduce dst": (
        lambda r: aiocoll.reduce(_x(r), 0, timeout=TIMEOUT),
        lambda r: aiocoll.reduce(_x(r), 1, timeout=TIMEOUT),
        ("dst", "1", "0"),
    ),
    "gather dst": (
        lambda r: aiocoll.gather(_x(r), 0, timeout=TIMEOUT),
        lambda r: aiocoll.gather(_x(r), 1, timeout=TIMEOUT),
        ("dst", "1", "0"),
    ),
    "scatter src": (
        lambda r: aiocoll.scatter(_x(r, (30, 3)), 0, timeout=TIMEOUT),
        lambda r: aiocoll.scatter(_x(r, (30, 3)), 1, timeout=TIMEOUT),
        ("src", "1", "0"),
    ),
    "broadcast against reduce": (
        lambda r: aiocoll.reduce(_x(r), 0, timeout=TIMEOUT),
        lambda r: aiocoll.broadcast(_x(r), 0, timeout=TIMEOUT),
        ("called", "broadcast", "reduce"),
    ),
    "broadcast_object src": (
        lambda r: aiocoll.broadcast_object({"r": r}, 0, timeout=TIMEOUT),
        lambda r: aiocoll.broadcast_object({"r": r}, 1, timeout=TIMEOUT),
        ("src", "1", "0"),
    ),
}


def _names_both_sides(msg: str, what: str, odd_value: str, other_value: str, other: int) -> bool:
    """Both members and what each called: "<what> <x> on rank a vs <y> on rank b" (either
    order), or "rank a called <x>, rank b called <y>"."""
    if what == "called":
        return f"rank {ODD} called {odd_value}" in msg and f"rank {other} called {other_value}" in msg
    return what in msg and f"{odd_value} on rank {ODD}" in msg and f"{other_value} on rank {other}" in msg


@pytest.mark.parametrize("world_size", SIZES)
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", list(CASES))
async def test_every_member_raises_mismatch_naming_both_sides(case, transport, world_size):
    common, odd, (what, odd_value, other_value) = CASES[case]

    async def body(rank):
        await aiocoll.all_reduce(np.ones(2, np.float32))  # links and the shm engine are up
        started = time.monotonic()
        with pytest.raises(aiocoll.MismatchError) as info:
            await (odd if rank == ODD else common)(rank)
        return info.value, time.monotonic() - started

    results = await run_ranks(body, world_size, transport=transport, secret="s", timeout=TIMEOUT)
    for rank, (err, elapsed) in enumerate(results):
        assert elapsed < TIMEOUT / 4, (rank, elapsed, err)
        ranks = set(err.ranks)
        assert ODD in ranks and len(ranks) == 2, (rank, err)
        other = (ranks - {ODD}).pop()
        msg = str(err)
        assert _names_both_sides(msg, what, odd_value, other_value, other), (rank, msg)


@pytest.mark.parametrize("world_size", SIZES)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_group_stays_broken_after_a_mismatch_and_others_are_unharmed(transport, world_size):
    async def body(rank):
        g = aiocoll.new_group(list(range(world_size)), tag="m")
        await aiocoll.all_reduce(np.ones(2, np.float32), group=g)
        with pytest.raises(aiocoll.MismatchError):
            await aiocoll.broadcast(_x(rank), ODD if rank == ODD else 0, g, timeout=TIMEOUT)
        with pytest.raises(aiocoll.CollectiveError):
            await aiocoll.all_reduce(np.ones(2, np.float32), group=g, timeout=TIMEOUT)
        return await aiocoll.all_reduce(np.full(2, rank, np.int64))

    for y in await run_ranks(body, world_size, transport=transport, secret="s", timeout=TIMEOUT):
        assert (y == world_size * (world_size - 1) // 2).all()


async def test_without_an_answer_to_describe_a_member_says_what_it_knows(monkeypatch):
    """A member whose peer never answers what it called (its loop stuck, say) still fails the
    collective, after a bounded wait, naming both members and its own call."""
    from aiocoll.core.comm import Communicator

    monkeypatch.setattr(Communicator, "_on_describe", lambda self, peer, key, body: None)

    async def body(rank):
        started = time.monotonic()
        with pytest.raises(aiocoll.MismatchError) as info:
            await aiocoll.all_gather(_x(rank, (3, 2) if rank == ODD else (2, 3)), timeout=4.0)
        return info.value, time.monotonic() - started

    for rank, (err, elapsed) in enumerate(await run_ranks(body, 2)):
        assert elapsed < 4.0, (rank, elapsed)
        assert set(err.ranks) == {0, 1}, err
        mine = "(3, 2)" if rank == ODD else "(2, 3)"
        assert f"shape {mine}" in str(err) and f"on rank {rank}" in str(err) and f"rank {1 - rank}" in str(err), err
