"""What only the TCP transport has: a wire format a stranger can abuse, real sockets, processes
that die, TLS. The behaviour every transport shares is in test_transport_conformance.py."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvloop

from aiocoll.core import auth as _auth
from aiocoll.core.errors import HandshakeError, TransportError
from aiocoll.testing.conformance import CHECKS, Check, RecordingSink, TransportSetup
from aiocoll.transports import KEY_SIZE, MAX_FRAME, TransportConfig
from aiocoll.transports.tcp import TcpTransport, parse_address

REPO = Path(__file__).resolve().parents[2]
SECRET = b"tcp-test-secret"
KEY = b"k" * KEY_SIZE
LOGGER = "aiocoll.transports.tcp"


def _config(rank: int, world_size: int = 3, **kw: object) -> TransportConfig:
    kw.setdefault("secret", SECRET)
    kw.setdefault("timeout", 5.0)
    return TransportConfig(rank=rank, world_size=world_size, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def listener() -> AsyncIterator[tuple[TcpTransport, RecordingSink, str]]:
    transport = TcpTransport(_config(0))
    sink = RecordingSink()
    address = await transport.listen(sink)
    yield transport, sink, address
    await transport.aclose()


async def _handshaken(address: str, rank: int = 1, world_size: int = 3) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw socket that passed the handshake as ``rank``: whatever it writes next is a frame."""
    host, port = parse_address(address)
    reader, writer = await asyncio.open_connection(host, port)
    await _auth.initiate(reader, writer, SECRET, b"tcp", struct.pack("!II", rank, world_size), 5.0)
    return reader, writer


async def _assert_still_serving(address: str, sink: RecordingSink) -> None:
    peer = TcpTransport(_config(2))
    try:
        conn = await peer.connect(0, address)
        before = len(sink.frames_from(2))
        await conn.send(KEY, b"still here")
        await sink.wait_until(lambda: len(sink.frames_from(2)) > before, "a frame from rank 2", 5.0)
    finally:
        await peer.aclose()


async def _closed_by_peer(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 5.0) == b""
    except ConnectionError:
        return True


# -- a stranger on the wire


async def test_random_bytes_to_the_listener_are_dropped_and_logged(
    listener: tuple[TcpTransport, RecordingSink, str], caplog: pytest.LogCaptureFixture
) -> None:
    _, sink, address = listener
    caplog.set_level(logging.WARNING, logger=LOGGER)
    host, port = parse_address(address)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(os.urandom(200))
    assert await _closed_by_peer(reader)
    writer.close()
    assert any("dropped a connection from tcp://127.0.0.1:" in r.getMessage() for r in caplog.records)
    assert any("bad magic" in r.getMessage() for r in caplog.records)
    assert not sink.lost, "a stranger that never authenticated is not a lost peer"
    await _assert_still_serving(address, sink)


