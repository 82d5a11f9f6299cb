"""The same-host engine of one group: its segment, its doorbell, and the drivers of its algorithms.

Lifecycle. The engine is made on the group's first fast-path collective and lives as long as
the shm transport (it is one of the transport's ``closers``). That first collective also sets
the segment up, by message over the group's ordinary links, at the collective's own sequence
number::

    group rank 0: create /dev/shm/aiocoll-<job>-<pid>-g<gid>-<rand>, write the header, attach
                  -> the name to every member                   (frame step 0)
    member p:     open and map it, check the header, attach (pid, doorbell name)
                  -> "attached" to rank 0                       (frame step 0)
    rank 0:       every member attached: unlink the name

From then on the name is gone and the memory lives exactly as long as the mappings. Anyone who
fails during setup unlinks the name (all members know it); the launcher's cleanup hook and
``sweep_stale`` catch the case where everyone died in those milliseconds.

Operations run one at a time per group, in the order they were called (the same order on every
member, which is what makes the shared counters meaningful). Each is registered with the
communicator (``comm.begin``), so another member's abort fails it, and so does a member that
left or died before reaching a counter this member waits for (a member that got that far has
nothing more to give: its departure changes nothing); it honours
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
import collections
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _shm_algorithms as algo
from ._comm import ActiveOp, Communicator
from ._dtypes import WireDtype
from ._errors import CollectiveTimeoutError, GroupBrokenError, MismatchError, RemoteAbortError
from ._ops import ReduceOp
from ._shm_doorbell import SLEEP_SLICE_S, SPIN_S, Doorbell, fence, spin_until
from ._shm_layout import A, B, F, GroupSegment, segment_bytes
from ._shm_segment import create_named, open_named, unlink_named
from ._wire import FrameKey, Kind

if TYPE_CHECKING:
    from ._group import ProcessGroup

log = logging.getLogger("aiocoll")

Array = np.ndarray[Any, Any]

#: Bytes of the name message of the setup exchange.
_NAME_BYTES = 128
#: How long a loop-driven operation may keep the event loop before giving other tasks a turn.
YIELD_S = 0.001


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


#: Most staging memory per member (depth * world * part bytes), and for the whole segment:
#: large groups get smaller parts (every member stages a part for every other one).
STAGE_BUDGET = 16 << 20
SEGMENT_BUDGET = 256 << 20


def default_part_bytes(world: int, depth: int = 4) -> int:
    """Bytes each member owns per round (``AIOCOLL_SHM_PART_BYTES`` overrides)."""
    part = _env_int("AIOCOLL_SHM_PART_BYTES", 0)
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


def default_depth() -> int:
    return _env_int("AIOCOLL_SHM_DEPTH", 4)


def default_direct_max(world: int, part: int) -> int:
    """Largest all_reduce done in one round, every member reducing everything."""
    return min(_env_int("AIOCOLL_SHM_DIRECT_MAX", 32 << 10), world * part)


def default_thread_min() -> int:
    """Operations of at least this many bytes run in the worker thread (``AIOCOLL_SHM_THREAD_MIN``)."""
    return _env_int("AIOCOLL_SHM_THREAD_MIN", 1 << 62)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class _Stopped(Exception):
    """The worker thread was told to stop (abort, timeout, cancellation)."""


class ShmEngine:
    """Runs the fast-path collectives of one group whose members all share this host."""

    def __init__(self, group: ProcessGroup, *, on_close: Callable[[ShmEngine], None] | None = None) -> None:
        from ._world import in_harness

        self.gid = group.gid
        self.size = group.size
        self.rank = group.rank
        self.members = group.ranks
        self.name = group.name
        self._busy = False
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()
        self._others = tuple(p for p in range(group.size) if p != group.rank)
        self._member_set = frozenset(group.ranks)
        self._typed: dict[tuple[str, int], list[Array]] = {}
        self._seg: GroupSegment | None = None
        self._bell: Doorbell | None = None
        self._op_no = 0
        self._base = 0
        self._broken: str | None = None
        self._closed = False
        self._waiting: algo.Wait | None = None
        self._current: ActiveOp | None = None  # the operation holding the engine's turn
        self._comm: Communicator | None = None
        self._unheard: list[tuple[int, asyncio.Future[Any]]] = []  # setup messages awaited
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._stop = threading.Event()
        self._on_close = on_close
        self.thread_min = default_thread_min()
        # Spinning only pays when every member has a core of its own: with more members than
        # cores (or all of them as tasks of this very process) the spinner steals the time of
        # the member it waits for.
        own_cores = _usable_cpus() >= self.size and not in_harness.get()
        self.spin_s = SPIN_S if own_cores else 0.0

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ public operations
    async def all_reduce(
        self, g: ProcessGroup, seq: int, op: ReduceOp, code: WireDtype, x: Array, out: Array, timeout: float
    ) -> None:
        """``out`` = reduction of every member's ``x`` (flat arrays; AVG is left a SUM).

        Raises:
            CollectiveError: timeout (naming the members that did not arrive), a dead member, a
                mismatch with another member's call, a remote abort, or a broken group.
            asyncio.CancelledError: the caller was cancelled; the group is broken everywhere.
        """

        def build(ctx: algo.Context) -> tuple[algo.Algorithm, int]:
            return algo.all_reduce_pipelined(ctx, op, code, x, out), algo.ALGO_PIPELINED

        await self._run(
            g, seq, "all_reduce", Kind.ALL_REDUCE, int(op), code, x.size, 0, x.nbytes, timeout, build, (op, code, x, out)
        )

    async def reduce_scatter(
        self, g: ProcessGroup, seq: int, op: ReduceOp, code: WireDtype, x: Array, out: Array, timeout: float
    ) -> None:
        """``out`` = block ``group.rank`` of the reduction of every member's ``x`` (W blocks).

        Raises:
            CollectiveError, asyncio.CancelledError: as ``all_reduce``.
        """

        def build(ctx: algo.Context) -> tuple[algo.Algorithm, int]:
            return algo.reduce_scatter_pipelined(ctx, op, code, x, out), algo.ALGO_PIPELINED

        await self._run(g, seq, "reduce_scatter", Kind.REDUCE_SCATTER, int(op), code, x.size, 0, x.nbytes, timeout, build)

    async def all_gather(self, g: ProcessGroup, seq: int, code: WireDtype, x: Array, out: Array, timeout: float) -> None:
        """``out`` = every member's ``x`` in group-rank order.

        Raises:
            CollectiveError, asyncio.CancelledError: as ``all_reduce``.
        """

        def build(ctx: algo.Context) -> tuple[algo.Algorithm, int]:
            return algo.all_gather_pipelined(ctx, x, out), algo.ALGO_PIPELINED

        await self._run(g, seq, "all_gather", Kind.ALL_GATHER, 0, code, x.size, 0, out.nbytes, timeout, build)

    async def broadcast(self, g: ProcessGroup, seq: int, root: int, code: WireDtype, buf: Array, timeout: float) -> None:
        """Copy group rank ``root``'s ``buf`` into every member's ``buf``.

        Raises:
            CollectiveError, asyncio.CancelledError: as ``all_reduce`` (the root, which waits for
                nobody, learns of a mismatch from the others' abort, at its next call at latest).
        """

        def build(ctx: algo.Context) -> tuple[algo.Algorithm, int]:
            return algo.broadcast_pipelined(ctx, root, buf), algo.ALGO_PIPELINED

        await self._run(g, seq, "broadcast", Kind.BROADCAST, 0, code, buf.size, root, buf.nbytes, timeout, build)

    # ------------------------------------------------------------------ one operation
    async def _run(
        self,
        g: ProcessGroup,
        seq: int,
        name: str,
        kind: Kind,
        op: int,
        code: WireDtype,
        count: int,
        root: int,
        nbytes: int,
        timeout: float,
        build: Callable[[algo.Context], tuple[algo.Algorithm, int]],
        small: tuple[ReduceOp, WireDtype, Array, Array] | None = None,
    ) -> None:
        comm = g.world.comm
        self._comm = comm
        active = comm.begin(g.name, g.gid, seq, name, self._member_set)
        active.needs = lambda peer: self._needs(active, peer)
        # A deadline rather than asyncio.timeout around everything: a small operation that
        # never has to sleep then pays nothing for its timeout (see _wait_async).
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            try:
                await self._acquire(deadline)
                self._current = active
                try:
                    if self._broken is not None or self._closed:
                        why = self._broken or "the shm transport closed"
                        raise active.error(GroupBrokenError, f"group is broken: {why}", ())
                    if self._seg is None:
                        async with asyncio.timeout_at(deadline):
                            await self._setup(g, seq, kind, op, code, count, active)
                    seg = self._seg
                    assert seg is not None
                    op_no = self._op_no
                    self._op_no += 1
                    # The first slot (and its descriptor) may still be read by a member that is
                    # behind: a broadcast root, for one, waits for nobody.
                    base = self._base
                    if base >= seg.depth:
                        reuse = algo.Wait(F, base - seg.depth + 1, self._others)
                        if not self._satisfied(reuse):
                            await self._wait_async(reuse, active, deadline)
                    if small is not None and nbytes <= seg.direct_max:
                        desc = (op_no, int(kind), op, int(code), count, root, algo.ALGO_DIRECT)
                        seg.write_descriptor(self.rank, self._base % seg.depth, desc)
                        await self._all_reduce_direct(*small, desc, active, deadline)
                        self._base += 1
                    else:
                        ctx = algo.Context(seg, self.rank, self._base, self._publish)
                        gen, algorithm = build(ctx)
                        desc = (op_no, int(kind), op, int(code), count, root, algorithm)
                        seg.write_descriptor(self.rank, self._base % seg.depth, desc)
                        async with asyncio.timeout_at(deadline):
                            if nbytes >= self.thread_min:
                                rounds = await self._drive_in_thread(gen, active, desc)
                            else:
                                rounds = await self._drive(gen, active, desc, deadline)
                        self._base += rounds
                finally:
                    self._current = None
                    self._release()
            except TimeoutError:
                raise self._timeout_error(active, name, timeout) from None
        except BaseException as exc:
            if self._broken is None:
                self._broken = f"{name} (step {seq}) failed: {exc!r}"
            comm.end(active, exc)
            raise
        comm.end(active)

    async def _acquire(self, deadline: float) -> None:
        """Take this engine's turn: operations run one at a time, in the order they were called
        (asyncio.Lock would do, at several times the cost on the uncontended path)."""
        if not self._busy and not self._queue:
            self._busy = True
            return
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(fut)
        try:
            async with asyncio.timeout_at(deadline):
                await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self._release()  # handed the turn just as we gave up: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._queue.remove(fut)
            raise

    def _release(self) -> None:
        while self._queue:
            fut = self._queue.popleft()
            if not fut.done():
                fut.set_result(None)  # ownership passes straight to the next in line
                return
        self._busy = False

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
        views = self._views(x.dtype, slot)
        np.copyto(views[self.rank][:n], x)
        self._publish((A,), g + 1)
        arrived = algo.Wait(A, g + 1, others, first=True)
        if not self._satisfied(arrived):
            await self._wait_async(arrived, active, deadline)
        self._check_descriptors(arrived, desc, active)
        if n:
            # Own input from the slot too: ``out`` may be ``x`` (all_reduce with out=x).
            algo.fold(op, code, [v[:n] for v in views], out)
        self._publish((B, F), g + 1)

    def _timeout_error(self, active: ActiveOp, name: str, timeout: float) -> CollectiveTimeoutError:
        w, seg = self._waiting, self._seg
        missing: list[int] = []
        if w is not None and seg is not None:
            missing = [self.members[p] for p in w.members if seg.counter(p, w.which) < w.target]
        elif self._unheard:
            missing = [rank for rank, fut in self._unheard if not fut.done() or fut.cancelled()]
        who = f"; ranks {missing} had not arrived" if missing else ""
        return CollectiveTimeoutError(
            f"{name} did not complete within {timeout} s{who}", group=active.group, seq=active.seq, op=name, ranks=missing
        )

    # ------------------------------------------------------------------ setup
    async def _setup(
        self, g: ProcessGroup, seq: int, kind: Kind, op: int, code: WireDtype, count: int, active: ActiveOp
    ) -> None:
        comm = g.world.comm
        key = FrameKey(g.gid, seq, 0, int(kind), op, int(code), 0, count)
        bell = Doorbell()
        name: str | None = None
        seg: GroupSegment | None = None
        try:
            if g.rank == 0:
                depth = default_depth()
                part = default_part_bytes(g.size, depth)
                name, mm = create_named(f"g{g.gid:016x}", segment_bytes(g.size, part, depth))
                try:
                    seg = GroupSegment(
                        mm, world=g.size, part=part, depth=depth, direct_max=default_direct_max(g.size, part)
                    )
                except BaseException:
                    mm.close()
                    raise
                seg.attach(0, bell.name)
                payload = memoryview(name.encode().ljust(_NAME_BYTES, b"\0"))
                acks = [bytearray(_NAME_BYTES) for _ in range(g.size - 1)]
                self._unheard = [
                    (g.ranks[p], comm.post_recv(g.ranks[p], key, memoryview(acks[p - 1]), active))
                    for p in range(1, g.size)
                ]
                waiters = [fut for _, fut in self._unheard]
                waiters += [comm.spawn(comm.send(g.ranks[p], key, payload)) for p in range(1, g.size)]
                await self._wait_messages(waiters, active)
                unlink_named(name)
                name = None
            else:
                got = bytearray(_NAME_BYTES)
                self._unheard = [(g.ranks[0], comm.post_recv(g.ranks[0], key, memoryview(got), active))]
                await self._wait_messages([self._unheard[0][1]], active)
                name = bytes(got).rstrip(b"\0").decode()
                try:
                    mm = open_named(name, 0)
                except FileNotFoundError:
                    # Rank 0 gave up (cancelled or timed out) after sending the name and unlinked
                    # it; its abort is on the way. Say so as the collective error it is.
                    name = None
                    raise active.error(
                        RemoteAbortError,
                        f"rank {g.ranks[0]} abandoned the group's shared segment before this rank opened it",
                        (g.ranks[0],),
                    ) from None
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
                name = None  # rank 0 unlinks it once everyone has attached
                await self._wait_messages([comm.spawn(comm.send(g.ranks[0], key, memoryview(bytes(_NAME_BYTES))))], active)
        except BaseException:
            if name is not None:
                with contextlib.suppress(OSError):
                    unlink_named(name)
            if seg is not None:
                seg.close()
            bell.close()
            raise
        self._unheard = []
        self._seg, self._bell = seg, bell

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

    def _check_descriptors(self, w: algo.Wait, desc: tuple[int, ...], active: ActiveOp) -> None:
        seg = self._seg
        assert seg is not None
        slot = self._base % seg.depth
        fields = ("operation number", "collective", "reduce op", "dtype", "element count", "root", "algorithm")
        for p in w.members:
            theirs = tuple(seg.descriptor(p, slot, len(desc)))
            if theirs != desc:
                diffs = [
                    f"{what} {b} on rank {self.members[p]} vs {a} here"
                    for what, a, b in zip(fields, desc, theirs)
                    if a != b
                ]
                raise active.error(MismatchError, "collective mismatch: " + "; ".join(diffs), (self.members[p], self.members[self.rank]))

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
                if w.first:
                    self._check_descriptors(w, desc, active)
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
        if self.spin_s and spin_until(self._satisfied, w, self.spin_s):
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
                if gone and self._comm is not None:
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
                    self._check_descriptors(w, desc, active)
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
        if self.spin_s and spin_until(self._satisfied, w, self.spin_s):
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
                if gone and self._comm is not None:
                    raise self._comm.lost_error(active, gone)
                bell.wait_blocking(SLEEP_SLICE_S)
        finally:
            seg.set_sleeping(self.rank, False)
        self._waiting = None

    # ------------------------------------------------------------------ lifetime
    def close(self, abort: bool = False) -> None:
        """Release the segment, doorbell and worker thread (an operation in flight fails)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._bell is not None:
            self._bell.ring(self._bell.name)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._typed.clear()
        if self._seg is not None:
            if not self._seg.close():
                log.debug("shm engine of %s: segment still in use, unmapped later", self.name)
            self._seg = None
        if self._bell is not None:
            self._bell.close()
            self._bell = None
        if self._on_close is not None:
            self._on_close(self)


__all__ = ["ShmEngine", "default_part_bytes", "default_depth", "default_direct_max", "default_thread_min"]
