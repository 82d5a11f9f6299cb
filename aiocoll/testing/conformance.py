"""The checks every transport must pass, whatever moves its bytes.

    from aiocoll.testing.conformance import check_transport
    from aiocoll.transports.tcp import TcpTransport

    await check_transport(TcpTransport, secret=b"s3cret")
    await check_transport(InprocTransport, options={"world": "w1"}, authenticates=False)

``check_transport`` runs every check of ``CHECKS`` in turn; a test suite may instead run each
``check_*(setup)`` on its own to get one test per behaviour. Each check builds a fresh world of
transports in the running event loop, drives it through the public interface only
(``listen``, ``connect``, ``send``, ``aclose``, ``abort`` and a ``FrameSink``), closes it, and
fails with ``ConformanceError`` if a task it did not start outlives the world.

``DEVICE_CHECKS`` hold what a transport whose capabilities say ``cuda_memory`` must also do with
CUDA memory (through ``DeviceFrameSink``); they need a GPU and torch or CuPy, and
``check_transport`` runs them when both the capability and a device are there.
"""

from __future__ import annotations

import array
import asyncio
import functools
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from aiocoll.core.errors import HandshakeError, TransportError
from aiocoll.transports import KEY_SIZE, Connection, Transport, TransportConfig, TransportFactory


class ConformanceError(AssertionError):
    """A transport broke the contract of ``aiocoll.transports._base``; the message says how."""


def _expect(condition: object, message: str) -> None:
    if not condition:
        raise ConformanceError(message)


class RejectedFrame(Exception):
    """Raised by a ``RecordingSink`` for a frame its ``reject`` predicate refuses."""


class Frame(NamedTuple):
    """One frame as a sink saw it: sender, key, and the memory the payload landed in."""

    peer: int
    key: bytes
    data: memoryview


class RecordingSink:
    """A FrameSink that records every frame and loss, checks the call protocol, and lets a
    test wait for what it expects.

    Attributes:
        frames: frames received, in order.
        lost: ``(peer, exc)`` for every ``peer_lost`` call, in order.
        events: ``("frame" | "lost", peer)`` in the order they happened.
        errors: contract violations seen (a buffer that was never handed out, a bad key, ...).
    """

    def __init__(self, reject: Callable[[int, bytes, int], bool] | None = None) -> None:
        self.frames: list[Frame] = []
        self.lost: list[tuple[int, BaseException | None]] = []
        self.events: list[tuple[str, int]] = []
        self.errors: list[str] = []
        self._reject = reject
        self._pending: list[tuple[int, bytes, memoryview]] = []
        self._changed = asyncio.Event()

    def frame_buffer(self, peer: int, key: bytes, nbytes: int) -> memoryview:
        if len(key) != KEY_SIZE:
            self.errors.append(f"frame_buffer got a key of {len(key)} bytes from rank {peer}")
        if nbytes < 0:
            self.errors.append(f"frame_buffer asked for {nbytes} bytes")
        if self._reject is not None and self._reject(peer, key, nbytes):
            raise RejectedFrame(f"frame {key!r} from rank {peer} rejected by the test")
        buffer = memoryview(bytearray(nbytes))
        self._pending.append((peer, key, buffer))
        return buffer

    def frame_received(self, peer: int, key: bytes, buffer: memoryview) -> None:
        for i, (p, k, b) in enumerate(self._pending):
            if b is buffer:
                del self._pending[i]
                if (p, k) != (peer, key):
                    self.errors.append(f"buffer announced for ({p}, {k!r}) delivered as ({peer}, {key!r})")
                break
        else:
            self.errors.append(f"frame_received from rank {peer} with memory frame_buffer never returned")
        self.frames.append(Frame(peer, key, buffer))
        self.events.append(("frame", peer))
        self._changed.set()

    def peer_lost(self, peer: int, exc: BaseException | None) -> None:
        self.lost.append((peer, exc))
        self.events.append(("lost", peer))
        self._changed.set()

    def lost_from(self, peer: int) -> list[BaseException | None]:
        """The ``exc`` of every ``peer_lost`` call for ``peer``."""
        return [exc for p, exc in self.lost if p == peer]

    def frames_from(self, peer: int) -> list[Frame]:
        return [f for f in self.frames if f.peer == peer]

    async def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float) -> None:
        """Wait until ``predicate()`` holds.

        Raises:
            ConformanceError: it did not within ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ConformanceError(
                    f"timed out after {timeout} s waiting for {what}; the sink saw "
                    f"{len(self.frames)} frames and losses {self.lost!r}"
                )
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    async def wait_frames(self, count: int, timeout: float) -> None:
        await self.wait_until(lambda: len(self.frames) >= count, f"{count} frames", timeout)

    async def wait_lost(self, peer: int, timeout: float) -> None:
        await self.wait_until(lambda: bool(self.lost_from(peer)), f"peer_lost({peer})", timeout)


@dataclass(frozen=True)
class TransportSetup:
    """How to build the transports of a conformance world.

    world_size: ranks in the worlds the checks build (at least 3 lets several peers send to one).
    secret: the shared secret; ``authenticates`` says whether a wrong one must be refused.
    options: ``TransportConfig.options`` for every rank.
    timeout: ``TransportConfig.timeout``, and how long a check waits for anything.
    ssl_server / ssl_client: TLS contexts for transports that take them.
    """

    factory: TransportFactory
    world_size: int = 3
    secret: bytes = b"aiocoll-conformance-secret"
    options: Mapping[str, Any] = field(default_factory=dict)
    authenticates: bool = True
    timeout: float = 10.0
    ssl_server: ssl.SSLContext | None = None
    ssl_client: ssl.SSLContext | None = None

    def config(self, rank: int, *, secret: bytes | None = None) -> TransportConfig:
        return TransportConfig(
            rank=rank,
            world_size=self.world_size,
            secret=self.secret if secret is None else secret,
            timeout=self.timeout,
            ssl_server=self.ssl_server,
            ssl_client=self.ssl_client,
            options=dict(self.options),
        )


class World:
    """A listening transport and a recording sink per rank."""

    def __init__(self, setup: TransportSetup, sinks: Mapping[int, RecordingSink] | None = None) -> None:
        self.setup = setup
        self.transports: list[Transport] = [setup.factory(setup.config(r)) for r in range(setup.world_size)]
        self.sinks: list[RecordingSink] = [
            (sinks or {}).get(r) or RecordingSink() for r in range(setup.world_size)
        ]
        self.addresses: list[str] = []

    async def connect(self, src: int, dst: int) -> Connection:
        """Open rank ``src``'s connection to rank ``dst``."""
        return await self.transports[src].connect(dst, self.addresses[dst])

    def check_sinks(self) -> None:
        for rank, sink in enumerate(self.sinks):
            _expect(not sink.errors, f"rank {rank}'s sink saw contract violations: {sink.errors}")