@pytest.mark.parametrize(
    ("header", "logged"),
    [
        (struct.pack("!4sQ", b"EVIL", 5) + KEY, "bad frame magic"),
        (struct.pack("!4sQ", b"ACF1", MAX_FRAME + 1) + KEY, "more than MAX_FRAME"),
        (struct.pack("!4sQ", b"ACF1", (1 << 64) - 1) + KEY, "more than MAX_FRAME"),
    ],
    ids=["bad magic", "MAX_FRAME + 1", "2**64 - 1"],
)
async def test_bad_frame_header_drops_the_connection(
    listener: tuple[TcpTransport, RecordingSink, str], caplog: pytest.LogCaptureFixture, header: bytes, logged: str
) -> None:
    _, sink, address = listener
    caplog.set_level(logging.WARNING, logger=LOGGER)
    reader, writer = await _handshaken(address)
    writer.write(struct.pack("!4sQ", b"ACF1", 3) + KEY + b"abc" + header)
    assert await _closed_by_peer(reader)
    writer.close()
    await sink.wait_lost(1, 5.0)
    assert [bytes(f.data) for f in sink.frames] == [b"abc"], "the frame before the bad header still arrives"
    assert isinstance(sink.lost_from(1)[0], TransportError)
    assert any(logged in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    await _assert_still_serving(address, sink)


async def test_data_after_goodbye_drops_the_connection(listener: tuple[TcpTransport, RecordingSink, str]) -> None:
    _, sink, address = listener
    reader, writer = await _handshaken(address)
    writer.write(struct.pack("!4sQ", b"ACG1", 0) + bytes(KEY_SIZE) + b"more")
    assert await _closed_by_peer(reader)
    writer.close()
    await sink.wait_lost(1, 5.0)
    assert "after goodbye" in str(sink.lost_from(1)[0])


@pytest.mark.parametrize(
    ("hello", "logged"),
    [
        (struct.pack("!II", 7, 3), "outside 0..2"),
        (struct.pack("!II", 1, 4), "world of 4 ranks"),
        (b"\x00", "hello of 1 bytes"),
    ],
    ids=["rank out of range", "other world size", "short hello"],
)
async def test_a_peer_with_a_bad_hello_is_dropped(
    listener: tuple[TcpTransport, RecordingSink, str], caplog: pytest.LogCaptureFixture, hello: bytes, logged: str
) -> None:
    _, sink, address = listener
    caplog.set_level(logging.WARNING, logger=LOGGER)
    host, port = parse_address(address)
    reader, writer = await asyncio.open_connection(host, port)
    await _auth.initiate(reader, writer, SECRET, b"tcp", hello, 5.0)  # the secret is right
    assert await _closed_by_peer(reader)
    writer.close()
    assert any(logged in r.getMessage() for r in caplog.records)
    assert not sink.lost
    await _assert_still_serving(address, sink)


async def test_wrong_secret_is_refused_and_logged(
    listener: tuple[TcpTransport, RecordingSink, str], caplog: pytest.LogCaptureFixture
) -> None:
    _, sink, address = listener
    caplog.set_level(logging.WARNING, logger=LOGGER)
    intruder = TcpTransport(_config(1, secret=b"not the secret"))
    try:
        with pytest.raises(HandshakeError, match="rank 0 at tcp://"):
            await intruder.connect(0, address)
    finally:
        await intruder.aclose()
    async with asyncio.timeout(5):
        while not any("dropped a connection" in r.getMessage() for r in caplog.records):
            await asyncio.sleep(0.01)
    await _assert_still_serving(address, sink)


async def test_connect_to_the_wrong_rank_is_refused(listener: tuple[TcpTransport, RecordingSink, str]) -> None:
    _, _, address = listener
    peer = TcpTransport(_config(1))
    try:
        with pytest.raises(HandshakeError, match="listener is rank 0"):
            await peer.connect(2, address)
    finally:
        await peer.aclose()


def test_an_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="secret"):
        TcpTransport(TransportConfig(rank=0, world_size=2))


def test_addresses_must_be_tcp_urls() -> None:
    assert parse_address("tcp://[::1]:80") == ("::1", 80)
    for bad in ("127.0.0.1:80", "tcp://127.0.0.1", "shm://x:1", "tcp://h:99999"):
        with pytest.raises(ValueError):
            parse_address(bad)


# -- connecting


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_connect_retries_until_the_listener_appears() -> None:
    port = _free_port()
    late = TcpTransport(_config(0, options={"port": port}))
    early = TcpTransport(_config(1))
    sink = RecordingSink()
    try:
        connecting = asyncio.create_task(early.connect(0, f"tcp://127.0.0.1:{port}"))
        await asyncio.sleep(0.3)
        assert not connecting.done(), "connect gave up while the peer was still starting"
        await late.listen(sink)
        conn = await asyncio.wait_for(connecting, 5.0)
        await conn.send(KEY, b"late but fine")
        await sink.wait_frames(1, 5.0)
    finally:
        await early.aclose()
        await late.aclose()


