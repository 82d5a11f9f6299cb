"""Collectives in flight: start one in the background, find it again from its output, wait for it.

Where the collective runs: on the event loop that serves the world (see ``aiocoll.sync``). Called
from that loop's own thread (async code, the test harness), it becomes a task of that loop and
the call returns at once; waiting for an unfinished one there would deadlock, so it raises and
points to ``await``. Called from any other thread (a training loop), it is handed to that loop
and waiting blocks the calling thread.

Order: every member of a group must issue the group's collectives in the same order. A unit
of work claims its places (sequence numbers) in one go, in the first step of its body, and units
started here claim theirs strictly in the order they were started, after the blocking calls of
``aiocoll.sync`` made before them and before those made after (they share one order per world:
``aiocoll.sync._in_order``), even when a unit first waits for its CUDA inputs.

Inputs are snapshotted when the call is made (CPU: a copy; CUDA: an asynchronous copy into
pinned host memory on the caller's stream), so the caller may change them at once. CUDA outputs
are filled by an asynchronous copy on the caller's stream; waiting makes the waiting thread's
current stream wait for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import torch

from aiocoll import sync as _sync
from aiocoll.core.world import World, current_world

log = logging.getLogger("aiocoll")

Body = Callable[[list[torch.Tensor]], Awaitable[Sequence[torch.Tensor | None]]]
"""Runs the collective(s) on host snapshots of the inputs; returns one host tensor per output,
or None for an output the body already wrote (CPU ``out=``)."""


class Work:
    """One unit of collective work and the outputs it fills."""

    __slots__ = ("future", "loop", "done_event", "observed", "__weakref__")

    def __init__(self, future: concurrent.futures.Future[None], loop: asyncio.AbstractEventLoop) -> None:
        self.future = future
        self.loop = loop
        self.done_event: Any = None  # (torch.cuda.Event, device index) after the device copies
        self.observed = False

    def done(self) -> bool:
        return self.future.done()

    def wait(self) -> None:
        """Block until the work is done; raise its error; order the current CUDA stream after it.

        Raises:
            RuntimeError: not done yet and called on the thread of the loop that runs it.
            CollectiveError (and others): what the collective raised.
        """
        if not self.future.done():
            try:
                running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is self.loop:
                raise RuntimeError(
                    "this collective's result is not ready, and waiting for it here would block the event "
                    "loop that runs it: in async code, `await aiocoll.torch.wait_async(t)` (or `await t`) "
                    "before using the tensor"
                )
        self.observed = True
        try:
            self.future.result()
        except KeyboardInterrupt:
            self.future.cancel()
            raise
        self._order_stream()

    def _order_stream(self) -> None:
        if self.done_event is not None:
            event, index = self.done_event
            torch.cuda.current_stream(index).wait_event(event)

    async def wait_async(self) -> None:
        """Await the work from async code (on any event loop).

        Raises:
            CollectiveError (and others): what the collective raised.
        """
        self.observed = True
        await asyncio.wrap_future(self.future)
        self._order_stream()


# Output tensor (by id) -> its work; entries leave when waited for or when the tensor dies.
_by_output: dict[int, tuple[weakref.ref[torch.Tensor], Work]] = {}
_registry_lock = threading.Lock()
# Units not finished yet, for outstanding() and for tests of dropped results.
_in_flight: set[Work] = set()

def _forget(key: int) -> None:
    with _registry_lock:
        _by_output.pop(key, None)


def register(out: torch.Tensor, work: Work) -> None:
    key = id(out)
    with _registry_lock:
        _by_output[key] = (weakref.ref(out), work)
    weakref.finalize(out, _forget, key)


def work_of(t: torch.Tensor) -> Work | None:
    """The unfinished-or-unwaited work that fills ``t`` (an op's output), if any."""
    with _registry_lock:
        entry = _by_output.get(id(t))
    if entry is None or entry[0]() is not t:
        return None
    return entry[1]


def wait_for(t: torch.Tensor) -> None:
    """Wait for the work that fills ``t`` (nothing if there is none: waiting is idempotent)."""
    work = work_of(t)
    if work is not None:
        work.wait()
        _forget(id(t))


def outstanding() -> int:
    """How many units of work are started and not finished."""
    return len(_in_flight)


def _note_unobserved_failure(future: concurrent.futures.Future[None], observed: Callable[[], bool]) -> None:
    if not future.cancelled() and future.exception() is not None and not observed():
        log.warning("aiocoll.torch: a collective whose result was never used failed: %s", future.exception())


# --------------------------------------------------------------------------- staging
class _Snapshot:
    """Host copies of the inputs, taken on the caller's thread (and CUDA stream)."""

    def __init__(self, inputs: Sequence[torch.Tensor]) -> None:
        self.host: list[torch.Tensor] = []
        self.event: Any = None
        for t in inputs:
            t = t.detach()
            if t.is_conj():
                t = t.resolve_conj()
            if t.is_neg():
                t = t.resolve_neg()
            if t.device.type == "cpu":
                self.host.append(t.clone(memory_format=torch.contiguous_format))
            elif t.device.type == "cuda":
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                self.host.append(host)
                self.event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                self.event.record()
            else:
                self.host.append(t.to("cpu"))

    async def ready(self) -> list[torch.Tensor]:
        if self.event is not None:
            delay = 0.0
            while not self.event.query():  # poll: never block the event loop on the GPU
                await asyncio.sleep(delay)
                delay = min(max(delay * 2, 2e-5), 1e-3)
        return self.host


def _finish(outs: Sequence[torch.Tensor], results: Sequence[torch.Tensor | None], streams: dict[int, Any]) -> Any:
    """Copy host results into the outputs; return the CUDA event after the last device copy."""
    # Writing the result is no operation of the caller's: autograd must not record it. By the
    # time it runs the op has usually returned, so the output has its history (the op's
    # backward); a recorded copy_ would replace that history with the copy's, whose gradient for
    # the overwritten output is zero, and the input's gradient would come out all wrong, on
    # whichever member the write beat the lazy wrapper's capture of the history.
    with torch.no_grad():
        return _copy_out(outs, results, streams)


def _copy_out(outs: Sequence[torch.Tensor], results: Sequence[torch.Tensor | None], streams: dict[int, Any]) -> Any:
    event: Any = None
    for out, res in zip(outs, results):
        if res is None:
            continue
        if out.device.type == "cuda":
            if not res.is_pinned():
                pinned = torch.empty(res.shape, dtype=res.dtype, pin_memory=True)
                pinned.copy_(res)
                res = pinned
            idx = out.device.index if out.device.index is not None else torch.cuda.current_device()
            stream = streams.get(idx) or torch.cuda.current_stream(idx)
            with torch.cuda.stream(stream):
                out.copy_(res.view(out.shape), non_blocking=True)
                ev = torch.cuda.Event()  # type: ignore[no-untyped-call]
                ev.record(stream)
                event = (ev, idx)
        else:
            out.copy_(res.view(out.shape))
    return event


# --------------------------------------------------------------------------- launching
def _target_loop(world: World) -> asyncio.AbstractEventLoop:
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    known = getattr(world, "loop", None) or _sync._loops.get(world)
    if known is not None and not known.is_closed():
        return known
    if running is not None:
        _sync._loops[world] = running  # a world used from inside a loop lives on that loop
        return running
    return _sync.loop_for(world)  # raises with a hint (bind) when the loop is unknown


def launch(inputs: Sequence[torch.Tensor], outs: Sequence[torch.Tensor], body: Body) -> Work:
    """Start ``body`` on the world's loop and register ``outs`` as filled by it.

    Args:
        inputs: tensors read by the collective (snapshotted now).
        outs: output tensors (allocated by the caller, on the inputs' device).
        body: coroutine function on the host snapshots; see :data:`Body`. It must claim every
            place it needs in its first step (start core collectives before awaiting any).

    Raises:
        NotInitializedError: no world. RuntimeError: the world's loop is unknown (see sync.bind).
    """
    world = current_world()
    loop = _target_loop(world)
    snap = _Snapshot(inputs)
    streams: dict[int, Any] = {}
    for t in outs:
        if t.device.type == "cuda":
            idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
            streams.setdefault(idx, torch.cuda.current_stream(idx))
    future: concurrent.futures.Future[None] = concurrent.futures.Future()
    work = Work(future, loop)

    async def run() -> None:
        # CUDA inputs: wait for their host copies while holding our place, so that no later
        # unit claims its sequence numbers before ours.
        results = await _sync._in_order(world, lambda: body(snap.host), snap.ready())
        work.done_event = _finish(outs, results, streams)

    def settle(task: asyncio.Future[None]) -> None:
        _in_flight.discard(work)
        if task.cancelled():
            future.cancel()
        elif task.exception() is not None:
            future.set_exception(task.exception())  # type: ignore[arg-type, unused-ignore]  # needed with some torch versions
        else:
            future.set_result(None)

    _in_flight.add(work)
    obs = weakref.ref(work)
    future.add_done_callback(lambda f: _note_unobserved_failure(f, lambda: (w := obs()) is None or w.observed))

    def start() -> None:
        task = loop.create_task(run())
        task.add_done_callback(settle)

    if _running_is(loop):
        start()
    else:
        import contextvars

        ctx = contextvars.copy_context()
        loop.call_soon_threadsafe(start, context=ctx)
    _sync._track(future)
    for out in outs:
        register(out, work)
    return work


def _running_is(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
