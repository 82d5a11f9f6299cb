"""``shm``: frames between ranks of one host through rings in shared memory.

Each one-way connection (see ``_base``) is a byte ring (``aiocoll.transports._shm_ring``) in an anonymous
shared-memory file, plus a Unix stream socket between the two processes::

    connect(peer, "shm://@NAME")                    listener at abstract socket "\\0NAME"
      socket connect, handshake (aiocoll.core.auth,  ->  accept, handshake, check the peer's uid
        purpose b"shm", hello = !II rank, world)
      memfd_create + ftruncate + mmap, init ring
      "SHMR" | capacity:u64 + SCM_RIGHTS(fd)      ->  mmap the descriptor, close it
                                                  <-  0x02 ("mapped")
      frames: write into the ring, publish head   ->  copy out of the ring into the sink's memory
      doorbell byte when the reader sleeps        ->
                                                  <-  doorbell byte when the writer waits for room

Nothing ever has a name in /dev/shm (the ring's file is a memfd passed by descriptor; the socket
lives in the abstract namespace), so nothing can be left behind by a crash or SIGKILL: the kernel
frees both when the last process holding them exits.

The socket does four jobs besides the handshake: it is the doorbell in both directions (one
byte, sent only when the other side has said, in the ring, that it is going to sleep), it lets
the event loop wait with ``add_reader`` instead of polling, its end-of-file tells a reader that
the writer is gone, and it carries descriptors from writer to reader (``send_fd``): the
same-host fast path hands each member its group's segment this way, so that segment never has a
name either. A received descriptor waits in the transport until claimed (``take_fds``) and is
closed with the transport if nobody claims it. A writer that closes on purpose first sets the
ring's goodbye flag, so ``peer_lost(peer, None)`` means "closed", and an end-of-file without
goodbye (crash, SIGKILL, ``abort()``) is reported as a TransportError.

Waiting: before sleeping, each side spins for a bounded time (``spin_us``) when the other side
is known to be mid-frame, because a wake-up through the socket and the event loop costs tens of
microseconds while the next piece usually arrives sooner. Memory ordering: x86 only (see
``aiocoll.sharedmem.doorbell``); importing this module elsewhere raises ImportError, so ``auto``
falls back to tcp.

Options (``TransportConfig.options``):
    ring_bytes: data capacity of each connection's ring (power of two, default 4 MiB).
    spin_us: microseconds to spin before sleeping (default ``AIOCOLL_SHM_SPIN_US`` or 200).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import struct
from collections.abc import Callable, Collection
from typing import Any, ClassVar, cast

from aiocoll.core import auth as _auth
from aiocoll.core.errors import HandshakeError, TransportError
from aiocoll.sharedmem.doorbell import SLEEP_SLICE_S, SPIN_S, check_memory_model, fence, spin_until, usable_cpus
from aiocoll.transports._shm_ring import FRAME_HEADER, Ring, RingError, check_capacity, padded, segment_size
from aiocoll.sharedmem.segment import create_anonymous, map_fd, sweep_stale

from ._base import MAX_FRAME, Buffer, Capabilities, FrameSink, TransportConfig

check_memory_model()

_log = logging.getLogger("aiocoll.transports.shm")

_PURPOSE = b"shm"
_HELLO = struct.Struct("!II")
_OFFER = struct.Struct("<4sQ")
_OFFER_MAGIC = b"SHMR"
_MAPPED = b"\x02"
_BELL = b"\x01"
_FD = b"\x03"  # carries a descriptor; to the reader it is a doorbell like any other byte
# Descriptors one read takes: the kernel ends a read after a message that carries some, and
# send_fd sends one per message.
_MAX_FDS = 4
_SCHEME = "shm://@"
DEFAULT_RING_BYTES = 4 << 20
# Most bytes one side copies before letting the other see them: small enough that reader and
# writer overlap, large enough that the per-piece bookkeeping is noise.
_PIECE = 1 << 20
# Most bytes the reader moves per event-loop callback before giving other callbacks a turn.
_PUMP_BUDGET = 16 << 20


def format_address(name: str) -> str:
    return _SCHEME + name


def parse_address(address: str) -> str:
    """The abstract socket name in ``shm://@NAME``.

    Raises:
        ValueError: not an shm address.
    """
    if not address.startswith(_SCHEME) or len(address) == len(_SCHEME):
        raise ValueError(f"not an shm address: {address!r} (expected shm://@NAME)")
    return address[len(_SCHEME) :]


def _bytes_view(obj: Buffer) -> memoryview:
    view = memoryview(obj)
    if not view.contiguous:
        raise ValueError("payload must be C-contiguous")
    return view if (view.ndim == 1 and view.format == "B") else view.cast("B")


def _peer_creds(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end, as the kernel saw it connect."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    return int(pid), int(uid)


class _SockStream:
    """The StreamReader/StreamWriter subset that ``aiocoll.core.auth`` uses, over a raw socket.

    asyncio's streams read ahead into a buffer; after the handshake this socket carries a
    descriptor in ancillary data, which a read-ahead would swallow. This reads exactly what the
    handshake asks for and not a byte more.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._out = bytearray()

    async def readexactly(self, n: int) -> bytes:
        got = bytearray()
        while len(got) < n:
            chunk = await self._loop.sock_recv(self._sock, n - len(got))
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(got), n)
            got += chunk
        return bytes(got)

    def write(self, data: bytes) -> None:
        self._out += data

    async def drain(self) -> None:
        if self._out:
            data, self._out = bytes(self._out), bytearray()
            await self._loop.sock_sendall(self._sock, data)