async def test_connect_timeout_names_the_peer_and_address() -> None:
    address = f"tcp://127.0.0.1:{_free_port()}"
    transport = TcpTransport(_config(0, timeout=0.5))
    started = time.monotonic()
    try:
        with pytest.raises(TransportError, match=rf"rank 2 at {address} within 0.5 s") as info:
            await transport.connect(2, address)
    finally:
        await transport.aclose()
    assert 0.5 <= time.monotonic() - started < 2.0
    assert not isinstance(info.value, HandshakeError)


# -- sockets and sends


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("how", ["aclose", "abort"])
async def test_closing_leaves_no_socket_open(how: str) -> None:
    before = _open_fds()
    transports = [TcpTransport(_config(r)) for r in range(3)]
    addresses = [await t.listen(RecordingSink()) for t in transports]
    for src in range(3):
        for dst in range(3):
            if src != dst:
                await (await transports[src].connect(dst, addresses[dst])).send(KEY, b"x")
    assert _open_fds() >= before + 3 + 12
    for t in transports:
        if how == "aclose":
            await t.aclose()
        else:
            t.abort()
    async with asyncio.timeout(2):
        while _open_fds() > before:
            await asyncio.sleep(0.01)


async def test_cancelling_a_send_mid_frame_breaks_the_connection(
    listener: tuple[TcpTransport, RecordingSink, str]
) -> None:
    _, sink, address = listener
    peer = TcpTransport(_config(1))
    try:
        conn = await peer.connect(0, address)
        sending = asyncio.create_task(conn.send(KEY, bytes(64 << 20)))
        await asyncio.sleep(0.005)  # some of it written, not all
        assert not sending.done()
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        with pytest.raises(TransportError, match="cancelled in the middle of a frame"):
            await conn.send(KEY, b"x")
        await sink.wait_lost(1, 5.0)
        assert not sink.frames, "half a frame must never be delivered"
        assert isinstance(sink.lost_from(1)[0], TransportError)
    finally:
        await peer.aclose()


# -- TLS


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl on PATH to make a self-signed certificate")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_tls_conforms(tls: tuple[ssl.SSLContext, ssl.SSLContext], loop: str, check: Check) -> None:
    server, client = tls
    setup = TransportSetup(TcpTransport, secret=SECRET, ssl_server=server, ssl_client=client)
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(check(setup))


