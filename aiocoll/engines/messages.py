"""Runs sans-IO schedules (aiocoll.algorithms) over the communicator: the async driver.

For each batch a schedule yields, the driver posts every receive first (so that frames land
straight in their buffers), starts every send, and waits for all of them or for the
collective's failure, whichever comes first. The k-th message between a pair of ranks in one
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
from collections.abc import Iterable
from typing import Any

from ..core import trace
from ..core.comm import ActiveOp, Communicator
from ..core.errors import CollectiveError, CollectiveTimeoutError
from ..groups.group import ProcessGroup
from ..core.wire import FLAG_P2P, NO_CALL, Call, FrameKey, Kind
from ..algorithms import Recv, Schedule, Send

#: Payloads at least this large have their local work (reductions, copies) run off the loop.
OFFLOAD_BYTES = 1 << 20


def _bytes(a: Any) -> memoryview:
    m = memoryview(a)
    return m if (m.ndim == 1 and m.format == "B") else m.cast("B")


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


async def _wait(comm: Communicator, active: ActiveOp, waiters: list[asyncio.Future[Any]]) -> None:
    if not waiters:
        return
    if len(waiters) == 1:
        both = waiters[0]
    else:
        both = asyncio.gather(*waiters)
    both.add_done_callback(_retrieve)
    if not both.done():
        await asyncio.wait((both, active.failure), return_when=asyncio.FIRST_COMPLETED)
    if active.failure.done() and not active.failure.cancelled():
        exc = active.failure.exception()
        if exc is not None:
            raise exc
    if not both.done():  # pragma: no cover - wait() returned, so one of the two is done
        raise RuntimeError("driver woke with nothing done")
    try:
        both.result()
    except CollectiveError as exc:
        if exc.seq >= 0:
            raise
        # A send failed before the collective itself was failed (the communicator's errors for
        # a single frame know no group or step): say which collective it hit.
        raise active.error(type(exc), exc.detail, exc.ranks) from exc


#: A collective tells the other members it is still waiting this long before its timeout
#: (at most; a quarter of the timeout when that is shorter). Members that have not said so by
#: the timeout are the ones named: see Communicator.announce_waiting.
WAITING_LEAD_S = 1.0


def _announce_later(comm: Communicator, active: ActiveOp, timeout: float | None) -> asyncio.TimerHandle | None:
    if timeout is None or len(active.members) < 3:
        return None  # with two members, the one we wait for is the one to name
    lead = min(WAITING_LEAD_S, timeout / 4)
    return asyncio.get_running_loop().call_later(timeout - lead, comm.announce_waiting, active)


def _timeout_error(
    group: ProcessGroup, active: ActiveOp, name: str, timeout: float | None, sending: Iterable[int] = ()
) -> CollectiveTimeoutError:
    comm = group.world.comm
    waiting = {p.peer for p in active.posted} | set(sending)
    silent = comm.silent_members(active, timeout or 0.0)
    # Name the ranks we wait for that did not say they were waiting themselves; if every one
    # we wait for did (a ring: our neighbour waits for its own), the ranks nobody heard from.
    blame = (waiting & silent) or silent or waiting
    who = f"; still waiting for ranks {sorted(waiting)}" if waiting else ""
    if blame != waiting:
        who += f"; not heard from ranks {sorted(blame)}"
    return CollectiveTimeoutError(
        f"{name} did not complete within {timeout} s{who}",
        group=group.name,
        seq=active.seq,
        op=name,
        ranks=blame,
    )


async def run_schedule(
    group: ProcessGroup,
    name: str,
    kind: Kind,
    schedule: Schedule,
    *,
    seq: int,
    op: int = 0,
    dtype: int = 0,
    count: int = 0,
    check_count: bool = True,
    call: Call = NO_CALL,
    agree: bool = False,
    timeout: float | None,
    offload: bool = False,
) -> None:
    """Run ``schedule`` as collective number ``seq`` of ``group``.

    ``call``: what the members must agree on besides kind, op, dtype and count (its digest goes
    in every frame). ``agree``: also exchange empty frames with every member alongside
    (Communicator.agree), for schedules in which some members only send or only receive: the
    collective finishes nowhere before every member has seen that all called the same.
    ``offload``: run the schedule's local work on a worker thread (for large payloads).

    Raises:
        CollectiveError: on timeout, peer failure, mismatch or a remote abort (the subclass says
            which); the group is then broken on every member.
        asyncio.CancelledError: the caller was cancelled; the group is broken on every member.
    """
    comm = group.world.comm
    ranks = group.ranks
    active = comm.begin(group.name, group.gid, seq, name, frozenset(ranks))
    record = trace.begin(group, seq, name, trace.nbytes(dtype, count))
    digest = call.digest
    comm.expect(active, FrameKey(group.gid, seq, 0, kind, op, dtype, 0, count, digest), call,
                check_count=check_count, timeout=timeout)
    agreed = comm.agree(active, ranks, group.rank) if agree else None
    sent = [0] * group.size
    received = [0] * group.size
    loop = asyncio.get_running_loop()
    stepping: asyncio.Future[Any] | None = None
    sends: list[tuple[int, asyncio.Future[Any]]] = []
    announce = _announce_later(comm, active, timeout)
    try:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    # The code between two yields is the schedule's local work (copies,
                    # reductions). For large payloads it runs on a worker thread (numpy releases
                    # the GIL), so the event loop keeps serving other tasks meanwhile.
                    if offload:
                        stepping = loop.run_in_executor(None, _step, schedule)
                        batch = await stepping
                        stepping = None
                    else:
                        batch = _step(schedule)
                    if batch is None:
                        if agreed is not None:
                            await _wait(comm, active, [agreed])
                        break
                    waiters: list[asyncio.Future[Any]] = []
                    for item in batch:
                        if isinstance(item, Recv):
                            key = FrameKey(group.gid, seq, received[item.peer], kind, op, dtype, 0, count, digest)
                            received[item.peer] += 1
                            waiters.append(
                                comm.post_recv(ranks[item.peer], key, _bytes(item.into), active, check_count=check_count)
                            )
                    sends.clear()
                    for item in batch:
                        if isinstance(item, Send):
                            key = FrameKey(group.gid, seq, sent[item.peer], kind, op, dtype, 0, count, digest)
                            sent[item.peer] += 1
                            fut = comm.spawn(comm.send(ranks[item.peer], key, _bytes(item.data)))
                            sends.append((ranks[item.peer], fut))
                            waiters.append(fut)
                    await _wait(comm, active, waiters)
        except TimeoutError:
            stuck = {peer for peer, fut in sends if not fut.done()}
            raise _timeout_error(group, active, name, timeout, stuck) from None
    except BaseException as exc:
        if announce is not None:
            announce.cancel()
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


def _step(schedule: Schedule) -> list[Any] | None:
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
            raise _timeout_error(group, active, name, timeout, {other}) from None
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


__all__ = ["run_schedule", "run_p2p", "CollectiveError"]
