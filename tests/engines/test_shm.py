"""The shm transport: frames intact and in order, close vs crash, authentication, nothing left behind."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import textwrap

import numpy as np
import pytest

import aiocoll
from aiocoll.sharedmem import segment as _shm_segment
from aiocoll.testing import run_ranks
from aiocoll.transports import TransportConfig, get_transport
from aiocoll.transports.shm import ShmTransport, parse_address

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="shm needs Linux")

SECRET = b"test-secret"


class Sink:
    """Records what a transport delivers; hands out fresh memory for every frame."""

    def __init__(self, reject: bool = False) -> None:
        self.frames: list[tuple[int, bytes, bytes]] = []
        self.lost: list[tuple[int, BaseException | None]] = []
        self.reject = reject
        self.changed = asyncio.Event()

    def frame_buffer(self, peer: int, key: bytes, nbytes: int) -> memoryview:
        if self.reject:
            raise ValueError("no thanks")
        return memoryview(bytearray(nbytes))

    def frame_received(self, peer: int, key: bytes, buffer: memoryview) -> None:
        self.frames.append((peer, key, bytes(buffer)))
        self.changed.set()

    def peer_lost(self, peer: int, exc: BaseException | None) -> None:
        self.lost.append((peer, exc))
        self.changed.set()

    async def until(self, cond, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not cond():
                self.changed.clear()
                await self.changed.wait()


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _ours_in_dev_shm(pid: int | None = None) -> list[str]:
    """aiocoll's names in /dev/shm made by ``pid`` (default: this process); other test runs
    on the machine may have their own."""
    pid = os.getpid() if pid is None else pid
    return [n for n in _shm_segment.named_segments() if n.split("-")[2] == str(pid)]


async def _pair(ring_bytes: int = 1 << 16, secret_b: bytes = SECRET, sink_a: Sink | None = None):
    """Rank 0 listens; rank 1 connects to it (one-way: 1 -> 0)."""
    a = ShmTransport(TransportConfig(0, 2, secret=SECRET, timeout=5.0))
    b = ShmTransport(TransportConfig(1, 2, secret=secret_b, timeout=5.0, options={"ring_bytes": ring_bytes}))
    sa = sink_a or Sink()
    address = await a.listen(sa)
    await b.listen(Sink())
    return a, b, sa, address


def _key(i: int) -> bytes:
    return i.to_bytes(4, "little") * 8


async def test_registered_as_shm_and_same_host_only():
    assert get_transport("shm") is ShmTransport
    assert ShmTransport.capabilities.same_host_only
    assert ShmTransport.capabilities.host_memory and not ShmTransport.capabilities.cuda_memory


async def test_frames_of_every_size_arrive_intact_and_in_order():
    a, b, sink, address = await _pair(ring_bytes=1 << 16)
    conn = await b.connect(0, address)
    rng = np.random.default_rng(0)
    # 0 bytes, odd sizes, exactly the ring, several rings (streams through), wrap-arounds.
    sizes = [0, 1, 63, 64, 65, 4097, 1 << 16, (1 << 16) + 1, 5 * (1 << 16) + 3, 1, 2, 3]
    payloads = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    for i, p in enumerate(payloads):
        await conn.send(_key(i), p)
    await sink.until(lambda: len(sink.frames) == len(payloads))
    assert [f[2] for f in sink.frames] == payloads
    assert [f[1] for f in sink.frames] == [_key(i) for i in range(len(payloads))]
    assert all(f[0] == 1 for f in sink.frames)
    await conn.aclose()
    await a.aclose()
    await b.aclose()


async def test_concurrent_sends_arrive_in_the_order_they_started():
    a, b, sink, address = await _pair(ring_bytes=1 << 16)
    conn = await b.connect(0, address)
    payloads = [bytes([i]) * (1000 * (i % 7) + 200_000 * (i % 3)) for i in range(30)]
    await asyncio.gather(*(conn.send(_key(i), p) for i, p in enumerate(payloads)))
    await sink.until(lambda: len(sink.frames) == len(payloads))
    assert [f[1] for f in sink.frames] == [_key(i) for i in range(30)]
    assert [f[2] for f in sink.frames] == payloads
    await a.aclose()
    await b.aclose()


async def test_sends_accept_any_contiguous_buffer():
    a, b, sink, address = await _pair()
    conn = await b.connect(0, address)
    arr = np.arange(1000, dtype=np.float64).reshape(10, 100)
    await conn.send(_key(1), arr)
    await conn.send(_key(2), memoryview(b"abc"))
    await sink.until(lambda: len(sink.frames) == 2)
    assert sink.frames[0][2] == arr.tobytes() and sink.frames[1][2] == b"abc"
    await a.aclose()
    await b.aclose()


async def test_a_passed_descriptor_is_there_before_the_frames_sent_after_it():
    before = _fds()
    a, b, sink, address = await _pair()
    conn = await b.connect(0, address)
    fd = _shm_segment.create_anonymous(4096, "probe")
    for i in range(50):  # each time the reader may be awake or asleep: no descriptor is lost
        os.pwrite(fd, i.to_bytes(4, "little"), 0)
        await b.send_fd(0, fd)
        await conn.send(_key(i), b"after")
        await sink.until(lambda: len(sink.frames) == i + 1)
        (got,) = a.take_fds(lambda peer, f: peer == 1, poll=(1,))
        assert got != fd and os.pread(got, 4, 0) == i.to_bytes(4, "little")
        os.close(got)
    assert a.take_fds(lambda peer, f: True, poll=(1,)) == []
    await b.send_fd(0, fd)  # never claimed: closed with the transport
    os.close(fd)
    await conn.send(_key(99), b"last")
    await sink.until(lambda: len(sink.frames) == 51)
    with pytest.raises(aiocoll.TransportError, match="no shm link to rank 0"):
        await a.send_fd(0, 0)  # a has no link *to* anyone
    await a.aclose()
    await b.aclose()
    assert _fds() == before


async def test_graceful_close_reports_peer_lost_without_error():
    a, b, sink, address = await _pair()
    conn = await b.connect(0, address)
    await conn.send(_key(0), b"last words")
    await conn.aclose()
    await sink.until(lambda: sink.lost)
    assert sink.frames[0][2] == b"last words"  # delivered before the goodbye
    assert sink.lost == [(1, None)]
    await a.aclose()
    await b.aclose()


async def test_abort_reports_peer_lost_with_an_error():
    a, b, sink, address = await _pair()
    await b.connect(0, address)
    b.abort()
    await sink.until(lambda: sink.lost)
    peer, exc = sink.lost[0]
    assert peer == 1 and isinstance(exc, aiocoll.TransportError)
    assert "without goodbye" in str(exc)
    await a.aclose()


async def test_a_rejected_frame_drops_the_link_and_breaks_the_sender():
    sink = Sink(reject=True)
    a, b, _, address = await _pair(sink_a=sink)
    conn = await b.connect(0, address)
    await conn.send(_key(0), b"unwanted")
    await sink.until(lambda: sink.lost)
    assert isinstance(sink.lost[0][1], aiocoll.TransportError) and "no thanks" in str(sink.lost[0][1])
    with pytest.raises(aiocoll.TransportError):
        for _ in range(100):  # the sender learns from the socket closing
            await conn.send(_key(1), b"more")
            await asyncio.sleep(0.01)
    await a.aclose()
    await b.aclose()


async def test_wrong_secret_fails_the_handshake_and_the_listener_survives(caplog):
    a, b, sink, address = await _pair(secret_b=b"wrong")
    with caplog.at_level(logging.WARNING, logger="aiocoll.transports.shm"):
        with pytest.raises(aiocoll.HandshakeError):
            await b.connect(0, address)
        await asyncio.sleep(0.05)
    assert any("dropped an incoming connection" in r.message for r in caplog.records)
    good = ShmTransport(TransportConfig(1, 2, secret=SECRET, timeout=5.0))
    conn = await good.connect(0, address)
    await conn.send(_key(7), b"ok")
    await sink.until(lambda: sink.frames)
    assert sink.frames[0][2] == b"ok"
    for t in (a, b, good):
        await t.aclose()


async def test_connect_to_the_wrong_rank_is_refused():
    a, b, _, address = await _pair()
    with pytest.raises(aiocoll.HandshakeError, match="not rank 5"):
        await b.connect(5, address)
    await a.aclose()
    await b.aclose()


async def test_connect_to_nobody_times_out_with_a_clear_error():
    t = ShmTransport(TransportConfig(1, 2, secret=SECRET, timeout=0.2))
    with pytest.raises(aiocoll.TransportError, match="no rank listening"):
        await t.connect(0, "shm://@aiocoll-shm-nobody-0000")
    with pytest.raises(ValueError, match="not an shm address"):
        await t.connect(0, "tcp://127.0.0.1:1")
    await t.aclose()


def test_address_format():
    assert parse_address("shm://@abc") == "abc"
    for bad in ("shm://abc", "shm://@", "abc"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_ring_capacity_is_checked():
    with pytest.raises(ValueError, match="power of two"):
        ShmTransport(TransportConfig(0, 2, options={"ring_bytes": 100_000}))


async def test_no_descriptor_and_no_dev_shm_file_left_behind():
    before_fds, before_shm = _fds(), _ours_in_dev_shm()
    for _ in range(3):
        a, b, sink, address = await _pair()
        conn = await b.connect(0, address)
        await conn.send(_key(0), bytes(200_000))
        await sink.until(lambda: sink.frames)
        await b.aclose()
        await a.aclose()
    a, b, sink, address = await _pair()
    await b.connect(0, address)
    b.abort()
    a.abort()
    await asyncio.sleep(0.05)
    assert _fds() == before_fds
    assert _ours_in_dev_shm() == before_shm


async def test_collectives_over_shm_without_the_fast_path(monkeypatch):
    # The message path over shm links (all_to_all always takes it; here everything does).
    monkeypatch.setenv("AIOCOLL_SHM_FASTPATH", "off")  # read by each world's init
    if True:

        async def body(rank):
            x = np.arange(100_003, dtype=np.float64) * (rank + 1)
            y = await aiocoll.all_reduce(x)
            z = await aiocoll.all_to_all(np.full((3, 2), rank, np.int32))
            return y, z

        results = await run_ranks(body, 3, transport="shm", secret="s")
        for y, z in results:
            np.testing.assert_array_equal(y, np.arange(100_003, dtype=np.float64) * 6)
            np.testing.assert_array_equal(z[:, 0], [0, 1, 2])


def _conformance_checks() -> list:
    try:
        from aiocoll.testing.conformance import CHECKS
    except ImportError:  # pragma: no cover - the suite ships with aiocoll
        return []
    return list(CHECKS)


def _loops() -> dict:
    loops = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        pass
    else:
        loops["uvloop"] = uvloop.new_event_loop
    return loops


@pytest.mark.parametrize("check", _conformance_checks(), ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("loop", sorted(_loops()))
def test_conforms(loop, check):
    from aiocoll.testing.conformance import TransportSetup

    setup = TransportSetup(ShmTransport, secret=b"conformance-" + os.urandom(8).hex().encode(),
                           options={"ring_bytes": 1 << 16})
    with asyncio.Runner(loop_factory=_loops()[loop]) as runner:
        runner.run(check(setup))


_KILLED_WRITER = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    sys.path.insert(0, {root!r})
    from aiocoll.transports import TransportConfig
    from aiocoll.transports.shm import ShmTransport

    async def main():
        t = ShmTransport(TransportConfig(1, 2, secret={secret!r}, timeout=5.0))
        conn = await t.connect(0, sys.argv[1])
        await conn.send(b"k" * 32, b"before the kill")
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
    """
)