async def test_tls_with_an_untrusted_certificate_fails_at_once(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server, _ = tls
    listening = TcpTransport(_config(0, ssl_server=server))
    stranger = TcpTransport(_config(1, ssl_client=ssl.create_default_context(), timeout=10.0))
    try:
        address = await listening.listen(RecordingSink())
        started = time.monotonic()
        with pytest.raises(TransportError, match="TLS with rank 0"):
            await stranger.connect(0, address)
        assert time.monotonic() - started < 5.0, "a bad certificate was retried"
    finally:
        await stranger.aclose()
        await listening.aclose()


async def test_tls_checks_the_server_hostname_option(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server, client = tls
    listening = TcpTransport(_config(0, ssl_server=server))
    wrong_name = TcpTransport(_config(1, ssl_client=client, options={"server_hostname": "example.org"}))
    right_name = TcpTransport(_config(2, ssl_client=client, options={"server_hostname": "localhost"}))
    try:
        address = await listening.listen(RecordingSink())
        with pytest.raises(TransportError, match="TLS"):
            await wrong_name.connect(0, address)
        await (await right_name.connect(0, address)).send(KEY, b"ok")
    finally:
        for t in (wrong_name, right_name, listening):
            await t.aclose()


# -- a peer in another process

_CHILD = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
import aiocoll
from aiocoll.testing.conformance import RecordingSink
from aiocoll.transports import TransportConfig
from aiocoll.transports.tcp import TcpTransport

async def main(parent, secret, mode):
    t = TcpTransport(TransportConfig(rank=1, world_size=2, secret=secret.encode(), timeout=10))
    print(await t.listen(RecordingSink()), flush=True)
    conn = await t.connect(0, parent)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # the parent connected
    if mode == "hang":
        await conn.send(b"k" * 32, b"alive")
        await asyncio.sleep(3600)
    else:
        await conn.send(b"k" * 32, bytes(32 << 20))
        await t.aclose()

asyncio.run(main(*sys.argv[2:]))
"""


async def _with_child(
    tmp_path: Path, mode: str, sink: RecordingSink, *, connect_back: bool = True
) -> tuple[TcpTransport, asyncio.subprocess.Process]:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    parent = TcpTransport(_config(0, world_size=2))
    address = await parent.listen(sink)
    child = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(REPO), address, SECRET.decode(), mode,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert child.stdout is not None and child.stdin is not None
    child_address = (await asyncio.wait_for(child.stdout.readline(), 30)).decode().strip()
    if connect_back:
        await parent.connect(1, child_address)
    child.stdin.write(b"go\n")
    await child.stdin.drain()
    return parent, child


async def _reap(child: asyncio.subprocess.Process) -> None:
    if child.returncode is None:
        try:
            child.kill()
        except ProcessLookupError:  # exited between the check and the kill
            pass
    await child.wait()


@pytest.mark.parametrize("connect_back", [True, False], ids=["both ways", "child sends only"])
async def test_a_killed_peer_is_reported_within_two_seconds(tmp_path: Path, connect_back: bool) -> None:
    sink = RecordingSink()
    parent, child = await _with_child(tmp_path, "hang", sink, connect_back=connect_back)
    try:
        await sink.wait_frames(1, 10.0)
        child.kill()
        killed = time.monotonic()
        await sink.wait_lost(1, 2.0)
        assert time.monotonic() - killed < 2.0
        exc = sink.lost_from(1)[0]
        assert isinstance(exc, TransportError) and "without saying goodbye" in str(exc)
        await asyncio.sleep(0.05)
        assert len(sink.lost_from(1)) == 1, "reported once, though both connections broke"
    finally:
        await _reap(child)
        await parent.aclose()


async def test_a_peer_process_that_closes_is_reported_after_its_last_frame(tmp_path: Path) -> None:
    sink = RecordingSink()
    parent, child = await _with_child(tmp_path, "send-and-close", sink)
    try:
        await sink.wait_lost(1, 10.0)
        assert sink.events == [("frame", 1), ("lost", 1)]
        assert sink.lost_from(1) == [None]
        assert sink.frames[0].data.nbytes == 32 << 20
        assert await asyncio.wait_for(child.wait(), 10) == 0
    finally:
        await _reap(child)
        await parent.aclose()


async def test_a_goodbye_waits_for_the_frame_still_arriving_from_that_peer(
    listener: tuple[TcpTransport, RecordingSink, str]
) -> None:
    """Rank 1's goodbye on one socket must not be reported before its frame on the other."""
    transport, sink, address = listener
    accepted: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()

    async def as_rank_1(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _auth.accept(reader, writer, SECRET, b"tcp", struct.pack("!II", 1, 3), 5.0)
        accepted.set_result(writer)

    fake_listener = await asyncio.start_server(as_rank_1, "127.0.0.1", 0)
    try:
        port = fake_listener.sockets[0].getsockname()[1]
        conn = await transport.connect(1, f"tcp://127.0.0.1:{port}")
        to_rank_0 = (await _handshaken(address))[1]
        payload = os.urandom(1000)
        to_rank_0.write(struct.pack("!4sQ", b"ACF1", len(payload)) + KEY + payload[:500])
        await asyncio.sleep(0.1)
        rank_1_side = await accepted
        rank_1_side.write(b"\x00")  # goodbye on the connection rank 0 sends on
        rank_1_side.close()
        await asyncio.sleep(0.2)  # let it land; writing before would earn a reset, an error
        with pytest.raises(TransportError, match="said goodbye"):
            await conn.send(KEY, b"x")
        assert not sink.lost, "reported rank 1 gone while its frame was still arriving"
        to_rank_0.write(payload[500:] + struct.pack("!4sQ", b"ACG1", 0) + bytes(KEY_SIZE))
        to_rank_0.close()
        await sink.wait_lost(1, 5.0)
        assert sink.events == [("frame", 1), ("lost", 1)]
        assert bytes(sink.frames[0].data) == payload
        assert sink.lost_from(1) == [None]
    finally:
        fake_listener.close()


# -- large frames on I/O threads (the connection's lane)


def _lane_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("aiocoll-tcp-")]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("how", ["aclose", "abort"])
def test_large_frames_move_on_threads_that_end_with_the_transport(loop: str, how: str) -> None:
    """Frames of bulk_bytes and more are written and read by threads of the connection; mixed
    with small frames they keep their order and their bytes, and no thread outlives the
    transport. The same run under the stdlib loop and uvloop."""
    import numpy as np

    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    rng = np.random.default_rng(11)
    # Sizes around the threshold and the staging buffer, and one that takes many recv calls.
    sizes = [5, 300 << 10, 17, (256 << 10) - 1, 256 << 10, 7 << 20, 0, (1 << 20) + 3, 40]
    payloads = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]

    async def main() -> None:
        before = set(_lane_threads())
        transports = [TcpTransport(_config(r, 2)) for r in range(2)]
        sinks = [RecordingSink(), RecordingSink()]
        addresses = [await t.listen(s) for t, s in zip(transports, sinks)]
        try:
            conns = [await transports[0].connect(1, addresses[1]), await transports[1].connect(0, addresses[0])]
            # Both directions at once; each direction's sends are started together, so only the
            # connection's lock orders them.
            await asyncio.gather(*(
                c.send(bytes([i]) * KEY_SIZE, p) for c in conns for i, p in enumerate(payloads)
            ))
            during = set(_lane_threads()) - before
            assert len(during) == 4, f"expected a send and a receive thread per connection, saw {sorted(during)}"
            for sink, peer in ((sinks[1], 0), (sinks[0], 1)):
                await sink.wait_frames(len(payloads), 10.0)
                got = sink.frames_from(peer)
                assert [f.key[0] for f in got] == list(range(len(payloads)))
                assert [bytes(f.data) == p for f, p in zip(got, payloads)] == [True] * len(payloads)
                assert not sink.errors
        finally:
            for t in transports:
                if how == "aclose":
                    await t.aclose()
                else:
                    t.abort()
        if how == "aclose":
            assert set(_lane_threads()) - before == set(), "aclose returned with an I/O thread still running"
        else:
            async with asyncio.timeout(2):
                while set(_lane_threads()) - before:
                    await asyncio.sleep(0.01)

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


async def test_a_sender_killed_in_a_large_frame_is_reported_and_nothing_half_delivered(
    listener: tuple[TcpTransport, RecordingSink, str]
) -> None:
    _, sink, address = listener
    reader, writer = await _handshaken(address)
    # A header announcing 8 MiB, 1 MiB of it, then a reset: the receiving thread holds the frame.
    writer.write(struct.pack("!4sQ", b"ACF1", 8 << 20) + KEY + bytes(1 << 20))
    await writer.drain()
    await asyncio.sleep(0.05)
    assert any(n.startswith("aiocoll-tcp-recv-") for n in _lane_threads())
    sock = writer.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    await sink.wait_lost(1, 5.0)
    assert not sink.frames, "half a frame must never be delivered"
    assert isinstance(sink.lost_from(1)[0], TransportError)
    await _assert_still_serving(address, sink)


def test_bulk_bytes_must_be_a_count() -> None:
    with pytest.raises(ValueError, match="bulk_bytes"):
        TcpTransport(_config(0, options={"bulk_bytes": -1}))
