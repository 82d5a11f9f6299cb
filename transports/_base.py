"""The transport interface: move opaque frames between two ranks, nothing more.

A transport knows ranks, addresses and bytes. It knows nothing of groups or collectives: the
layer above hands it a fixed-size opaque ``key`` with each payload and reads the key back on the
other side to decide where the payload goes.

Data flow, receive side (the BufferedProtocol idea, made transport-neutral)::

    transport reads a frame header (key, nbytes)
      -> buf = sink.frame_buffer(peer, key, nbytes)     # the layer above picks the memory
      -> transport writes the payload straight into buf  # no intermediate copy
      -> sink.frame_received(peer, key, buf)

Connections are one-way: rank a sends to rank b over the connection a opened to b, and b
never sends on it. That keeps connect races out of the picture (no "who dials whom") and
makes a frame's origin the connection's authenticated peer, never a claim inside the frame.

Device memory (optional): a transport whose capabilities say ``cuda_memory`` also takes payloads
in CUDA memory (``CudaBuffer``: anything with ``__cuda_array_interface__``), and if the sink has
``frame_device_buffer`` (``DeviceFrameSink``) it calls that instead of ``frame_buffer``, so the
sink may have a payload land straight in device memory. Other transports and sinks are unchanged.

Lifecycle: ``listen(sink)`` once, then ``connect(peer, address)`` for each peer to send to;
``aclose()`` flushes and closes gracefully; ``abort()`` drops everything at once and is safe
to call from any state, more than once.
"""

from __future__ import annotations

import ssl
import sys
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeAlias, runtime_checkable

if sys.version_info >= (3, 12):
    from collections.abc import Buffer
else:  # pragma: no cover - 3.11 has no Buffer ABC; anything with the buffer protocol goes
    Buffer: TypeAlias = Any

#: Size in bytes of the opaque per-frame key that the layer above uses to match frames.
KEY_SIZE = 32

#: Upper bound on one frame's payload that a transport accepts from a peer (a header claiming
#: more is a protocol violation: the connection is dropped, nothing is allocated).
MAX_FRAME = 1 << 40


@dataclass(frozen=True)
class Capabilities:
    """What a transport can do.

    host_memory: moves payloads in host memory (numpy arrays, CPU tensors).
    cuda_memory: moves payloads that live in CUDA device memory without staging through the host.
    same_host_only: reaches only ranks on this host (shared memory); ``auto`` falls back to
        another transport for remote peers.
    shared_segments: passes memory descriptors between its peers (``send_fd(peer, fd)``,
        ``take_fds(match)``) and has the lifetime hook ``on_close``: a same-host engine may then
        compute in segments shared over it (``aiocoll.engines.shm``).
    """

    host_memory: bool = True
    cuda_memory: bool = False
    same_host_only: bool = False
    shared_segments: bool = False


@dataclass
class TransportConfig:
    """What every transport is constructed with.

    rank / world_size: this process's global rank and the world's size.
    secret: shared secret for the connection handshake (empty: no authentication, inproc only);
        left out of the repr, so that logging a config does not leak it.
    host: the address to listen on / advertise (an interface address, not 0.0.0.0).
    timeout: seconds to keep trying to connect before raising TransportError.
    ssl_server / ssl_client: optional TLS contexts for transports that can use them.
    options: transport-specific settings (documented by each transport).
    """

    rank: int
    world_size: int
    secret: bytes = field(default=b"", repr=False)
    host: str = "127.0.0.1"
    timeout: float = 60.0
    ssl_server: ssl.SSLContext | None = None
    ssl_client: ssl.SSLContext | None = None
    options: dict[str, Any] = field(default_factory=dict)


class FrameSink(Protocol):
    """Implemented by the layer above; the transport calls it from the event loop thread."""

    def frame_buffer(self, peer: int, key: bytes, nbytes: int) -> memoryview:
        """Return writable, C-contiguous memory of exactly ``nbytes`` bytes for the payload.

        Raising here rejects the frame: the transport drops the connection and reports the
        error through ``peer_lost``.
        """
        ...

    def frame_received(self, peer: int, key: bytes, buffer: memoryview) -> None:
        """The payload of the frame announced by ``frame_buffer`` is now in ``buffer``."""
        ...

    def peer_lost(self, peer: int, exc: BaseException | None) -> None:
        """The connection from ``peer`` ended: ``exc`` is None for a graceful close."""
        ...


