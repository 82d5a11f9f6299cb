"""``tcp``: frames over TCP (optionally TLS), received straight into the memory the sink picks.

Every connection starts with the handshake of ``aiocoll.core.auth`` (purpose ``b"tcp"``; each side's
hello is ``!II`` rank, world_size, so both ends learn and check who is on the other side). Then
the wire carries, in one direction only (see ``_base``)::

    initiator -> acceptor   frame* goodbye?
        frame    = b"ACF1" | nbytes:u64 | key[KEY_SIZE] | payload[nbytes]
        goodbye  = b"ACG1" | 0:u64      | key[KEY_SIZE] (ignored), then end of stream
    acceptor -> initiator   nothing, except one byte 0x00 ("goodbye") before closing

The goodbyes let a peer tell ``aclose()`` from death: a killed process's kernel closes its
sockets with a clean FIN too, so "EOF at a frame boundary" alone would report a SIGKILL as a
graceful close. ``peer_lost(peer, None)`` therefore means "the peer said goodbye"; an EOF without
one, a reset, a header that breaks the format, or a frame the sink rejects is a TransportError.

Receiving uses ``asyncio.BufferedProtocol``: the 44-byte header is read into a small staging
buffer, then ``sink.frame_buffer`` picks the destination and the socket reads straight into it.
Nothing payload-sized is ever allocated by the transport, whatever a header claims.

Options (``TransportConfig.options``):
    port: port to listen on (default 0: any free port).
    server_hostname: name to check the listener's TLS certificate against (default: the host of
        the address connected to).
    socket_buffer: SO_SNDBUF / SO_RCVBUF in bytes (default 0: leave the kernel's autotuning
        alone; 4 MiB buffers measured no faster on loopback).
    bulk_bytes: payloads of at least this many bytes are sent and received by a thread of the
        connection doing blocking I/O (see ``_tcp_lane``), not by the event loop (default
        256 KiB, or ``AIOCOLL_TCP_BULK_BYTES``; 0: never). Not with TLS, whose bytes only the ssl
        transport can produce.

Large frames: the event loop reads the header (and whatever of the payload came with it), then
stops reading that socket and hands the rest of the payload to the connection's lane, which
``recv_into``s it straight into the sink's memory and gives the socket back; on the sending
side the lane ``sendmsg``s header and payload. Frames on one connection keep their order: a
send holds the connection's lock until its bytes are in the kernel, whichever path wrote them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import struct
from typing import Any, ClassVar, cast

from aiocoll.core import auth as _auth
from aiocoll.core.errors import HandshakeError, TransportError

from ._base import (
    KEY_SIZE, MAX_FRAME, Buffer, Capabilities,
    FrameSink,
    TransportConfig,
    format_host_port,
    parse_host_port,
)
from ._tcp_lane import Lane, PeerClosed, recv_all, send_all

_log = logging.getLogger("aiocoll.transports.tcp")

_PURPOSE = b"tcp"
_FRAME = b"ACF1"
_GOODBYE = b"ACG1"
_PREFIX = struct.Struct("!4sQ")
#: Bytes before each payload: magic, payload length, key.
HEADER_SIZE = _PREFIX.size + KEY_SIZE
_HELLO = struct.Struct("!II")
_BYE = b"\x00"

_DEFAULT_SOCKET_BUFFER = 0
# How much the staging buffer may read past a header. Bytes of a payload that arrive together
# with its header are copied once from here into the sink's memory; everything after goes straight
# into it. Reading only the 44 header bytes costs an event-loop turn per header and per payload:
# with 16 KiB, one recv() takes many small frames, and the receiver handled 3-8x more frames/s of
# 64 B-1 KiB (same at 16 KiB); the copy is bounded by this much per frame.
_STAGING = 16 << 10
# Payloads are handed to the socket in slices of this size, each drained before the next; see
# TcpConnection.send for why. On the 3.11 selector loop one 64 MiB write() ran at 0.7 GB/s (the
# transport copies the unsent rest), 1 MiB and 4 MiB slices at 2-3 GB/s.
_SLICE = 1 << 20
# Payloads up to this size are copied behind their header and written with it in one write().
_COALESCE = 64 << 10
# Frames from this size on go through the connection's lane (option bulk_bytes). Below it a
# thread hand-off (two wake-ups, 20-100 us) costs more than the loop's own writes and reads.
_DEFAULT_BULK_BYTES = 256 << 10
# Connect backoff: first retry after 10 ms, doubling up to 1 s.
_BACKOFF_FIRST = 0.01
_BACKOFF_MAX = 1.0


def format_address(host: str, port: int) -> str:
    """``tcp://host:port``, with IPv6 hosts in brackets."""
    return format_host_port("tcp", host, port)