@asynccontextmanager
async def open_world(setup: TransportSetup, sinks: Mapping[int, RecordingSink] | None = None) -> AsyncIterator[World]:
    """Every rank listening; closed gracefully on exit, aborted if the body raised."""
    world = World(setup, sinks)
    try:
        for transport, sink in zip(world.transports, world.sinks):
            world.addresses.append(await transport.listen(sink))
        yield world
    except BaseException:
        for transport in world.transports:
            transport.abort()
        raise
    for transport in world.transports:
        await transport.aclose()
    world.check_sinks()


Check = Callable[[TransportSetup], Awaitable[None]]
CHECKS: list[Check] = []
DEVICE_CHECKS: list[Check] = []


async def _no_leftover_tasks(before: set[asyncio.Task[Any]], name: str, timeout: float = 2.0) -> None:
    # Aborted transports may need a few loop turns for cancelled tasks to finish: allow that,
    # but not a task that keeps running.
    current = asyncio.current_task()
    deadline = time.monotonic() + timeout
    while True:
        left = [t for t in asyncio.all_tasks() - before if t is not current and not t.done()]
        if not left:
            return
        if time.monotonic() > deadline:
            raise ConformanceError(f"{name}: tasks outlived the transports: {left!r}")
        await asyncio.sleep(0.01)


def _bounded(fn: Check) -> Check:
    @functools.wraps(fn)
    async def run(setup: TransportSetup) -> None:
        before = asyncio.all_tasks()
        async with asyncio.timeout(setup.timeout * 6):
            await fn(setup)
        await _no_leftover_tasks(before, fn.__name__)

    return run


def conformance_check(fn: Check) -> Check:
    """Register ``fn`` in ``CHECKS``, bound its time, and fail it if it leaves tasks behind."""
    run = _bounded(fn)
    CHECKS.append(run)
    return run


def device_check(fn: Check) -> Check:
    """Register ``fn`` in ``DEVICE_CHECKS`` (transports with ``cuda_memory``), bounded likewise."""
    run = _bounded(fn)
    DEVICE_CHECKS.append(run)
    return run


