"""``ucx``: frames over UCX (through ucxx), in host or CUDA memory, GPU to GPU where UCX can.

Each one-way connection (see ``_base``) has two channels::

    control  TCP, initiator -> acceptor. It starts with the handshake of ``aiocoll.core.auth``
             (purpose b"ucx", hello = !II rank, world_size), carries the wiring, the goodbye
             and aborts, and its end tells each side that the other is gone.
    data     a UCX endpoint from the initiator's worker to the acceptor's worker, made from the
             worker address the acceptor sent over the control connection.

The data endpoints are made without UCX error handling: UCX refuses its shared-memory transports
(sysv, posix, cma) to endpoints that ask for it, and CPU traffic between ranks of one host would
then go over TCP. Failure detection is the control connection's job instead.

Wiring, right after the handshake::

    acceptor -> initiator   b"UCXW" | length:u32 | conn_key[32] | worker_address[length]
    initiator -> acceptor   0x03 ("the endpoint exists")

Frame ``n`` of a connection is one or two UCX tagged messages::

    header   tag H(n)   b"UCF1" | flags:u32 | nbytes:u64 | key[KEY_SIZE] | payload if INLINE
    payload  tag D(n)   nbytes bytes, host or device memory (absent when inline or empty)

    flags: 1 INLINE (the payload rides in the header), 2 DEVICE (the sender's payload is in
    device memory; never together with INLINE)

H(n) = (h + n) mod 2**64 and D(n) = (d + n) mod 2**64, where h and d are the first two 64-bit
words of conn_key, 32 random bytes the acceptor draws for each connection. Receives are posted on
the acceptor's worker, which anyone who can reach its UCX interfaces may send to; only a sender
that passed the handshake knows which tags match (a guess hits with odds of about 2**-64), so
nothing else ever lands in the sink's memory, and frames of different connections never match
each other's receives. (Whoever can watch the traffic sees the tags, as they see the frames of an
unencrypted tcp transport.) Payloads up to
``_INLINE`` bytes in host memory ride in the header message; the rest is received straight into
the memory ``frame_buffer`` (or ``frame_device_buffer``, see ``_base.DeviceFrameSink``) picked.

Control, after the wiring::

    initiator -> acceptor   b"UCG1" | frames:u64   goodbye: every frame before ``frames`` is sent
                            b"UCA1" | 0:u64        abort: drop the frame in flight, and all after
    acceptor -> initiator   0x00 goodbye before closing; 0x04 "abort seen"

Why aborts are announced and acknowledged: UCX's rendezvous lets the *receiver* read the sender's
memory (cma, cuda_ipc), even after the sender closed its endpoint (seen with UCX 1.21: a receive
posted after the sender's close completed with whatever the buffer then held). A send that gives
up (cancelled, aborted) returns the payload to its caller, who may overwrite it. So a sender that
gives up on a frame first tells the receiver over the control connection, and a receiver checks
that connection right before it delivers a payload: a frame whose sender gave up is never
delivered. A cancelled send also waits (at most ``config.timeout``) for the receiver's 0x04.

Progress: one UCX worker per transport, in blocking mode: the event loop watches the worker's
event descriptor and progresses the worker only when it fires, so an idle rank costs no CPU.

Options (``TransportConfig.options``):
    port: TCP port of the control listener (default 0: any free port).
    ucx_config: dict of UCX settings for this rank's context, names without the ``UCX_`` prefix
        (e.g. ``{"TLS": "tcp,cuda_copy"}``); ``UCX_*`` environment variables apply as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import struct
import weakref
from collections.abc import Callable
from typing import Any, ClassVar, cast

from aiocoll.core import auth as _auth
from aiocoll.core.errors import HandshakeError, TransportError

from ._base import (
    KEY_SIZE, MAX_FRAME, Buffer, Capabilities, CudaBuffer,
    FrameSink,
    TransportConfig,
    format_host_port,
    parse_host_port,
)

INSTALL_HINT = "pip install 'aiocoll[ucx-cu12]' (CUDA 12) or 'aiocoll[ucx-cu13]' (CUDA 13)"

_had_memtype_cache = "UCX_MEMTYPE_CACHE" in os.environ
try:
    import ucxx._lib.libucxx as _ucx
    from ucxx._lib.arr import Array as _Array
    from ucxx.types import Tag as _Tag
except (ImportError, OSError) as _exc:  # OSError: the wheel is there but libucx did not load
    raise ImportError(f"the ucx transport needs the ucxx package: {INSTALL_HINT} ({_exc})") from _exc

if not _had_memtype_cache and "MEMTYPE_CACHE" not in _ucx.get_current_options():
    # Importing ucxx sets UCX_MEMTYPE_CACHE=n for UCX versions that had that setting; newer
    # ones warn about an unknown variable on every context, and on every child process.
    os.environ.pop("UCX_MEMTYPE_CACHE", None)

_log = logging.getLogger("aiocoll.transports.ucx")

_PURPOSE = b"ucx"
_HELLO = struct.Struct("!II")
_WIRING = struct.Struct("!4sI")
_WIRING_MAGIC = b"UCXW"
_WIRED = b"\x03"
_CONN_KEY = 32
_MAX_WORKER_ADDRESS = 1 << 20
_CONTROL = struct.Struct("!4sQ")
_GOODBYE = b"UCG1"
_ABORT = b"UCA1"
_BYE = b"\x00"
_ABORT_SEEN = b"\x04"
_HEADER = struct.Struct("<4sIQ")
_HEADER_MAGIC = b"UCF1"
HEADER_SIZE = _HEADER.size + KEY_SIZE
_FLAG_INLINE = 1
# The sender gave the payload in device memory: a sink with ``frame_buffer_from_device`` is asked
# for the memory through it (``_base.DeviceFrameSink``), so that a frame nobody waits for yet
# can still land in device memory instead of being staged through the host.
_FLAG_DEVICE = 2
# Host payloads up to this size travel inside the header message: one UCX message instead of
# two. The header message stays under ucxx's default rendezvous threshold (8 KiB), so it is
# always sent eagerly and never needs the receiver to have posted first.
_INLINE = 8192 - HEADER_SIZE - 64
_TAG_MASK = (1 << 64) - 1
# While any request is posted (a connection always has its next header receive posted) the worker
# is also progressed on this timer, in case an event were ever missed. Measured: two idle ranks
# connected both ways used 4 ms of CPU each in 10 s.
_SAFETY_S = 0.5
# Polling while device-memory requests are in flight (_Engine._arm_timer): every turn of the loop
# for this long, then at this period.
_POLL_FAST_S = 0.05
_POLL_SLOW_S = 0.001
_BACKOFF_FIRST = 0.01
_BACKOFF_MAX = 1.0


def format_address(host: str, port: int) -> str:
    """``ucx://host:port``, with IPv6 hosts in brackets."""
    return format_host_port("ucx", host, port)