def parse_address(address: str) -> tuple[str, int]:
    """Split ``tcp://host:port`` into host and port.

    Raises:
        ValueError: not a ``tcp://`` address with a host and a port.
    """
    return parse_host_port("tcp", address)


def _bytes_view(obj: Buffer, what: str) -> memoryview:
    """A flat byte view of ``obj``: slicing must count bytes, not rows of an n-d array."""
    view = obj if isinstance(obj, memoryview) else memoryview(obj)
    if not view.c_contiguous:
        raise TypeError(f"{what} must be C-contiguous")
    if view.ndim != 1 or view.itemsize != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _receive_view(buf: memoryview, nbytes: int) -> memoryview:
    """Check what ``frame_buffer`` returned and view it as bytes to receive into."""
    view = _bytes_view(buf, "frame_buffer's memory")
    if view.readonly:
        raise TypeError("frame_buffer returned read-only memory")
    if view.nbytes != nbytes:
        raise ValueError(f"frame_buffer returned {view.nbytes} bytes for a frame of {nbytes}")
    return view


def _unread(reader: asyncio.StreamReader) -> int:
    # StreamReader has no public way to ask how much it buffered. The handshake guarantees the
    # initiator sends nothing after its proof until it reads OK (and the acceptor nothing after
    # OK), so this is 0 unless the peer broke the protocol.
    return len(getattr(reader, "_buffer", b""))


