"""Test kit: run one coroutine as N ranks of one world, in one event loop, over ``inproc``.

    from aiocoll.testing import run_ranks

    async def test_sum():
        async def body(rank):
            return await aiocoll.all_reduce(np.full(3, rank))
        results = await run_ranks(body, world_size=4)
        assert all((r == 6).all() for r in results)

Each rank runs as its own task with its own context, so ``aiocoll.world()`` and the default
group resolve per rank inside ``body``. ``aiocoll.testing.conformance`` holds the checks every
transport must pass.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..core.auth import new_secret
from ..core.world import in_harness, init, leave

T = TypeVar("T")


async def run_ranks(
    fn: Callable[[int], Awaitable[T]],
    world_size: int,
    *,
    transport: str = "inproc",
    timeout: float = 30.0,
    return_exceptions: bool = False,
    **init_kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank)`` for every rank of a fresh world of ``world_size`` ranks; return the results.

    Args:
        transport: ``"inproc"`` (default) or any transport whose ranks can share a process
            (``"tcp"`` works too, over loopback). Unless ``secret=`` or ``insecure=True`` is
            passed, the run gets a fresh secret.
        timeout: the world's default collective timeout.
        return_exceptions: return each rank's exception in its slot instead of raising.

    Raises:
        The exception of the lowest failing rank, unless ``return_exceptions``.
    """
    from ..store.base import MemoryStore

    store = MemoryStore()
    if init_kwargs.get("secret") is None and not init_kwargs.get("insecure"):
        # The harness owns the rendezvous, as a launcher does: it makes the run's secret.
        init_kwargs["secret"] = new_secret()
    options = dict(init_kwargs.pop("transport_options", None) or {})
    options.setdefault("world", f"test-{uuid.uuid4().hex[:12]}")

    async def one(rank: int) -> Any:
        in_harness.set(True)
        await init(
            rank=rank,
            world_size=world_size,
            store=store,
            transport=transport,
            timeout=timeout,
            transport_options=options,
            **init_kwargs,
        )
        failed: BaseException | None = None
        try:
            return await fn(rank)
        except BaseException as exc:
            failed = exc
            raise
        finally:
            # As a process would: a rank that failed leaves without the barrier (the others may
            # wait for it in a collective it will never join), but gracefully, so that the
            # others get every frame it sent for the collectives it completed. Cancelled (the
            # whole run is being torn down): at once.
            await leave(barrier=failed is None, abort=isinstance(failed, asyncio.CancelledError))

    tasks = [asyncio.create_task(one(r), name=f"aiocoll-rank-{r}") for r in range(world_size)]
    try:
        results = await asyncio.gather(*tasks, return_exceptions=True)
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    if not return_exceptions:
        for r in results:
            if isinstance(r, BaseException):
                raise r
    return list(results)


__all__ = ["run_ranks"]