@runtime_checkable
class CudaBuffer(Protocol):
    """Device memory as transports with ``cuda_memory`` take and give it: anything exposing the
    CUDA Array Interface (torch CUDA tensors, CuPy arrays, Numba device arrays), C-contiguous.

    Its data must be ready when it is handed over: a transport does not wait on the stream the
    interface names (version 3 ``stream``); the layer above orders its own streams.
    """

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]: ...


class DeviceFrameSink(Protocol):
    """A FrameSink that can take payloads straight into device memory (optional).

    A transport whose capabilities say ``cuda_memory`` calls ``frame_device_buffer`` instead of
    ``frame_buffer`` when the sink has that method, and hands what it returned, host or device
    memory, to ``frame_received``. Transports without ``cuda_memory`` never call it, and sinks
    without it only ever give host memory, so neither side has to change.
    """

    def frame_device_buffer(self, peer: int, key: bytes, nbytes: int) -> memoryview | CudaBuffer:
        """Like ``frame_buffer``, but may return device memory of exactly ``nbytes`` bytes.

        Raising here rejects the frame, as for ``frame_buffer``.
        """
        ...

    # Optional as well: ``frame_buffer_from_device(peer, key, nbytes)``, with the same contract
    # as ``frame_device_buffer``. A transport that knows the sender gave the payload in device
    # memory (ucx) calls it instead for such frames, so that the sink can give device memory to
    # a frame it did not expect yet (one that arrives before its receive is posted) rather than
    # staging it through host memory.

    def frame_received(self, peer: int, key: bytes, buffer: memoryview | CudaBuffer) -> None:
        """The payload is now in ``buffer``, the object ``frame_device_buffer`` returned."""
        ...

    def peer_lost(self, peer: int, exc: BaseException | None) -> None:
        """As ``FrameSink.peer_lost``."""
        ...


@runtime_checkable
class Connection(Protocol):
    """One-way link to a peer: this side sends, the peer's sink receives."""

    peer: int

    async def send(self, key: bytes, payload: Buffer) -> None:
        """Send one frame. Returns once ``payload`` may be reused by the caller.

        Frames on one connection arrive in the order their ``send`` calls started.
        Raises TransportError if the connection is broken.
        """
        ...

    async def aclose(self) -> None:
        """Flush what was sent and close."""
        ...

    def abort(self) -> None:
        """Close at once, dropping unsent data."""
        ...


@runtime_checkable
class Transport(Protocol):
    """A way to move frames between ranks. One instance per rank."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    async def listen(self, sink: FrameSink) -> str:
        """Start accepting connections; return this rank's address for peers to connect to."""
        ...

    async def connect(self, peer: int, address: str) -> Connection:
        """Open (and authenticate) a connection to ``peer`` at ``address``."""
        ...

    async def aclose(self) -> None:
        """Close every connection and the listener gracefully."""
        ...

    def abort(self) -> None:
        """Drop every connection and the listener at once."""
        ...

    # Optional: ``on_close(fn) -> forget``, the lifetime hook: ``fn(abort)`` runs when the
    # transport closes or aborts, before its links go; ``forget()`` takes it back. Engines that
    # hold resources tied to the transport's links end with it this way.
    # Optional: ``inbound_peers() -> set[int]``, the ranks that have connected to this one. A
    # rank leaving after a failure waits (bounded) until every live peer has, so that a peer
    # still in ``init`` can finish it. A transport without it is taken as fully connected.


class TransportFactory(Protocol):
    """What the entry point ``aiocoll.transports`` names: a class or callable making a Transport."""

    def __call__(self, config: TransportConfig) -> Transport: ...



def format_host_port(scheme: str, host: str, port: int) -> str:
    """``scheme://host:port``, with IPv6 hosts in brackets (the address form of tcp and ucx)."""
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def parse_host_port(scheme: str, address: str) -> tuple[str, int]:
    """Split ``scheme://host:port`` into host and port.

    Raises:
        ValueError: not a ``scheme://`` address with a host and a port.
    """
    parts = urllib.parse.urlsplit(address)
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in {scheme} address {address!r}") from exc
    if parts.scheme != scheme or not parts.hostname or port is None:
        raise ValueError(f"expected {scheme}://host:port, got {address!r}")
    return parts.hostname, port

__all__ = [
    "format_host_port",
    "parse_host_port",
    "KEY_SIZE",
    "MAX_FRAME",
    "Capabilities",
    "TransportConfig",
    "FrameSink",
    "CudaBuffer",
    "DeviceFrameSink",
    "Connection",
    "Transport",
    "TransportFactory",
]
