"""aiocoll.torch work and blocking calls keep the order in which a thread made them: each claims
its places (sequence numbers) in that order on every member, however long one of them waits
for something of its own first (its CUDA inputs on their way to the host, simulated here).
"""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch", reason="torch is an optional extra; the [test] set-up (.ci/run) installs the CPU build")

import aiocoll.sync  # noqa: E402
import aiocoll.torch as ft  # noqa: E402
from aiocoll.core.world import current_world  # noqa: E402
from aiocoll.torch import _work  # noqa: E402

from _torch_reference import blocking_ranks  # noqa: E402


@pytest.fixture
def slow_inputs_on_rank_0(monkeypatch):
    """Rank 0's aiocoll.torch inputs take 0.2 s to reach the host (a CUDA copy in flight)."""
    real = _work._Snapshot.ready

    async def ready(self):
        if current_world().rank == 0:
            await asyncio.sleep(0.2)
        return await real(self)

    monkeypatch.setattr(_work._Snapshot, "ready", ready)


async def test_a_blocking_call_after_lazy_work_claims_after_it(slow_inputs_on_rank_0):
    """Both members issue a lazy all_reduce, then a blocking one of the same shape; on rank 0
    the lazy one first waits for its inputs. Had the blocking one claimed first there, each
    member would have reduced one input with the other's other input, silently."""

    def rank_fn(rank):
        lazy = ft.all_reduce(torch.full((4,), float(rank + 1)), "sum", None)
        blocking = aiocoll.sync.all_reduce(torch.full((4,), 10.0 * (rank + 1)))
        return ft.wait_tensor(lazy).tolist(), blocking.tolist()

    for lazy, blocking in await blocking_ranks(rank_fn, 2):
        assert lazy == [3.0] * 4 and blocking == [30.0] * 4


async def test_lazy_work_keeps_its_order_behind_lazy_work_that_waits(slow_inputs_on_rank_0):
    def rank_fn(rank):
        first = ft.all_gather_tensor(torch.full((2,), float(rank)), 0, None)
        second = ft.all_reduce_coalesced([torch.full((2,), float(rank + 1)), torch.ones(3, dtype=torch.int64)], "sum", None)
        third = aiocoll.sync.all_gather(torch.full((2,), 5.0 + rank))
        return ft.wait_tensor(first).tolist(), [ft.wait_tensor(t).tolist() for t in second], third.tolist()

    for first, second, third in await blocking_ranks(rank_fn, 2):
        assert first == [0.0, 0.0, 1.0, 1.0]
        assert second == [[3.0, 3.0], [2, 2, 2]]
        assert third == [5.0, 5.0, 6.0, 6.0]
