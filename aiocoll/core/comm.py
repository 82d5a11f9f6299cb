"""The communicator: one per rank, between the algorithms and the transports.

It owns the connections to the other ranks and is the FrameSink of every transport, so it is
where frames meet the receives posted for them. A frame is matched on (source rank, gid, seq,
step, flags) — never on arrival order — so any number of collectives on any number of groups
can be in flight at once. A frame that arrives before its receive is posted waits in the
unexpected store (bounded); one whose receive is posted lands straight in the receive's buffer.

Failure handling lives here because this is where it is seen first:
- a peer leaves or crashes     -> every collective in flight that still needs something from it
                                  (a receive not yet landed; for the shared-memory engine, a
                                  counter it has not reached) fails with PeerFailureError naming
                                  it, its group is broken and the other members get an ABORT; a
                                  collective whose part from that peer is complete (its frames
                                  arrived, even if they wait unclaimed) finishes normally, so a
                                  member that finished and left never makes another fail;
- a frame's header disagrees   -> MismatchError on this rank, and an ABORT frame to every other
  with the posted receive         member so that they raise it too;
- an ABORT frame arrives       -> the collective it names fails with the sender's error, and the
                                  group is marked broken;
- a peer crashes               -> this rank tells every other peer (a LOST control frame), so that
                                  a survivor that leaves right after is not taken for the culprit;
                                  a collective begun after a crash fails at once unless the
                                  crashed rank's frames for it already arrived;
- a collective nears its       -> this rank tells the other members it is still waiting (WAITING),
  timeout                         so that when the timeout strikes, every member can name the ranks
                                  it did not hear from, not merely the neighbour it waits on (in a
                                  ring, that neighbour is usually waiting too).

Who is named when several peers go at once: losses seen in one turn of the event loop are
handled together, after every frame already readable has been delivered. A peer that told us
"rank X is lost" (a LOST notice, or an ABORT of a collective that failed for want of X) and then
went away itself is a survivor leaving, not a cause: collectives of groups holding X name X,
following the chain when the news went through several survivors. This matters because one
process often sees the survivors' exits and the victim's death at the same moment (a loaded
host, or survivors that exit at once on error), and the order in which the event loop reports
sockets is arbitrary. A survivor that leaves
through ``destroy()`` says goodbye after its last frame (ABORTs and LOST notices included), so
it is seen as leaving, never as crashing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mmap
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import (
    CollectiveError,
    CollectiveTimeoutError,
    GroupBrokenError,
    MismatchError,
    PeerFailureError,
    RemoteAbortError,
)
from ..arrays.dtypes import WireDtype
from .errors import TransportError
from ..arrays.ops import ReduceOp
from .wire import AGREE_STEP, FLAG_CONTROL, FLAG_P2P, NO_CALL, Call, FrameKey, Kind, kind_name, show_value
from ..transports import Connection, Transport

log = logging.getLogger("aiocoll")

#: Bytes of frames this rank buffers for receives not yet posted before it drops the sender.
DEFAULT_MAX_UNEXPECTED = 8 << 30
_MAX_CONTROL = 1 << 16
_MAX_OP_NAME = 64
_MAX_HEARD_GROUPS = 4096
#: Collectives whose call this rank remembers, to answer a DESCRIBE about one it finished.
_MAX_CALLS = 1024
#: How long a rank that asked another what it called waits for the answer before failing the
#: collective with what it knows (at most half the collective's timeout).
DESCRIBE_WAIT_S = 2.0
#: Scratch buffers from this size on are committed page by page as the payload arrives.
_LAZY_SCRATCH = 1 << 20
#: A frame that waited in scratch memory is copied into its receive this many bytes per turn of
#: the event loop (frames smaller than this in one go). See Communicator._drain.
_DRAIN_SLICE = 1 << 20

_ERRORS: dict[str, type[CollectiveError]] = {
    "timeout": CollectiveTimeoutError,
    "mismatch": MismatchError,
    "peer": PeerFailureError,
    "abort": RemoteAbortError,
    "broken": GroupBrokenError,
}


_DONTNEED: int | None = getattr(mmap, "MADV_DONTNEED", None)


def _private_mapping(nbytes: int) -> mmap.mmap:
    """Anonymous memory, committed page by page as it is written, freed by MADV_DONTNEED.

    Private, not mmap's default MAP_SHARED: shared anonymous memory is a shmem file, whose pages
    MADV_DONTNEED only unmaps without freeing them, and whose munmap then frees them all at once
    on the event loop (40 ms for 256 MiB).
    """
    if hasattr(mmap, "MAP_PRIVATE"):
        return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return mmap.mmap(-1, nbytes)  # Windows: no flags, and no shmem file behind the mapping


def _on_device(buffer: Any) -> bool:
    """Whether ``buffer`` is device memory (CUDA Array Interface); memoryviews never are."""
    return not isinstance(buffer, memoryview) and hasattr(buffer, "__cuda_array_interface__")


def op_name(code: int) -> str:
    try:
        return ReduceOp(code).name.lower()
    except ValueError:
        return f"op {code}"


def dtype_name(code: int) -> str:
    try:
        return WireDtype(code).name.lower()
    except ValueError:
        return f"dtype code {code}"


def _record(exc: CollectiveError) -> CollectiveError:
    """A copy of ``exc`` without traceback, to keep as the reason a group is broken.

    The raised error's traceback holds the failed collective's frames, and with them the
    caller's arrays and views of shared-memory segments, which could then never be unmapped
    while the group object lives.
    """
    return type(exc)(exc.detail, group=exc.group, seq=exc.seq, op=exc.op, ranks=exc.ranks)


def _error_code(exc: CollectiveError) -> str:
    for code, cls in _ERRORS.items():
        if type(exc) is cls:
            return code
    return "abort"


@dataclass(eq=False)
class ActiveOp:
    """A collective in flight on this rank; the handle failures are delivered through."""

    group: str
    gid: int
    seq: int
    op: str
    members: frozenset[int]
    failure: asyncio.Future[None]
    posted: set[Posted] = field(default_factory=set)
    p2p: bool = False  # point to point: ``seq`` numbers messages of a (pair, tag), not steps
    # What every frame of this collective must say (Communicator.expect); None: not checked
    # until a receive is posted (point to point, or a collective that has not said).
    expect: FrameKey | None = None
    check_count: bool = True
    call: Call = NO_CALL
    described: set[int] = field(default_factory=set)  # peers asked to say what they called
    describe_wait: float = DESCRIBE_WAIT_S
    # Whether the op still waits on a rank in a way the communicator cannot see (the
    # shared-memory engine waits on counters, not on posted receives); see needs_from.
    needs: Callable[[int], bool] | None = None

    def needs_from(self, peer: int) -> bool:
        """Whether this op still waits for something ``peer`` has not delivered yet."""
        if any(p.peer == peer and not p.future.done() for p in self.posted):
            return True
        return self.needs is not None and self.needs(peer)

    def fail(self, exc: CollectiveError) -> None:
        if not self.failure.done():
            self.failure.set_exception(exc)
            # The failure future may never be awaited if the op already finished its last
            # batch; retrieving the exception here keeps asyncio from logging it as lost.
            self.failure.exception()

    def error(self, cls: type[CollectiveError], message: str, ranks: Iterable[int]) -> CollectiveError:
        return cls(message, group=self.group, seq=self.seq, op=self.op, ranks=ranks)


def compare(key: FrameKey, expect: FrameKey, check_count: bool, them: str, me: str) -> tuple[list[str], bool]:
    """How the call a frame describes differs from the one expected here.

    Returns the differences that the keys name in full (collective, reduce op, dtype, element
    count), and whether, those being equal, the call digests differ (root, shape, dim...: what
    exactly, only the sender can say; see Communicator.describe).
    """
    if key.kind != expect.kind:
        return [f"{them} called {kind_name(key.kind)}, {me} called {kind_name(expect.kind)}"], False
    problems = []
    if key.op != expect.op:
        problems.append(f"reduce op {op_name(key.op)} on {them} vs {op_name(expect.op)} on {me}")
    if key.dtype != expect.dtype:
        problems.append(f"dtype {dtype_name(key.dtype)} on {them} vs {dtype_name(expect.dtype)} on {me}")
    if check_count and key.count != expect.count:
        problems.append(f"{key.count} elements on {them} vs {expect.count} on {me}")
    differs = not problems and not expect.flags & FLAG_P2P and key.call != expect.call
    return problems, differs


@dataclass(eq=False)
class Posted:
    """A receive waiting for its frame."""

    peer: int
    slot: tuple[int, int, int, int]
    expect: FrameKey
    check_count: bool
    buffer: Any  # memoryview, or device memory (CUDA Array Interface, with .nbytes)
    future: asyncio.Future[None]
    op: ActiveOp | None
    me: int = -1
    mismatch: CollectiveError | None = None
    discard: bool = False  # abandoned (cancelled point to point): drop the frame when it comes
    # The mismatch is in what the call digest covers: the receive stays pending (its collective
    # cannot finish) until the sender, asked, fails it with a message naming both calls.
    undescribed: bool = False

    def check(self, key: FrameKey, nbytes: int) -> CollectiveError | None:
        them, me = f"rank {self.peer}", f"rank {self.me}"
        problems, differs = compare(key, self.expect, self.check_count, them, me)
        self.undescribed = differs
        if differs:
            op = self.op
            problems.append(_undescribed(op.op if op else kind_name(key.kind), op.call if op else NO_CALL, them, me))
        elif not problems and nbytes != self.buffer.nbytes:
            problems.append(f"{them} sent {nbytes} bytes, {me} expected {self.buffer.nbytes}")
        if not problems:
            return None
        message = "collective mismatch: " + "; ".join(problems)
        if self.op is None:
            return MismatchError(message, ranks=(self.peer, self.me))
        return self.op.error(MismatchError, message, (self.peer, self.me))


def _undescribed(name: str, call: Call, them: str, me: str) -> str:
    mine = ", ".join(f"{n} {show_value(v)}" for n, v in call.fields) or "no arguments to compare"
    return f"{them} called {name} with other arguments than {me} ({mine} on {me}; {them} did not say which)"


@dataclass(frozen=True)
class _Record:
    """A collective this rank started, kept a while to answer DESCRIBE about it."""

    group: str
    op: str
    members: frozenset[int]
    call: Call


class Communicator:
    """Frame matching, connections and failure propagation for one rank."""

    def __init__(self, rank: int, world_size: int, *, max_unexpected: int = DEFAULT_MAX_UNEXPECTED) -> None:
        self.rank = rank
        self.world_size = world_size
        self.transports: list[Transport] = []
        self._conns: dict[int, Connection] = {}
        # Connections for payloads in device memory, where they go over another transport than
        # host payloads (ucx beside shm/tcp with transport="auto"); see send().
        self._device_conns: dict[int, Connection] = {}
        #: Makes device memory of n bytes for a device frame that arrives before its receive is
        #: posted (set by the GPU engine, aiocoll.engines.gpu); None: such frames wait in host
        #: memory and are copied in when their receive is posted.
        self.device_scratch: Callable[[int], Any] | None = None
        self._posted: dict[tuple[int, tuple[int, int, int, int]], Posted] = {}
        self._unexpected: dict[tuple[int, tuple[int, int, int, int]], tuple[FrameKey, Any]] = {}
        self._unexpected_bytes = 0
        self._landing: dict[tuple[int, tuple[int, int, int, int]], Posted | None] = {}
        # receives whose frame arrived in scratch memory and is being copied into them
        self._draining: dict[tuple[int, tuple[int, int, int, int]], Posted] = {}
        self._max_unexpected = max_unexpected
        self._active: set[ActiveOp] = set()
        self._dead: dict[int, str] = {}
        self._crashed: set[int] = set()  # dead without a goodbye (a subset of _dead)
        # rank -> (the rank it told us is lost, why); see the module docstring
        self._told: dict[int, tuple[int, str]] = {}
        # rank -> the rank its PeerFailureError ABORT named (for naming only, unlike _told)
        self._failed_by: dict[int, int] = {}
        self._pending_losses: dict[int, BaseException | None] = {}
        # gid -> rank -> loop time of its last WAITING notice for a collective of that group
        self._heard: dict[int, dict[int, float]] = {}
        self._broken: dict[int, CollectiveError] = {}
        # gid -> first collective step that fails; steps before it may still complete (see _break)
        self._broken_from: dict[int, int] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._calls: OrderedDict[tuple[int, int], _Record] = OrderedDict()

    # ----------------------------------------------------------------- connections
    def add_connection(self, peer: int, conn: Connection) -> None:
        self._conns[peer] = conn

    def add_device_connection(self, peer: int, conn: Connection) -> None:
        """Send payloads in device memory to ``peer`` over ``conn`` (a transport with
        ``cuda_memory``); host payloads keep their connection."""
        self._device_conns[peer] = conn

    def has_device_path(self, peer: int) -> bool:
        """Whether device memory reaches ``peer`` without staging through host memory."""
        return peer in self._device_conns

    def is_dead(self, peer: int) -> bool:
        return peer in self._dead

    # ----------------------------------------------------------------- FrameSink
    def frame_buffer(self, peer: int, key: bytes, nbytes: int) -> memoryview:
        k = FrameKey.unpack(key)
        if k.flags & FLAG_CONTROL:
            if nbytes > _MAX_CONTROL:
                raise ValueError(f"control frame of {nbytes} bytes from rank {peer}")
            return memoryview(bytearray(nbytes))
        posted = self._posted.get((peer, k.slot))
        if posted is not None and posted.discard:
            return self._scratch(peer, nbytes)
        if posted is not None and _on_device(posted.buffer):
            # A transport of host memory only: the frame lands in host memory and is copied
            # into the device receive when it has arrived (frame_received: landed is not posted).
            self._landing[(peer, k.slot)] = None
            return self._scratch(peer, nbytes)
        # Remember where this frame lands: a transport may deliver the payload in several
        # reads, and the receive may be posted while it does (then frame_received copies).
        self._landing[(peer, k.slot)] = posted
        if posted is not None:
            posted.mismatch = posted.check(k, nbytes)
            if posted.mismatch is None:
                buffer: memoryview = posted.buffer
                return buffer
        return self._scratch(peer, nbytes)

    def frame_device_buffer(self, peer: int, key: bytes, nbytes: int) -> Any:
        """DeviceFrameSink: the posted receive's memory, device memory included; else host
        scratch, as frame_buffer."""
        return self._place(peer, key, nbytes, device=False)

    def frame_buffer_from_device(self, peer: int, key: bytes, nbytes: int) -> Any:
        """DeviceFrameSink, for payloads the sender gave in device memory: as
        frame_device_buffer, but an early frame waits in device scratch (``device_scratch``)."""
        return self._place(peer, key, nbytes, device=self.device_scratch is not None)

    def _place(self, peer: int, key: bytes, nbytes: int, *, device: bool) -> Any:
        k = FrameKey.unpack(key)
        if k.flags & FLAG_CONTROL:
            return self.frame_buffer(peer, key, nbytes)
        posted = self._posted.get((peer, k.slot))
        if posted is not None and posted.discard:
            return self._scratch(peer, nbytes)
        self._landing[(peer, k.slot)] = posted
        if posted is not None:
            posted.mismatch = posted.check(k, nbytes)
            if posted.mismatch is None:
                return posted.buffer
        if not device:
            return self._scratch(peer, nbytes)
        if self._unexpected_bytes + nbytes > self._max_unexpected:
            raise ValueError(
                f"rank {peer} sent {nbytes} bytes nobody asked for yet, over the "
                f"{self._max_unexpected}-byte limit for unexpected frames"
            )
        assert self.device_scratch is not None
        return self.device_scratch(nbytes)

    def _scratch(self, peer: int, nbytes: int) -> memoryview:
        if self._unexpected_bytes + nbytes > self._max_unexpected:
            raise ValueError(
                f"rank {peer} sent {nbytes} bytes nobody asked for yet, over the "
                f"{self._max_unexpected}-byte limit for unexpected frames"
            )
        if nbytes < _LAZY_SCRATCH:
            return memoryview(bytearray(nbytes))
        # bytearray(n) zeroes all n bytes at once, so a header claiming 2 GiB cost 2 GiB of
        # resident memory before a byte of payload came. An anonymous mapping takes memory as
        # the payload is written into it, so what a frame costs is what it actually delivered.
        return memoryview(_private_mapping(nbytes))

    def frame_received(self, peer: int, key: bytes, buffer: Any) -> None:
        k = FrameKey.unpack(key)
        if k.flags & FLAG_CONTROL:
            self._on_control(peer, k, bytes(buffer))
            return
        landed = self._landing.pop((peer, k.slot), None)
        posted = self._posted.pop((peer, k.slot), None)
        if posted is not None:
            if posted.op is not None:
                posted.op.posted.discard(posted)
            if posted.future.done():
                return
            if landed is not posted:  # posted while the payload was arriving in scratch memory
                posted.mismatch = posted.check(k, buffer.nbytes)
                if posted.mismatch is None:
                    self._copy_in(posted, buffer)
                    return
            if posted.mismatch is not None:
                if posted.undescribed and posted.op is not None:
                    self.describe(posted.op, peer)
                    return
                self._mismatch(posted.op, posted.mismatch)
                posted.future.set_exception(posted.mismatch)
            else:
                posted.future.set_result(None)
            return
        if self._doomed(k.gid, k.seq, bool(k.flags & FLAG_P2P)):
            return  # a collective of a broken group: nobody will ever ask for it
        if not k.flags & FLAG_P2P:
            # Nobody asked for this frame yet; if this rank is in the collective it belongs to,
            # the frame must still describe that collective (a broadcast root and a reduce leaf
            # only send: neither would ever look at the other's frame).
            op = self._op_at(k.gid, k.seq)
            if op is not None and self._screen(op, peer, k):
                return
        self._unexpected[(peer, k.slot)] = (k, buffer)
        self._unexpected_bytes += buffer.nbytes

    def peer_lost(self, peer: int, exc: BaseException | None) -> None:
        if self._closing or peer in self._dead or peer in self._pending_losses:
            return
        reason = "closed its connection" if exc is None else f"was lost ({exc})"
        self._dead[peer] = reason
        if exc is not None:
            self._crashed.add(peer)
        for slot_key in [k for k in self._landing if k[0] == peer]:
            del self._landing[slot_key]  # frames cut off mid-payload never complete
        for slot_key in [k for k, p in self._posted.items() if k[0] == peer and p.discard]:
            del self._posted[slot_key]  # abandoned receives: nothing will come
        log.log(logging.DEBUG if exc is None else logging.WARNING, "rank %d: rank %d %s", self.rank, peer, reason)
        if exc is not None:
            self._tell_others(peer, reason)
        # Failing the collectives waits one turn of the loop: frames already readable on other
        # connections (a LOST notice from a survivor that is now leaving) are delivered first.
        if not self._pending_losses:
            asyncio.get_running_loop().call_soon(self._fail_lost)
        self._pending_losses[peer] = exc

    def _fail_lost(self) -> None:
        batch, self._pending_losses = self._pending_losses, {}
        if self._closing:
            return
        for op in list(self._active):
            if op.failure.done():
                continue
            # Transports report a loss only after the last frame the peer sent was delivered
            # (graceful or not), so a collective hurt by it is one still waiting for that peer.
            # One whose part from the peer is complete finishes: the peer may well have
            # finished it too and left, and failing here would make the members disagree.
            # Members that wait on it only through others hear of it by our ABORT.
            hurt = [peer for peer in batch if peer in op.members and op.needs_from(peer)]
            if not hurt:
                continue
            err = self.lost_error(op, hurt)
            self._break(op.gid, err, 0 if op.p2p else op.seq)
            op.fail(err)
            self._broadcast_abort(op, err)

    def lost_error(self, op: ActiveOp, peers: Iterable[int]) -> CollectiveError:
        """The error of ``op`` failing because ``peers`` (dead members it still needs) are gone:
        a PeerFailureError naming the culprits (see ``_culprit``)."""
        culprits = sorted({self._culprit(p, op.members) for p in peers})
        first = culprits[0]
        return op.error(PeerFailureError, f"rank {first} {self._dead.get(first, 'was lost')}", culprits)

    def _culprit(self, peer: int, members: frozenset[int]) -> int:
        """``peer``, or the rank ``peer`` told us was lost before it went away itself (followed
        down the chain: a survivor may have heard of the death from another survivor)."""
        seen = {peer}
        while True:
            told = self._told.get(peer)
            lost = told[0] if told is not None else self._failed_by.get(peer)
            if lost is None or lost not in members or lost == self.rank or lost in seen:
                return peer
            peer = lost
            seen.add(peer)

    def _tell_others(self, lost: int, reason: str) -> None:
        body = json.dumps({"lost": lost, "reason": reason[:1000]}).encode()
        key = FrameKey(0, 0, 0, Kind.LOST, 0, 0, FLAG_CONTROL, 0)
        for peer in list(self._conns):
            if peer != lost and peer not in self._dead:
                self.spawn(self._send_quietly(peer, key, memoryview(body)))

    def announce_waiting(self, op: ActiveOp) -> None:
        """Tell the other members that this rank is still inside ``op`` (its timeout is near)."""
        if op not in self._active or op.failure.done():
            return
        key = FrameKey(op.gid, op.seq, 0, Kind.WAITING, 0, 0, FLAG_CONTROL, 0)
        body = op.op.encode()[:_MAX_OP_NAME]
        for peer in op.members:
            if peer != self.rank and peer not in self._dead and peer in self._conns:
                self.spawn(self._send_quietly(peer, key, memoryview(body)))

    def silent_members(self, op: ActiveOp, within: float) -> set[int]:
        """Members of ``op`` that have not said, in the last ``within`` seconds, that they are
        stuck in a collective of its group (this one, or an earlier or later step: in a ring,
        members are often one step apart when one of them stops)."""
        heard = self._heard.get(op.gid, {})
        since = asyncio.get_running_loop().time() - within
        return {p for p in op.members if p != self.rank and heard.get(p, -1.0) < since}

    def _on_lost_notice(self, reporter: int, body: bytes) -> None:
        try:
            info = json.loads(body)
            lost, reason = int(info["lost"]), str(info["reason"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("rank %d: malformed LOST notice from rank %d: %s", self.rank, reporter, exc)
            return
        if not 0 <= lost < self.world_size or lost in (reporter, self.rank):
            log.warning("rank %d: LOST notice from rank %d names rank %d; ignored", self.rank, reporter, lost)
            return
        # Kept to name the culprit, and to refuse collectives begun later (begin). Collectives
        # in flight are left alone: the reporter's own ones that still needed the lost rank fail
        # there and reach us as its ABORT, and ours that still need it fail when our own link
        # to it ends. Failing them here would fail collectives whose part from the lost rank
        # is complete, which other members may have finished.
        self._told.setdefault(reporter, (lost, reason))

    # ----------------------------------------------------------------- receives and sends
    def post_recv(
        self,
        peer: int,
        expect: FrameKey,
        buffer: Any,
        op: ActiveOp | None,
        *,
        check_count: bool = True,
    ) -> asyncio.Future[None]:
        """Post a receive of the frame ``expect`` names from ``peer`` into ``buffer``."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        posted = Posted(peer, expect.slot, expect, check_count, buffer, fut, op, self.rank)
        got = self._unexpected.pop((peer, expect.slot), None)
        if got is not None:
            k, data = got
            self._unexpected_bytes -= data.nbytes
            err = posted.check(k, data.nbytes)
            if err is not None and posted.undescribed and op is not None:
                self.describe(op, peer)  # the receive stays pending; the answer fails the op
            elif err is not None:
                self._mismatch(op, err)
                fut.set_exception(err)
            else:
                self._copy_in(posted, data)
            return fut
        if peer in self._dead:
            who = self._culprit(peer, op.members) if op is not None else peer
            err = (
                op.error(PeerFailureError, f"rank {who} {self._dead.get(who, 'was lost')}", (who,))
                if op is not None
                else PeerFailureError(f"rank {peer} {self._dead[peer]}", ranks=(peer,))
            )
            fut.set_exception(err)
            return fut
        self._posted[(peer, expect.slot)] = posted
        if op is not None:
            op.posted.add(posted)
        return fut

    def expect(self, op: ActiveOp, key: FrameKey, call: Call, *, check_count: bool = True,
               timeout: float | None = None) -> None:
        """Say what every frame of collective ``op`` must describe (``key``: kind, op, dtype,
        count, call digest) and what its call was, so that frames that arrive for it before
        or without a receive are checked too, and a DESCRIBE about it can be answered.

        Frames already waiting for ``op`` are checked now. ``timeout``: the collective's, to
        bound how long a DESCRIBE waits for its answer.
        """
        op.expect, op.call, op.check_count = key, call, check_count
        op.describe_wait = DESCRIBE_WAIT_S if timeout is None else min(DESCRIBE_WAIT_S, timeout / 2)
        self._calls[(op.gid, op.seq)] = _Record(op.group, op.op, op.members, call)
        if len(self._calls) > _MAX_CALLS:
            self._calls.popitem(last=False)
        if self._unexpected:
            for slot_key, (k, data) in list(self._unexpected.items()):
                peer, slot = slot_key
                if slot[0] == op.gid and slot[1] == op.seq and not slot[3] & FLAG_P2P and self._screen(op, peer, k):
                    del self._unexpected[slot_key]
                    self._unexpected_bytes -= data.nbytes

    def agree(self, op: ActiveOp, ranks: tuple[int, ...], me: int) -> asyncio.Future[None]:
        """Exchange empty frames describing ``op`` (the key given to :meth:`expect`) with the
        other members ``ranks`` (``me`` is this rank's index) in ceil(log2 W) dissemination
        rounds, as a barrier does; the future completes after the last round.

        The rounds run beside the collective's own schedule (their own step numbers, each round
        sent once the previous one arrived and matched), so they cannot deadlock with it. Every
        frame is checked as any frame of ``op``: when the future completes, every member is
        known, directly or through members that checked, to have called what this rank called;
        a member that saw another call holds its rounds back, so nobody gets that far.
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        size = len(ranks)
        expect = op.expect
        assert expect is not None, "agree() after expect()"
        nothing = memoryview(b"")

        def start(k: int, distance: int) -> None:
            if distance >= size:
                if not done.done():
                    done.set_result(None)
                return
            key = FrameKey(op.gid, op.seq, AGREE_STEP + k, expect.kind, expect.op, expect.dtype, 0, expect.count,
                           expect.call)
            self.spawn(self._send_quietly(ranks[(me + distance) % size], key, nothing))
            got = self.post_recv(ranks[(me - distance) % size], key, memoryview(bytearray(0)), op,
                                 check_count=op.check_count)
            got.add_done_callback(lambda f: arrived(f, k, distance))

        def arrived(f: asyncio.Future[None], k: int, distance: int) -> None:
            if f.cancelled() or f.exception() is not None or op.failure.done():
                return  # the collective failed or ended: its own error is what is raised
            start(k + 1, distance << 1)

        start(0, 1)
        return done

    def _op_at(self, gid: int, seq: int) -> ActiveOp | None:
        for op in self._active:
            if op.seq == seq and op.gid == gid and not op.p2p:
                return op
        return None

    def _screen(self, op: ActiveOp, peer: int, k: FrameKey) -> bool:
        """Check a frame for ``op`` that no receive was posted for; True if it mismatches
        (then ``op`` fails, or its sender is asked what it called)."""
        if op.expect is None or peer not in op.members:
            return False
        problems, differs = compare(k, op.expect, op.check_count, f"rank {peer}", f"rank {self.rank}")
        if differs:
            self.describe(op, peer)
            return True
        if problems:
            op.fail(op.error(MismatchError, "collective mismatch: " + "; ".join(problems), (peer, self.rank)))
            return True
        return False

    def describe(self, op: ActiveOp, peer: int) -> None:
        """Tell ``peer``, whose frame for ``op`` carried another call digest, what this rank
        called; ``peer`` knows both calls then and fails the collective on every member with a
        message naming both. If no answer comes in time, ``op`` fails with what is known here.
        """
        if peer in op.described or op.failure.done():
            return
        op.described.add(peer)
        body = json.dumps({"op": op.op[:_MAX_OP_NAME], "call": op.call.to_json()}).encode()
        if len(body) > _MAX_CONTROL:
            body = json.dumps({"op": op.op[:_MAX_OP_NAME], "call": []}).encode()
        if peer in self._conns and peer not in self._dead:
            key = FrameKey(op.gid, op.seq, 0, Kind.DESCRIBE, 0, 0, FLAG_CONTROL, 0)
            self.spawn(self._send_quietly(peer, key, memoryview(body)))
        partial = op.error(
            MismatchError,
            "collective mismatch: " + _undescribed(op.op, op.call, f"rank {peer}", f"rank {self.rank}"),
            (peer, self.rank),
        )
        asyncio.get_running_loop().call_later(op.describe_wait, op.fail, partial)

    def _on_describe(self, peer: int, key: FrameKey, body: bytes) -> None:
        try:
            info = json.loads(body)
            theirs = Call.from_json(info["call"])
            their_op = str(info["op"])[:_MAX_OP_NAME]
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("rank %d: malformed DESCRIBE from rank %d: %s", self.rank, peer, exc)
            return
        op = self._op_at(key.gid, key.seq)
        if op is not None and op.expect is not None:
            rec: _Record | None = _Record(op.group, op.op, op.members, op.call)
        else:
            op, rec = None, self._calls.get((key.gid, key.seq))
        if rec is None or peer not in rec.members:
            log.debug("rank %d: DESCRIBE from rank %d about a collective unknown here", self.rank, peer)
            return
        me, them = f"rank {self.rank}", f"rank {peer}"
        problems = rec.call.differences(theirs, me, them)
        if their_op != rec.op:
            problems.insert(0, f"{them} called {their_op}, {me} called {rec.op}")
        if not problems:
            problems = [f"{them} and {me} called {rec.op} with arguments whose digests differ"]
        message = "collective mismatch: " + "; ".join(problems)
        if op is not None:
            # Its driver ends it: the group breaks from this step and every member is told.
            op.fail(op.error(MismatchError, message, (self.rank, peer)))
            return
        if self._doomed(key.gid, key.seq, False):
            return  # already broken at or before this step: the members were told
        err = MismatchError(message, group=rec.group, seq=key.seq, op=rec.op, ranks=(self.rank, peer))
        self._break(key.gid, err, key.seq)
        stand_in = ActiveOp(rec.group, key.gid, key.seq, rec.op, rec.members, asyncio.get_running_loop().create_future())
        self._broadcast_abort(stand_in, err)
    def _copy_in(self, posted: Posted, data: Any) -> None:
        """Complete ``posted`` with a frame that arrived in scratch memory before it was posted."""
        if _on_device(posted.buffer) or _on_device(data):
            from ..arrays.cuda import copy_bytes

            # One asynchronous copy on the GPU (or by DMA from/to the host), waited for here:
            # the receive's memory holds the frame once its future completes.
            if data.nbytes:
                copy_bytes(posted.buffer, data)
            posted.future.set_result(None)
            return
        if data.nbytes < _DRAIN_SLICE:
            if data.nbytes:
                posted.buffer[:] = data
            posted.future.set_result(None)
            return
        # One memoryview assignment would hold the loop for the whole copy, page faults of the
        # destination included: 0.1-0.5 s for 512 MiB, longer on a loaded host. Copied a slice per
        # turn, other tasks run in between, and each copied slice of scratch goes back to the OS
        # at once, so the frame never costs more than its own size (scratch plus the part of the
        # destination written so far). A worker thread would free the loop too, but a copy in
        # flight cannot be stopped: it could write into the caller's memory after the
        # collective failed and returned.
        self._draining[(posted.peer, posted.slot)] = posted
        asyncio.get_running_loop().call_soon(self._drain, posted, data, 0)

    def _drain(self, posted: Posted, data: memoryview, start: int) -> None:
        op, fut = posted.op, posted.future
        if fut.done() or (op is not None and op.failure.done()) or self._closing:
            # Cancelled, failed or closing: the receive's memory is the caller's again, and
            # the frame is dropped (as a frame arriving for an abandoned receive would be).
            self._draining.pop((posted.peer, posted.slot), None)
            if not fut.done():
                fut.cancel()
            return
        end = min(start + _DRAIN_SLICE, data.nbytes)
        posted.buffer[start:end] = data[start:end]
        scratch = data.obj
        if isinstance(scratch, mmap.mmap) and _DONTNEED is not None:
            scratch.madvise(_DONTNEED, start, end - start)
        if end < data.nbytes:
            asyncio.get_running_loop().call_soon(self._drain, posted, data, end)
            return
        self._draining.pop((posted.peer, posted.slot), None)
        fut.set_result(None)

    def withdraw(self, op: ActiveOp) -> bool:
        """Take back ``op``'s receives if none has begun or finished receiving; False (and
        nothing done) otherwise."""
        if any(d.op is op for d in self._draining.values()):
            return False  # a message is being copied in: it was received
        for posted in op.posted:
            if posted.future.done() or (posted.peer, posted.slot) in self._landing:
                return False
        for posted in list(op.posted):
            self.cancel_recv(posted)
            posted.future.cancel()
        op.posted.clear()
        return True

    def abandon(self, op: ActiveOp) -> None:
        """Withdraw ``op``'s receives but keep their places: each frame is dropped when it
        arrives instead of waiting as unexpected, so later messages still match (point to
        point, where the numbering is per pair and tag, resynchronises this way)."""
        for posted in list(op.posted):
            if self._posted.get((posted.peer, posted.slot)) is posted:
                posted.discard = True
                posted.op = None
                posted.buffer = memoryview(bytearray(0))  # the caller's memory is theirs again
            if not posted.future.done():
                posted.future.cancel()
        op.posted.clear()

    def cancel_recv(self, posted: Posted) -> None:
        if self._posted.get((posted.peer, posted.slot)) is posted:
            del self._posted[(posted.peer, posted.slot)]

    def send_now(self, peer: int, key: FrameKey, payload: Any) -> bool:
        """Write a small frame to ``peer`` without waiting, where its connection can (tcp: no
        send in progress on it, nothing unsent, the frame small enough to copy); False: nothing
        was written, use :meth:`send`. Saves a task and a loop turn per small message. Device
        memory always goes through :meth:`send`."""
        if peer == self.rank or peer in self._dead or _on_device(payload):
            return False
        now = getattr(self._conns.get(peer), "send_now", None)
        return now is not None and bool(now(key.pack(), payload))

    async def send(self, peer: int, key: FrameKey, payload: Any) -> None:
        """Send one frame to ``peer`` (``peer`` may be this rank: it is delivered locally).

        ``payload`` is host memory, or device memory (``__cuda_array_interface__``, ready to be
        read), which goes over the peer's device connection when it has one.
        """
        device = _on_device(payload)
        if peer == self.rank:
            raw = key.pack()
            buf = self._place(peer, raw, payload.nbytes, device=False) if device else self.frame_buffer(
                peer, raw, payload.nbytes)
            if payload.nbytes:
                if device or _on_device(buf):
                    from ..arrays.cuda import copy_bytes

                    copy_bytes(buf, payload)
                else:
                    buf[:] = payload
            self.frame_received(peer, raw, buf)
            return
        if peer in self._dead:
            raise PeerFailureError(f"rank {peer} {self._dead[peer]}", ranks=(peer,))
        conn = (self._device_conns.get(peer) if device else None) or self._conns.get(peer)
        if conn is None:
            raise PeerFailureError(f"no connection to rank {peer}", ranks=(peer,))
        try:
            await conn.send(key.pack(), payload)
        except TransportError as exc:
            # The receiving side usually reports this first (peer_lost); if not, the error
            # still names the peer and is a CollectiveError, as every collective failure is.
            raise PeerFailureError(f"sending to rank {peer} failed: {exc}", ranks=(peer,)) from exc

    # ----------------------------------------------------------------- collectives in flight
    def begin(
        self, group: str, gid: int, seq: int, op: str, members: frozenset[int], *, p2p: bool = False
    ) -> ActiveOp:
        """Register a collective; raises at once if its group is broken or a member crashed
        before taking part in it.

        A group broken at step s refuses steps s and later (and point to point); a member that
        is still behind may finish the steps before s, which every other member finished.
        A member that left gracefully does not make it fail here: only a receive from it that
        cannot be served from what it sent (or a send to it) does. A crashed member (or one a
        member reported lost) does, unless frames it sent for this very collective are here: it
        took part, and other members may have finished.
        """
        active = ActiveOp(group, gid, seq, op, members, asyncio.get_running_loop().create_future(), p2p=p2p)
        if self._doomed(gid, seq, p2p):
            cause = self._broken[gid]
            if not p2p and seq == self._broken_from[gid]:
                # This very call is the collective that failed elsewhere before we got to it:
                # raise what the members that were in it raised.
                raise active.error(type(cause), cause.detail, cause.ranks)
            since = f" by {cause.op or 'a collective'} at step {cause.seq}" if cause.seq >= 0 else ""
            raise active.error(GroupBrokenError, f"group was broken{since}: {cause.detail}", cause.ranks)
        crashed = [p for p in members if p in self._crashed and not self._took_part(p, gid, seq, p2p)]
        if crashed:
            raise self.lost_error(active, crashed)
        for reporter, (lost, reason) in self._told.items():
            if reporter in members and lost in members and not self._took_part(lost, gid, seq, p2p):
                who = self._culprit(lost, members)
                if who != lost:  # what was reported lost was a survivor leaving after a death
                    raise self.lost_error(active, (who,))
                raise active.error(PeerFailureError, f"rank {lost} {reason} (reported by rank {reporter})", (lost,))
        self._active.add(active)
        return active

    def _took_part(self, peer: int, gid: int, seq: int, p2p: bool) -> bool:
        """Whether a frame ``peer`` sent for collective ``seq`` of ``gid`` (or point-to-point
        message ``seq``) waits here unclaimed."""
        flag = FLAG_P2P if p2p else 0
        return any(
            p == peer and slot[0] == gid and slot[1] == seq and slot[3] & FLAG_P2P == flag
            for p, slot in self._unexpected
        )

    def end(self, op: ActiveOp, exc: BaseException | None = None) -> None:
        """Unregister ``op``; on failure break its group and tell the other members why."""
        self._active.discard(op)
        for posted in list(op.posted):
            self.cancel_recv(posted)
        op.posted.clear()
        if not op.failure.done():
            op.failure.cancel()
        if exc is None:
            return
        if isinstance(exc, asyncio.CancelledError):
            err: CollectiveError = op.error(
                RemoteAbortError, f"rank {self.rank} cancelled the collective", (self.rank,)
            )
        elif isinstance(exc, CollectiveError):
            err = exc
        else:
            err = op.error(RemoteAbortError, f"rank {self.rank} failed: {exc!r}", (self.rank,))
        step = 0 if op.p2p else op.seq
        already = self._doomed(op.gid, step, False)
        self._break(op.gid, err, step)
        if not already:  # the failure started here: tell the others (remote ones are known)
            self._broadcast_abort(op, err)

    def _doomed(self, gid: int, seq: int, p2p: bool) -> bool:
        """Whether step ``seq`` (or a point-to-point message) of group ``gid`` can only fail."""
        start = self._broken_from.get(gid)
        return start is not None and (p2p or seq >= start)

    def _break(self, gid: int, err: CollectiveError, step: int) -> None:
        """Mark group ``gid`` broken from collective ``step`` on (0: everything).

        Steps before it are left alone: the member that failed at ``step`` had finished them and
        sent its part, so a member still behind can finish them too; failing them would turn a
        collective that matched into an error, and dropping their early frames into a hang.
        """
        if gid not in self._broken_from or step < self._broken_from[gid]:
            self._broken[gid] = _record(err)
            self._broken_from[gid] = step
        # This rank's own collectives of those steps can no longer finish either: the other
        # members fail theirs (they got our ABORT, or sent us theirs) and would not tell us.
        for op in list(self._active):
            if op.gid == gid and (op.p2p or op.seq >= step) and not op.failure.done():
                op.fail(op.error(type(err), err.detail, err.ranks))
        for slot_key in [k for k in self._unexpected if self._doomed(k[1][0], k[1][1], bool(k[1][3] & FLAG_P2P))]:
            _, data = self._unexpected.pop(slot_key)
            self._unexpected_bytes -= data.nbytes

    def _mismatch(self, op: ActiveOp | None, err: CollectiveError) -> None:
        if op is not None:
            op.fail(err)

    def _broadcast_abort(self, op: ActiveOp, err: CollectiveError) -> None:
        body = json.dumps(
            {"code": _error_code(err), "message": err.detail, "ranks": list(err.ranks), "origin": self.rank}
        ).encode()
        key = FrameKey(op.gid, 0 if op.p2p else op.seq, 0, Kind.ABORT, 0, 0, FLAG_CONTROL, 0)
        for peer in op.members:
            if peer == self.rank or peer in self._dead or peer not in self._conns:
                continue
            self.spawn(self._send_quietly(peer, key, memoryview(body)))

    async def _send_quietly(self, peer: int, key: FrameKey, payload: memoryview) -> None:
        try:
            await self.send(peer, key, payload)
        except Exception as exc:  # the peer may be gone; its own failure path reports that
            log.debug("rank %d: abort to rank %d not delivered: %s", self.rank, peer, exc)

    def _on_control(self, peer: int, key: FrameKey, body: bytes) -> None:
        if key.kind == Kind.LOST:
            self._on_lost_notice(peer, body)
            return
        if key.kind == Kind.DESCRIBE:
            self._on_describe(peer, key, body)
            return
        if key.kind == Kind.WAITING:
            theirs = body.decode("utf-8", "replace")
            heard = self._heard.get(key.gid)
            if heard is None:
                if len(self._heard) >= _MAX_HEARD_GROUPS:
                    self._heard.pop(next(iter(self._heard)))
                heard = self._heard[key.gid] = {}
            heard[peer] = asyncio.get_running_loop().time()
            for op in list(self._active):
                if op.gid == key.gid and op.seq == key.seq and peer in op.members:
                    if theirs != op.op:
                        # Two members on different paths (the shared-memory fast path and
                        # frames, say) exchange no frame that could show it; this is the first
                        # word they have from each other about this step.
                        op.fail(op.error(
                            MismatchError,
                            f"collective mismatch: rank {peer} called {theirs}, rank {self.rank} called {op.op}",
                            (peer, self.rank),
                        ))
            return
        if key.kind != Kind.ABORT:
            log.warning("rank %d: unknown control frame kind %d from rank %d", self.rank, key.kind, peer)
            return
        try:
            info = json.loads(body)
            cls = _ERRORS.get(str(info.get("code")), RemoteAbortError)
            message = f"rank {int(info['origin'])} aborted: {info['message']}"
            ranks = [int(r) for r in info.get("ranks", [])]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # AttributeError: not a dict
            log.warning("rank %d: malformed abort from rank %d: %s", self.rank, peer, exc)
            return
        if cls is PeerFailureError and len(ranks) == 1 and 0 <= ranks[0] < self.world_size:
            # The sender lost that rank (or heard of it): should the sender go away next
            # without a goodbye, it is a survivor leaving, not a culprit (see _culprit).
            if ranks[0] not in (peer, self.rank):
                self._failed_by.setdefault(peer, ranks[0])
        # key.seq: the step that failed there (0 when a point-to-point call failed)
        self._break(key.gid, cls(message, seq=key.seq, ranks=ranks), key.seq)
        for op in list(self._active):
            if op.gid == key.gid and (op.p2p or op.seq >= key.seq):
                op.fail(op.error(cls, message, ranks))

    # ----------------------------------------------------------------- lifecycle
    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` in the background, tracked so that close() can wait for it."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def aflush(self, timeout: float) -> None:
        """Give frames sent in the background (aborts, notices) up to ``timeout`` s to go out."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout)

    def not_joined(self) -> set[int]:
        """Live peers that have not connected to this rank yet, as far as the transports tell
        (one without ``inbound_peers`` counts as having them all)."""
        joined: set[int] = set()
        for t in self.transports:
            inbound = getattr(t, "inbound_peers", None)
            if inbound is None:
                return set()
            joined |= inbound()
        return {p for p in range(self.world_size) if p != self.rank and p not in joined and p not in self._dead}

    async def wait_joined(self, timeout: float) -> set[int]:
        """Wait up to ``timeout`` s until every live peer has connected to this rank; return
        those that have not.

        A peer still inside ``init`` connects to every rank: leaving before it did would make
        its ``init`` fail, though this rank owes it nothing else. Polled: it runs once, at
        shutdown, and only waits at all when a peer is that far behind.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (missing := self.not_joined()) and loop.time() < deadline:
            await asyncio.sleep(0.005)
        return missing

    async def aclose(self, flush_timeout: float = 5.0) -> None:
        """Close gracefully: give background sends (notices, sends of cancelled calls) up to
        ``flush_timeout`` s, then let each transport flush what it holds and say goodbye, so
        that peers receive every frame sent before they see this rank leave."""
        self._closing = True
        if self._background:
            await asyncio.wait(list(self._background), timeout=flush_timeout)
        for task in list(self._background):
            task.cancel()
        conns = [*self._conns.values(), *self._device_conns.values()]
        closed = await asyncio.gather(*(conn.aclose() for conn in conns), return_exceptions=True)
        for exc in closed:
            if isinstance(exc, BaseException):
                log.debug("rank %d: closing a connection: %r", self.rank, exc)
        for t in self.transports:
            await t.aclose()
        self._conns.clear()
        self._device_conns.clear()
        self.device_scratch = None
        self._unexpected.clear()
        self._unexpected_bytes = 0

    def abort(self) -> None:
        self._closing = True
        for task in list(self._background):
            task.cancel()
        for conn in [*self._conns.values(), *self._device_conns.values()]:
            conn.abort()
        for t in self.transports:
            t.abort()
        self._conns.clear()
        self._device_conns.clear()
        self.device_scratch = None