async def _wait_readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, _resolve, fut)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


def _ring_bell(sock: socket.socket) -> None:
    try:
        sock.send(_BELL)
    except (BlockingIOError, InterruptedError):
        pass  # the socket is full of doorbells already: the other side will wake
    except OSError:
        pass  # the other side is gone; its end-of-file reports that


class ShmConnection:
    """The writing end of a one-way link to a rank on this host."""

    def __init__(self, owner: ShmTransport, peer: int, sock: socket.socket, ring: Ring, spin_s: float) -> None:
        self.peer = peer
        self._owner = owner
        self._spin_s = spin_s
        self._sock = sock
        self._ring = ring
        self._loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()
        self._room: asyncio.Future[None] | None = None
        self._broken: TransportError | None = None
        self._closed = False
        self._loop.add_reader(sock.fileno(), self._on_readable)

    # ------------------------------------------------------------------ sending
    async def send(self, key: bytes, payload: Buffer) -> None:
        src = _bytes_view(payload)
        n = src.nbytes
        async with self._lock:
            self._check()
            ring = self._ring
            await self._wait_room(FRAME_HEADER)
            started = False
            try:
                ring.put_header(key, n)
                started = True
                off = 0
                while off < n:
                    free = ring.free()
                    if free == 0:
                        self._publish()
                        await self._wait_room(1)
                        continue
                    k = min(n - off, free, _PIECE)
                    ring.put(src[off : off + k])
                    off += k
                    if off < n:
                        self._publish()  # let the reader start on this piece
                pad = padded(n) - n
                if pad:
                    await self._wait_room(pad)
                    ring.pad(n)
                self._publish()
            except BaseException as exc:
                if started and self._broken is None:
                    # Half a frame is in the ring: the stream cannot be resumed. Drop it so the
                    # reader reports a broken link rather than misreading what follows.
                    self._break(TransportError(f"send to rank {self.peer} interrupted mid-frame: {exc!r}"))
                    self._teardown()
                raise

    async def send_fd(self, fd: int) -> None:
        """Pass a duplicate of descriptor ``fd`` to the peer, which finds it with ``take_fds``.

        Raises:
            TransportError: the link is broken or closed.
        """
        while True:
            self._check()
            try:
                socket.send_fds(self._sock, [_FD], [fd])
                return
            except (BlockingIOError, InterruptedError):
                # Full of doorbells the peer has not read yet: wait until it does.
                fut: asyncio.Future[None] = self._loop.create_future()
                self._loop.add_writer(self._sock.fileno(), _resolve, fut)
                handle = self._loop.call_later(SLEEP_SLICE_S, _resolve, fut)
                try:
                    await fut
                finally:
                    handle.cancel()
                    with contextlib.suppress(Exception):
                        self._loop.remove_writer(self._sock.fileno())
            except OSError as exc:
                self._break(TransportError(f"passing a descriptor to rank {self.peer} failed: {exc}"))

    def _publish(self) -> None:
        self._ring.publish()
        fence()
        if self._ring.reader_sleeping:
            _ring_bell(self._sock)

    async def _wait_room(self, need: int) -> None:
        ring = self._ring
        if ring.free() >= need:
            return
        if self._spin_s and spin_until(_has_room, (ring, need), self._spin_s):
            return
        ring.set_writer_sleeping(True)
        fence()
        try:
            while ring.free() < need:
                self._check()
                fut = self._loop.create_future()
                self._room = fut
                # The slice bounds the cost of a doorbell lost to a race (see _shm_doorbell).
                handle = self._loop.call_later(SLEEP_SLICE_S, _resolve, fut)
                try:
                    await fut
                finally:
                    handle.cancel()
                    self._room = None
                self._check()
        finally:
            if not self._closed:
                ring.set_writer_sleeping(False)

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            data = b""
            reason = f"connection to rank {self.peer} failed: {exc}"
        else:
            reason = f"rank {self.peer} closed its end of the connection"
        if not data:
            self._break(TransportError(reason))
            self._loop.remove_reader(self._sock.fileno())
            return
        if self._room is not None:
            _resolve(self._room)

    def _check(self) -> None:
        if self._broken is not None:
            raise self._broken
        if self._closed:
            raise TransportError(f"shm connection to rank {self.peer} is closed")

    def _break(self, exc: TransportError) -> None:
        if self._broken is None:
            self._broken = exc
        if self._room is not None:
            _resolve(self._room)

    # ------------------------------------------------------------------ closing
    def _teardown(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._ring.close()
        self._owner._forget(self)

    async def aclose(self) -> None:
        """Wait for sends in progress, say goodbye in the ring, and close."""
        if self._closed:
            return
        try:
            async with asyncio.timeout(self._owner.timeout):
                async with self._lock:
                    if self._broken is None and not self._closed:
                        self._ring.publish()
                        self._ring.say_goodbye()
                        fence()
                        _ring_bell(self._sock)
        except TimeoutError:
            _log.warning("shm: closing the link to rank %d while a send is stuck", self.peer)
        self._teardown()

    def abort(self) -> None:
        """Close at once; the reader sees the link break (no goodbye)."""
        self._break(TransportError(f"shm connection to rank {self.peer} was aborted"))
        self._teardown()


def _has_room(arg: tuple[Ring, int]) -> bool:
    return arg[0].free() >= arg[1]


def _has_data(ring: Ring) -> bool:
    return ring.available() > 0


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Inbound:
    """The reading end of a link from ``peer``: copies frames out of the ring into the sink's memory."""

    def __init__(
        self, owner: ShmTransport, peer: int, sock: socket.socket, ring: Ring, sink: FrameSink, spin_s: float
    ) -> None:
        self.peer = peer
        self._owner = owner
        self._spin_s = spin_s
        self._sock = sock
        self._ring = ring
        self._sink = sink
        self._loop = asyncio.get_running_loop()
        self._key = b""
        self._buf: memoryview | None = None
        self._got = 0
        self._closed = False
        self._scheduled = False
        self._loop.add_reader(sock.fileno(), self._on_readable)
        self._pump()  # frames may already be waiting

    def _on_readable(self) -> None:
        if self._read():
            self._pump()

    def _read(self) -> bool:
        """Read doorbells (and descriptors) from the socket; True if there were any."""
        if self._closed:
            return False
        try:
            # recv_fds, not recv: a descriptor passed with a byte that a plain recv reads is
            # closed by the kernel.
            data, fds, flags, _ = socket.recv_fds(self._sock, 4096, _MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data, fds, flags = b"", [], 0
        if fds:
            self._owner._received(self.peer, fds)
        if flags & getattr(socket, "MSG_CTRUNC", 0):
            _log.warning("shm: rank %d sent more descriptors at once than expected; extra ones dropped", self.peer)
        if not data:
            self._end()
            return False
        return True

    def poll(self) -> None:
        """Read what the socket holds now (from a coroutine); frames that woke us are moved soon."""
        got = False
        while self._read():
            got = True
        if got and not self._scheduled and not self._closed:
            self._scheduled = True
            self._loop.call_soon(self._scheduled_pump)

    def _scheduled_pump(self) -> None:
        self._scheduled = False
        self._pump()

    def _pump(self, *, final: bool = False) -> None:
        if self._closed:
            return
        ring = self._ring
        ring.set_reader_sleeping(False)
        budget = _PUMP_BUDGET
        try:
            while True:
                moved = self._step()
                if moved:
                    budget -= moved
                    if budget <= 0 and not final:
                        self._release()
                        if not self._scheduled:
                            self._scheduled = True
                            self._loop.call_soon(self._scheduled_pump)
                        return
                    continue
                self._release()
                if final:
                    return
                if self._buf is not None and self._spin_s:
                    # Mid-frame: the writer is copying the next piece right now.
                    if spin_until(_has_data, ring, self._spin_s):
                        continue
                ring.set_reader_sleeping(True)
                fence()
                if ring.available() == 0:
                    return
                ring.set_reader_sleeping(False)
        except Exception as exc:  # a rejected frame or a corrupt ring: drop the link
            self._drop(exc)

    def _step(self) -> int:
        ring = self._ring
        avail = ring.available()
        buf = self._buf
        if buf is None:
            if avail < FRAME_HEADER:
                return 0
            key, n = ring.get_header()
            if n > MAX_FRAME:
                raise RingError(f"frame of {n} bytes announced")
            got = self._sink.frame_buffer(self.peer, key, n)
            view = got if (got.ndim == 1 and got.format == "B") else got.cast("B")
            if view.nbytes != n:
                raise ValueError(f"sink gave {view.nbytes} bytes for a frame of {n}")
            self._key, self._buf, self._got = key, view, 0
            if n == 0:
                self._deliver()
            return FRAME_HEADER
        n = buf.nbytes
        k = min(avail, n - self._got, _PIECE)
        if k <= 0:
            return 0
        ring.get(buf[self._got : self._got + k])
        self._got += k
        if self._got == n:
            ring.skip(padded(n) - n)  # published together with the payload's last byte
            self._deliver()
        else:
            self._release()
        return k

    def _deliver(self) -> None:
        key, buf = self._key, self._buf
        assert buf is not None
        self._buf = None
        self._release()
        self._sink.frame_received(self.peer, key, buf)

    def _release(self) -> None:
        ring = self._ring
        ring.release()
        fence()
        if ring.writer_sleeping:
            _ring_bell(self._sock)

    def _end(self) -> None:
        """The writer's socket closed: deliver what it left in the ring, then report."""
        if self._closed:
            return
        self._pump(final=True)
        if self._closed:
            return
        if self._ring.goodbye and self._buf is None and self._ring.available() == 0:
            self._lost(None)
        else:
            self._lost(TransportError(f"rank {self.peer} died or aborted: its shm link closed without goodbye"))

    def _drop(self, exc: BaseException) -> None:
        self._lost(TransportError(f"dropped the shm link from rank {self.peer}: {exc}"))

    def _lost(self, exc: BaseException | None) -> None:
        self.close()
        self._owner._lose(self.peer, exc)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._buf = None
        self._ring.close()
        self._owner._forget_inbound(self)


class ShmTransport:
    """Transport between ranks of one host through shared-memory rings."""

    name: ClassVar[str] = "shm"
    capabilities: ClassVar[Capabilities] = Capabilities(
        host_memory=True, cuda_memory=False, same_host_only=True, shared_segments=True
    )

    def __init__(self, config: TransportConfig) -> None:
        self.rank = config.rank
        self.world_size = config.world_size
        self.timeout = config.timeout
        self._secret = config.secret
        options = config.options
        self.ring_bytes = check_capacity(int(options.get("ring_bytes", DEFAULT_RING_BYTES)))
        if "spin_us" in options:
            self.spin_s = float(options["spin_us"]) * 1e-6
        else:
            # With more ranks than cores a spinning reader only delays the writer it waits for.
            self.spin_s = SPIN_S if usable_cpus() >= min(config.world_size, 64) else 0.0
        self._sink: FrameSink | None = None
        self._listener: socket.socket | None = None
        self._address = ""
        self._accepting: asyncio.Task[None] | None = None
        self._admitting: set[asyncio.Task[None]] = set()
        self._conns: set[ShmConnection] = set()
        self._inbound: set[_Inbound] = set()
        self._lost: set[int] = set()
        self._fds: list[tuple[int, int]] = []  # (peer, descriptor) received, not yet claimed
        self._admitted: set[int] = set()  # peers whose link to us is set up
        self._closed = False
        self._closers: list[Callable[[bool], None]] = []  # see on_close

    @property
    def address(self) -> str:
        return self._address

    # ------------------------------------------------------------------ listening
    async def listen(self, sink: FrameSink) -> str:
        """Listen on a fresh abstract Unix socket; return ``shm://@NAME``.

        Raises:
            TransportError: already listening, or the socket could not be created.
        """
        if self._listener is not None:
            raise TransportError("shm transport is already listening")
        self._sink = sink
        # Litter of crashed jobs: group segments whose creator died in the setup window.
        sweep_stale()
        name = f"aiocoll-shm-{os.getpid()}-{secrets.token_hex(8)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind("\0" + name)
            sock.listen(socket.SOMAXCONN)  # every peer of a large world may connect at once
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise TransportError(f"shm: cannot listen on an abstract Unix socket: {exc}") from exc
        self._listener = sock
        self._address = format_address(name)
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop(sock))
        return self._address

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if self._closed:
                    return
                _log.warning("shm: accept failed: %s", exc)
                await asyncio.sleep(0.01)
                continue
            task = loop.create_task(self._admit(sock))
            self._admitting.add(task)
            task.add_done_callback(self._admitting.discard)

    async def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        fd = -1
        try:
            peer_pid, peer_uid = _peer_creds(sock)
            if peer_uid != os.getuid():
                raise HandshakeError("peer runs as another user")
            stream = _SockStream(sock)
            hello = await _auth.accept(
                cast(Any, stream), cast(Any, stream), self._secret, _PURPOSE,
                _HELLO.pack(self.rank, self.world_size), self.timeout,
            )
            await stream.drain()
            peer = self._parse_hello(hello)
            async with asyncio.timeout(self.timeout):
                data = b""
                while len(data) < _OFFER.size:
                    await _wait_readable(sock)
                    chunk, fds, _, _ = socket.recv_fds(sock, _OFFER.size - len(data), 1)
                    for extra in fds:
                        if fd < 0:
                            fd = extra
                        else:
                            os.close(extra)
                    if not chunk:
                        raise HandshakeError("peer closed before offering a ring")
                    data += chunk
            magic, capacity = _OFFER.unpack(data)
            if magic != _OFFER_MAGIC or fd < 0:
                raise HandshakeError("peer did not offer a shared-memory ring")
            check_capacity(capacity)
            mm = map_fd(fd, segment_size(capacity))
            os.close(fd)
            fd = -1
            try:
                ring = Ring(mm, capacity, initialise=False)
            except BaseException:
                mm.close()
                raise
            await asyncio.get_running_loop().sock_sendall(sock, _MAPPED)
        except asyncio.CancelledError:
            sock.close()
            raise
        except (HandshakeError, RingError, ValueError, OSError, TimeoutError) as exc:
            _log.warning("shm: rank %d dropped an incoming connection: %s", self.rank, exc)
            sock.close()
            return
        finally:
            if fd >= 0:
                os.close(fd)
        if self._closed:
            ring.close()
            sock.close()
            return
        assert self._sink is not None
        self._inbound.add(_Inbound(self, peer, sock, ring, self._sink, self._spin_for(peer_pid)))
        self._admitted.add(peer)

    def _parse_hello(self, hello: bytes) -> int:
        if len(hello) != _HELLO.size:
            raise HandshakeError(f"malformed hello of {len(hello)} bytes")
        peer, world_size = _HELLO.unpack(hello)
        if world_size != self.world_size:
            raise HandshakeError(f"peer is in a world of {world_size} ranks, this one has {self.world_size}")
        if not 0 <= peer < world_size or peer == self.rank:
            raise HandshakeError(f"peer claims rank {peer}")
        return int(peer)

    # ------------------------------------------------------------------ connecting
    async def connect(self, peer: int, address: str) -> ShmConnection:
        """Open an authenticated link to ``peer`` listening at ``address``.

        Raises:
            ValueError: ``address`` is not an shm address.
            HandshakeError: the peer failed authentication or is not ``peer``.
            TransportError: nobody listens there within the timeout, or the ring could not be set up.
        """
        name = parse_address(address)
        if self._closed:
            raise TransportError("shm transport is closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, "\0" + name)
                break
            except (ConnectionRefusedError, FileNotFoundError) as exc:
                sock.close()
                if loop.time() > deadline:
                    raise TransportError(f"no rank listening at {address}: {exc}") from exc
                await asyncio.sleep(0.01)
            except BaseException:
                sock.close()
                raise
        fd = -1
        mm = None
        try:
            peer_pid, peer_uid = _peer_creds(sock)
            if peer_uid != os.getuid():
                raise HandshakeError(f"the listener at {address} runs as another user")
            stream = _SockStream(sock)
            hello = await _auth.initiate(
                cast(Any, stream), cast(Any, stream), self._secret, _PURPOSE,
                _HELLO.pack(self.rank, self.world_size), self.timeout,
            )
            if len(hello) != _HELLO.size or _HELLO.unpack(hello) != (peer, self.world_size):
                raise HandshakeError(f"the listener at {address} is not rank {peer} of this world")
            capacity = self.ring_bytes
            fd = create_anonymous(segment_size(capacity), f"ring{self.rank}to{peer}")
            mm = map_fd(fd, segment_size(capacity))
            ring = Ring(mm, capacity, initialise=True)
            socket.send_fds(sock, [_OFFER.pack(_OFFER_MAGIC, capacity)], [fd])
            os.close(fd)
            fd = -1
            async with asyncio.timeout(max(0.0, deadline - loop.time()) + 1.0):
                if await _SockStream(sock).readexactly(1) != _MAPPED:
                    raise HandshakeError(f"rank {peer} did not map the ring")
        except BaseException as exc:
            sock.close()
            if mm is not None:
                mm.close()
            if isinstance(exc, (HandshakeError, asyncio.CancelledError)):
                raise
            if isinstance(exc, (OSError, TimeoutError, asyncio.IncompleteReadError)):
                raise TransportError(f"shm link to rank {peer} failed: {exc!r}") from exc
            raise
        finally:
            if fd >= 0:
                os.close(fd)
        conn = ShmConnection(self, peer, sock, ring, self._spin_for(peer_pid))
        self._conns.add(conn)
        return conn

    # ------------------------------------------------------------------ passing descriptors
    async def send_fd(self, peer: int, fd: int) -> None:
        """Pass a duplicate of descriptor ``fd`` to ``peer`` over the link's socket (SCM_RIGHTS).

        ``peer`` has it (in ``take_fds``) before it can read any frame sent to it after this
        returns. The caller keeps ``fd``.

        Raises:
            TransportError: no open link to ``peer``.
        """
        conn = next((c for c in self._conns if c.peer == peer), None)
        if conn is None or self._closed:
            raise TransportError(f"no shm link to rank {peer} to pass a descriptor over")
        await conn.send_fd(fd)

    def take_fds(self, want: Callable[[int, int], bool], *, poll: Collection[int] = ()) -> list[int]:
        """Remove and return the received descriptors for which ``want(peer, fd)`` holds; the
        caller owns them. The sockets of the links from the ranks in ``poll`` are read first.

        Descriptors nobody takes are closed with the transport.
        """
        for inbound in [i for i in self._inbound if i.peer in poll]:
            inbound.poll()
        taken: list[tuple[int, int]] = []
        kept: list[tuple[int, int]] = []
        for peer, fd in self._fds:
            (taken if want(peer, fd) else kept).append((peer, fd))
        self._fds = kept
        return [fd for _, fd in taken]

    def _received(self, peer: int, fds: list[int]) -> None:
        if self._closed:
            for fd in fds:
                os.close(fd)
            return
        self._fds.extend((peer, fd) for fd in fds)

    def _close_received(self) -> None:
        fds, self._fds = self._fds, []
        for _, fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    # ------------------------------------------------------------------ bookkeeping
    def _spin_for(self, peer_pid: int) -> float:
        # A peer in this very process (ranks as tasks of one loop, in tests) can only make
        # progress once we return to the loop: spinning for it is pure waste.
        return 0.0 if peer_pid == os.getpid() else self.spin_s

    def inbound_peers(self) -> set[int]:
        """Ranks that have set up their link to this one (it may have ended since)."""
        return set(self._admitted)

    def _forget(self, conn: ShmConnection) -> None:
        self._conns.discard(conn)

    def _forget_inbound(self, inbound: _Inbound) -> None:
        self._inbound.discard(inbound)

    def _lose(self, peer: int, exc: BaseException | None) -> None:
        if self._closed or self._sink is None:
            return
        self._sink.peer_lost(peer, exc)

    # ------------------------------------------------------------------ closing
    def _stop_listening(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        for task in list(self._admitting):
            task.cancel()
        if self._listener is not None:
            self._listener.close()

    def on_close(self, fn: Callable[[bool], None]) -> Callable[[], None]:
        """Call ``fn(abort)`` when this transport closes (first thing, before its links go);
        returns a function that takes the call back. Engines that compute in segments passed
        over this transport end with it this way (the Transport protocol's lifetime hook)."""
        self._closers.append(fn)

        def forget() -> None:
            with contextlib.suppress(ValueError):  # already run: the transport closed
                self._closers.remove(fn)

        return forget

    def _run_closers(self, abort: bool) -> None:
        closers, self._closers = self._closers, []
        for fn in closers:
            try:
                fn(abort)
            except Exception:
                _log.exception("shm: closing a fast-path engine failed")

    async def aclose(self) -> None:
        """Say goodbye on every link, then release sockets, rings and fast-path engines."""
        if self._closed:
            return
        self._stop_listening()
        self._run_closers(False)
        for conn in list(self._conns):
            await conn.aclose()
        self._closed = True
        for inbound in list(self._inbound):
            inbound.close()
        self._close_received()
        pending = [t for t in (self._accepting, *self._admitting) if t is not None]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    def abort(self) -> None:
        """Drop every link at once (peers see them break) and release everything."""
        if self._closed:
            return
        self._closed = True
        self._stop_listening()
        self._run_closers(True)
        for conn in list(self._conns):
            conn.abort()
        for inbound in list(self._inbound):
            inbound.close()
        self._close_received()


__all__ = ["ShmTransport", "ShmConnection", "format_address", "parse_address"]