class CudaArrays:
    """Device memory for the device checks, from torch or CuPy, whichever has a GPU here."""

    def __init__(self, alloc: Callable[[int], Any], to_host: Callable[[Any], np.ndarray],
                 from_host: Callable[[np.ndarray], Any]) -> None:
        self.alloc = alloc
        self.to_host = to_host
        self.from_host = from_host


def cuda_arrays() -> CudaArrays | None:
    """torch's or CuPy's device arrays, or None without a CUDA device (or without both)."""
    try:
        import torch

        if torch.cuda.is_available():

            def torch_from_host(data: np.ndarray) -> Any:
                out = torch.from_numpy(data).to("cuda")
                torch.cuda.synchronize()  # device memory handed to a transport must be ready
                return out

            return CudaArrays(
                lambda n: torch.zeros(n, dtype=torch.uint8, device="cuda"),
                lambda t: t.cpu().numpy(),
                torch_from_host,
            )
    except ImportError:
        pass
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:

            def cupy_from_host(data: np.ndarray) -> Any:
                out = cupy.asarray(data)
                cupy.cuda.runtime.deviceSynchronize()
                return out

            return CudaArrays(lambda n: cupy.zeros(n, dtype=cupy.uint8), lambda a: a.get(), cupy_from_host)
    except Exception:  # CuPy without a driver raises its own runtime errors
        pass
    return None


class DeviceRecordingSink(RecordingSink):
    """A RecordingSink that is also a ``DeviceFrameSink``: frames whose key starts with
    ``device_prefix`` land in device memory, the others in host memory."""

    def __init__(self, arrays: CudaArrays, device_prefix: bytes = b"dev") -> None:
        super().__init__()
        self._arrays = arrays
        self._prefix = device_prefix

    def frame_device_buffer(self, peer: int, key: bytes, nbytes: int) -> Any:
        if not key.startswith(self._prefix):
            return self.frame_buffer(peer, key, nbytes)
        buffer = self._arrays.alloc(nbytes)
        self._pending.append((peer, key, buffer))
        return buffer


def _key(n: int, tag: bytes = b"k") -> bytes:
    return (tag + n.to_bytes(8, "big")).ljust(KEY_SIZE, b".")


def _pattern(n: int, seed: int) -> bytes:
    return bytes((seed * 31 + i) % 251 for i in range(n)) if n < 4096 else (
        np.arange(seed, seed + n, dtype=np.uint64) % 251
    ).astype(np.uint8).tobytes()