async def test_a_sigkilled_writer_is_reported_as_lost_and_leaves_nothing(tmp_path):
    sink = Sink()
    a = ShmTransport(TransportConfig(0, 2, secret=SECRET, timeout=5.0))
    address = await a.listen(sink)
    script = tmp_path / "writer.py"
    root = os.path.dirname(os.path.dirname(os.path.abspath(aiocoll.__file__)))
    script.write_text(_KILLED_WRITER.format(root=root, secret=SECRET))
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), address)
    assert await proc.wait() == -signal.SIGKILL
    await sink.until(lambda: sink.lost)
    assert sink.frames and sink.frames[0][2] == b"before the kill"
    assert isinstance(sink.lost[0][1], aiocoll.TransportError)
    await a.aclose()
    assert _ours_in_dev_shm(proc.pid) == []


def _litter(job: str, pid: int) -> str:
    """A name as the last resort of create_anonymous leaves when its process dies between
    creating and unlinking it (memfd and O_TMPFILE both refused)."""
    name = f"aiocoll-{job}-{pid}-gdeadbeef-{os.urandom(8).hex()}"
    os.close(os.open(f"/dev/shm/{name}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    return name


def test_named_litter_is_unlinked_by_the_job_cleanup_hook():

    name = _litter("testjob42", 999999999)
    assert name in list(_shm_segment.named_segments("testjob42"))
    _shm_segment.cleanup_job("testjob42")
    assert name not in list(_shm_segment.named_segments())


def test_stale_named_litter_of_dead_creators_is_swept():
    stale = _litter("nojob", 999999999)  # no such pid
    assert stale in list(_shm_segment.named_segments())
    assert stale not in _shm_segment.sweep_stale(min_age_s=3600)  # too young to be litter
    assert stale in _shm_segment.sweep_stale(min_age_s=0)
    assert stale not in list(_shm_segment.named_segments())


def test_anonymous_segments_never_have_a_name(monkeypatch):
    before = set(os.listdir("/dev/shm"))
    fd = _shm_segment.create_anonymous(1 << 16, "probe")
    os.close(fd)
    monkeypatch.delattr(os, "memfd_create")  # the O_TMPFILE fallback
    fd = _shm_segment.create_anonymous(1 << 16, "probe")
    assert os.fstat(fd).st_nlink == 0 and os.fstat(fd).st_size == 1 << 16
    os.close(fd)
    assert set(os.listdir("/dev/shm")) - before == set()
