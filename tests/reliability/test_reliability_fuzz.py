"""Bad bytes, from the same machine over loopback only: random and truncated handshakes to the
tcp listener, the shm listener and the store, and (knowing the secret, so past the handshake)
random and truncated frames and requests.

For every bad connection: the server drops it (we read end-of-file, promptly), logs why, and
keeps serving a legitimate peer afterwards; memory stays flat, in particular a header that
claims a huge payload costs nothing until the payload comes. Seeded, so a failure replays.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import struct

import numpy as np
import pytest

from aiocoll.core import auth as _auth
from aiocoll.core.comm import Communicator
from aiocoll.store.tcp import REQUEST, TcpStoreClient, TcpStoreServer
from aiocoll.core.wire import FLAG_CONTROL, FrameKey, Kind
from aiocoll.transports import MAX_FRAME, TransportConfig, get_transport

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc (Linux)")

SECRET = b"fuzz-secret"
SEED = int(os.environ.get("AIOCOLL_FUZZ_SEED", "20240607"))
ROUNDS = int(os.environ.get("AIOCOLL_FUZZ_ROUNDS", "60"))
HANDSHAKE_TIMEOUT = 1.5
WORLD = 3


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _hello(purpose: bytes, hello: bytes, nonce: bytes | None = None) -> bytes:
    return _auth.MAGIC + bytes([len(purpose)]) + purpose + (nonce or os.urandom(32)) + struct.pack("!H", len(hello)) + hello


def _handshake_garbage(rng: random.Random, purpose: bytes, hello: bytes) -> list[bytes]:
    """Random bytes, every truncation of a valid opening, and openings that lie about sizes."""
    valid = _hello(purpose, hello)
    cases = [rng.randbytes(rng.randrange(0, 400)) for _ in range(ROUNDS)]
    cases += [valid[:cut] for cut in range(0, len(valid))]
    cases += [
        _auth.MAGIC + b"\xff" + rng.randbytes(300),  # purpose of 255 bytes: not ours
        _auth.MAGIC + bytes([len(purpose)]) + purpose + os.urandom(32) + b"\xff\xff" + rng.randbytes(100),  # hello > MAX
        _hello(b"nope", hello),
        _hello(purpose, rng.randbytes(rng.randrange(0, 64))),  # a hello the listener cannot parse (or a rank it refuses)
        b"\x16\x03\x01\x02\x00" + rng.randbytes(200),  # a TLS ClientHello to a plaintext listener
    ]
    return cases


class _Conn:
    """A loopback client that sends bytes and waits to be dropped."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def tcp(cls, host: str, port: int) -> _Conn:
        return cls(*await asyncio.open_connection(host, port))

    @classmethod
    async def unix(cls, name: str) -> _Conn:
        return cls(*await asyncio.open_unix_connection("\0" + name))

    async def send(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError):
            pass  # dropped while we were still talking: a refusal too

    async def dropped(self, timeout: float) -> bool:
        """True once the server closes on us (after it read what it wanted)."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
            return True
        except (ConnectionError, OSError):
            return True
        except TimeoutError:
            return False
        finally:
            self.writer.transport.abort()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("aiocoll")]


@pytest.fixture
async def target():
    """Rank 0 of a world of 3: a communicator behind tcp and shm listeners, and the store."""
    comm = Communicator(0, WORLD, max_unexpected=256 << 20)
    config = TransportConfig(rank=0, world_size=WORLD, secret=SECRET, timeout=HANDSHAKE_TIMEOUT)
    tcp = get_transport("tcp")(config)
    shm = get_transport("shm")(config)
    comm.transports += [tcp, shm]
    tcp_addr = await tcp.listen(comm)
    shm_addr = await shm.listen(comm)
    store = await TcpStoreServer.start("127.0.0.1", 0, SECRET, handshake_timeout=HANDSHAKE_TIMEOUT)
    host, port = tcp_addr[len("tcp://"):].rsplit(":", 1)
    yield {"comm": comm, "tcp": (host, int(port)), "shm": shm_addr[len("shm://@"):], "store": store.address,
           "tcp_t": tcp, "shm_t": shm}
    await store.aclose()
    comm.abort()


async def _legit_frame_arrives(target: dict, peer: int = 2) -> None:
    """A real rank still gets through: authenticated, and its frame reaches the communicator."""
    comm: Communicator = target["comm"]
    t = get_transport("tcp")(TransportConfig(rank=peer, world_size=WORLD, secret=SECRET, timeout=5))
    try:
        conn = await t.connect(0, "tcp://%s:%d" % target["tcp"])
        key = FrameKey(77, 1, 0, Kind.ALL_REDUCE, 1, 5, 0, 4)
        fut = comm.post_recv(peer, key, memoryview(bytearray(32)), None)
        await conn.send(key.pack(), np.arange(4, dtype=np.int64))
        async with asyncio.timeout(5):
            await fut
    finally:
        await t.aclose()


async def test_random_and_truncated_handshakes_to_the_tcp_listener(target, caplog):
    rng = random.Random(SEED)
    caplog.set_level(logging.WARNING)
    cases = _handshake_garbage(rng, b"tcp", struct.pack("!II", 1, WORLD))
    before = len(_warnings(caplog))
    for data in cases:
        c = await _Conn.tcp(*target["tcp"])
        await c.send(data)
        c.writer.write_eof()
        assert await c.dropped(HANDSHAKE_TIMEOUT + 2), f"not dropped after {data[:40]!r}"
    await asyncio.sleep(0.1)
    logged = _warnings(caplog)[before:]
    assert len([m for m in logged if "dropped a connection from" in m]) >= len(cases), logged[-5:]
    await _legit_frame_arrives(target)


async def test_a_silent_or_slow_client_is_dropped_at_the_handshake_timeout(target, caplog):
    caplog.set_level(logging.WARNING)
    conns = [await _Conn.tcp(*target["tcp"]) for _ in range(5)]
    conns += [await _Conn.tcp(*target["store"]) for _ in range(5)]
    conns += [await _Conn.unix(target["shm"]) for _ in range(5)]
    for c in conns[::2]:
        await c.send(_auth.MAGIC[:3])  # a few bytes, then nothing
    results = await asyncio.gather(*(c.dropped(HANDSHAKE_TIMEOUT + 3) for c in conns))
    assert all(results), results
    assert sum("timed out" in m for m in _warnings(caplog)) >= len(conns), _warnings(caplog)


async def test_random_and_truncated_handshakes_to_the_store(target, caplog):
    rng = random.Random(SEED + 1)
    caplog.set_level(logging.WARNING)
    cases = _handshake_garbage(rng, b"store", b"")
    before = len(_warnings(caplog))
    for data in cases:
        c = await _Conn.tcp(*target["store"])
        await c.send(data)
        c.writer.write_eof()
        assert await c.dropped(HANDSHAKE_TIMEOUT + 2), f"not dropped after {data[:40]!r}"
    await asyncio.sleep(0.1)
    logged = _warnings(caplog)[before:]
    assert len([m for m in logged if "refused connection from" in m]) >= len(cases), logged[-5:]
    client = await TcpStoreClient.connect(*target["store"], secret=SECRET, timeout=5)
    try:
        await client.set("still", b"serving")
        assert await client.get("still", timeout=2) == b"serving"
    finally:
        await client.aclose()


async def test_random_and_truncated_handshakes_to_the_shm_listener(target, caplog):
    rng = random.Random(SEED + 2)
    caplog.set_level(logging.WARNING)
    cases = _handshake_garbage(rng, b"shm", struct.pack("!II", 1, WORLD))
    before = len(_warnings(caplog))
    for data in cases:
        c = await _Conn.unix(target["shm"])
        await c.send(data)
        c.writer.write_eof()
        assert await c.dropped(HANDSHAKE_TIMEOUT + 2), f"not dropped after {data[:40]!r}"
    await asyncio.sleep(0.1)
    logged = _warnings(caplog)[before:]
    assert len([m for m in logged if "dropped an incoming connection" in m]) >= len(cases), logged[-5:]
    # a legitimate rank still gets a ring
    t = get_transport("shm")(TransportConfig(rank=1, world_size=WORLD, secret=SECRET, timeout=5))
    try:
        conn = await t.connect(0, "shm://@" + target["shm"])
        key = FrameKey(78, 1, 0, Kind.ALL_REDUCE, 1, 5, 0, 4)
        fut = target["comm"].post_recv(1, key, memoryview(bytearray(32)), None)
        await conn.send(key.pack(), np.arange(4, dtype=np.int64))
        async with asyncio.timeout(5):
            await fut
    finally:
        await t.aclose()


def _bad_frames(rng: random.Random) -> list[tuple[str, bytes]]:
    """Byte streams an authenticated peer might send; each ends the connection (or leaves junk
    that the communicator must shrug off)."""
    out: list[tuple[str, bytes]] = []

    def frame(key: bytes, payload: bytes, nbytes: int | None = None) -> bytes:
        return b"ACF1" + struct.pack("!Q", len(payload) if nbytes is None else nbytes) + key + payload

    def key(**kw: int) -> bytes:
        f = dict(gid=rng.getrandbits(64), seq=rng.getrandbits(64), step=rng.getrandbits(32), kind=rng.getrandbits(8),
                 op=rng.getrandbits(8), dtype=rng.getrandbits(8), flags=rng.getrandbits(8), count=rng.getrandbits(64))
        f.update(kw)
        return FrameKey(**f).pack()

    for _ in range(ROUNDS):
        out.append(("random bytes", rng.randbytes(rng.randrange(1, 600))))
        out.append(("random header", b"ACF1" + rng.randbytes(8 + 32) + rng.randbytes(rng.randrange(0, 100))))
        out.append(("huge claim, no payload", frame(key(flags=0), b"", nbytes=rng.randrange(1 << 30, 1 << 64))))
        good = frame(key(flags=0), rng.randbytes(rng.randrange(0, 3000)))
        out.append(("truncated frame", good[: rng.randrange(1, len(good))]))
    out += [
        ("over MAX_FRAME", frame(key(flags=0), b"", nbytes=MAX_FRAME + 1)),
        ("2 GiB claim, 1 KiB payload", frame(key(flags=0), b"x" * 1024, nbytes=2 << 30)),
        ("200 MiB claim (within the bound), 1 KiB payload", frame(key(flags=0), b"x" * 1024, nbytes=200 << 20)),
        ("200 MiB claim, no payload", frame(key(flags=0), b"", nbytes=200 << 20)),
        ("over the unexpected-bytes bound", frame(key(flags=0), b"", nbytes=300 << 20)),
        ("control frame over 64 KiB", frame(key(flags=FLAG_CONTROL, kind=Kind.ABORT), b"{" * (70 << 10))),
        ("data after goodbye", b"ACG1" + bytes(8) + bytes(32) + frame(key(flags=0), b"late")),
    ]
    for kind in (Kind.ABORT, Kind.LOST, Kind.WAITING, 99):
        for body in (b"", b"not json", b"[1,2]", b'{"code": 5}', json.dumps({"lost": 10**30, "reason": 1}).encode(),
                     json.dumps({"origin": "x", "message": [], "ranks": "abc"}).encode(), rng.randbytes(200)):
            out.append((f"malformed control {kind}", frame(key(flags=FLAG_CONTROL, kind=kind, gid=5, seq=0), body)))
    return out


async def test_random_and_truncated_frames_after_the_handshake(target, caplog):
    """What a peer that knows the secret but not the protocol sends. Nothing it claims is
    allocated up front, each bad stream is dropped with a logged reason, junk control frames are
    logged and ignored, and a real rank is served afterwards."""
    rng = random.Random(SEED + 3)
    caplog.set_level(logging.INFO, logger="aiocoll")
    comm: Communicator = target["comm"]
    start_rss = _rss_mib()
    peak = start_rss
    cases = _bad_frames(rng)
    not_dropped = []
    for what, data in cases:
        r, w = await asyncio.open_connection(*target["tcp"])
        await _auth.initiate(r, w, SECRET, b"tcp", struct.pack("!II", 1, WORLD), 5)
        c = _Conn(r, w)
        await c.send(data)
        if "claim" in what:
            await asyncio.sleep(0.02)  # the listener has read the header and holds the frame open
            peak = max(peak, _rss_mib())
        c.writer.write_eof()  # EOF at once: a frame cut short, or a close without goodbye
        if not await c.dropped(5):
            not_dropped.append(what)
        peak = max(peak, _rss_mib())
    assert not not_dropped, not_dropped
    await asyncio.sleep(0.2)
    assert peak - start_rss < 64, f"RSS went from {start_rss:.0f} MiB to {peak:.0f} MiB"
    # every connection's end was reported with a reason, and format violations were logged as such
    messages = [r.getMessage() for r in caplog.records]
    assert sum("lost rank 1" in m for m in messages) >= len(cases), [m for m in messages if "rank 1" in m][-5:]
    for reason in ("bad frame magic", "more than MAX_FRAME", "data after goodbye", "in the middle of a frame",
                   "limit for unexpected frames", "control frame of"):
        assert any(reason in m for m in messages), f"nothing logged about {reason!r}"
    assert any("malformed" in m or "unknown control frame" in m for m in messages)
    # junk is refused by checks, never by an exception escaping the communicator
    assert not any("sink failed" in m for m in messages), [m for m in messages if "sink failed" in m][:3]
    # junk held for receives nobody posted is bounded by max_unexpected, and goes with the group
    assert comm._unexpected_bytes <= 256 << 20
    await _legit_frame_arrives(target)


async def test_random_and_truncated_store_requests_after_the_handshake(target, caplog):
    rng = random.Random(SEED + 4)
    caplog.set_level(logging.WARNING)
    start_rss = _rss_mib()
    peak = start_rss
    host, port = target["store"]
    sent = 0
    for i in range(ROUNDS * 3):
        r, w = await asyncio.open_connection(host, port)
        await _auth.initiate(r, w, SECRET, b"store", b"", 5)
        op = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 200])
        key_len = rng.choice([0, 1, 20, 4096, 4097, 65535])
        body_len = rng.choice([0, 8, 1 << 20, (64 << 20) + 1, (1 << 32) - 1])
        header = REQUEST.pack(op, rng.getrandbits(32), key_len, body_len, rng.getrandbits(63) - (1 << 62))
        data = header + rng.randbytes(rng.randrange(0, 200))
        if i % 3 == 0:
            data = data[: rng.randrange(1, len(data))]
        c = _Conn(r, w)
        await c.send(data)
        c.writer.write_eof()
        assert await c.dropped(5), f"store kept a client that sent {data[:32]!r}"
        sent += 1
        peak = max(peak, _rss_mib())
    assert peak - start_rss < 64, f"RSS went from {start_rss:.0f} MiB to {peak:.0f} MiB"
    assert len([m for m in _warnings(caplog) if "store" in m]) >= sent // 2, _warnings(caplog)[-5:]
    client = await TcpStoreClient.connect(host, port, secret=SECRET, timeout=5)
    try:
        await client.set("after-fuzz", b"ok")
        assert await client.get("after-fuzz", timeout=2) == b"ok"
    finally:
        await client.aclose()

