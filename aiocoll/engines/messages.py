"""The message-passing engine: runs sans-IO schedules (aiocoll.algorithms) over the communicator.

For each batch a schedule yields, the driver posts every receive first (so that frames land
straight in their buffers), starts every send, and waits for all of them or for the
collective's failure, whichever comes first. A ``Start`` batch is started and the schedule
resumed at once (its local work then overlaps those transfers) until the ``Finish`` naming
them; what is still started when the schedule ends is waited for before the collective ends. The k-th message between a pair of ranks in one
collective gets step k in its frame key; together with the group id and sequence number that is
what the receiving side matches on.

Timeouts, cancellation and failures end here: the collective is unregistered, its pending
receives withdrawn, its group marked broken, and (if the failure started on this rank) every
other member is told with an ABORT frame, so that all members raise instead of waiting.
Point to point is the exception for timeouts and cancellation: a send or receive gives up
without breaking the group (see run_p2p).
Sends already handed to a transport are never interrupted mid-frame: they finish in the
background (tracked by the communicator), keeping every connection's framing intact.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from .. import algorithms
from ..algorithms import Batch, Finish, Recv, Schedule, Send, Start
from ..core import trace
from ..core.comm import ActiveOp, Communicator
from ..core.errors import CollectiveError, CollectiveTimeoutError
from ..core.wire import FLAG_P2P, FrameKey, Kind
from . import scope

if TYPE_CHECKING:
    from ..groups.group import ProcessGroup
    from .plan import Plan

#: Payloads at least this large have their local work (reductions, copies) run off the loop.
OFFLOAD_BYTES = 1 << 20


def _bytes(a: Any) -> Any:
    if hasattr(a, "__cuda_array_interface__"):
        return a  # device memory (aiocoll.engines.gpu): flat uint8 already, the transport reads it
    m = memoryview(a)
    return m if (m.ndim == 1 and m.format == "B") else m.cast("B")


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


async def _wait(comm: Communicator, active: ActiveOp, waiters: list[asyncio.Future[Any]]) -> None:
    """Wait until every waiter is done, one fails, or the collective fails; raise the failure.

    One future gates the wait, each waiter's callback counting down to it: one loop turn from
    the last completion to the caller's wake-up, where gather() plus wait() took three (a 4 B
    all_reduce is a handful of such turns on each rank).
    """
    left = [w for w in waiters if not w.done()]
    if left and not active.failure.done():
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        count = len(left)

        def one(f: asyncio.Future[Any]) -> None:
            nonlocal count
            count -= 1
            # Retrieved here (also for waiters that end after the gate opened): asyncio would
            # log a failed future nobody looked at.
            failed = f.cancelled() or f.exception() is not None
            if (failed or count == 0) and not gate.done():
                gate.set_result(None)

        def failed(_: asyncio.Future[None]) -> None:
            if not gate.done():
                gate.set_result(None)

        for w in left:
            w.add_done_callback(one)
        active.failure.add_done_callback(failed)
        try:
            await gate
        finally:
            active.failure.remove_done_callback(failed)
    if active.failure.done() and not active.failure.cancelled():
        exc = active.failure.exception()
        if exc is not None:
            raise exc
    first: BaseException | None = None
    for w in waiters:
        if w.done():
            exc = w.exception() if not w.cancelled() else asyncio.CancelledError()
            first = first or exc
    if isinstance(first, CollectiveError) and first.seq < 0:
        # A send failed before the collective itself was failed (the communicator's errors for
        # a single frame know no group or step): say which collective it hit.
        raise active.error(type(first), first.detail, first.ranks) from first
    if first is not None:
        raise first
    if any(not w.done() for w in waiters):  # pragma: no cover - the gate opens on all or a failure
        raise RuntimeError("driver woke with a step unfinished")


class MessageEngine:
    """Message passing: a plan runs as an algorithm's schedule over the communicator's links.

    One instance serves every group (it keeps no state: the order of collectives is their
    sequence numbers, carried in every frame), so ``reserve``/``abandon`` have nothing to do.
    """

    def reserve(self) -> int:
        return -1

    def abandon(self, ticket: int) -> None:
        pass

    async def run(self, group: ProcessGroup, plan: Plan, ticket: int = -1) -> None:
        """Run ``plan``: its own schedule, or the one the algorithm table picks.

        Raises:
            CollectiveError, asyncio.CancelledError: as ``run_schedule``.
        """
        if plan.schedule is not None:
            schedule = plan.schedule(group.rank, group.size)
        else:
            assert plan.x is not None and plan.out is not None
            schedule = algorithms.select(
                plan.collective, group.rank, group.size, x=plan.x, out=plan.out, root=plan.root, reduce=plan.reduce,
                chosen=group.world.settings.algorithms,
            )
        await run_schedule(group, plan, schedule)


#: The message-passing engine (stateless: one for every group).
MESSAGES = MessageEngine()


async def run_schedule(group: ProcessGroup, plan: Plan, schedule: Schedule) -> None:
    """Run ``schedule`` as this member's part of ``plan`` (collective number ``plan.seq``).

    ``plan.call``: what the members must agree on besides kind, op, dtype and count (its digest
    goes in every frame). ``plan.agree``: also exchange empty frames with every member alongside
    (Communicator.agree), for schedules in which some members only send or only receive: the
    collective finishes nowhere before every member has seen that all called the same.
    ``plan.offload``: run the schedule's local work on a worker thread (for large payloads).

    Raises:
        CollectiveError: on timeout, peer failure, mismatch or a remote abort (the subclass says
            which); the group is then broken on every member.
        asyncio.CancelledError: the caller was cancelled; the group is broken on every member.
    """
    comm = group.world.comm
    ranks = group.ranks
    seq, kind, op, dtype, count = plan.seq, int(plan.kind), int(plan.op), int(plan.dtype), plan.count
    check_count, timeout, offload = plan.check_count, plan.timeout, plan.offload
    active = scope.begin(group, plan)
    record = trace.begin(group, seq, plan.label, trace.nbytes(dtype, count))
    digest = plan.call.digest
    agreed = comm.agree(active, ranks, group.rank) if plan.agree else None
    sent = [0] * group.size
    received = [0] * group.size
    loop = asyncio.get_running_loop()
    stepping: asyncio.Future[Any] | None = None
    # Started and not yet finished (Start/Finish batches, or a plain batch being waited for):
    # id(op) -> (op, its waiter, the rank a send goes to or -1). The op is held so its id stays its own.
    started: dict[int, tuple[Any, asyncio.Future[Any] | None, int]] = {}
    announce = scope.announce_later(group, active, timeout)
    waited = True  # the first step copies the input (ring) or builds a batch: as after a wait

    def start(ops: list[Any]) -> list[asyncio.Future[Any]]:
        waiters: list[asyncio.Future[Any]] = []
        # Receives first, so that frames land straight in their buffers.
        for item in ops:
            if isinstance(item, Recv):
                key = FrameKey(group.gid, seq, received[item.peer], kind, op, dtype, 0, count, digest)
                received[item.peer] += 1
                fut = comm.post_recv(ranks[item.peer], key, _bytes(item.into), active, check_count=check_count)
                started[id(item)] = (item, fut, -1)
                waiters.append(fut)
        for item in ops:
            if isinstance(item, Send):
                key = FrameKey(group.gid, seq, sent[item.peer], kind, op, dtype, 0, count, digest)
                sent[item.peer] += 1
                peer = ranks[item.peer]
                payload = _bytes(item.data)
                # A small frame the connection can write at once needs no task: it is written
                # (copied behind its header) before this returns.
                if comm.send_now(peer, key, payload):
                    started[id(item)] = (item, None, peer)
                    continue
                sending = comm.spawn(comm.send(peer, key, payload))
                started[id(item)] = (item, sending, peer)
                waiters.append(sending)
        return waiters

    def finish(ops: list[Any]) -> list[asyncio.Future[Any]]:
        waiters: list[asyncio.Future[Any]] = []
        for item in ops:
            entry = started.pop(id(item), None)
            if entry is None:
                raise RuntimeError(f"the schedule finished {item!r}, which it had not started")
            if entry[1] is not None:
                waiters.append(entry[1])
        return waiters

    try:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    # The code between two yields is the schedule's local work (copies,
                    # reductions). For large payloads it runs on a worker thread (numpy releases
                    # the GIL), so the event loop keeps serving other tasks meanwhile, and the
                    # transfers a Start began keep moving.
                    # Only after a wait: that is where a schedule reduces what arrived; after a
                    # Start it only builds its next batch, not worth a thread hop (each is a
                    # wake-up, milliseconds on a loaded host).
                    if offload and waited:
                        stepping = loop.run_in_executor(None, _step, schedule)
                        batch = await stepping
                        stepping = None
                    else:
                        batch = _step(schedule)
                    if batch is None:
                        rest = [entry[1] for entry in started.values() if entry[1] is not None]
                        if agreed is not None:
                            rest.append(agreed)
                        await _wait(comm, active, rest)
                        started.clear()
                        break
                    waited = not isinstance(batch, Start)
                    if isinstance(batch, Start):
                        start(batch.ops)
                    elif isinstance(batch, Finish):
                        await _wait(comm, active, finish(batch.ops))
                    else:
                        start(batch)
                        await _wait(comm, active, finish(batch))
        except TimeoutError:
            waiting = {p.peer for p in active.posted}
            waiting |= {peer for _, fut, peer in started.values() if peer >= 0 and fut is not None and not fut.done()}
            raise scope.timed_out(comm, active, timeout, waiting) from None
    except BaseException as exc:
        if announce is not None:
            announce.cancel()
        for _, fut, _ in started.values():
            if fut is not None:
                fut.add_done_callback(_retrieve)  # nobody waits for them any more
        if stepping is None or stepping.done():
            schedule.close()
        else:  # the worker thread is still inside the generator: close it when it returns
            stepping.add_done_callback(lambda _: schedule.close())
        comm.end(active, exc)
        trace.end(record, exc)
        raise
    if announce is not None:
        announce.cancel()
    comm.end(active)
    trace.end(record)


def _step(schedule: Schedule) -> Batch | None:
    try:
        return next(schedule)
    except StopIteration:
        return None


async def run_p2p(
    group: ProcessGroup,
    peer: int,
    payload: Any,
    *,
    receive: bool,
    tag: int,
    dtype: int,
    count: int,
    timeout: float | None,
) -> None:
    """Send ``payload`` to (or receive it from) group rank ``peer`` on ``tag``."""
    comm = group.world.comm
    counter = group.p2p_received if receive else group.p2p_sent
    n = counter[(peer, tag)]
    counter[(peer, tag)] += 1
    name = "recv" if receive else "send"
    other = group.ranks[peer]
    active = comm.begin(group.name, group.gid, n, name, frozenset((comm.rank, other)), p2p=True)
    key = FrameKey(group.gid, n, tag, Kind.SEND, 0, dtype, FLAG_P2P, count)
    try:
        try:
            async with asyncio.timeout(timeout):
                if receive:
                    fut = comm.post_recv(other, key, _bytes(payload), active)
                else:
                    fut = comm.spawn(comm.send(other, key, _bytes(payload)))
                await _wait(comm, active, [fut])
        except TimeoutError:
            raise scope.timed_out(comm, active, timeout, {p.peer for p in active.posted} | {other}) from None
    except (asyncio.CancelledError, CollectiveTimeoutError):
        # Point to point resynchronises instead of breaking the group (which would break it on
        # this pair only: a third member would wait for its timeout on its next call). A send
        # already started still goes out. A receive gives its message number back when nothing
        # of the message has come and no later receive on this (peer, tag) was posted, so that
        # a retry gets the message; otherwise the message is dropped when it comes. Either way
        # both sides' message numbers stay in step.
        if receive and counter[(peer, tag)] == n + 1 and comm.withdraw(active):
            counter[(peer, tag)] = n
        else:
            comm.abandon(active)
        comm.end(active)
        raise
    except BaseException as exc:
        comm.end(active, exc)
        raise
    comm.end(active)


__all__ = ["MESSAGES", "MessageEngine", "OFFLOAD_BYTES", "run_p2p", "run_schedule"]
