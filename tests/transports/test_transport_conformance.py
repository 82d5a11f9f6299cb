"""Every built-in transport passes the conformance suite, on the stdlib event loop and on uvloop
(shm runs it in test_shm.py); transports that move CUDA memory also pass its device checks.

Each check runs as its own test inside ``asyncio.Runner(loop_factory=...)``: a plain loop
factory is the one way to pick the loop that works on every supported Python and needs no
event-loop policy (deprecated in 3.14).
"""

from __future__ import annotations

import asyncio
import importlib.util
import uuid
from collections.abc import Callable

import pytest
import uvloop

from aiocoll.core.errors import TransportError
from aiocoll.testing.conformance import (
    CHECKS,
    DEVICE_CHECKS,
    Check,
    ConformanceError,
    TransportSetup,
    check_frames_keep_order,
    check_rejected_frame_drops_connection,
    check_transport,
    cuda_arrays,
)
from aiocoll.transports import TransportConfig
from aiocoll.transports._base import Buffer
from aiocoll.transports.inproc import InprocConnection, InprocTransport
from aiocoll.transports.tcp import TcpTransport

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


HAS_UCXX = importlib.util.find_spec("ucxx") is not None
UCX = pytest.param(
    "ucx",
    marks=pytest.mark.skipif(
        not HAS_UCXX,
        reason="ucxx is not installed; runs wherever the ucx-cu12 or ucx-cu13 extra is (pip install -e '.[ucx-cu12]')",
    ),
)
TRANSPORTS = ["inproc", "tcp", UCX]
#: The built-in transports whose capabilities say cuda_memory.
DEVICE_TRANSPORTS = [UCX]


def _setup(transport: str) -> TransportSetup:
    if transport == "inproc":
        return TransportSetup(InprocTransport, options={"world": f"conformance-{uuid.uuid4().hex}"}, authenticates=False)
    if transport == "ucx":
        from aiocoll.transports.ucx import UcxTransport

        return TransportSetup(UcxTransport, secret=b"conformance-" + uuid.uuid4().hex.encode())
    return TransportSetup(TcpTransport, secret=b"conformance-" + uuid.uuid4().hex.encode())


def _run(loop: str, check: Check, setup: TransportSetup) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(check(setup))


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_transport_conforms(loop: str, transport: str, check: Check) -> None:
    _run(loop, check, _setup(transport))


@pytest.mark.gpu
@pytest.mark.parametrize("check", DEVICE_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("transport", DEVICE_TRANSPORTS)
@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_transport_conforms_on_device(loop: str, transport: str, check: Check) -> None:
    if cuda_arrays() is None:
        pytest.skip("no CUDA device (torch or CuPy with a GPU); runs on the GPU machine with pytest -m gpu")
    _run(loop, check, _setup(transport))


def test_check_transport_runs_every_check() -> None:
    ran: list[str] = []
    original = list(CHECKS)

    def spy(check: Check) -> Check:
        async def run(setup: TransportSetup) -> None:
            ran.append(check.__name__)
            await check(setup)

        return run

    CHECKS[:] = [spy(c) for c in original]
    try:
        asyncio.run(
            check_transport(InprocTransport, options={"world": f"all-{uuid.uuid4().hex}"}, authenticates=False)
        )
    finally:
        CHECKS[:] = original
    assert ran == [c.__name__ for c in original]


class _ReorderingTransport(InprocTransport):
    """Broken on purpose: every other frame overtakes the one before it."""

    async def connect(self, peer: int, address: str) -> InprocConnection:
        conn = await super().connect(peer, address)
        held: list[tuple[bytes, bytes]] = []
        send = conn.send

        async def reordering_send(key: bytes, payload: Buffer) -> None:
            if not held:
                held.append((key, bytes(payload)))
                return
            await send(key, payload)
            await send(*held.pop())

        conn.send = reordering_send  # type: ignore[method-assign]
        return conn


class _StubbornTransport(InprocTransport):
    """Broken on purpose: keeps a connection usable after the receiver rejected a frame."""

    async def connect(self, peer: int, address: str) -> InprocConnection:
        conn = await super().connect(peer, address)
        send = conn.send

        async def send_ignoring_drops(key: bytes, payload: Buffer) -> None:
            conn._closed = False
            try:
                await send(key, payload)
            except TransportError:
                conn._closed = False

        conn.send = send_ignoring_drops  # type: ignore[method-assign]
        return conn


@pytest.mark.parametrize(
    ("factory", "check", "complaint"),
    [
        (_ReorderingTransport, check_frames_keep_order, "arrived with key"),
        (_StubbornTransport, check_rejected_frame_drops_connection, "kept succeeding"),
    ],
    ids=["reordered frames", "rejection ignored"],
)
def test_suite_fails_a_broken_transport(
    factory: Callable[[TransportConfig], InprocTransport], check: Check, complaint: str
) -> None:
    setup = TransportSetup(factory, options={"world": f"broken-{uuid.uuid4().hex}"}, authenticates=False, timeout=1.0)
    with pytest.raises(ConformanceError, match=complaint):
        _run("asyncio", check, setup)