def parse_address(address: str) -> tuple[str, int]:
    """Split ``ucx://host:port`` into host and port.

    Raises:
        ValueError: not a ``ucx://`` address with a host and a port.
    """
    return parse_host_port("ucx", address)


def _bases(conn_key: bytes) -> tuple[int, int]:
    """The header and payload tag bases of a connection (module docstring)."""
    return int.from_bytes(conn_key[:8], "little"), int.from_bytes(conn_key[8:16], "little")


def _tag(base: int, n: int) -> Any:
    return _Tag((base + n) & _TAG_MASK)


# ---------------------------------------------------------------------------- memory


def cuda_interface(obj: object) -> dict[str, Any] | None:
    """The CUDA Array Interface of ``obj``, or None for host memory.

    Raises:
        TypeError: ``obj`` has the interface but refuses to give it (a torch tensor that
            requires grad), or it describes masked memory.
    """
    try:
        iface = getattr(obj, "__cuda_array_interface__", None)
    except Exception as exc:  # torch raises RuntimeError for tensors that require grad
        raise TypeError(f"cannot get the CUDA array interface of {type(obj).__name__}: {exc}") from exc
    if iface is None:
        return None
    if not isinstance(iface, dict):
        raise TypeError(f"{type(obj).__name__}.__cuda_array_interface__ is not a dict")
    if iface.get("mask") is not None:
        raise TypeError("masked CUDA arrays are not supported")
    return iface


def _device_nbytes(iface: dict[str, Any], what: str) -> tuple[int, bool]:
    """(size in bytes, read-only) of C-contiguous device memory.

    Raises:
        TypeError: the memory is not C-contiguous.
    """
    import numpy as np

    shape = tuple(int(d) for d in iface["shape"])
    itemsize = np.dtype(iface["typestr"]).itemsize
    strides = iface.get("strides")
    if strides is not None and math.prod(shape) > 1:
        expected, step = [], itemsize
        for dim in reversed(shape):
            expected.append(step)
            step *= dim
        if any(d > 1 and s != e for d, s, e in zip(shape, strides, reversed(expected))):
            raise TypeError(f"{what} must be C-contiguous")
    _, readonly = iface["data"]
    return math.prod(shape) * itemsize, bool(readonly)


def _host_view(obj: Buffer, what: str) -> memoryview:
    """A flat byte view of host memory."""
    view = obj if isinstance(obj, memoryview) else memoryview(obj)
    if not view.c_contiguous:
        raise TypeError(f"{what} must be C-contiguous")
    if view.ndim != 1 or view.itemsize != 1 or view.format != "B":
        view = view.cast("B")
    return view


# ---------------------------------------------------------------------------- progress


class _Op:
    """One UCX request in flight, the memory it uses, and what to call when it ends."""

    __slots__ = ("request", "keep", "done", "device")

    def __init__(
        self, request: Any, keep: tuple[Any, ...], done: Callable[[str | None], None] | None, device: bool = False
    ) -> None:
        self.request = request
        self.keep = keep  # referenced until UCX is done with the memory, or the worker is gone
        self.done = done
        self.device = device  # device memory: the engine polls while it is in flight (_Engine._arm_timer)


def _error(request: Any) -> str | None:
    """None if a finished request succeeded, else what went wrong."""
    if request.status == 0:
        return None
    try:
        request.check_error()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return f"UCX status {request.status}"


def _start_closing(endpoints: list[Any]) -> None:
    for ep in endpoints:
        with contextlib.suppress(Exception):
            ep.close()
    endpoints.clear()