async def _send_until_broken(conn: Connection, timeout: float) -> TransportError:
    """Send small frames until the connection reports it is broken (a kernel may accept a few
    more bytes before it learns the peer is gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            await conn.send(_key(0, b"probe"), b"x")
        except TransportError as exc:
            return exc
        await asyncio.sleep(0.01)
    raise ConformanceError(f"send to rank {conn.peer} kept succeeding after the peer went away")


async def _expect_transport_error(awaitable: Awaitable[Any], what: str) -> TransportError:
    try:
        await awaitable
    except TransportError as exc:
        return exc
    except Exception as exc:
        raise ConformanceError(f"{what} raised {exc!r}, expected TransportError") from exc
    raise ConformanceError(f"{what} succeeded, expected TransportError")


# -- the checks, in the order a transport author would want to fix them


@conformance_check
async def check_frame_arrives_intact(setup: TransportSetup) -> None:
    """A frame's key and payload arrive in the memory the receiver's sink chose."""
    async with open_world(setup) as w:
        conn = await w.connect(1, 0)
        payload = os.urandom(1000)
        await conn.send(_key(1), payload)
        doubles = array.array("d", [1.5, -2.25, 3e300])  # not a byte format: sent as its bytes
        await conn.send(_key(2), doubles)
        sink = w.sinks[0]
        await sink.wait_frames(2, setup.timeout)
        (p1, k1, d1), (p2, k2, d2) = sink.frames
        _expect((p1, k1) == (1, _key(1)), f"first frame came as (peer {p1}, key {k1!r})")
        _expect(bytes(d1) == payload, "payload changed on the way")
        _expect((p2, k2) == (1, _key(2)) and bytes(d2) == doubles.tobytes(), "typed payload changed on the way")
        _expect(not w.sinks[1].frames, "frames arrived at the sender")


@conformance_check
async def check_zero_length_frame(setup: TransportSetup) -> None:
    """A frame with an empty payload arrives, and the stream stays in step after it."""
    async with open_world(setup) as w:
        conn = await w.connect(1, 0)
        await conn.send(_key(1), b"")
        await conn.send(_key(2), b"")
        await conn.send(_key(3), b"after")
        sink = w.sinks[0]
        await sink.wait_frames(3, setup.timeout)
        got = [(f.key, bytes(f.data)) for f in sink.frames]
        _expect(got == [(_key(1), b""), (_key(2), b""), (_key(3), b"after")], f"got {got!r}")


@conformance_check
async def check_large_frame(setup: TransportSetup) -> None:
    """A 64 MiB frame arrives intact, and the sender may reuse its buffer once send returns."""
    size = 64 << 20
    async with open_world(setup) as w:
        conn = await w.connect(1, 0)
        payload = np.arange(size, dtype=np.uint8)
        expected = payload.copy()
        await conn.send(_key(1), payload)
        payload.fill(0xEE)  # allowed now: what arrives must be what was there during send()
        sink = w.sinks[0]
        await sink.wait_frames(1, setup.timeout)
        got = np.frombuffer(sink.frames[0].data, dtype=np.uint8)
        _expect(got.size == size, f"got {got.size} bytes of {size}")
        bad = np.flatnonzero(got != expected)
        _expect(bad.size == 0, f"{bad.size} bytes differ, first at offset {bad[:1].tolist()}")


@conformance_check
async def check_frames_keep_order(setup: TransportSetup) -> None:
    """Many frames of mixed sizes on one connection arrive complete and in order."""
    sizes = [(i * 7919) % 70_000 if i % 5 else i % 7 for i in range(300)]
    async with open_world(setup) as w:
        conn = await w.connect(1, 0)
        for i, n in enumerate(sizes):
            await conn.send(_key(i), _pattern(n, i))
        sink = w.sinks[0]
        await sink.wait_frames(len(sizes), setup.timeout)
        for i, (n, frame) in enumerate(zip(sizes, sink.frames)):
            _expect(frame.key == _key(i), f"frame {i} arrived with key {frame.key!r}")
            _expect(bytes(frame.data) == _pattern(n, i), f"frame {i} ({n} bytes) changed on the way")


@conformance_check
async def check_concurrent_sends(setup: TransportSetup) -> None:
    """Sends running at once on one connection never interleave, and keep their start order."""
    sizes = [(i * 104_729) % (3 << 20) for i in range(24)]
    payloads = [_pattern(n, i) for i, n in enumerate(sizes)]
    async with open_world(setup) as w:
        conn = await w.connect(1, 0)
        await asyncio.gather(*(conn.send(_key(i), p) for i, p in enumerate(payloads)))
        sink = w.sinks[0]
        await sink.wait_frames(len(sizes), setup.timeout)
        keys = [f.key for f in sink.frames]
        _expect(keys == [_key(i) for i in range(len(sizes))], "frames arrived out of their start order")
        for i, frame in enumerate(sink.frames):
            _expect(bytes(frame.data) == payloads[i], f"frame {i} was corrupted by a concurrent send")


@conformance_check
async def check_frames_from_many_peers(setup: TransportSetup) -> None:
    """Every other rank sends to rank 0 at once; each frame is attributed to its true sender."""
    per_peer = 20
    async with open_world(setup) as w:
        senders = range(1, setup.world_size)
        conns = [await w.connect(r, 0) for r in senders]

        async def stream(conn: Connection, rank: int) -> None:
            for i in range(per_peer):
                await conn.send(_key(i), rank.to_bytes(4, "big") * (1 + i * 500))

        await asyncio.gather(*(stream(c, r) for c, r in zip(conns, senders)))
        sink = w.sinks[0]
        await sink.wait_frames(per_peer * len(senders), setup.timeout)
        for rank in senders:
            frames = sink.frames_from(rank)
            _expect([f.key for f in frames] == [_key(i) for i in range(per_peer)], f"rank {rank}'s frames out of order")
            for i, f in enumerate(frames):
                _expect(bytes(f.data) == rank.to_bytes(4, "big") * (1 + i * 500), f"frame {i} of rank {rank} wrong")


@conformance_check
async def check_aclose_flushes_and_reports(setup: TransportSetup) -> None:
    """aclose() delivers what was sent, then the peer sees peer_lost once; the closer sees none."""
    async with open_world(setup) as w:
        conn = await w.connect(1, 0)
        back = await w.connect(0, 1)
        payload = _pattern(4 << 20, 3)
        await conn.send(_key(1), payload)
        await w.transports[1].aclose()
        sink = w.sinks[0]
        await sink.wait_lost(1, setup.timeout)
        _expect(sink.events[:2] == [("frame", 1), ("lost", 1)], f"rank 0 saw {sink.events} (frame, then loss)")
        _expect(bytes(sink.frames[0].data) == payload, "the frame sent before aclose() was cut")
        await asyncio.sleep(0.05)  # time for a duplicate report to show up
        _expect(len(sink.lost_from(1)) == 1, f"peer_lost(1) reported {len(sink.lost_from(1))} times")
        _expect(not w.sinks[1].lost, f"the closing rank reported its own peers lost: {w.sinks[1].lost}")
        await _send_until_broken(back, setup.timeout)


@conformance_check
async def check_abort_reports_peer_lost(setup: TransportSetup) -> None:
    """abort() drops everything: peers see peer_lost and their sends fail; it is idempotent."""
    async with open_world(setup) as w:
        conn = await w.connect(1, 0)
        back = await w.connect(0, 1)
        await conn.send(_key(1), b"before")
        await w.sinks[0].wait_frames(1, setup.timeout)
        w.transports[1].abort()
        w.transports[1].abort()
        await w.sinks[0].wait_lost(1, setup.timeout)
        await _expect_transport_error(conn.send(_key(2), b"after"), "send on an aborted transport")
        await _send_until_broken(back, setup.timeout)
        await w.transports[1].aclose()  # after abort: returns, raises nothing


@conformance_check
async def check_send_after_close_raises(setup: TransportSetup) -> None:
    """A closed connection or transport refuses sends and connects with TransportError."""
    async with open_world(setup) as w:
        first = await w.connect(1, 0)
        second = await w.connect(1, 0)
        await first.aclose()
        await first.aclose()
        first.abort()
        await _expect_transport_error(first.send(_key(1), b"x"), "send on a closed connection")
        await second.send(_key(2), b"still open")
        await w.sinks[0].wait_frames(1, setup.timeout)
        await w.transports[1].aclose()
        await w.transports[1].aclose()
        w.transports[1].abort()
        await _expect_transport_error(second.send(_key(3), b"x"), "send after the transport's aclose()")
        await _expect_transport_error(w.connect(1, 0), "connect after the transport's aclose()")


@conformance_check
async def check_rejected_frame_drops_connection(setup: TransportSetup) -> None:
    """A sink whose frame_buffer raises drops that connection and reports the peer lost with an
    error; the listener keeps serving new connections."""
    bad = _key(666, b"bad")
    sink0 = RecordingSink(reject=lambda peer, key, nbytes: key == bad)
    async with open_world(setup, {0: sink0}) as w:
        conn = await w.connect(1, 0)
        await conn.send(_key(1), b"fine")
        try:
            await conn.send(bad, b"refused")
        except TransportError:
            pass  # a transport may learn of the rejection within send itself
        await sink0.wait_lost(1, setup.timeout)
        excs = sink0.lost_from(1)
        _expect(excs[0] is not None, "a rejected frame was reported as a graceful close")
        _expect([f.key for f in sink0.frames] == [_key(1)], f"got frames {[f.key for f in sink0.frames]}")
        await _send_until_broken(conn, setup.timeout)
        again = await w.connect(1, 0)
        await again.send(_key(2), b"new connection")
        await sink0.wait_frames(2, setup.timeout)
        _expect(bytes(sink0.frames[1].data) == b"new connection", "the new connection's frame changed")


@conformance_check
async def check_wrong_secret_refused(setup: TransportSetup) -> None:
    """A peer with the wrong secret fails with HandshakeError, both ways, quickly; the listener
    keeps serving the right peers and its sink never hears of the intruder."""
    if not setup.authenticates:
        return
    async with open_world(setup) as w:
        intruder = setup.factory(setup.config(1, secret=setup.secret + b"-wrong"))
        intruder_sink = RecordingSink()
        try:
            intruder_address = await intruder.listen(intruder_sink)
            started = time.monotonic()
            try:
                await intruder.connect(0, w.addresses[0])
            except HandshakeError:
                pass
            else:
                raise ConformanceError("a connection with the wrong secret was accepted")
            try:
                await w.transports[2 % setup.world_size].connect(1, intruder_address)
            except HandshakeError:
                pass
            else:
                raise ConformanceError("connected to a listener with the wrong secret")
            elapsed = time.monotonic() - started
            _expect(elapsed < setup.timeout / 2, f"wrong secrets took {elapsed:.1f} s to refuse (retried?)")
        finally:
            await intruder.aclose()
        conn = await w.connect(1, 0)
        await conn.send(_key(1), b"genuine")
        await w.sinks[0].wait_frames(1, setup.timeout)
        _expect(not w.sinks[0].lost, f"the listener reported {w.sinks[0].lost} for a refused intruder")
        _expect(not intruder_sink.frames, "the intruder's listener received frames")


@device_check
async def check_device_frames(setup: TransportSetup) -> None:
    """Device payloads arrive intact in device memory and in host memory, host payloads in
    device memory, small and large, in order; the sender may reuse its memory once send returns."""
    arrays = cuda_arrays()
    _expect(arrays is not None, "no CUDA device (torch or CuPy with a GPU) to check device memory with")
    assert arrays is not None
    sizes = [0, 8, 5000, 1 << 20, 16 << 20]
    sink0 = DeviceRecordingSink(arrays)
    async with open_world(setup, {0: sink0}) as w:
        conn = await w.connect(1, 0)
        sent = []
        for i, n in enumerate(sizes):
            for kind, device_src in ((b"dev-dd", True), (b"dev-hd", False), (b"hst-dh", True)):
                data = np.frombuffer(_pattern(n, i + len(kind)), np.uint8).copy()
                payload = arrays.from_host(data) if device_src else data
                await conn.send(_key(i, kind), payload)
                if device_src:  # allowed now, as for host memory
                    payload[...] = 0xEE
                sent.append((_key(i, kind), data))
        await sink0.wait_frames(len(sent), setup.timeout)
        for (k, data), frame in zip(sent, sink0.frames):
            _expect(frame.key == k, f"frame {k!r} arrived as {frame.key!r}")
            on_device = k[:3] == b"dev"
            _expect(on_device == hasattr(frame.data, "__cuda_array_interface__"),
                    f"frame {k!r} landed in the wrong kind of memory")
            got = arrays.to_host(frame.data) if on_device else np.frombuffer(frame.data, np.uint8)
            _expect(np.array_equal(got, data), f"frame {k!r} ({data.size} bytes) changed on the way")


async def check_transport(
    factory: TransportFactory,
    *,
    world_size: int = 3,
    secret: bytes = b"aiocoll-conformance-secret",
    options: Mapping[str, Any] | None = None,
    authenticates: bool = True,
    timeout: float = 10.0,
) -> None:
    """Run every check of ``CHECKS`` against transports made by ``factory``, and those of
    ``DEVICE_CHECKS`` too when its capabilities say ``cuda_memory`` and a CUDA device is here.

    Args:
        world_size: ranks per world; at least 2 (3 or more also checks several senders to one).
        authenticates: whether the transport must refuse a peer with the wrong secret.
        timeout: the transports' connect timeout, and how long a check waits for an event.

    Raises:
        ConformanceError: the first check that failed, naming what went wrong.
        ValueError: ``world_size`` is below 2.
    """
    if world_size < 2:
        raise ValueError(f"world_size must be at least 2, got {world_size}")
    setup = TransportSetup(
        factory=factory,
        world_size=world_size,
        secret=secret,
        options=dict(options or {}),
        authenticates=authenticates,
        timeout=timeout,
    )
    for check in CHECKS:
        await check(setup)
    if getattr(getattr(factory, "capabilities", None), "cuda_memory", False) and cuda_arrays() is not None:
        for check in DEVICE_CHECKS:
            await check(setup)


__all__ = [
    "CHECKS",
    "DEVICE_CHECKS",
    "CudaArrays",
    "DeviceRecordingSink",
    "cuda_arrays",
    "device_check",
    "check_device_frames",
    "ConformanceError",
    "Frame",
    "RecordingSink",
    "RejectedFrame",
    "TransportSetup",
    "World",
    "check_transport",
    "conformance_check",
    "open_world",
    "check_frame_arrives_intact",
    "check_zero_length_frame",
    "check_large_frame",
    "check_frames_keep_order",
    "check_concurrent_sends",
    "check_frames_from_many_peers",
    "check_aclose_flushes_and_reports",
    "check_abort_reports_peer_lost",
    "check_send_after_close_raises",
    "check_rejected_frame_drops_connection",
    "check_wrong_secret_refused",
]
