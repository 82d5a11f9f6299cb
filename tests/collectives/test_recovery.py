"""Recovering from a failed collective: every member renews the group and goes on."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import aiocoll
import aiocoll.sync
from aiocoll.testing import faults, run_blocking_ranks, run_ranks

TRANSPORTS = ["inproc", "tcp", "shm"]  # shm: the world takes the shared-memory engine


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_stats_loop_skips_one_late_round_and_goes_on(transport):
    rng = np.random.default_rng(11)
    data = rng.standard_normal((4, 3, 16))  # round, rank, values

    async def body(rank: int) -> list[object]:
        out: list[object] = []
        for k in range(4):
            if k == 1 and rank == 2:
                await asyncio.sleep(2.5)  # late for this round: the others time out at 0.3 s
            try:
                out.append(await aiocoll.all_reduce(data[k, rank], timeout=0.3 if k == 1 else 30))
            except aiocoll.CollectiveError as exc:
                out.append(type(exc).__name__)
                aiocoll.renew_group()  # every member saw the failure: every member renews
        return out

    results = await run_ranks(body, 3, transport=transport, timeout=30)
    for rank, out in enumerate(results):
        assert isinstance(out[1], str) and out[1] in {"CollectiveTimeoutError", "RemoteAbortError"}, (rank, out)
        for k in (0, 2, 3):
            np.testing.assert_allclose(out[k], data[k].sum(axis=0), rtol=1e-12)


async def test_the_renewed_world_is_the_default_group_and_the_old_one_stays_broken():
    async def body(rank: int) -> tuple[str, str, str, bool]:
        old = aiocoll.world()
        try:
            await aiocoll.all_reduce(np.ones(2), op="max" if rank else "sum")
        except aiocoll.MismatchError:
            pass
        new = aiocoll.renew_group()
        assert aiocoll.world() is new and new.ranks == old.ranks and new.gid != old.gid
        with pytest.raises(aiocoll.GroupBrokenError):
            await aiocoll.all_reduce(np.ones(2), group=old)
        again = aiocoll.renew_group(new)
        y = await aiocoll.all_reduce(np.full(2, rank + 1.0))
        assert y.tolist() == [3.0, 3.0]
        return old.name, new.name, again.name, aiocoll.find_group([0, 1]) is again

    assert await run_ranks(body, 2) == [("world", "world#1", "world#2", True)] * 2


@pytest.mark.parametrize("tagged", [True, False])
async def test_a_subgroup_is_destroyed_and_replaced_with_the_same_ranks_and_tag(tagged):
    async def body(rank: int) -> tuple[int, ...] | None:
        g = aiocoll.new_group([0, 2], tag="pair" if tagged else "")
        if rank not in g.ranks:
            aiocoll.renew_group(g)  # non-members renew too: group ids count on every rank
            return None
        try:
            await aiocoll.all_reduce(np.ones(3 if rank == 0 else 4), group=g)
        except aiocoll.MismatchError:
            pass
        h = aiocoll.renew_group(g)
        assert g.destroyed and h.ranks == (0, 2) and h.tag == g.tag and h.gid != g.gid
        y = await aiocoll.all_reduce(np.array([rank]), group=h)
        return tuple(y.tolist())

    assert await run_ranks(body, 3) == [(2,), None, (2,)]


async def test_a_dead_member_is_named_by_the_renewed_group_too():
    async def body(rank: int) -> str:
        if rank == 1:
            faults.kill()
        try:
            await aiocoll.all_reduce(np.ones(2), timeout=20)
        except aiocoll.PeerFailureError:
            pass
        aiocoll.renew_group()
        with pytest.raises(aiocoll.PeerFailureError) as info:
            await aiocoll.all_reduce(np.ones(2), timeout=20)
        return str(list(info.value.ranks))

    results = await run_ranks(body, 3, timeout=20)
    assert results[0] == results[2] == "[1]"


async def test_renew_group_has_a_blocking_twin():
    def body(rank: int) -> list[float]:
        try:
            aiocoll.sync.all_reduce(np.ones(1), "max" if rank else "sum")
        except aiocoll.MismatchError:
            pass
        aiocoll.sync.renew_group()
        return aiocoll.sync.all_reduce(np.full(1, rank + 1.0)).tolist()

    assert await run_blocking_ranks(body, 2) == [[3.0], [3.0]]


def test_bad_arguments_are_named():
    async def body(rank: int) -> None:
        with pytest.raises(TypeError, match="renew_group takes"):
            aiocoll.renew_group(3)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="no group named"):
            aiocoll.renew_group("nope")
        g = aiocoll.new_group([0, 1], tag="t")
        aiocoll.destroy_group(g)
        with pytest.raises(ValueError, match="was destroyed"):
            aiocoll.renew_group(g)

    asyncio.run(run_ranks(body, 2))