def _tune(sock: Any, buffer_size: int, *, send: bool, receive: bool) -> None:
    """TCP_NODELAY (frames are whole messages: never wait to coalesce), keepalive (find a peer
    whose host vanished without a FIN), and the socket buffers."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    if buffer_size > 0:
        if send:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_size)
        if receive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_size)


def _bulk_bytes(options: dict[str, Any]) -> int:
    """The ``bulk_bytes`` option, else ``AIOCOLL_TCP_BULK_BYTES``, else the default.

    Raises:
        ValueError: not an integer >= 0.
    """
    value = options.get("bulk_bytes", os.environ.get("AIOCOLL_TCP_BULK_BYTES", _DEFAULT_BULK_BYTES))
    try:
        bulk = int(value)
    except (TypeError, ValueError):
        bulk = -1
    if bulk < 0:
        raise ValueError(f"tcp bulk_bytes (option or AIOCOLL_TCP_BULK_BYTES) must be an integer >= 0, got {value!r}")
    return bulk


def _peername(transport: asyncio.BaseTransport) -> str:
    name = transport.get_extra_info("peername")
    if isinstance(name, tuple) and len(name) >= 2:
        return format_address(str(name[0]), int(name[1]))
    return repr(name)


class _Receiver(asyncio.BufferedProtocol):
    """The accepting end of one connection: parses frames and feeds the sink."""

    def __init__(self, owner: TcpTransport, peer: int, remote: str, writer: asyncio.StreamWriter) -> None:
        self.peer = peer
        self._owner = owner
        self._remote = remote
        # Held, not used: StreamWriter.__del__ closes its transport (3.11.5+), and the handshake's
        # writer still owns ours.
        self._writer = writer
        self._transport = cast(asyncio.Transport, writer.transport)
        self._sink = owner._require_sink()
        self._stage = bytearray(max(_STAGING, HEADER_SIZE))
        self._stage_view = memoryview(self._stage)
        self._start = 0  # staged bytes not yet parsed are _stage[_start:_end]
        self._end = 0
        self._key = b""
        self._buffer: memoryview | None = None  # what frame_buffer returned, for frame_received
        self._dst: memoryview | None = None  # the same memory as flat bytes
        self._filled = 0
        self._goodbye = False
        self._done = False  # reported or closed on purpose: no more sink calls
        # Large payloads: received by this connection's lane while the loop leaves the socket alone.
        self._bulk = owner._bulk_bytes if owner._config.ssl_server is None else 0
        self._lane: Lane | None = None
        self._job: asyncio.Future[None] | None = None  # the lane is receiving the rest of _dst
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def receiving(self) -> bool:
        """Still delivering frames: neither ended nor dropped."""
        return not self._done

    # -- asyncio.BufferedProtocol

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._dst is not None:
            return self._dst[self._filled :]
        # _parse leaves at most a partial header at the front, so there is always room.
        return self._stage_view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._done:
            return
        if self._dst is not None:
            self._filled += nbytes
            if self._filled == len(self._dst):
                self._deliver()
            return
        self._end += nbytes
        self._parse()

    def eof_received(self) -> bool:
        if not self._done:
            if self._dst is not None or self._end > self._start:
                self._lost(TransportError(f"rank {self.peer} closed the connection in the middle of a frame"))
            elif not self._goodbye:
                self._lost(
                    TransportError(f"rank {self.peer} closed the connection without saying goodbye (did it die?)")
                )
            else:
                self._lost(None)
        return False  # close our end too

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done:
            reason = f"{type(exc).__name__}: {exc}" if exc else "closed"
            self._lost(TransportError(f"connection from rank {self.peer} lost: {reason}"))
        self._release()
        self._end_lane()
        self._owner._incoming.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)

    # -- framing

    def _parse(self) -> None:
        view = self._stage_view
        while not self._done:
            if self._dst is not None:
                take = min(self._end - self._start, len(self._dst) - self._filled)
                if take:
                    self._dst[self._filled : self._filled + take] = view[self._start : self._start + take]
                    self._start += take
                    self._filled += take
                if self._filled < len(self._dst):
                    self._offload()
                    break  # the rest of the payload is read straight into _dst, here or by the lane
                self._deliver()
                continue
            if self._goodbye and self._end > self._start:
                self._violation("data after goodbye")
                return
            if self._end - self._start < HEADER_SIZE:
                break
            magic, nbytes = _PREFIX.unpack_from(self._stage, self._start)
            key = bytes(view[self._start + _PREFIX.size : self._start + HEADER_SIZE])
            self._start += HEADER_SIZE
            if magic == _GOODBYE and nbytes == 0:
                self._goodbye = True
            elif magic != _FRAME:
                self._violation(f"bad frame magic {bytes(magic)!r}")
                return
            elif nbytes > MAX_FRAME:
                self._violation(f"frame header claims {nbytes} bytes, more than MAX_FRAME ({MAX_FRAME})")
                return
            else:
                self._begin(key, nbytes)
        if self._done:
            return
        rest = self._end - self._start
        if rest and self._start:
            # Same-size slice assignment: no resize, so the exported view stays valid.
            self._stage[:rest] = self._stage[self._start : self._end]
        self._start, self._end = 0, rest

    def _begin(self, key: bytes, nbytes: int) -> None:
        try:
            buffer = self._sink.frame_buffer(self.peer, key, nbytes)
            dst = _receive_view(buffer, nbytes)
        except Exception as exc:
            self._drop(TransportError(f"frame of {nbytes} bytes from rank {self.peer} rejected: {exc!r}"), exc)
            return
        if nbytes == 0:
            self._received(key, buffer)
            return
        self._key, self._buffer, self._dst, self._filled = key, buffer, dst, 0

    def _offload(self) -> None:
        """Hand the rest of a large payload to the lane; the loop stops reading until it is in."""
        assert self._dst is not None
        if not self._bulk or len(self._dst) - self._filled < self._bulk:
            return
        if self._lane is None:
            self._lane = self._owner._new_lane(self._transport, f"aiocoll-tcp-recv-{self._owner.rank}<{self.peer}")
            if self._lane is None:
                self._bulk = 0
                return
        self._transport.pause_reading()
        job = self._job = self._lane.submit(recv_all, self._dst[self._filled :])
        job.add_done_callback(self._offloaded)

    def _offloaded(self, job: asyncio.Future[None]) -> None:
        self._job = None
        exc = job.exception()
        if self._done:
            return  # dropped or closed meanwhile: the frame goes nowhere
        if exc is not None:
            if isinstance(exc, PeerClosed):
                reason = f"rank {self.peer} closed the connection in the middle of a frame"
            else:
                reason = f"connection from rank {self.peer} lost in the middle of a frame: {type(exc).__name__}: {exc}"
            self._lost(TransportError(reason))
            self._transport.abort()
            return
        assert self._dst is not None
        self._filled = len(self._dst)
        self._deliver()
        if not self._done:
            self._transport.resume_reading()

    def _end_lane(self) -> None:
        if self._lane is not None:
            if self._job is not None:
                self._lane.interrupt()  # its thread may wait for bytes that will never come
            self._lane.close()

    def _deliver(self) -> None:
        key, buffer = self._key, self._buffer
        assert buffer is not None
        self._release()
        self._received(key, buffer)

    def _received(self, key: bytes, buffer: memoryview) -> None:
        try:
            self._sink.frame_received(self.peer, key, buffer)
        except Exception as exc:
            self._drop(TransportError(f"sink failed on a frame from rank {self.peer}: {exc!r}"), exc)

    def _release(self) -> None:
        self._key, self._buffer, self._dst, self._filled = b"", None, None, 0

    # -- endings

    def _violation(self, reason: str) -> None:
        _log.warning(
            "rank %d dropped the connection from rank %d (%s): %s", self._owner.rank, self.peer, self._remote, reason
        )
        self._drop(TransportError(f"rank {self.peer} broke the frame format: {reason}"), None)

    def _drop(self, exc: TransportError, cause: BaseException | None) -> None:
        if cause is not None:
            exc.__cause__ = cause
        self._lost(exc)
        self._transport.abort()

    def _lost(self, exc: BaseException | None) -> None:
        self._done = True
        self._release()
        self._owner._lose(self.peer, exc)

    async def aclose(self, timeout: float) -> None:
        """Say goodbye, close, and wait until the socket is closed (abort after ``timeout``)."""
        if not self._transport.is_closing():
            self._done = True
            self._release()
            self._transport.write(_BYE)
            self._transport.close()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.closed)
        except TimeoutError:
            self.abort()
        except asyncio.CancelledError:
            self.abort()
            raise

    def abort(self) -> None:
        self._done = True
        self._release()
        self._end_lane()
        self._transport.abort()


class TcpConnection(asyncio.Protocol):
    """One-way link to a peer over TCP: this side sends frames, the peer's sink receives them.

    It is also the asyncio protocol of its socket, to learn about flow control and about the
    peer going away (the peer never writes on it, except a goodbye byte before it closes).
    """

    def __init__(self, owner: TcpTransport, peer: int, address: str, writer: asyncio.StreamWriter) -> None:
        self.peer = peer
        self.address = address
        self._owner = owner
        # Held, not used: StreamWriter.__del__ closes its transport (3.11.5+).
        self._writer = writer
        self._transport = cast(asyncio.Transport, writer.transport)
        self._lock = asyncio.Lock()
        self._sending = 0  # send() calls started and not returned (send_now writes only at 0)
        self._closing = False  # aclose() or abort() called: new sends are refused
        self._broken = ""  # why the connection can no longer carry frames
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._goodbye = False
        self._reported = False
        # Large payloads: written by this connection's lane (see _tcp_lane).
        self._bulk = owner._bulk_bytes if owner._config.ssl_client is None else 0
        self._lane: Lane | None = None
        self._job: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def send(self, key: bytes, payload: Buffer) -> None:
        """Send one frame; return once ``payload`` may be reused.

        Frames on one connection arrive in the order their ``send`` calls started (a FIFO lock
        serialises them). Cancelling a send that is still waiting for its turn sends nothing;
        cancelling one that has started writing aborts the connection, because half a frame
        cannot be taken back and the payload may no longer be referenced once we return.

        Raises:
            ValueError: ``key`` is not KEY_SIZE bytes.
            TypeError: ``payload`` is not a C-contiguous buffer.
            TransportError: the connection is closed or broken (the message names the peer).
        """
        if len(key) != KEY_SIZE:
            raise ValueError(f"key must be {KEY_SIZE} bytes, got {len(key)}")
        data = _bytes_view(payload, "payload")
        self._check()
        self._sending += 1
        try:
            await self._send_locked(key, data)
        finally:
            self._sending -= 1

    def send_now(self, key: bytes, payload: Buffer) -> bool:
        """Write a small frame at once if nothing else is being sent and nothing is unsent;
        return whether it was written (False: nothing was, use ``send``).

        The frame is copied behind its header, so ``payload`` may be reused at once. Frames
        keep their order with ``send``'s: it is refused while a send is in progress, and a
        frame the kernel did not take yet waits in the transport, ahead of later writes (a
        lane waits for the transport to drain before it writes).

        Raises:
            ValueError: ``key`` is not KEY_SIZE bytes.
            TypeError: ``payload`` is not a C-contiguous buffer.
        """
        if self._sending or self._paused or self._broken or self._closing or self._goodbye:
            return False
        if len(key) != KEY_SIZE:
            raise ValueError(f"key must be {KEY_SIZE} bytes, got {len(key)}")
        data = _bytes_view(payload, "payload")
        if data.nbytes > _COALESCE:
            return False
        self._transport.write(_PREFIX.pack(_FRAME, data.nbytes) + key + data)
        return True

    async def _send_locked(self, key: bytes, data: memoryview) -> None:
        async with self._lock:
            # Sends that started before aclose() still go out (aclose waits for them), so only
            # a broken connection stops them here.
            self._check_intact()
            t = self._transport
            total = data.nbytes
            header = _PREFIX.pack(_FRAME, total) + bytes(key)
            if self._bulk and total >= self._bulk:
                if self._lane is None:
                    self._lane = self._owner._new_lane(t, f"aiocoll-tcp-send-{self._owner.rank}>{self.peer}")
                    if self._lane is None:
                        self._bulk = 0
                if self._lane is not None:
                    await self._send_on_lane(self._lane, header, data)
                    return
            written = 0
            try:
                if total <= _COALESCE:
                    # One write, so one system call and one segment: with TCP_NODELAY each
                    # write leaves at once, and on loopback each wakes the receiver once more.
                    t.write(header + data)
                    written = total
                    await self._drain(last=True)
                    return
                t.write(header)
                # Why slices and a drain after each: transport.write() keeps what the kernel did
                # not take at once. The 3.11 selector loop copies it into a bytearray; 3.12+ and
                # uvloop keep a reference to our memoryview, so returning before the transport's
                # buffer is empty would let the caller overwrite bytes not yet sent. The write
                # buffer's high-water mark is 0 (see TcpTransport.connect), so _drain() returns
                # only when the transport holds nothing: every byte is in the kernel and no
                # reference to the payload is left. Slicing bounds what the transport holds (or
                # copies, on 3.11) at any moment to one slice instead of the whole payload.
                while written < total:
                    piece = data[written : written + _SLICE]
                    t.write(piece)
                    written += len(piece)
                    await self._drain(last=written == total)
                if total == 0:
                    await self._drain(last=True)
            except asyncio.CancelledError:
                if written < total or t.get_write_buffer_size() > 0:
                    self._break("a send was cancelled in the middle of a frame")
                    t.abort()
                raise

    async def _send_on_lane(self, lane: Lane, header: bytes, data: memoryview) -> None:
        # The lane writes the socket itself: the transport must hold no unsent byte first, so
        # that the lane's bytes follow the previous frame's on the wire (every send drains
        # before it lets go of the lock; a send_now may have left bytes behind).
        await self._drain()
        job = self._job = lane.submit(send_all, (memoryview(header), data))
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            if not job.done() or job.exception() is not None:
                self._break("a send was cancelled in the middle of a frame")
                lane.interrupt()
                self._transport.abort()
                # The thread may read the payload until the shutdown reaches it; the caller
                # owns that memory again once we return.
                await _settled(job)
            raise
        except Exception as exc:
            reason = self._broken or f"{type(exc).__name__}: {exc}"
            self._break(reason)
            self._transport.abort()
            raise TransportError(f"connection to rank {self.peer} at {self.address} is broken: {reason}") from exc
        finally:
            self._job = None
        if self._goodbye:
            return  # every byte is in the kernel; see _drain for why a goodbye is no failure
        self._check_intact()

    async def _drain(self, last: bool = False) -> None:
        if self._paused and not self._broken:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiter = waiter
            try:
                await waiter
            finally:
                self._drain_waiter = None
        if last and self._goodbye and self._transport.get_write_buffer_size() == 0:
            # The whole frame was in the kernel before the peer's goodbye was read. A peer says
            # goodbye only once its collectives are over, having read all it needed: the frame
            # was either received or not needed, and failing here would fail a collective the
            # peer completed (the goodbye often overtakes this task's wake-up).
            return
        self._check_intact()

    def _check_intact(self) -> None:
        if self._broken:
            raise TransportError(f"connection to rank {self.peer} at {self.address} is broken: {self._broken}")

    def _check(self) -> None:
        self._check_intact()
        if self._closing:
            raise TransportError(f"connection to rank {self.peer} at {self.address} is closed")

    def _break(self, reason: str) -> None:
        if not self._broken:
            self._broken = reason
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _report(self, exc: BaseException | None) -> None:
        if not self._reported and not self._closing:
            self._reported = True
            self._owner._lose(self.peer, exc)

    def _report_after_frames(self, exc: BaseException | None) -> None:
        """Report the peer gone, unless frames it sent may still sit in the other socket.

        The layer above takes a loss to mean "nothing more will come from this peer" and fails
        what still waits for it; this socket's end says nothing about the other one, where the
        peer's last frames may be unread yet (a loaded host reads sockets in any order). That
        connection reports the loss once its stream ends, after the last frame, whether the
        peer said goodbye there or not.
        """
        if self._owner._receiving_from(self.peer):
            self._reported = True
        else:
            self._report(exc)

    # -- asyncio.Protocol

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if data == _BYE and not self._goodbye:
            self._goodbye = True
            return
        reason = f"rank {self.peer} wrote {len(data)} unexpected bytes on a one-way connection"
        _log.warning("rank %d dropped its connection to %s: %s", self._owner.rank, self.address, reason)
        self._break(reason)
        self._report(TransportError(reason))
        self._transport.abort()

    def eof_received(self) -> bool:
        if self._goodbye:
            self._break(f"rank {self.peer} said goodbye")
            self._report_after_frames(None)
        else:
            reason = f"rank {self.peer} closed the connection without saying goodbye (did it die?)"
            self._break(reason)
            self._report_after_frames(TransportError(reason))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"{type(exc).__name__}: {exc}" if exc else "connection closed"
        self._break(reason)
        self._report_after_frames(TransportError(f"connection to rank {self.peer} at {self.address} lost: {reason}"))
        self._owner._outgoing.discard(self)
        self._end_lane()
        if not self.closed.done():
            self.closed.set_result(None)

    def _end_lane(self) -> None:
        if self._lane is not None:
            if self._job is not None:
                self._lane.interrupt()
            self._lane.close()

    # -- closing

    def left_during_handshake(self) -> None:
        """The peer's goodbye came with the handshake: treat it as received, and close."""
        self._goodbye = True
        self.eof_received()
        self._transport.close()

    async def aclose(self) -> None:
        """Wait for sends already started, say goodbye, and close.

        Gives up and aborts after the transport's timeout (a peer that stopped reading must not
        hang shutdown). Cancelling it aborts the connection. Idempotent.
        """
        if self._closing:
            await asyncio.shield(self.closed)
            return
        self._closing = True
        try:
            async with asyncio.timeout(self._owner._timeout):
                async with self._lock:
                    if not self._broken and not self._transport.is_closing():
                        self._transport.write(_PREFIX.pack(_GOODBYE, 0) + bytes(KEY_SIZE))
                        # close() flushes the write buffer before closing the socket.
                        self._transport.close()
                await asyncio.shield(self.closed)
        except TimeoutError:
            self.abort()
        except asyncio.CancelledError:
            self.abort()
            raise

    def abort(self) -> None:
        """Close at once, dropping unsent data. Idempotent."""
        self._closing = True
        self._break("aborted")
        self._end_lane()
        self._transport.abort()