class _Engine:
    """One UCX context and worker, progressed from the event loop whenever its descriptor fires.

    Every request stays referenced here, with the memory it reads or writes, until it completes
    or the worker is destroyed: UCX may touch that memory until then, whatever its owner thinks.
    """

    def __init__(self, config: dict[str, str]) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self.context = _ucx.UCXContext(config, feature_flags=(_ucx.Feature.TAG, _ucx.Feature.WAKEUP))
            self.worker = _ucx.UCXWorker(self.context)
            self.worker.init_blocking_progress_mode()
            self.address = bytes(self.worker.address)
            self.cuda_support = bool(self.context.cuda_support)
        except Exception as exc:
            self.context = self.worker = None
            raise TransportError(f"UCX could not start: {type(exc).__name__}: {exc}") from exc
        self._fd: int = self.worker.epoll_file_descriptor
        self._ops: dict[int, _Op] = {}
        self._endpoints: list[Any] = []
        self._scheduled = False
        self._driving = False
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._self_ep: Any = None
        self._copy_base = int.from_bytes(os.urandom(8), "little")
        self._copies = 0
        self._device_ops = 0  # device-memory requests in flight (see _arm_timer)
        self._polling_since: float | None = None
        self._loop.add_reader(self._fd, self._drive)
        # A transport never closed (its loop simply ended) must not hang the interpreter's exit:
        # ucxx 0.52's endpoint destructor closes an endpoint that is not closing yet by
        # progressing the worker until the flush completes, with no time limit. Starting the
        # close here, at exit or when the engine is collected, makes that destructor return.
        self._finalizer = weakref.finalize(self, _start_closing, self._endpoints)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- posting

    def endpoint(self, worker_address: bytes) -> Any:
        """An endpoint to the worker at ``worker_address``, without UCX error handling.

        Raises:
            TransportError: UCX cannot reach that worker.
        """
        self._check()
        try:
            address = _ucx.UCXAddress.create_from_buffer(worker_address)
            ep = _ucx.UCXEndpoint.create_from_worker_address(self.worker, address, False)
        except Exception as exc:
            raise TransportError(f"UCX cannot reach the peer's worker: {type(exc).__name__}: {exc}") from exc
        self._endpoints.append(ep)
        self.kick()
        return ep

    def send(self, ep: Any, data: Any, tag: Any, done: Callable[[str | None], None] | None) -> _Op:
        """Post a send; ``done`` is called once UCX no longer needs ``data``: right here if the
        send completed inside the call (small eager messages do), which spares the sender two
        turns of the event loop."""
        self._check()
        array = _Array(data)
        request = ep.tag_send(array, tag)
        if request.completed:
            op = _Op(request, (), None)
            self.kick()  # anything UCX left for progress
            if done is not None:
                done(_error(request))
            return op
        return self._track(request, (array, data), done, bool(array.cuda))

    def recv(self, data: Any, tag: Any, done: Callable[[str | None], None] | None) -> _Op:
        """Post a receive into ``data`` (or into the memory of the ucxx Array ``data``)."""
        self._check()
        array = data if isinstance(data, _Array) else _Array(data)
        return self._track(self.worker.tag_recv(array, tag), (array, data), done, bool(array.cuda))

    def copy(self, dst: Any, src: bytes, done: Callable[[str | None], None]) -> None:
        """Copy host bytes into ``dst`` (host or device memory) through UCX itself, by sending
        them to this very worker: no CUDA library needed for the host-to-device copy."""
        self._check()
        if self._self_ep is None:
            self._self_ep = self.endpoint(self.address)
        tag = _tag(self._copy_base, self._copies)
        self._copies += 1
        self.recv(dst, tag, done)
        self.send(self._self_ep, src, tag, None)

    def close_endpoint(self, ep: Any) -> None:
        """Start closing ``ep`` (flushing what it sent); the worker finishes it in the background.

        An endpoint must be closed this way before it is dropped: ucxx's destructor would
        otherwise close it by progressing the worker until done, with no time limit.
        """
        if ep not in self._endpoints:
            return  # closed already: a second close() would hand back a request ucxx never made
        self._endpoints.remove(ep)
        try:
            request = ep.close()
        except Exception as exc:
            _log.debug("closing a UCX endpoint failed: %s", exc)
            return
        if request is not None and not self._closed:
            self._track(request, (ep,), None)

    async def flush(self, ep: Any, timeout: float) -> bool:
        """Close ``ep`` gracefully: return once UCX flushed what it sent (False: timed out)."""
        if ep not in self._endpoints:
            return True  # closed already
        self._endpoints.remove(ep)
        fut: asyncio.Future[str | None] = self._loop.create_future()
        try:
            request = ep.close()
        except Exception as exc:
            _log.debug("flushing a UCX endpoint failed: %s", exc)
            return False
        if request is None:
            return True

        def done(err: str | None) -> None:
            if not fut.done():
                fut.set_result(err)

        self._track(request, (ep,), done)
        try:
            async with asyncio.timeout(timeout):
                err = await asyncio.shield(fut)
        except TimeoutError:
            return False
        return err is None

    def _track(
        self, request: Any, keep: tuple[Any, ...], done: Callable[[str | None], None] | None, device: bool = False
    ) -> _Op:
        op = _Op(request, keep, done, device)
        self._ops[id(op)] = op
        self._device_ops += device
        self.kick()
        return op

    def forget(self, op: _Op) -> None:
        """Stop calling back about ``op``; it stays referenced until UCX is done with it."""
        op.done = None

    # -- progress

    def kick(self) -> None:
        """Progress soon, from the event loop (never from inside a caller's frame)."""
        # Inside _drive, the loop progresses again after every callback anyway.
        if not self._scheduled and not self._driving and not self._closed:
            self._scheduled = True
            self._loop.call_soon(self._drive)

    def _drive(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        worker = self.worker
        self._driving = True
        try:
            # A callback may close the engine (a sink that aborts the transport): stop there.
            while not self._closed:
                while worker.progress_once():
                    pass
                if self._dispatch():
                    continue  # callbacks may have posted more work
                if self._closed or worker.arm():
                    break
        finally:
            self._driving = False
        self._arm_timer()

    def _dispatch(self) -> bool:
        finished = [op for op in self._ops.values() if op.request.completed]
        for op in finished:
            self._ops.pop(id(op), None)
            if op.device:
                self._device_ops -= 1
                # Device transfers are moving: poll at full speed again. (Keyed on "none in
                # flight" instead, a peer that keeps one posted, such as the next collective's
                # early frame, would leave polling slow for good.)
                self._polling_since = None
            done, op.done = op.done, None
            if done is None:
                continue
            try:
                done(_error(op.request))
            except Exception:  # a failing callback must not stop progress for everyone else
                _log.exception("ucx: a completion callback raised")
        return bool(finished)

    def _arm_timer(self) -> None:
        if self._device_ops and not self._closed and not self._scheduled:
            # Transfers of device memory (cuda_ipc, cuda_copy) end inside the GPU's copy engines,
            # which need not wake the worker's descriptor: poll on every turn of the loop while
            # one is in flight (it lasts microseconds to milliseconds), and sleep again after.
            # A device receive can also wait for a frame that is slow to come (its sender is
            # behind): after _POLL_FAST_S without a device request finishing, poll every
            # _POLL_SLOW_S instead.
            now = self._loop.time()
            if self._polling_since is None:
                self._polling_since = now
            self._scheduled = True
            if now - self._polling_since < _POLL_FAST_S:
                self._loop.call_soon(self._drive)
            else:
                self._loop.call_later(_POLL_SLOW_S, self._drive)
            return
        if self._timer is None and self._ops and not self._closed:
            self._timer = self._loop.call_later(_SAFETY_S, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._drive()

    def _check(self) -> None:
        if self._closed:
            raise TransportError("the UCX worker of this transport is closed")

    def check_cuda(self) -> None:
        """Raises TransportError if this UCX was built or configured without CUDA support."""
        if not self.cuda_support:
            raise TransportError(
                "UCX here has no CUDA support (a build without CUDA, or UCX_TLS without cuda_copy): "
                "device memory cannot be sent or received"
            )

    # -- closing

    async def aclose(self, timeout: float) -> None:
        """Flush and close every endpoint, then release the worker and context."""
        if self._closed:
            return
        for ep in list(self._endpoints):
            await self.flush(ep, timeout)
        self._finish()

    def abort(self) -> None:
        """Release the worker and context now; requests in flight are dropped with them."""
        if not self._closed:
            for ep in list(self._endpoints):
                self.close_endpoint(ep)
            self._finish()

    def _finish(self) -> None:
        self._closed = True
        self._finalizer.detach()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._fd)
        worker = self.worker
        for op in self._ops.values():
            op.done = None
        with contextlib.suppress(Exception):
            worker.cancel_inflight_requests(period=0, max_attempts=1)
        # A few rounds let cancellations and endpoint closes finish inside UCX.
        for _ in range(8):
            with contextlib.suppress(Exception):
                worker.progress()
            if all(op.request.completed for op in self._ops.values()):
                break
        keep = [op.keep for op in self._ops.values()]
        # Requests first (each cancels itself if still running), then endpoints, worker and
        # context: the worker is destroyed with the last reference to any of them. Only then
        # the memory those requests used, which UCX can no longer touch.
        for op in self._ops.values():
            op.request = None
        self._ops.clear()
        self._device_ops = 0
        self._endpoints.clear()
        self._self_ep = None
        self.worker = None
        self.context = None
        del worker
        keep.clear()


# ---------------------------------------------------------------------------- control sockets


class _SockStream:
    """The StreamReader/StreamWriter subset ``aiocoll.core.auth`` uses, over a raw socket, reading
    exactly what is asked (a stream's read-ahead would swallow bytes meant for later)."""

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


def _tune(sock: socket.socket) -> None:
    """TCP_NODELAY for the few small control messages, keepalive to notice a vanished host."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _read_available(sock: socket.socket) -> tuple[bytes, bool, str]:
    """Everything the socket holds now: (data, end of stream seen, error)."""
    chunks: list[bytes] = []
    while True:
        try:
            chunk = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return b"".join(chunks), False, ""
        except OSError as exc:
            return b"".join(chunks), True, f"{type(exc).__name__}: {exc}"
        if not chunk:
            return b"".join(chunks), True, ""
        chunks.append(chunk)


def _send_now(sock: socket.socket, data: bytes) -> bool:
    """Write a few bytes without waiting (they fit any socket buffer); False if they did not go."""
    try:
        return sock.send(data) == len(data)
    except OSError:
        return False


class _Sending:
    """One frame being sent: its one or two UCX requests, and the send() waiting on them."""

    __slots__ = ("future", "ops", "left", "error")

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future
        self.ops: list[_Op] = []
        self.left = 0
        self.error: str | None = None

    def part_done(self, err: str | None) -> None:
        self.left -= 1
        if err is not None and self.error is None:
            self.error = err
        if (self.left == 0 or err is not None) and not self.future.done():
            self.future.set_result(None)

    @property
    def finished(self) -> bool:
        return self.left == 0


class UcxConnection:
    """One-way link to a peer over UCX: this side sends frames, the peer's sink receives them."""

    def __init__(
        self, owner: UcxTransport, peer: int, address: str, sock: socket.socket, ep: Any, conn_key: bytes
    ) -> None:
        self.peer = peer
        self.address = address
        self._owner = owner
        self._engine = owner._require_engine()
        self._loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = sock
        self._ep = ep
        self._header_base, self._payload_base = _bases(conn_key)
        self._next = 0  # sequence number of the next frame
        self._sending: set[_Sending] = set()
        self._closing = False  # aclose() or abort() called: new sends are refused
        self._broken = ""  # why the connection can no longer carry frames
        self._goodbye = False  # the peer said goodbye
        self._reported = False
        self._released = asyncio.Event()  # the peer can no longer read a frame we gave up on
        self._closed = asyncio.Event()
        self._linger: asyncio.TimerHandle | None = None
        self._loop.add_reader(sock.fileno(), self._on_control)

    async def send(self, key: bytes, payload: Buffer | CudaBuffer) -> None:
        """Send one frame; return once ``payload`` may be reused.

        ``payload`` is host memory (anything with the buffer protocol) or device memory (anything
        with ``__cuda_array_interface__``: torch CUDA tensors, CuPy arrays), C-contiguous; device
        memory goes to UCX as it is, never through host memory, and must be ready (see
        ``_base.CudaBuffer``). Frames on one connection arrive in the order their ``send`` calls
        started (each takes its sequence number before its first await) and may be in flight
        together. Cancelling a send that has not finished aborts the connection, and returns
        only once the receiver confirmed it will not deliver the frame, or after the timeout:
        the receiver may be reading ``payload`` straight out of this process's memory.

        Raises:
            ValueError: ``key`` is not KEY_SIZE bytes.
            TypeError: ``payload`` is neither C-contiguous host memory nor C-contiguous device memory.
            TransportError: the connection is closed or broken (the message names the peer).
        """
        if len(key) != KEY_SIZE:
            raise ValueError(f"key must be {KEY_SIZE} bytes, got {len(key)}")
        iface = cuda_interface(payload)
        if iface is not None:
            nbytes, _ = _device_nbytes(iface, "payload")
            self._engine.check_cuda()
            data: Any = payload
            inline = None
        else:
            view = _host_view(cast(Buffer, payload), "payload")
            nbytes = view.nbytes
            data = view
            inline = bytes(view) if nbytes <= _INLINE else None
        if self._closing:
            raise TransportError(f"connection to rank {self.peer} at {self.address} is closed")
        self._check_intact()
        n = self._next
        self._next += 1
        flags = (_FLAG_INLINE if inline is not None else 0) | (_FLAG_DEVICE if iface is not None else 0)
        header = _HEADER.pack(_HEADER_MAGIC, flags, nbytes) + key + (inline or b"")
        sending = _Sending(self._loop.create_future())
        parts = [(header, self._header_base)]
        if inline is None and nbytes:
            parts.append((data, self._payload_base))
        sending.left = len(parts)
        self._sending.add(sending)
        try:
            for buf, base in parts:
                sending.ops.append(self._engine.send(self._ep, buf, _tag(base, n), sending.part_done))
        except Exception as exc:  # UCX refused the request (closed worker, device memory without CUDA)
            self._sending.discard(sending)
            self._give_up(sending)
            # Frame n is half posted at best: no later frame may follow it on this connection.
            self._break(f"UCX refused a send: {exc}")
            raise TransportError(f"UCX refused to send {nbytes} bytes to rank {self.peer}: {exc}") from exc
        try:
            await sending.future
        except asyncio.CancelledError:
            if not sending.finished:
                self._abort("a send was cancelled in the middle of a frame")
                self._sending.discard(sending)
                await self._wait_released()
            raise
        finally:
            self._sending.discard(sending)
        if sending.error is None and sending.finished:
            return
        reason = sending.error or self._broken or "closed"
        # A failed part leaves the receiver waiting for frame n forever: the stream is over.
        self._abort(f"a send failed: {reason}", unfinished=not sending.finished)
        if not sending.finished:
            await self._wait_released()
        raise TransportError(f"send to rank {self.peer} at {self.address} failed: {reason}")

    def _check_intact(self) -> None:
        if self._broken:
            raise TransportError(f"connection to rank {self.peer} at {self.address} is broken: {self._broken}")

    async def _wait_released(self) -> None:
        if self._released.is_set():
            return
        try:
            async with asyncio.timeout(self._owner._timeout):
                await self._released.wait()
        except TimeoutError:
            _log.warning("rank %d: rank %d did not confirm the abort within %s s", self._owner.rank, self.peer,
                         self._owner._timeout)

    def _give_up(self, sending: _Sending) -> None:
        for op in sending.ops:
            self._engine.forget(op)
        if not sending.future.done():
            sending.future.set_result(None)

    # -- the control connection

    def _on_control(self) -> None:
        sock = self._sock
        if sock is None:
            return
        data, ended, error = _read_available(sock)
        for byte in data:
            if byte == _BYE[0] and not self._goodbye:
                self._goodbye = True
            elif byte == _ABORT_SEEN[0] and self._broken:
                self._released.set()
            else:
                reason = f"rank {self.peer} wrote an unexpected byte {byte:#04x} on a one-way connection"
                _log.warning("rank %d dropped its connection to %s: %s", self._owner.rank, self.address, reason)
                self._report(TransportError(reason))
                self._break(reason)
                self._close_socket()
                return
        if not ended:
            return
        if self._goodbye and not error:
            self._break(f"rank {self.peer} said goodbye")
            if self._owner._receiving_from(self.peer):
                # Frames the peer sent before leaving may still be on their way to us; that
                # connection reports the loss once it has delivered them.
                self._reported = True
            else:
                self._report(None)
        else:
            reason = error or f"rank {self.peer} closed the connection without saying goodbye (did it die?)"
            self._report(TransportError(reason))
            self._break(reason)
        self._close_socket()

    def _break(self, reason: str) -> None:
        """No more frames on this connection: fail the sends still waiting, close the endpoint."""
        if not self._broken:
            self._broken = reason
        for sending in list(self._sending):
            if not sending.finished and sending.error is None:
                sending.error = reason
            self._give_up(sending)
        if self._ep is not None:
            ep, self._ep = self._ep, None
            if not self._engine.closed:
                self._engine.close_endpoint(ep)

    def _report(self, exc: BaseException | None) -> None:
        if not self._reported and not self._closing:
            self._reported = True
            self._owner._lose(self.peer, exc)

    def _close_socket(self) -> None:
        self._released.set()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._owner._outgoing.discard(self)
        self._closed.set()

    def _abort(self, reason: str, unfinished: bool = False) -> None:
        """Give up: tell the receiver to drop what is in flight, and wait for its word in the
        background (it frees send() callers through ``_released``)."""
        self._closing = True
        unfinished = unfinished or any(not s.finished for s in self._sending)
        self._break(reason)
        sock = self._sock
        if sock is None:
            return
        if not unfinished or not _send_now(sock, _CONTROL.pack(_ABORT, 0)):
            self._close_socket()
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        self._linger = self._loop.call_later(self._owner._timeout, self._close_socket)

    async def aclose(self) -> None:
        """Wait for sends in flight, flush, say goodbye, and close.

        Gives up and aborts after the transport's timeout (a peer that stopped receiving must not
        hang shutdown). Cancelling it aborts the connection. Idempotent.
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            async with asyncio.timeout(self._owner._timeout):
                pending = [s.future for s in self._sending]
                if pending:
                    await asyncio.wait(pending)
                if not self._broken and self._ep is not None:
                    ep, self._ep = self._ep, None
                    flushed = await self._engine.flush(ep, self._owner._timeout)
                    sock = self._sock
                    if flushed and sock is not None:
                        await self._loop.sock_sendall(sock, _CONTROL.pack(_GOODBYE, self._next))
                    elif not flushed:
                        self._abort("could not flush the UCX endpoint")
                        return
                self._close_socket()
        except (TimeoutError, OSError):
            self.abort()
        except asyncio.CancelledError:
            self.abort()
            raise

    def abort(self) -> None:
        """Close at once, dropping unsent data. Idempotent."""
        self._abort("aborted")
        if self._owner._closing:
            self._close_socket()


class _Inbound:
    """The receiving end of a connection from ``peer``: one frame at a time, in order."""

    def __init__(self, owner: UcxTransport, peer: int, sock: socket.socket, conn_key: bytes) -> None:
        self.peer = peer
        self._owner = owner
        self._engine = owner._require_engine()
        self._sink = owner._require_sink()
        self._loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = sock
        self._header_base, self._payload_base = _bases(conn_key)
        self._n = 0  # the frame being received
        self._header = bytearray(HEADER_SIZE + _INLINE)
        self._header_array = _Array(self._header)  # every header lands here, one at a time
        self._frame_key = b""
        self._buffer: Any = None
        self._op: _Op | None = None
        self._control = b""  # control bytes not parsed yet
        self._goodbye: int | None = None  # frames the sender says it sent, once it said goodbye
        self._goodbye_timer: asyncio.TimerHandle | None = None
        self._done = False  # reported or closed on purpose: no more sink calls
        self._loop.add_reader(sock.fileno(), self._on_control)
        self._post_header()

    @property
    def receiving(self) -> bool:
        return not self._done

    # -- frames

    def _post_header(self) -> None:
        self._op = self._engine.recv(self._header_array, _tag(self._header_base, self._n), self._on_header)

    def _on_header(self, err: str | None) -> None:
        self._op = None
        if self._done:
            return
        if err is not None:  # a header longer than the buffer is a truncation error here
            self._drop(TransportError(f"receiving frame {self._n} from rank {self.peer} failed: {err}"), None)
            return
        magic, flags, nbytes = _HEADER.unpack_from(self._header)
        key = bytes(self._header[_HEADER.size : HEADER_SIZE])
        if magic != _HEADER_MAGIC:
            self._violation(f"bad frame magic {bytes(magic)!r}")
            return
        if nbytes > MAX_FRAME:
            self._violation(f"frame header claims {nbytes} bytes, more than MAX_FRAME ({MAX_FRAME})")
            return
        inline = bool(flags & _FLAG_INLINE)
        if flags & ~(_FLAG_INLINE | _FLAG_DEVICE) or (inline and (nbytes > _INLINE or flags & _FLAG_DEVICE)):
            self._violation(f"bad frame flags {flags:#x} for {nbytes} bytes")
            return
        try:
            buffer = self._frame_buffer(key, nbytes, bool(flags & _FLAG_DEVICE))
        except Exception as exc:
            self._drop(TransportError(f"frame of {nbytes} bytes from rank {self.peer} rejected: {exc!r}"), exc)
            return
        self._frame_key, self._buffer = key, buffer
        if nbytes == 0:
            self._deliver()
        elif inline:
            src = bytes(self._header[HEADER_SIZE : HEADER_SIZE + nbytes])
            if cuda_interface(buffer) is None:
                _host_view(buffer, "frame_buffer's memory")[:] = src
                self._deliver()
            else:
                self._engine.copy(buffer, src, self._on_payload)
        else:
            try:
                self._op = self._engine.recv(buffer, _tag(self._payload_base, self._n), self._on_payload)
            except Exception as exc:  # UCX refused the memory (device memory without CUDA support)
                self._drop(TransportError(f"UCX cannot receive frame {self._n} from rank {self.peer}: {exc}"), exc)

    def _frame_buffer(self, key: bytes, nbytes: int, from_device: bool) -> Any:
        pick = getattr(self._sink, "frame_buffer_from_device", None) if from_device else None
        if pick is None:
            pick = getattr(self._sink, "frame_device_buffer", None) or self._sink.frame_buffer
        buffer = pick(self.peer, key, nbytes)
        iface = cuda_interface(buffer)
        if iface is not None:
            size, readonly = _device_nbytes(iface, "frame_device_buffer's memory")
            self._engine.check_cuda()
        else:
            view = _host_view(buffer, "frame_buffer's memory")
            size, readonly = view.nbytes, view.readonly
        if readonly:
            raise TypeError("frame_buffer returned read-only memory")
        if size != nbytes:
            raise ValueError(f"frame_buffer returned {size} bytes for a frame of {nbytes}")
        return buffer

    def _on_payload(self, err: str | None) -> None:
        self._op = None
        if self._done:
            return
        if err is not None:  # e.g. the sender died while its payload was being read
            self._drop(TransportError(f"receiving frame {self._n} from rank {self.peer} failed: {err}"), None)
            return
        # The sender may have given up on this frame and let its caller overwrite the memory we
        # just read: it says so on the control connection before it lets go (module docstring).
        self._on_control()
        if not self._done:
            self._deliver()

    def _deliver(self) -> None:
        key, buffer = self._frame_key, self._buffer
        self._frame_key, self._buffer = b"", None
        self._n += 1
        try:
            self._sink.frame_received(self.peer, key, buffer)
        except Exception as exc:
            self._drop(TransportError(f"sink failed on a frame from rank {self.peer}: {exc!r}"), exc)
            return
        if self._done:
            return
        if self._goodbye is not None and self._n >= self._goodbye:
            self._finish(None)
            return
        self._post_header()

    # -- control

    def _on_control(self) -> None:
        sock = self._sock
        if sock is None or self._done:
            return
        data, ended, error = _read_available(sock)
        self._control += data
        while len(self._control) >= _CONTROL.size:
            magic, count = _CONTROL.unpack_from(self._control)
            self._control = self._control[_CONTROL.size :]
            if magic == _GOODBYE and self._goodbye is None:
                self._on_goodbye(count)
            elif magic == _ABORT:
                _send_now(sock, _ABORT_SEEN)
                self._lost(TransportError(f"rank {self.peer} aborted the connection"))
                return
            else:
                self._violation(f"bad control message {bytes(magic)!r}")
                return
            if self._done:
                return
        if ended:
            if self._goodbye is None or self._control or error:
                self._lost(TransportError(
                    error or f"rank {self.peer} closed the connection without saying goodbye (did it die?)"
                ))
            else:
                # Goodbye, then end of stream: the socket is done; frames may still be arriving.
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(sock.fileno())

    def _on_goodbye(self, count: int) -> None:
        if count < self._n:
            self._violation(f"goodbye after {count} frames, but {self._n} arrived")
            return
        self._goodbye = count
        if self._n == count and self._buffer is None:
            self._finish(None)
            return
        # The sender flushed before saying goodbye, so the rest is already on its way.
        self._goodbye_timer = self._loop.call_later(self._owner._timeout, self._late, count)

    def _late(self, count: int) -> None:
        self._lost(TransportError(f"rank {self.peer} said goodbye after {count} frames, but only {self._n} arrived"))

    # -- endings

    def _violation(self, reason: str) -> None:
        _log.warning("rank %d dropped the connection from rank %d: %s", self._owner.rank, self.peer, reason)
        self._drop(TransportError(f"rank {self.peer} broke the frame format: {reason}"), None)

    def _drop(self, exc: TransportError, cause: BaseException | None) -> None:
        if cause is not None:
            exc.__cause__ = cause
        self._lost(exc)

    def _finish(self, exc: BaseException | None) -> None:
        self._lost(exc)

    def _lost(self, exc: BaseException | None) -> None:
        if self._done:
            return
        self.close()
        self._owner._lose(self.peer, exc)

    def close(self, goodbye: bool = False) -> None:
        """Stop receiving (saying goodbye first if asked), and release the socket."""
        if self._done and self._sock is None:
            return
        self._done = True
        if self._goodbye_timer is not None:
            self._goodbye_timer.cancel()
            self._goodbye_timer = None
        if self._op is not None:
            self._engine.forget(self._op)
            self._op = None
        self._buffer = None
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(sock.fileno())
            if goodbye:
                _send_now(sock, _BYE)
            sock.close()
        self._owner._incoming.discard(self)


class UcxTransport:
    """Frames over UCX between ranks, authenticated with the shared secret; host or CUDA memory.

    Raises (constructor):
        ValueError: ``config.secret`` is empty, or TLS contexts were given (UCX does not encrypt:
            use the tcp transport with TLS for that).
    """

    name: ClassVar[str] = "ucx"
    capabilities: ClassVar[Capabilities] = Capabilities(host_memory=True, cuda_memory=True)

    def __init__(self, config: TransportConfig) -> None:
        if not config.secret:
            raise ValueError("the ucx transport needs a shared secret (TransportConfig.secret)")
        if config.ssl_server is not None or config.ssl_client is not None:
            raise ValueError("the ucx transport cannot encrypt frames; use the tcp transport for TLS")
        self.rank = config.rank
        self._config = config
        self._timeout = config.timeout
        self._hello = _HELLO.pack(config.rank, config.world_size)
        ucx_config = config.options.get("ucx_config") or {}
        if not isinstance(ucx_config, dict):
            raise ValueError(f"options['ucx_config'] must be a dict of UCX settings, got {ucx_config!r}")
        self._ucx_config = {str(k).removeprefix("UCX_"): str(v) for k, v in ucx_config.items()}
        self._engine: _Engine | None = None
        self._sink: FrameSink | None = None
        self._listener: socket.socket | None = None
        self._address = ""
        self._accepting: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._incoming: set[_Inbound] = set()
        self._outgoing: set[UcxConnection] = set()
        self._lost: set[int] = set()  # peers already reported to the sink
        self._closing = False
        self._closed: asyncio.Event | None = None

    @property
    def address(self) -> str:
        """This rank's address (empty before ``listen``)."""
        return self._address

    @property
    def cuda_ready(self) -> bool:
        """Whether UCX started here can move CUDA memory (known once ``listen`` ran)."""
        return self._engine is not None and self._engine.cuda_support

    # -- listening

    async def listen(self, sink: FrameSink) -> str:
        """Start UCX and accept connections on ``config.host``; return ``ucx://host:port``.

        Raises:
            TransportError: UCX cannot start, the socket cannot be bound, or the transport is
                closed or already listening.
        """
        self._check_open()
        if self._listener is not None:
            raise TransportError(f"rank {self.rank} is already listening at {self._address}")
        host, port = self._config.host, int(self._config.options.get("port", 0))
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, _, _, _, sockaddr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
        except (OSError, IndexError) as exc:
            raise TransportError(f"rank {self.rank} cannot listen on {host}:{port}: {exc}") from exc
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
            self._engine = self._engine or _Engine(self._ucx_config)
        except OSError as exc:
            sock.close()
            raise TransportError(f"rank {self.rank} cannot listen on {host}:{port}: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        self._sink = sink
        self._listener = sock
        bound_host, bound_port = sock.getsockname()[:2]
        self._address = format_address(str(bound_host), int(bound_port))
        self._accepting = loop.create_task(self._accept_loop(sock))
        return self._address

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:
                if self._closing:
                    return
                _log.warning("ucx: rank %d: accept failed: %s", self.rank, exc)
                await asyncio.sleep(0.01)
                continue
            if self._closing:
                sock.close()
                return
            task = loop.create_task(self._admit(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _admit(self, sock: socket.socket) -> None:
        remote = "?"
        try:
            remote = format_address(*sock.getpeername()[:2])
            sock.setblocking(False)
            _tune(sock)
            stream = _SockStream(sock)
            hello = await _auth.accept(
                cast(Any, stream), cast(Any, stream), self._config.secret, _PURPOSE, self._hello, self._timeout
            )
            await stream.drain()
            peer = self._parse_hello(hello)
            engine = self._require_engine()
            conn_key = os.urandom(_CONN_KEY)
            stream.write(_WIRING.pack(_WIRING_MAGIC, len(engine.address)) + conn_key + engine.address)
            async with asyncio.timeout(self._timeout):
                await stream.drain()
                if await stream.readexactly(1) != _WIRED:
                    raise HandshakeError("peer did not confirm its UCX endpoint")
        except (HandshakeError, asyncio.IncompleteReadError, OSError, TimeoutError, TransportError) as exc:
            _log.warning("ucx: rank %d dropped a connection from %s: %s", self.rank, remote, exc)
            sock.close()
            return
        except BaseException:
            sock.close()
            raise
        if self._closing:
            sock.close()
            return
        self._lost.discard(peer)  # a new connection from a peer re-arms its loss report
        self._incoming.add(_Inbound(self, peer, sock, conn_key))

    def _parse_hello(self, hello: bytes) -> int:
        if len(hello) != _HELLO.size:
            raise HandshakeError(f"hello of {len(hello)} bytes, expected {_HELLO.size}")
        rank, world_size = _HELLO.unpack(hello)
        if world_size != self._config.world_size:
            raise HandshakeError(f"peer is in a world of {world_size} ranks, this one has {self._config.world_size}")
        if not 0 <= rank < world_size:
            raise HandshakeError(f"peer claims rank {rank}, outside 0..{world_size - 1}")
        return int(rank)

    # -- connecting

    async def connect(self, peer: int, address: str) -> UcxConnection:
        """Open and authenticate a connection to ``peer``, retrying until ``config.timeout``.

        Refused or unreachable connections are retried with exponential backoff (10 ms doubling
        to 1 s); a failed handshake is not (a wrong secret does not fix itself).

        Raises:
            ValueError: ``address`` is not ``ucx://host:port`` or ``peer`` is not a rank.
            HandshakeError: the peer failed authentication, or is not rank ``peer``.
            TransportError: no connection within ``config.timeout`` (names peer and address), UCX
                cannot reach the peer's worker, or the transport is closed.
        """
        host, port = parse_address(address)
        if not 0 <= peer < self._config.world_size:
            raise ValueError(f"peer {peer} is not a rank of a world of {self._config.world_size}")
        self._check_open()
        engine = self._require_engine()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        sock = await self._open(peer, address, host, port, deadline)
        ep = None
        try:
            stream = _SockStream(sock)
            remaining = max(deadline - loop.time(), 0.001)
            hello = await _auth.initiate(
                cast(Any, stream), cast(Any, stream), self._config.secret, _PURPOSE, self._hello, remaining
            )
            their_rank = self._parse_hello(hello)
            if their_rank != peer:
                raise HandshakeError(f"the listener is rank {their_rank}")
            async with asyncio.timeout(max(deadline - loop.time(), 0.001)):
                magic, length = _WIRING.unpack(await stream.readexactly(_WIRING.size))
                if magic != _WIRING_MAGIC or length > _MAX_WORKER_ADDRESS:
                    raise HandshakeError(f"bad wiring message ({bytes(magic)!r}, {length} bytes)")
                conn_key = await stream.readexactly(_CONN_KEY)
                worker_address = await stream.readexactly(length)
            self._check_open()
            ep = engine.endpoint(worker_address)
            await loop.sock_sendall(sock, _WIRED)
            self._check_open()
        except HandshakeError as exc:
            sock.close()
            raise HandshakeError(f"handshake with rank {peer} at {address} failed: {exc}") from exc
        except TransportError:  # UCX cannot reach the peer's worker, or we were closed meanwhile
            sock.close()
            if ep is not None:
                engine.close_endpoint(ep)
            raise
        except (asyncio.IncompleteReadError, OSError, TimeoutError) as exc:
            sock.close()
            if ep is not None:
                engine.close_endpoint(ep)
            raise TransportError(f"rank {peer} at {address} dropped the connection while wiring UCX: {exc!r}") from exc
        except BaseException:
            sock.close()
            if ep is not None:
                engine.close_endpoint(ep)
            raise
        conn = UcxConnection(self, peer, address, sock, ep, conn_key)
        self._lost.discard(peer)
        self._outgoing.add(conn)
        return conn

    async def _open(self, peer: int, address: str, host: str, port: int, deadline: float) -> socket.socket:
        loop = asyncio.get_running_loop()
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
            sock: socket.socket | None = None
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                family, _, _, _, sockaddr = infos[0]
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                async with asyncio.timeout(remaining):
                    await loop.sock_connect(sock, sockaddr)
                _tune(sock)
                return sock
            except OSError as exc:  # refused, unreachable, reset, and TimeoutError
                last = exc
                if sock is not None:
                    sock.close()
            except BaseException:
                if sock is not None:
                    sock.close()
                raise
            await asyncio.sleep(min(delay, max(deadline - loop.time(), 0)))
            delay = min(delay * 2, _BACKOFF_MAX)

    # -- loss reports

    def _require_sink(self) -> FrameSink:
        assert self._sink is not None, "connections are accepted only after listen()"
        return self._sink

    def _require_engine(self) -> _Engine:
        if self._engine is None:
            # connect() before listen(): start UCX here (listen() reuses it).
            self._engine = _Engine(self._ucx_config)
        return self._engine

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

    def _receiving_from(self, peer: int) -> bool:
        return any(r.peer == peer and r.receiving for r in self._incoming)

    def _check_open(self) -> None:
        if self._closing:
            raise TransportError(f"rank {self.rank}'s ucx transport is closed")

    # -- closing

    def _stop_listening(self) -> list[asyncio.Task[None]]:
        tasks = [t for t in (self._accepting, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        if self._listener is not None:
            self._listener.close()
        return tasks

    async def aclose(self) -> None:
        """Stop listening, flush and close every connection saying goodbye, release UCX.

        Waits at most ``config.timeout`` per connection, then aborts it. Cancelling it aborts
        what is left. Idempotent; a second call waits for the first.
        """
        if self._closed is not None:
            await self._closed.wait()
            return
        self._closing = True
        self._closed = asyncio.Event()
        try:
            await asyncio.gather(*self._stop_listening(), return_exceptions=True)
            # Flush what we sent first, then say goodbye to those sending to us: a peer that
            # sees our goodbye may take it as "nothing more will come from this rank".
            await asyncio.gather(*(conn.aclose() for conn in list(self._outgoing)))
            for inbound in list(self._incoming):
                inbound.close(goodbye=True)
            if self._engine is not None:
                await self._engine.aclose(self._timeout)
        except BaseException:
            self.abort()
            raise
        finally:
            self._closed.set()

    def abort(self) -> None:
        """Drop the listener, every connection and UCX at once. Idempotent, safe in any state."""
        self._closing = True
        self._stop_listening()
        for conn in list(self._outgoing):
            conn.abort()
        for inbound in list(self._incoming):
            inbound.close()
        if self._engine is not None:
            self._engine.abort()


__all__ = ["HEADER_SIZE", "INSTALL_HINT", "UcxConnection", "UcxTransport", "cuda_interface", "format_address",
           "parse_address"]
