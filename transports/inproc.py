"""``inproc``: ranks as tasks of one event loop, frames copied from sender to receiver memory.

The in-memory twin of the real transports: it keeps their semantics (one-way connections,
per-connection order, the payload copied into memory the receiver chose, peer loss reported on
abort) so that algorithms and failure handling can be tested with many ranks in one process.

Options: ``world`` (str) names the simulated world, so several worlds can live in one process.
"""

from __future__ import annotations

import asyncio
import time
from typing import ClassVar

from aiocoll.core.errors import TransportError

from ._base import Buffer, Capabilities, FrameSink, TransportConfig

_listeners: dict[str, InprocTransport] = {}


class InprocConnection:
    """One-way link to a transport in the same process."""

    def __init__(self, owner: InprocTransport, peer: int, target: InprocTransport) -> None:
        self.peer = peer
        self._owner = owner
        self._target = target
        self._closed = False

    async def send(self, key: bytes, payload: Buffer) -> None:
        if self._closed or self._target._closed or self._owner._closed:
            raise TransportError(f"inproc connection to rank {self.peer} is closed")
        src = memoryview(payload)
        if src.ndim != 1 or src.format != "B":
            src = src.cast("B")
        sink = self._target._sink
        assert sink is not None
        try:
            dst = sink.frame_buffer(self._owner.rank, key, src.nbytes)
            if src.nbytes:
                dst[:] = src
        except Exception as exc:
            # A sink that rejects a frame drops the link, as a real transport would.
            self._closed = True
            self._target._lose(self._owner.rank, exc)
            raise TransportError(f"rank {self.peer} rejected a frame: {exc}") from exc
        sink.frame_received(self._owner.rank, key, dst)
        # Give the loop a turn, as a real send would: no rank may starve the others.
        await asyncio.sleep(0)

    async def aclose(self) -> None:
        self._closed = True

    def abort(self) -> None:
        self._closed = True


class InprocTransport:
    """Transport for many ranks in one process (tests, simulation)."""

    name: ClassVar[str] = "inproc"
    capabilities: ClassVar[Capabilities] = Capabilities(host_memory=True, cuda_memory=False)

    def __init__(self, config: TransportConfig) -> None:
        self.rank = config.rank
        self._world = str(config.options.get("world", "default"))
        self._timeout = config.timeout
        self._sink: FrameSink | None = None
        self._address = ""
        self._closed = False
        self._peers: set[int] = set()  # ranks we are linked with in either direction
        self._inbound: set[int] = set()  # ranks that connected to us
        self._lost: set[int] = set()

    async def listen(self, sink: FrameSink) -> str:
        self._sink = sink
        self._address = f"inproc://{self._world}/{self.rank}"
        if self._address in _listeners and not _listeners[self._address]._closed:
            raise TransportError(f"{self._address} is already listening")
        _listeners[self._address] = self
        return self._address

    async def connect(self, peer: int, address: str) -> InprocConnection:
        deadline = time.monotonic() + self._timeout
        while True:
            if self._closed:
                raise TransportError(f"inproc rank {self.rank} is closed")
            target = _listeners.get(address)
            if target is not None and not target._closed:
                break
            if time.monotonic() > deadline:
                raise TransportError(f"no inproc rank listening at {address}")
            await asyncio.sleep(0.001)
        self._peers.add(peer)
        target._peers.add(self.rank)
        target._inbound.add(self.rank)
        return InprocConnection(self, peer, target)

    def inbound_peers(self) -> set[int]:
        """Ranks that have connected to this one."""
        return set(self._inbound)

    def _lose(self, peer: int, exc: BaseException | None) -> None:
        if peer in self._lost or self._sink is None:
            return
        self._lost.add(peer)
        self._sink.peer_lost(peer, exc)

    def _others(self) -> list[InprocTransport]:
        prefix = f"inproc://{self._world}/"
        return [
            t
            for a, t in list(_listeners.items())
            if a.startswith(prefix) and t is not self and self.rank in t._peers
        ]

    def _shutdown(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        if _listeners.get(self._address) is self:
            del _listeners[self._address]
        for other in self._others():
            other._lose(self.rank, exc)

    async def aclose(self) -> None:
        self._shutdown(None)

    def abort(self) -> None:
        self._shutdown(TransportError(f"rank {self.rank} aborted"))
