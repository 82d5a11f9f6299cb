"""The same-host engine of one group: its segment, its doorbell, and the drivers of its algorithms.

Lifecycle. The engine is made on the group's first fast-path collective and lives as long as
its group: until ``destroy_group``, until the group is no longer referenced (see
``aiocoll.engines.select``), or until the shm transport closes (it is one of the transport's
``closers``), whichever comes first; operations already running finish before it closes
(``retire``). That first collective also sets the segment up at the collective's own sequence
number, so every member does it at the same point of its call order::

    group rank 0: memfd_create (no name anywhere), write the header (group id, random token),
                  map it, attach (pid, doorbell name)
                  -> the descriptor to every member, over the link's Unix socket (SCM_RIGHTS)
                  -> then (gid, token, size) to every member     (frame step 0)
    member p:     take the descriptor that matches (gid, token) from what the socket brought,
                  map it, check the header, attach, close the descriptor

Nothing is ever named, so a crash or SIGKILL at any point leaves nothing behind: the kernel
frees the memory when the last process holding a descriptor or mapping is gone. A descriptor
that arrived for a setup that failed stays with the transport until this group's engine closes
or the transport does. Pages are committed as collectives touch them: a group that only ever
runs small collectives costs a few pages per member, not the whole segment.

Operations run one at a time per group, in the order their collectives claimed their sequence
numbers (the same order on every member, which is what makes the shared counters meaningful):
a collective takes its place (``reserve``) when it claims its number, before its first await,
so one that awaits something first (a collective of several steps) cannot be overtaken on some
members and not on others. Each is registered with the communicator (``comm.begin``), so
another member's abort fails it, and so does a member that left or died before reaching a
counter this member waits for (a member that got that far has nothing more to give: its
departure changes nothing); it honours
its timeout (CollectiveTimeoutError naming the members whose counters did not move); and a
failure or cancellation breaks the engine and the group for good: counters that are out of step
cannot be trusted, and the caller's output may be half-written.

Drivers. Operations run on the event loop: waits spin for ``spin_s`` (yielding the CPU) and
then sleep on the doorbell (``loop.add_reader``); long ones give the loop a turn every
``YIELD_S``, so other tasks wait at most about a millisecond. Operations of at least
``thread_min`` bytes (``AIOCOLL_SHM_THREAD_MIN``) may instead run in the engine's worker thread
(numpy releases the GIL while copying and reducing), where waits sleep in ``select``. That is
off by default: in the sweep on the 16-core machine the thread lost at 2 and 8 ranks (by 7-25%
at 64-256 MiB) and won only some 4-rank cells, with no consistent gain to pay for the handoffs
and GIL round trips of every round (BENCHMARKS.md, "Tuning"). An abort,
timeout or cancellation stops the thread at its next wait or round, and the caller is not
resumed before the thread has let go of the caller's arrays.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import secrets
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from . import pipelines as algo
from ...core import trace
from ...core.comm import ActiveOp, dtype_name, op_name
from ...arrays.dtypes import WireDtype
from ...core.errors import (
    CollectiveTimeoutError,
    GroupBrokenError,
    MismatchError,
    PeerFailureError,
    RemoteAbortError,
    TransportError,
)
from ...arrays.ops import ReduceOp
from ...sharedmem.doorbell import SLEEP_SLICE_S, Doorbell, fence, spin_until, usable_cpus
from .layout import RELEASED, REDUCED, STAGED, GroupSegment, peek, segment_bytes
from ...sharedmem.segment import create_anonymous, map_fd
from ...core.wire import Call, FrameKey, Kind, kind_name
from .. import scope
from ..plan import Plan

if TYPE_CHECKING:
    from ...groups.group import ProcessGroup
    from ...transports.shm import ShmTransport

log = logging.getLogger("aiocoll")

Array = np.ndarray[Any, Any]

#: The setup frame: group id, token and size of the segment whose descriptor went ahead of it.
_OFFER = struct.Struct("<QQQ")
#: How long a loop-driven operation may keep the event loop before giving other tasks a turn.
YIELD_S = 0.001


#: Most staging memory per member (depth * world * part bytes), and for the whole segment:
#: large groups get smaller parts (every member stages a part for every other one).
STAGE_BUDGET = 16 << 20
SEGMENT_BUDGET = 256 << 20


def default_part_bytes(world: int, depth: int = 4, chosen: int = 0) -> int:
    """Bytes each member owns per round (``chosen``, Settings.shm_part_bytes, overrides)."""
    part = chosen
    if part:
        return max(4096, part // 4096 * 4096)
    # Measured (BENCHMARKS.md, "tuning"): big parts amortise the per-round Python work, small
    # ones keep a round (W parts) in the cache; the best trade moves with W.
    if world <= 2:
        part = 512 << 10
    else:
        part = (256 << 10) if world <= 4 else (128 << 10)
    budget = min(STAGE_BUDGET, SEGMENT_BUDGET // world)
    return max(4096, min(part, budget // (depth * world) // 4096 * 4096))


def default_direct_max(world: int, part: int, limit: int = 32 << 10) -> int:
    """Largest all_reduce done in one round, every member reducing everything."""
    return min(limit, world * part)


def _differences(mine: tuple[int, ...], theirs: tuple[int, ...], me: str, them: str) -> list[str]:
    """The descriptor words that differ, in words (the last one, the call digest, is left to
    a DESCRIBE: only its owner can say what it stands for)."""
    _, kind, op, code, count, root, algorithm = mine[:7]
    t_kind, t_op, t_code, t_count, t_root, t_algorithm = theirs[1:7]
    if t_kind != kind:
        return [f"{them} called {kind_name(t_kind)}, {me} called {kind_name(kind)}"]
    out = []
    if t_op != op:
        out.append(f"reduce op {op_name(t_op)} on {them} vs {op_name(op)} on {me}")
    if t_code != code:
        out.append(f"dtype {dtype_name(t_code)} on {them} vs {dtype_name(code)} on {me}")
    if t_count != count:
        out.append(f"{t_count} elements on {them} vs {count} on {me}")
    if t_root != root:
        out.append(f"src {t_root} on {them} vs {root} on {me}")
    if not out and (t_algorithm != algorithm or theirs[0] != mine[0]):
        out.append(f"operation {theirs[0]} (algorithm {t_algorithm}) on {them} vs {mine[0]} (algorithm {algorithm}) "
                   f"on {me}: the members' settings differ")
    return out


class _Stopped(Exception):
    """The worker thread was told to stop (abort, timeout, cancellation)."""


class ShmEngine:
    """Runs the fast-path collectives of one group whose members all share this host."""

    def __init__(
        self,
        group: ProcessGroup,
        transport: ShmTransport,
        *,
        on_close: Callable[[ShmEngine], None] | None = None,
    ) -> None:
        settings = group.world.settings
        self.settings = settings
        self.gid = group.gid
        self.size = group.size
        self.rank = group.rank
        self.members = group.ranks
        self.name = group.name
        self._comm = group.world.comm
        # Turns, in reserve() order: the lowest ticket not finished runs; see _acquire.
        self._issued = 0
        self._turn = 0
        self._holder: int | None = None
        self._finished: set[int] = set()
        self._turn_waiters: dict[int, asyncio.Future[None]] = {}
        self._others = tuple(p for p in range(group.size) if p != group.rank)
        self._member_set = frozenset(group.ranks)
        self._typed: dict[tuple[str, int], list[Array]] = {}
        self._seg: GroupSegment | None = None
        self._bell: Doorbell | None = None
        self._op_no = 0
        self._base = 0
        self._broken: str | None = None
        self._closed = False
        self._closed_why = "the shm transport closed"
        self._retiring: str | None = None  # close once idle, for this reason
        self._transport = transport
        self._waiting: algo.Wait | None = None
        self._current: ActiveOp | None = None  # the operation holding the engine's turn
        self._unheard: list[tuple[int, asyncio.Future[Any]]] = []  # setup messages awaited
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._stop = threading.Event()
        self._on_close = on_close
        self.thread_min = settings.shm_thread_min
        # Spinning only pays when every member has a core of its own: with more members than
        # cores (or all of them as tasks of this very process) the spinner steals the time of
        # the member it waits for.
        own_cores = usable_cpus() >= self.size and not group.world.shares_process
        self.spin_s = settings.shm_spin_us * 1e-6 if own_cores else 0.0
        self.spin_yield = settings.shm_spin_yield

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ public operations
    def reserve(self) -> int:
        """This engine's next turn, for a collective that claims its sequence number now.

        Pass it to the operation (``ticket=``); a collective that will not run after all gives
        it back with :meth:`abandon`, or the operations after it wait for it until they time out.
        """
        ticket = self._issued
        self._issued += 1
        return ticket

    def abandon(self, ticket: int) -> None:
        """Give ``ticket`` back unused (no-op if its operation ran or is running)."""
        if ticket != self._holder:
            self._finish(ticket)

    async def run(self, g: ProcessGroup, plan: Plan, ticket: int) -> None:
        """Run ``plan`` (all_reduce, reduce_scatter, all_gather or broadcast; flat arrays; an
        AVG all_reduce is left a SUM) in the group's segment.

        Raises:
            CollectiveError: timeout (naming the members that did not arrive), a dead member, a
                mismatch with another member's call, a remote abort, or a broken group.
            asyncio.CancelledError: the caller was cancelled; the group is broken everywhere.
        """
        x, out = plan.x, plan.out
        assert x is not None and out is not None
        op, code = ReduceOp(plan.op) if plan.op else ReduceOp.SUM, WireDtype(plan.dtype)
        small: tuple[ReduceOp, WireDtype, Array, Array] | None = None
        build: Callable[[algo.Context], tuple[algo.Algorithm, int]]
        if plan.collective == "all_reduce":
            nbytes, small = x.nbytes, (op, code, x, out)

            def build(ctx: algo.Context) -> tuple[algo.Algorithm, int]:
                return algo.all_reduce_pipelined(ctx, op, code, x, out), algo.ALGO_PIPELINED
        elif plan.collective == "reduce_scatter":
            nbytes = x.nbytes

            def build(ctx: algo.Context) -> tuple[algo.Algorithm, int]:
                return algo.reduce_scatter_pipelined(ctx, op, code, x, out), algo.ALGO_PIPELINED
        elif plan.collective == "all_gather":
            nbytes = out.nbytes

            def build(ctx: algo.Context) -> tuple[algo.Algorithm, int]:
                return algo.all_gather_pipelined(ctx, x, out), algo.ALGO_PIPELINED
        elif plan.collective == "broadcast":
            nbytes, root = out.nbytes, plan.root

            def build(ctx: algo.Context) -> tuple[algo.Algorithm, int]:
                return algo.broadcast_pipelined(ctx, root, out), algo.ALGO_PIPELINED
        else:
            self.abandon(ticket)
            raise ValueError(f"the shm engine does not run {plan.collective}")
        await self._run(g, plan, nbytes, build, ticket, small)

    # ------------------------------------------------------------------ one operation
    async def _run(
        self,
        g: ProcessGroup,
        plan: Plan,
        nbytes: int,
        build: Callable[[algo.Context], tuple[algo.Algorithm, int]],
        ticket: int,
        small: tuple[ReduceOp, WireDtype, Array, Array] | None = None,
    ) -> None:
        comm = g.world.comm
        seq, name, timeout = plan.seq, plan.label, plan.timeout
        kind, op, code, count, call, root = plan.kind, plan.op, WireDtype(plan.dtype), plan.count, plan.call, plan.root
        try:
            active = scope.begin(g, plan, self._member_set)
        except BaseException:
            self.abandon(ticket)
            raise
        record = trace.begin(g, seq, name, nbytes)
        active.needs = lambda peer: self._needs(active, peer)
        # A deadline rather than asyncio.timeout around everything: a small operation that
        # never has to sleep then pays nothing for its timeout (see _wait_async).
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            try:
                await self._acquire(ticket, deadline)
                self._current = active
                try:
                    if self._broken is not None or self._closed:
                        why = self._broken or self._closed_why
                        raise active.error(GroupBrokenError, f"group is broken: {why}", ())
                    if self._seg is None:
                        async with asyncio.timeout_at(deadline):
                            await self._setup(g, seq, kind, op, code, count, call, active)
                    seg = self._seg
                    assert seg is not None
                    op_no = self._op_no
                    self._op_no += 1
                    # The first slot (and its descriptor) may still be read by a member that is
                    # behind: a broadcast root, for one, waits for nobody.
                    base = self._base
                    if base >= seg.depth:
                        reuse = algo.Wait(RELEASED, base - seg.depth + 1, self._others)
                        if not self._satisfied(reuse):
                            await self._wait_async(reuse, active, deadline)
                    if small is not None and nbytes <= seg.direct_max:
                        desc = (op_no, int(kind), op, int(code), count, root, algo.ALGO_DIRECT, call.digest)
                        seg.write_descriptor(self.rank, self._base % seg.depth, desc)
                        await self._all_reduce_direct(*small, desc, active, deadline)
                        self._base += 1
                    else:
                        ctx = algo.Context(seg, self.rank, self._base, self._publish)
                        gen, algorithm = build(ctx)
                        desc = (op_no, int(kind), op, int(code), count, root, algorithm, call.digest)
                        seg.write_descriptor(self.rank, self._base % seg.depth, desc)
                        async with asyncio.timeout_at(deadline):
                            if nbytes >= self.thread_min:
                                rounds = await self._drive_in_thread(gen, active, desc)
                            else:
                                rounds = await self._drive(gen, active, desc, deadline)
                        self._base += rounds
                finally:
                    self._current = None
                    self._release(ticket)
            except TimeoutError:
                raise self._timeout_error(active, name, timeout) from None
        except BaseException as exc:
            if self._broken is None:
                self._broken = f"{name} (step {seq}) failed: {exc!r}"
            comm.end(active, exc)
            trace.end(record, exc)
            raise
        comm.end(active)
        trace.end(record)

    async def _acquire(self, ticket: int, deadline: float) -> None:
        """Wait for ``ticket``'s turn: operations run one at a time, in reserve() order
        (asyncio.Lock would do for call order, at several times the cost uncontended)."""
        if self._turn != ticket:
            fut = asyncio.get_running_loop().create_future()
            self._turn_waiters[ticket] = fut
            try:
                async with asyncio.timeout_at(deadline):
                    await fut
            except BaseException:
                self._turn_waiters.pop(ticket, None)
                self._finish(ticket)  # handed the turn just as we gave up, or never: pass it on
                raise
        self._holder = ticket

    def _release(self, ticket: int) -> None:
        if self._holder == ticket:
            self._holder = None
        self._finish(ticket)

    def _finish(self, ticket: int) -> None:
        """``ticket`` ran or never will; the lowest unfinished ticket gets the turn."""
        if ticket < self._turn or ticket in self._finished:
            return
        self._finished.add(ticket)
        while self._turn in self._finished:
            self._finished.discard(self._turn)
            self._turn += 1
        fut = self._turn_waiters.pop(self._turn, None)
        if fut is not None and not fut.done():
            fut.set_result(None)  # ownership passes straight to the next in line
        elif self._retiring is not None and self._idle():
            self.close(why=self._retiring)

    def _idle(self) -> bool:
        """No operation running, and none that reserved a turn still to run."""
        return self._holder is None and self._turn == self._issued

    # ------------------------------------------------------------------ small all_reduce
    def _views(self, dtype: np.dtype[Any], slot: int) -> list[Array]:
        """Every member's staging slot ``slot`` viewed as ``dtype`` (cached: views cost)."""
        key = (dtype.str, slot)
        views = self._typed.get(key)
        if views is None:
            seg = self._segment()
            views = [seg.stage[p][slot].view(dtype) for p in range(self.size)]
            self._typed[key] = views
        return views

    async def _all_reduce_direct(
        self,
        op: ReduceOp,
        code: WireDtype,
        x: Array,
        out: Array,
        desc: tuple[int, ...],
        active: ActiveOp,
        deadline: float,
    ) -> None:
        # all_reduce_direct of _shm_algorithms, written out flat: for a few bytes the
        # generator and its waits cost more than the collective itself.
        seg = self._segment()
        g = self._base
        slot = g % seg.depth
        others = self._others
        n = x.size
        np.copyto(self._views(x.dtype, slot)[self.rank][:n], x)
        self._publish((STAGED,), g + 1)
        arrived = algo.Wait(STAGED, g + 1, others, first=True)
        if not self._satisfied(arrived):
            # No view of the segment is held across this wait: an error raised here keeps this
            # frame alive in its traceback, and a view in it would keep the segment mapped
            # after the engine closes.
            await self._wait_async(arrived, active, deadline)
        if self._check_descriptors(arrived, desc, active):
            await self._until_failed(active, deadline)
        if n:
            # Own input from the slot too: ``out`` may be ``x`` (all_reduce with out=x).
            algo.fold(op, code, [v[:n] for v in self._views(x.dtype, slot)], out)
        self._publish((REDUCED, RELEASED), g + 1)

    def _timeout_error(self, active: ActiveOp, name: str, timeout: float) -> CollectiveTimeoutError:
        w, seg = self._waiting, self._seg
        missing: list[int] = []
        if w is not None and seg is not None:
            missing = [self.members[p] for p in w.members if seg.counter(p, w.which) < w.target]
        elif self._unheard:
            missing = [rank for rank, fut in self._unheard if not fut.done() or fut.cancelled()]
        who = f"; ranks {missing} had not arrived" if missing else ""
        return scope.timed_out(self._comm, active, timeout, missing, missing, who)

    # ------------------------------------------------------------------ setup
    async def _setup(
        self, g: ProcessGroup, seq: int, kind: Kind, op: int, code: WireDtype, count: int, call: Call, active: ActiveOp
    ) -> None:
        comm = g.world.comm
        key = FrameKey(g.gid, seq, 0, int(kind), op, int(code), 0, count, call.digest)
        bell = Doorbell()
        fd = -1
        seg: GroupSegment | None = None
        try:
            if g.rank == 0:
                depth = self.settings.shm_depth
                part = default_part_bytes(g.size, depth, self.settings.shm_part_bytes)
                size = segment_bytes(g.size, part, depth)
                token = secrets.randbits(64) | 1
                fd = create_anonymous(size, f"g{g.gid:016x}")
                mm = map_fd(fd, size)
                try:
                    seg = GroupSegment(
                        mm, world=g.size, part=part, depth=depth, direct_max=default_direct_max(g.size, part, self.settings.shm_direct_max),
                        gid=g.gid, token=token,
                    )
                except BaseException:
                    mm.close()
                    raise
                seg.attach(0, bell.name)
                for p in range(1, g.size):
                    try:
                        await self._transport.send_fd(g.ranks[p], fd)
                    except TransportError as exc:
                        raise active.error(PeerFailureError, f"rank {g.ranks[p]}: {exc}", (g.ranks[p],)) from None
                os.close(fd)
                fd = -1
                # After the descriptors: a member that reads this frame already has its one.
                offer = memoryview(_OFFER.pack(g.gid, token, size))
                await self._wait_messages([comm.spawn(comm.send(g.ranks[p], key, offer)) for p in range(1, g.size)], active)
            else:
                got = bytearray(_OFFER.size)
                self._unheard = [(g.ranks[0], comm.post_recv(g.ranks[0], key, memoryview(got), active))]
                await self._wait_messages([self._unheard[0][1]], active)
                gid, token, size = _OFFER.unpack(got)
                fd = self._take_segment_fd(g.ranks[0], token)
                if fd < 0 or gid != g.gid:
                    raise active.error(
                        RemoteAbortError,
                        f"rank {g.ranks[0]} announced the group's shared segment but its descriptor never came",
                        (g.ranks[0],),
                    )
                mm = map_fd(fd, size)
                os.close(fd)
                fd = -1
                try:
                    seg = GroupSegment(mm)
                except BaseException:
                    mm.close()
                    raise
                if seg.world != g.size:
                    raise active.error(
                        MismatchError, f"rank {g.ranks[0]} made a segment for {seg.world} members, not {g.size}", (g.ranks[0],)
                    )
                seg.attach(g.rank, bell.name)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            if seg is not None:
                seg.close()
            bell.close()
            raise
        self._unheard = []
        self._seg, self._bell = seg, bell

    def _take_segment_fd(self, creator: int, token: int) -> int:
        """The descriptor ``creator`` passed for this group's segment with ``token``, or -1.
        Any other one it passed for this group (a setup that failed) is closed."""

        def ours(peer: int, fd: int) -> bool:
            head = peek(fd)
            return peer == creator and head is not None and head[0] == self.gid

        found = -1
        for fd in self._transport.take_fds(ours, poll=(creator,)):
            head = peek(fd)
            if found < 0 and head is not None and head[1] == token:
                found = fd
            else:
                os.close(fd)
        return found

    def _discard_segment_fds(self) -> None:
        """Close descriptors passed for this group's segment that no setup took."""

        def ours(peer: int, fd: int) -> bool:
            head = peek(fd)
            return head is not None and head[0] == self.gid

        for fd in self._transport.take_fds(ours):
            os.close(fd)

    async def _wait_messages(self, waiters: list[asyncio.Future[Any]], active: ActiveOp) -> None:
        both = asyncio.gather(*waiters)
        both.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            await asyncio.wait((both, active.failure), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            both.cancel()
            raise
        if active.failure.done() and not active.failure.cancelled() and active.failure.exception() is not None:
            both.cancel()
            raise active.failure.exception()  # type: ignore[misc]
        both.result()

    # ------------------------------------------------------------------ departures
    def _needs(self, active: ActiveOp, peer: int) -> bool:
        """Whether ``active`` now waits for a counter of global rank ``peer`` that it has not
        reached (the communicator asks when ``peer`` leaves or dies). Waits that begin later
        check for themselves (``_departed``)."""
        w, seg = self._waiting, self._seg
        if self._current is not active or w is None or seg is None:
            return False
        return any(self.members[p] == peer and seg.counter(p, w.which) < w.target for p in w.members)

    def _departed(self, w: algo.Wait) -> list[int]:
        """Global ranks that ``w`` waits for, below its target, and gone: their counters will
        never move again."""
        comm, seg = self._comm, self._seg
        if comm is None or seg is None:
            return []
        return [
            self.members[p] for p in w.members if seg.counter(p, w.which) < w.target and comm.is_dead(self.members[p])
        ]

    # ------------------------------------------------------------------ progress and waking
    def _publish(self, which: Iterable[int], value: int) -> None:
        seg, bell = self._segment(), self._bell
        assert bell is not None
        for w in which:
            seg.set_counter(self.rank, w, value)
        fence()  # the counters are visible before we read the sleeping flags (see _shm_doorbell)
        for p in self._others:
            if seg.sleeping(p):
                bell.ring(seg.bell(p))

    def _segment(self) -> GroupSegment:
        seg = self._seg
        if seg is None:
            raise GroupBrokenError(f"the shm transport of {self.name} was closed during a collective")
        return seg

    def _satisfied(self, w: algo.Wait) -> bool:
        counter = self._segment().counter
        which, target = w.which, w.target
        for p in w.members:
            if counter(p, which) < target:
                return False
        return True

    def _check_descriptors(self, w: algo.Wait, desc: tuple[int, ...], active: ActiveOp, on_loop: bool = True) -> bool:
        """Raise MismatchError if a member of ``w`` described its operation otherwise.

        Returns True if they differ only in what the call digest covers (shape, dim): the
        member was then asked what it called (over the group's links, so only ``on_loop``) and
        its answer fails the operation with a message naming both calls; the caller waits for
        that (_until_failed).
        """
        seg = self._seg
        assert seg is not None
        slot = self._base % seg.depth
        me = self.members[self.rank]
        undescribed = False
        for p in w.members:
            theirs = tuple(seg.descriptor(p, slot, len(desc)))
            if theirs == desc:
                continue
            them = self.members[p]
            diffs = _differences(desc, theirs, f"rank {me}", f"rank {them}")
            if diffs:
                raise active.error(MismatchError, "collective mismatch: " + "; ".join(diffs), (them, me))
            if on_loop:
                self._comm.describe(active, them)
                undescribed = True
            else:  # the worker thread cannot talk to the other member: say what is known
                raise active.error(
                    MismatchError,
                    f"collective mismatch: rank {them} called {active.op} with other arguments than rank {me} "
                    f"({active.call!r} on rank {me})",
                    (them, me),
                )
        return undescribed

    async def _until_failed(self, active: ActiveOp, deadline: float) -> None:
        """Wait for ``active`` to fail (a member was asked what it called; see describe)."""
        async with asyncio.timeout_at(deadline):
            await asyncio.shield(active.failure)
        raise RuntimeError("the shm engine waited for a failure that did not come")  # pragma: no cover

    @staticmethod
    def _failure(active: ActiveOp) -> BaseException | None:
        f = active.failure
        if f.done() and not f.cancelled():
            return f.exception()
        return None

    # ------------------------------------------------------------------ driver: event loop
    async def _drive(self, gen: algo.Algorithm, active: ActiveOp, desc: tuple[int, ...], deadline: float) -> int:
        yield_at = time.perf_counter() + YIELD_S
        try:
            w = next(gen)
            while True:
                if not self._satisfied(w):
                    await self._wait_async(w, active, deadline)
                if w.first and self._check_descriptors(w, desc, active):
                    await self._until_failed(active, deadline)
                if time.perf_counter() > yield_at:
                    await asyncio.sleep(0)
                    failure = self._failure(active)
                    if failure is not None:
                        raise failure
                    yield_at = time.perf_counter() + YIELD_S
                w = gen.send(None)
        except StopIteration as stop:
            return int(stop.value)
        finally:
            gen.close()

    async def _wait_async(self, w: algo.Wait, active: ActiveOp, deadline: float) -> None:
        """Return once ``w`` holds: spin for ``spin_s``, then sleep on the doorbell.

        Raises:
            TimeoutError: ``deadline`` (event-loop time) passed first.
            CollectiveError: the operation failed meanwhile (dead peer, remote abort).
        """
        seg, bell = self._segment(), self._bell
        assert bell is not None
        if self.spin_s and spin_until(self._satisfied, w, self.spin_s, self.spin_yield):
            return
        loop = asyncio.get_running_loop()
        self._waiting = w
        seg.set_sleeping(self.rank, True)
        fence()  # the flag is visible before we re-read the counters
        try:
            while not self._satisfied(w):
                failure = self._failure(active)
                if failure is not None:
                    raise failure
                gone = self._departed(w)
                if gone:
                    raise self._comm.lost_error(active, gone)
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError()
                await bell.wait(min(SLEEP_SLICE_S, left), also=active.failure)
        finally:
            seg.set_sleeping(self.rank, False)
        self._waiting = None  # kept on failure: a timeout names whom we waited for

    # ------------------------------------------------------------------ driver: worker thread
    async def _drive_in_thread(self, gen: algo.Algorithm, active: ActiveOp, desc: tuple[int, ...]) -> int:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"aiocoll-shm-{self.name}")
        self._stop.clear()
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._executor, self._work, gen, active, desc)

        def stop(_: object = None) -> None:
            self._stop.set()
            if self._bell is not None:
                self._bell.ring(self._bell.name)

        active.failure.add_done_callback(stop)
        try:
            return await asyncio.shield(fut)
        except BaseException as exc:
            stop()
            # The thread may still be writing into the caller's output: never return before it
            # has stopped, whatever else is cancelled meanwhile.
            while not fut.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([fut])
            if not fut.cancelled():
                fut.exception()
            failure = self._failure(active)
            if isinstance(exc, _Stopped) and failure is not None:
                raise failure from None
            raise
        finally:
            active.failure.remove_done_callback(stop)

    def _work(self, gen: algo.Algorithm, active: ActiveOp, desc: tuple[int, ...]) -> int:
        try:
            w = next(gen)
            while True:
                if not self._satisfied(w):
                    self._wait_blocking(w, active)
                if w.first:
                    self._check_descriptors(w, desc, active, on_loop=False)
                if self._stop.is_set():
                    raise _Stopped()
                w = gen.send(None)
        except StopIteration as stop:
            return int(stop.value)
        finally:
            gen.close()

    def _wait_blocking(self, w: algo.Wait, active: ActiveOp) -> None:
        seg, bell = self._seg, self._bell
        assert seg is not None and bell is not None
        if self.spin_s and spin_until(self._satisfied, w, self.spin_s, self.spin_yield):
            return
        self._waiting = w
        seg.set_sleeping(self.rank, True)
        fence()
        try:
            while not self._satisfied(w):
                if self._stop.is_set():
                    raise _Stopped()
                # Reads the communicator's record of the dead from this thread: a set lookup,
                # and a stale answer only costs one more slice.
                gone = self._departed(w)
                if gone:
                    raise self._comm.lost_error(active, gone)
                bell.wait_blocking(SLEEP_SLICE_S)
        finally:
            seg.set_sleeping(self.rank, False)
        self._waiting = None

    # ------------------------------------------------------------------ lifetime
    def retire(self, why: str = "the group was released") -> None:
        """Close once the operations already running or queued have finished: the group is
        gone (destroyed, or no longer referenced), so nothing new can start."""
        if self._closed:
            return
        self._retiring = why
        if self._idle():
            self.close(why=why)

    def close(self, abort: bool = False, *, why: str = "the shm transport closed") -> None:
        """Release the segment, doorbell and worker thread (an operation in flight fails)."""
        if self._closed:
            return
        self._closed = True
        self._closed_why = why
        self._stop.set()
        if self._bell is not None:
            self._bell.ring(self._bell.name)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._typed.clear()
        if self._seg is not None:
            if not self._seg.close():
                log.warning("shm engine of %s: a view of its segment is still in use; unmapped when it is freed", self.name)
            self._seg = None
        if self._bell is not None:
            self._bell.close()
            self._bell = None
        self._discard_segment_fds()
        if self._on_close is not None:
            self._on_close(self)


__all__ = ["ShmEngine", "default_direct_max", "default_part_bytes"]
