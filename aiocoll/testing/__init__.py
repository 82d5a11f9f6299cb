"""Test kit: run one coroutine as N ranks of one world, in one event loop or in real processes.

    from aiocoll.testing import run_ranks

    async def test_sum():
        async def body(rank):
            return await aiocoll.all_reduce(np.full(3, rank))
        results = await run_ranks(body, world_size=4)
        assert all((r == 6).all() for r in results)

Each rank runs as its own task with its own context, so ``aiocoll.world()`` and the default
group resolve per rank inside ``body``. When one rank fails, the others are cancelled and the
failure is raised: a rank left waiting for the one that failed cannot hang the test.

Also here:

- :func:`run_processes`: the same with one process per rank (``aiocoll run``'s launcher), for
  code that needs real processes (shared memory, signals, a module-level function).
- :func:`run_blocking_ranks` and :func:`in_thread`: blocking code (``aiocoll.sync``, autograd)
  as ranks, each on its own thread, served by the test's event loop.
- :mod:`aiocoll.testing.faults`: kill a rank, cut a link, delay a rank's sends, stop a process.
- a pytest plugin (registered as ``aiocoll`` under ``pytest11``): the fixtures ``aiocoll_ranks``
  and ``aiocoll_processes`` and the marker ``@pytest.mark.aiocoll(world_size=..., ...)``.
- :mod:`aiocoll.testing.conformance` (the checks every transport must pass) and
  :mod:`aiocoll.testing.simulate` (schedules run in lockstep without I/O).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..core.auth import new_secret
from ..core.world import in_harness, init, leave
from .faults import RankKilled
from .processes import RanksFailed, run_processes

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

    The first rank to fail (raise anything but :class:`~aiocoll.testing.faults.RankKilled`)
    gets the others cancelled, unless ``return_exceptions``; each leaves gracefully, so the
    teardown logs no lost peers. A rank ended by ``faults.kill()`` is an expected outcome: its
    slot holds the ``RankKilled`` and the others go on.

    Args:
        transport: ``"inproc"`` (default) or any transport whose ranks can share a process
            (``"tcp"`` works too, over loopback). Unless ``secret=`` or ``insecure=True`` is
            passed, the run gets a fresh secret.
        timeout: the world's default collective timeout.
        return_exceptions: wait for every rank and return each one's exception in its slot
            instead of raising.

    Raises:
        The exception of the first rank to fail, unless ``return_exceptions``.
        asyncio.CancelledError: the caller was cancelled; every rank was cancelled and aborted.
    """
    from ..store.base import MemoryStore

    store = MemoryStore()
    if init_kwargs.get("secret") is None and not init_kwargs.get("insecure"):
        # The harness owns the rendezvous, as a launcher does: it makes the run's secret.
        init_kwargs["secret"] = new_secret()
    options = dict(init_kwargs.pop("transport_options", None) or {})
    options.setdefault("world", f"test-{uuid.uuid4().hex[:12]}")
    # Set when the harness cancels the survivors of a failure (as opposed to its caller being
    # cancelled): they then leave gracefully, like processes told to stop, not as if crashing.
    stopping = False

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
        except RankKilled as exc:
            return exc  # its connections are gone already; nothing to leave
        except BaseException as exc:
            failed = exc
            raise
        finally:
            # As a process would: a rank that failed leaves without the barrier (the others may
            # wait for it in a collective it will never join), but gracefully, so that the
            # others get every frame it sent for the collectives it completed. Cancelled from
            # outside (the whole run is being torn down): at once.
            aborted = isinstance(failed, asyncio.CancelledError) and not stopping
            await leave(barrier=failed is None, abort=aborted)

    tasks = [asyncio.create_task(one(r), name=f"aiocoll-rank-{r}") for r in range(world_size)]
    first: BaseException | None = None
    try:
        if return_exceptions:
            await asyncio.wait(tasks)
        else:
            pending: set[asyncio.Task[Any]] = set(tasks)
            while pending and first is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                failed = [t for t in tasks if t in done and not t.cancelled() and t.exception() is not None]
                if failed:
                    first = failed[0].exception()
            if pending:
                stopping = True
                for t in pending:
                    t.cancel()
                await asyncio.wait(pending)
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    if first is not None:
        raise first
    out: list[Any] = []
    for t in tasks:
        if t.cancelled():
            out.append(asyncio.CancelledError())
        else:
            exc = t.exception()
            out.append(exc if exc is not None else t.result())
    return out


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run the blocking ``fn(*args, **kwargs)`` on a new thread, in a copy of this context (the
    rank's world), while the event loop goes on serving the collectives; return its result.

    Raises:
        Whatever ``fn`` raised.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()
    ctx = contextvars.copy_context()

    def done(result: T | None, exc: BaseException | None) -> None:
        if fut.done():  # the awaiting rank was cancelled meanwhile
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result = ctx.run(fn, *args, **kwargs)
        except BaseException as exc:  # handed back to the awaiting task
            loop.call_soon_threadsafe(done, None, exc)
        else:
            loop.call_soon_threadsafe(done, result, None)

    threading.Thread(target=target, daemon=True, name="aiocoll-blocking-rank").start()
    return await fut


async def run_blocking_ranks(fn: Callable[[int], T], world_size: int, **kwargs: Any) -> list[Any]:
    """``fn(rank)`` (blocking code: ``aiocoll.sync``, autograd) for every rank of an in-process
    world, each rank on its own thread, its collectives served by the test's event loop.

    ``kwargs`` go to :func:`run_ranks`.

    Raises:
        The exception of the first rank to fail, as :func:`run_ranks`.
    """
    from .. import sync

    async def body(rank: int) -> Any:
        sync.bind()
        return await in_thread(fn, rank)

    return await run_ranks(body, world_size, **kwargs)


__all__ = ["RankKilled", "RanksFailed", "in_thread", "run_blocking_ranks", "run_processes", "run_ranks"]