class TcpTransport:
    """Frames over TCP between ranks, authenticated with the shared secret, optionally in TLS.

    Raises (constructor):
        ValueError: ``config.secret`` is empty (TCP connections are always authenticated).
    """

    name: ClassVar[str] = "tcp"
    capabilities: ClassVar[Capabilities] = Capabilities(host_memory=True)

    def __init__(self, config: TransportConfig) -> None:
        if not config.secret:
            raise ValueError("the tcp transport needs a shared secret (TransportConfig.secret)")
        self.rank = config.rank
        self._config = config
        self._timeout = config.timeout
        self._buffer_size = int(config.options.get("socket_buffer", _DEFAULT_SOCKET_BUFFER))
        self._bulk_bytes = _bulk_bytes(config.options)
        self._lanes: set[Lane] = set()
        self._hello = _HELLO.pack(config.rank, config.world_size)
        self._sink: FrameSink | None = None
        self._server: asyncio.Server | None = None
        self._address = ""
        self._tasks: set[asyncio.Task[None]] = set()
        self._incoming: set[_Receiver] = set()
        self._outgoing: set[TcpConnection] = set()
        self._lost: set[int] = set()  # peers already reported to the sink
        self._admitted: set[int] = set()  # peers whose connection to us passed the handshake
        self._closing = False
        self._closed: asyncio.Event | None = None

    @property
    def address(self) -> str:
        """This rank's address (empty before ``listen``)."""
        return self._address

    async def listen(self, sink: FrameSink) -> str:
        """Start accepting connections on ``config.host``; return ``tcp://host:port``.

        Raises:
            TransportError: the socket cannot be bound, or the transport is closed or listening.
        """
        self._check_open()
        if self._server is not None:
            raise TransportError(f"rank {self.rank} is already listening at {self._address}")
        host, port = self._config.host, int(self._config.options.get("port", 0))
        try:
            sock = await self._bind(host, port)
        except OSError as exc:
            raise TransportError(f"rank {self.rank} cannot listen on {host}:{port}: {exc}") from exc
        kwargs: dict[str, Any] = {}
        if self._config.ssl_server is not None:
            kwargs.update(ssl=self._config.ssl_server, ssl_handshake_timeout=self._timeout)
        try:
            # A plain callback, not a coroutine: asyncio then starts no task of its own, and we
            # track the handshake tasks ourselves so that none outlives the transport.
            # start_server calls listen() again with its own backlog (default 100), replacing
            # the one _bind set: without this, a world of more ranks connecting at once would
            # see connections dropped (retried with backoff) before the listener accepts them.
            self._server = await asyncio.start_server(
                self._on_connect, sock=sock, backlog=socket.SOMAXCONN, **kwargs
            )
        except BaseException:
            sock.close()
            raise
        self._sink = sink
        bound_host, bound_port = sock.getsockname()[:2]
        self._address = format_address(str(bound_host), int(bound_port))
        return self._address

    async def _bind(self, host: str, port: int) -> socket.socket:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        if not infos:
            raise OSError(f"cannot resolve {host!r}")
        # Only the first address: with port 0, binding each of several would give several ports.
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Accepted sockets inherit the receive buffer; set it before listen() so the window
            # scale offered in the SYN-ACK matches it.
            if self._buffer_size > 0:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._buffer_size)
            sock.bind(sockaddr)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.transport.abort()
            return
        task = asyncio.get_running_loop().create_task(self._admit(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _admit(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, writer.transport)
        remote = _peername(transport)
        try:
            hello = await _auth.accept(reader, writer, self._config.secret, _PURPOSE, self._hello, self._timeout)
            peer = self._parse_hello(hello)
            if _unread(reader):
                raise HandshakeError("peer sent data before the handshake was confirmed")
        except HandshakeError as exc:
            _log.warning("rank %d dropped a connection from %s: %s", self.rank, remote, exc)
            transport.abort()
            return
        except BaseException:
            transport.abort()
            raise
        if self._closing:
            transport.abort()
            return
        self._lost.discard(peer)  # a new connection from a peer re-arms its loss report
        if reader.at_eof() or reader.exception() is not None or transport.is_closing():
            # The peer left during the last step of the handshake; the stream protocol saw it.
            self._lose(peer, TransportError(f"rank {peer} closed the connection right after the handshake"))
            transport.abort()
            return
        receiver = _Receiver(self, peer, remote, writer)
        transport.set_protocol(receiver)
        self._incoming.add(receiver)
        self._admitted.add(peer)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _tune(sock, 0, send=False, receive=False)

    def _parse_hello(self, hello: bytes) -> int:
        if len(hello) != _HELLO.size:
            raise HandshakeError(f"hello of {len(hello)} bytes, expected {_HELLO.size}")
        rank, world_size = _HELLO.unpack(hello)
        if world_size != self._config.world_size:
            raise HandshakeError(f"peer is in a world of {world_size} ranks, this one has {self._config.world_size}")
        if not 0 <= rank < world_size:
            raise HandshakeError(f"peer claims rank {rank}, outside 0..{world_size - 1}")
        return int(rank)

    async def connect(self, peer: int, address: str) -> TcpConnection:
        """Open and authenticate a connection to ``peer``, retrying until ``config.timeout``.

        Refused or unreachable connections are retried with exponential backoff (10 ms doubling
        to 1 s); a failed handshake is not (a wrong secret does not fix itself).

        Raises:
            ValueError: ``address`` is not ``tcp://host:port`` or ``peer`` is not a rank.
            HandshakeError: the peer failed authentication, or is not rank ``peer``.
            TransportError: no connection within ``config.timeout`` (names peer and address), a
                TLS error, or the transport is closed.
        """
        host, port = parse_address(address)
        if not 0 <= peer < self._config.world_size:
            raise ValueError(f"peer {peer} is not a rank of a world of {self._config.world_size}")
        self._check_open()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        reader, writer = await self._open(peer, address, host, port, deadline)
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, writer.transport)
        try:
            remaining = max(deadline - loop.time(), 0.001)
            hello = await _auth.initiate(reader, writer, self._config.secret, _PURPOSE, self._hello, remaining)
            their_rank = self._parse_hello(hello)
            if their_rank != peer:
                raise HandshakeError(f"the listener is rank {their_rank}")
            left = False
            if _unread(reader):
                if _unread(reader) != len(_BYE) or await reader.readexactly(len(_BYE)) != _BYE:
                    raise HandshakeError("peer sent data after the handshake")
                # Its goodbye, right behind its OK: the peer finished and left while this side
                # was still reading the OK. Nothing is wrong with the link; the peer is gone.
                left = True
        except HandshakeError as exc:
            transport.abort()
            raise HandshakeError(f"handshake with rank {peer} at {address} failed: {exc}") from exc
        except BaseException:
            transport.abort()
            raise
        if self._closing:
            transport.abort()
            raise TransportError(f"rank {self.rank}'s transport was closed while connecting to rank {peer}")
        if not left and (reader.at_eof() or reader.exception() is not None or transport.is_closing()):
            transport.abort()
            raise TransportError(f"rank {peer} at {address} closed the connection right after the handshake")
        conn = TcpConnection(self, peer, address, writer)
        transport.set_protocol(conn)
        # Pause the protocol whenever the transport holds any unsent byte, resume it only once it
        # holds none: TcpConnection.send relies on that. Plain transports pause at size > high,
        # asyncio's and uvloop's TLS transports at size >= high (high=0 would never resume);
        # TLS encrypts each write into its own buffer at once, so no reference to the payload
        # outlives the write there anyway.
        if self._config.ssl_client is None:
            transport.set_write_buffer_limits(high=0, low=0)
        else:
            transport.set_write_buffer_limits(high=1, low=0)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _tune(sock, self._buffer_size, send=True, receive=False)
        self._lost.discard(peer)
        self._outgoing.add(conn)
        if left:
            conn.left_during_handshake()
        return conn

    async def _open(
        self, peer: int, address: str, host: str, port: int, deadline: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        kwargs: dict[str, Any] = {}
        if self._config.ssl_client is not None:
            kwargs.update(
                ssl=self._config.ssl_client,
                server_hostname=self._config.options.get("server_hostname"),
                ssl_handshake_timeout=self._timeout,
            )
        delay = _BACKOFF_FIRST
        last: BaseException | None = None
        while True:
            self._check_open()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TransportError(
                    f"rank {self.rank} could not connect to rank {peer} at {address} "
                    f"within {self._timeout} s (last error: {last})"
                ) from last
            try:
                async with asyncio.timeout(remaining):
                    return await asyncio.open_connection(host, port, **kwargs)
            except ssl.SSLError as exc:
                # Certificates do not get better with retries.
                raise TransportError(f"TLS with rank {peer} at {address} failed: {exc}") from exc
            except OSError as exc:  # refused, unreachable, reset, and TimeoutError
                last = exc
            await asyncio.sleep(min(delay, max(deadline - loop.time(), 0)))
            delay = min(delay * 2, _BACKOFF_MAX)

    # -- loss reports

    def _require_sink(self) -> FrameSink:
        assert self._sink is not None, "connections are accepted only after listen()"
        return self._sink

    def _lose(self, peer: int, exc: BaseException | None) -> None:
        """Tell the sink that ``peer`` is gone, once per peer, and never for our own closing."""
        if self._closing or self._sink is None or peer in self._lost:
            return
        self._lost.add(peer)
        if exc is not None:
            _log.info("rank %d lost rank %d: %s", self.rank, peer, exc)
        try:
            self._sink.peer_lost(peer, exc)
        except Exception:  # a broken sink must not take the event loop's callback down
            _log.exception("rank %d: sink.peer_lost(%d) raised", self.rank, peer)

    def _new_lane(self, transport: asyncio.BaseTransport, name: str) -> Lane | None:
        """A lane on ``transport``'s socket, or None where there is none to duplicate."""
        if self._closing:
            return None
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        try:
            lane = Lane(sock.fileno(), name)
        except (OSError, RuntimeError) as exc:  # out of descriptors or threads: the loop does it
            _log.warning("rank %d: no I/O thread for large frames (%s); the event loop moves them", self.rank, exc)
            return None
        self._lanes.add(lane)
        return lane

    async def _join_lanes(self) -> None:
        """Wait until every lane's thread has ended (they end once their connection does)."""
        for lane in list(self._lanes):
            lane.close()
            if not await lane.wait_closed(self._timeout):
                lane.interrupt()
                if not await lane.wait_closed(1.0):
                    _log.warning("rank %d: an I/O thread of the tcp transport did not end", self.rank)
                    continue
            self._lanes.discard(lane)

    def _receiving_from(self, peer: int) -> bool:
        return any(r.peer == peer and r.receiving for r in self._incoming)

    def inbound_peers(self) -> set[int]:
        """Ranks that have connected to this one (their connection may have ended since)."""
        return set(self._admitted)

    def _check_open(self) -> None:
        if self._closing:
            raise TransportError(f"rank {self.rank}'s tcp transport is closed")

    # -- closing

    async def aclose(self) -> None:
        """Stop listening, flush and close every connection, saying goodbye on each.

        Waits at most ``config.timeout`` per connection, then aborts it. Cancelling it aborts
        what is left. Idempotent; a second call waits for the first.
        """
        if self._closed is not None:
            await self._closed.wait()
            return
        self._closing = True
        self._closed = asyncio.Event()
        try:
            if self._server is not None:
                self._server.close()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Flush what we sent first, then say goodbye to those sending to us: a peer that
            # sees our goodbye may take it as "nothing more will come from this rank".
            await asyncio.gather(*(conn.aclose() for conn in list(self._outgoing)))
            await asyncio.gather(*(receiver.aclose(self._timeout) for receiver in list(self._incoming)))
            if self._server is not None:
                await self._server.wait_closed()
            await self._join_lanes()
        except BaseException:
            self.abort()
            raise
        finally:
            self._closed.set()

    def abort(self) -> None:
        """Drop the listener and every connection at once. Idempotent, safe in any state."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self._outgoing):
            conn.abort()
        for receiver in list(self._incoming):
            receiver.abort()
        for lane in list(self._lanes):
            lane.interrupt()
            lane.close()


async def _settled(fut: asyncio.Future[None]) -> None:
    """Wait until ``fut`` is done, whatever cancels the caller meanwhile (re-raised by the caller)."""
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            continue
        except Exception:
            return
    if not fut.cancelled():
        fut.exception()


__all__ = ["HEADER_SIZE", "TcpConnection", "TcpTransport", "format_address", "parse_address"]
