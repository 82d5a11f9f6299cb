"""Blocking aiocoll, for code that is not async: training loops, scripts, notebooks.

    import aiocoll.sync as coll

    coll.init()                              # the environment, as aiocoll.init
    y = coll.all_reduce(x)                   # blocks this thread until done
    coll.destroy()

Every collective and group function of ``aiocoll`` has a twin here with the same signature.
They run on one background event loop per process (a daemon thread started on first use), so
they may be called from any thread; calls from several threads run concurrently (each group
still needs the same call order on every member). The world started by :func:`init` is the
process's world: ``aiocoll.world()`` sees it from every thread.

Async and sync code can share one world and its groups:

- after :func:`init` here, :func:`run` runs a coroutine on the background loop, where
  ``await aiocoll.all_reduce(x, group=g)`` uses the same groups as the blocking calls;
- after ``await aiocoll.init()`` on your own event loop, call :func:`bind` once from that loop:
  blocking calls from other threads (``asyncio.to_thread``, a training thread) then run on it.

Called from a thread whose event loop is running, a blocking call would stall that loop (and
deadlock if the collective needs it), so it raises RuntimeError naming the ``await`` form
instead. Group functions never block and are allowed there.

Interrupting a blocking call (KeyboardInterrupt) cancels the collective, which aborts it on
every member and marks the group broken (see ``aiocoll``'s cancellation rules).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import contextvars
import functools
import logging
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import aiocoll
from aiocoll.collectives import tensors as _collectives
from aiocoll.groups import api as _groups_api
from aiocoll.groups import mesh as _mesh
from aiocoll.collectives import objects as _objects
from aiocoll.core.errors import NotInitializedError
from aiocoll.groups.group import ProcessGroup
from aiocoll.core.world import current_world

if TYPE_CHECKING:
    from aiocoll.core.world import World

log = logging.getLogger("aiocoll")

P = ParamSpec("P")
T = TypeVar("T")


# --------------------------------------------------------------------------- the background loop
class _Background:
    """One event loop in a daemon thread, started on first use, stopped at interpreter exit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                ready = threading.Event()
                loop = asyncio.new_event_loop()

                def serve() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    try:
                        loop.run_forever()
                    finally:
                        loop.close()

                self._thread = threading.Thread(target=serve, name="aiocoll-sync-loop", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def is_loop_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def stop(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=10)


_background = _Background()

#: Which event loop serves each world: its connections live there, so its collectives run there.
_loops: weakref.WeakKeyDictionary[World, asyncio.AbstractEventLoop] = weakref.WeakKeyDictionary()

#: Work submitted and not finished yet (waited for by ``destroy``).
_pending: set[concurrent.futures.Future[Any]] = set()
_pending_lock = threading.Lock()

#: Per world, the unit of work that claims its places last so far (see _in_order).
_last_claim: weakref.WeakKeyDictionary[World, asyncio.Future[None]] = weakref.WeakKeyDictionary()


async def _in_order(world: World | None, start: Callable[[], Awaitable[T]],
                   ready: Awaitable[Any] | None = None) -> T:
    """Run ``start()`` once every unit handed to _in_order before it on ``world`` has claimed its
    places (sequence numbers), and before any handed to it later claims theirs.

    ``start()`` must claim its places in its first step (before its first suspension), as the
    collectives do. ``ready``, if given, is awaited first while holding the unit's place (an
    aiocoll.torch unit waits there for its CUDA inputs to reach the host). Units are handed to
    _in_order on the world's loop in the order threads submit them, so work that threads submit
    (blocking calls, aiocoll.torch) claims in the order each thread made its calls.

    Raises:
        Whatever ``ready`` or ``start()``'s awaitable raises; CancelledError if cancelled while
        waiting for its turn (the units after it then go on).
    """
    if world is None:
        if ready is not None:
            await ready
        return await start()
    mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    before = _last_claim.get(world)
    _last_claim[world] = mine
    try:
        if before is not None and not before.done():
            await before
        if ready is not None:
            await ready
        claiming = start()
    except BaseException:
        mine.set_result(None)
        if asyncio.iscoroutine(ready):
            ready.close()
        raise
    # Set first, awaited second: whoever waits for ``mine`` runs only after this step, which
    # has by then run ``claiming`` up to its first suspension, past its claims.
    mine.set_result(None)
    return await claiming


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _refuse_in_loop(name: str) -> None:
    running = _running_loop()
    if running is None:
        return
    world = _world_or_none()
    owner = getattr(world, "loop", None) if world is not None else None
    if owner is not None and owner is not running:
        # `await aiocoll.<name>` would be refused here too: the world runs on another loop.
        raise RuntimeError(
            f"aiocoll.sync.{name}() was called from a thread whose event loop is running; blocking "
            f"here would stall that loop. The world runs on another event loop, where `await "
            f"aiocoll.{name}(...)` is the async form; from this loop, run the blocking call in a "
            f"worker thread: `await asyncio.to_thread(aiocoll.sync.{name}, ...)`."
        )
    raise RuntimeError(
        f"aiocoll.sync.{name}() was called from a thread whose event loop is running; blocking "
        f"here would stall that loop. In async code use `await aiocoll.{name}(...)`, or run the "
        "blocking call in another thread (asyncio.to_thread)."
    )


def _world_or_none() -> World | None:
    try:
        return current_world()
    except NotInitializedError:
        return None


def loop_for(world: World | None) -> asyncio.AbstractEventLoop:
    """The event loop that runs ``world``'s collectives (the background loop for no world).

    Raises:
        RuntimeError: the world was started on an event loop that was never bound
            (:func:`bind`), or that loop is closed.
    """
    if world is None:
        return _background.loop()
    loop = getattr(world, "loop", None) or _loops.get(world)
    if loop is None:
        raise RuntimeError(
            "this world was started by `await aiocoll.init()` on an event loop aiocoll.sync does not "
            "know: call aiocoll.sync.bind() once from that loop (or start the world with "
            "aiocoll.sync.init())"
        )
    if loop.is_closed():
        raise RuntimeError("the event loop that serves this world is closed; aiocoll.sync cannot use it")
    return loop


def bind(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Let other threads make blocking calls on the world of the calling context.

    Call it once from the event loop that ran ``await aiocoll.init()`` (or pass that loop).
    Not needed after :func:`init` here.

    Raises:
        NotInitializedError: no world in this context.
        RuntimeError: no ``loop`` given and no event loop running in this thread.
    """
    world = current_world()
    if loop is None:
        loop = _running_loop()
        if loop is None:
            raise RuntimeError("aiocoll.sync.bind() needs a running event loop, or pass loop=")
    _loops[world] = loop


def _track(fut: concurrent.futures.Future[Any]) -> None:
    with _pending_lock:
        _pending.add(fut)

    def done(f: concurrent.futures.Future[Any]) -> None:
        with _pending_lock:
            _pending.discard(f)

    fut.add_done_callback(done)


@contextlib.contextmanager
def _streams_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[None]:
    """Record the caller's CUDA streams for the tensors among the arguments (see _torch_arrays)."""
    if "torch" not in sys.modules:
        yield
        return
    torch = sys.modules["torch"]

    def tensors() -> Iterator[Any]:
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                yield a
            elif isinstance(a, (list, tuple)):
                yield from (t for t in a if isinstance(t, torch.Tensor))

    found = [t for t in tensors() if t.device.type == "cuda"]
    if not found:
        yield
        return
    from aiocoll.arrays.tensors import recorded_streams

    with recorded_streams(found):
        yield


def submit(coro: Coroutine[Any, Any, T], world: World | None = None) -> concurrent.futures.Future[T]:
    """Start ``coro`` on the loop that serves ``world`` (default: the calling context's world).

    The coroutine runs in a copy of the calling thread's context. Returns at once.

    Raises:
        RuntimeError: as :func:`loop_for`.
    """
    try:
        target = loop_for(world if world is not None else _world_or_none())
    except BaseException:
        coro.close()  # never started: no "never awaited" warning
        raise
    fut = asyncio.run_coroutine_threadsafe(coro, target)
    _track(fut)
    return fut


def wait(fut: concurrent.futures.Future[T]) -> T:
    """Block until ``fut`` is done; an interrupt cancels the work (and is raised again)."""
    try:
        return fut.result()
    except KeyboardInterrupt:
        fut.cancel()
        raise


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on the loop that serves this process's world and block until it is done.

    Inside it, the async API (``await aiocoll.all_reduce(...)``) uses the same world and groups
    as the blocking calls. Before any world exists it runs on the background loop.

    Raises:
        RuntimeError: called from a running event loop (``await`` the coroutine there instead).
        Whatever the coroutine raises.
    """
    if _running_loop() is not None:
        coro.close()
        _refuse_in_loop("run")
    return wait(submit(coro))


def _blocking(fn: Callable[P, Awaitable[T]]) -> Callable[P, T]:
    """The blocking twin of an aiocoll coroutine function."""
    name = fn.__name__

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        _refuse_in_loop(name)
        with _streams_of(args, kwargs):

            async def go() -> T:
                # The collective claims its place in its first step: in the order of this
                # thread's calls, also relative to its aiocoll.torch work (see _in_order).
                return await _in_order(_world_or_none(), lambda: fn(*args, **kwargs))

            return wait(submit(go()))

    call.__doc__ = (
        f"Blocking ``aiocoll.{name}``: runs it on aiocoll's background event loop and returns "
        f"its result.\n\n{fn.__doc__ or ''}"
    )
    call.__module__ = __name__
    call.__qualname__ = name
    return call


def _on_loop(fn: Callable[P, T]) -> Callable[P, T]:
    """A group function run on the thread of the loop that serves the world, so that the
    group registry is only ever changed from that thread. Called on that thread (or inside
    any running loop) it simply runs: it never blocks."""
    name = fn.__name__

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        world = _world_or_none()
        if world is None or _running_loop() is not None:
            return fn(*args, **kwargs)
        target = loop_for(world)
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        ctx = contextvars.copy_context()

        def step() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(ctx.run(fn, *args, **kwargs))
            except BaseException as exc:  # handed to the caller
                fut.set_exception(exc)

        target.call_soon_threadsafe(step)
        return wait(fut)

    call.__module__ = __name__
    call.__qualname__ = name
    return call


# --------------------------------------------------------------------------- start and stop
def init(
    rank: int | None = None,
    world_size: int | None = None,
    store: Any = None,
    transport: str | None = None,
    timeout: float | None = None,
    **kwargs: Any,
) -> ProcessGroup:
    """Blocking ``aiocoll.init``: join the world on aiocoll's background event loop.

    Arguments as ``aiocoll.init`` (left out: from the environment, else a world of one). The
    world becomes this process's world, seen by every thread.

    Returns:
        The world group.

    Raises:
        RuntimeError: called from a running event loop, or a world is already initialised.
        ValueError / StoreError / TransportError / HandshakeError: as ``aiocoll.init``.
    """
    _refuse_in_loop("init")
    existing = _world_or_none()
    if existing is not None:
        raise RuntimeError("aiocoll is already initialised in this process; call aiocoll.sync.destroy() first")
    loop = _background.loop()

    async def start() -> ProcessGroup:
        return await aiocoll.init(rank, world_size, store, transport, timeout, **kwargs)

    pg = wait(asyncio.run_coroutine_threadsafe(start(), loop))
    _loops[pg.world] = loop
    return pg


def destroy(*, abort: bool = False) -> None:
    """Blocking ``aiocoll.destroy``: finish the work in flight, leave the world, close.

    Work still in flight (lazy ``aiocoll.torch`` results) is waited for first; its errors are
    logged, not raised. Safe to call twice, and before ``init`` (then it does nothing).

    Raises:
        RuntimeError: called from a running event loop.
    """
    _refuse_in_loop("destroy")
    world = _world_or_none()
    if world is None:
        return
    with _pending_lock:
        pending = list(_pending)
    for f in pending:
        try:
            f.result(timeout=None if not abort else 0)
        except Exception as exc:  # reported, not raised: destroy must still close
            log.warning("aiocoll.sync.destroy: work in flight failed: %s", exc)
    target = loop_for(world)

    async def stop() -> None:
        await aiocoll.destroy(abort=abort)

    wait(asyncio.run_coroutine_threadsafe(stop(), target))
    _loops.pop(world, None)


def world() -> ProcessGroup:
    """The root group (as ``aiocoll.world``).

    Raises:
        NotInitializedError: before ``init``.
    """
    return aiocoll.world()


@atexit.register
def _at_exit() -> None:
    world = _world_or_none()
    if world is not None and _loops.get(world) is not None and _loops[world] is _background._loop:
        log.warning("aiocoll.sync: the world was not destroyed; destroying it at exit")
        try:
            destroy()
        except Exception as exc:  # interpreter exit: report and go on
            log.warning("aiocoll.sync: destroy at exit failed: %s", exc)
    _background.stop()


# --------------------------------------------------------------------------- collectives
all_reduce = _blocking(_collectives.all_reduce)
all_gather = _blocking(_collectives.all_gather)
reduce_scatter = _blocking(_collectives.reduce_scatter)
all_to_all = _blocking(_collectives.all_to_all)
broadcast = _blocking(_collectives.broadcast)
reduce = _blocking(_collectives.reduce)
gather = _blocking(_collectives.gather)
scatter = _blocking(_collectives.scatter)
barrier = _blocking(_collectives.barrier)
send = _blocking(_collectives.send)
recv = _blocking(_collectives.recv)
permute = _blocking(_collectives.permute)
all_reduce_coalesced = _blocking(_collectives.all_reduce_coalesced)
all_gather_coalesced = _blocking(_collectives.all_gather_coalesced)
reduce_scatter_coalesced = _blocking(_collectives.reduce_scatter_coalesced)
all_gather_object = _blocking(_objects.all_gather_object)
broadcast_object = _blocking(_objects.broadcast_object)

# --------------------------------------------------------------------------- groups
new_group = _on_loop(_groups_api.new_group)
new_subgroups = _on_loop(_groups_api.new_subgroups)
find_group = _on_loop(_groups_api.find_group)
find_or_create_group = _on_loop(_groups_api.find_or_create_group)
destroy_group = _on_loop(_groups_api.destroy_group)
renew_group = _on_loop(_groups_api.renew_group)
expand_group = _on_loop(_groups_api.expand_group)
init_device_mesh = _on_loop(_mesh.init_device_mesh)
DeviceMesh = _mesh.DeviceMesh
ProcessGroup = ProcessGroup
ReduceOp = aiocoll.ReduceOp

__all__ = [
    # starting and stopping
    "init",
    "destroy",
    "world",
    # collectives
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "all_to_all",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "barrier",
    "send",
    "recv",
    "permute",
    "all_reduce_coalesced",
    "all_gather_coalesced",
    "reduce_scatter_coalesced",
    "all_gather_object",
    "broadcast_object",
    "ReduceOp",
    # groups
    "ProcessGroup",
    "DeviceMesh",
    "new_group",
    "new_subgroups",
    "find_group",
    "find_or_create_group",
    "destroy_group",
    "renew_group",
    "expand_group",
    "init_device_mesh",
    # async and sync together
    "run",
    "bind",
]
