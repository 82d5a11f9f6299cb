"""The ucx transport's own promises: registration, the wiring (shared memory on one host), who can
get a frame in, frames a sender gave up on, dead peers, idle CPU, and nothing left behind. What
every transport shares is in test_transport_conformance.py.

Runs wherever ucxx is installed (``pip install -e '.[ucx-cu12]'`` or ``[ucx-cu13]``); the tests
of device memory are marked ``gpu`` and run on a CUDA machine with ``pytest -m gpu``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import aiocoll
from aiocoll.core.errors import TransportError
from aiocoll.testing.conformance import RecordingSink
from aiocoll.transports import KEY_SIZE, TransportConfig

HAS_UCXX = importlib.util.find_spec("ucxx") is not None
needs_ucxx = pytest.mark.skipif(
    not HAS_UCXX, reason="ucxx is not installed; runs wherever the ucx-cu12 or ucx-cu13 extra is"
)

TESTS = Path(__file__).resolve().parents[1]
PEER = TESTS / "scripts" / "ucx_peer.py"
HELLO = b"hello".ljust(KEY_SIZE, b".")  # ucx_peer.py's greeting
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(aiocoll.__file__)))
# Shared with the child processes through the environment (see env()).
SECRET = os.environ.get("UCX_TEST_SECRET", "ucx-test-" + os.urandom(8).hex()).encode()


def key(n: int, tag: bytes = b"k") -> bytes:
    return (tag + n.to_bytes(8, "big")).ljust(KEY_SIZE, b".")


def pattern(nbytes: int, seed: int = 0) -> np.ndarray:
    return ((np.arange(nbytes, dtype=np.uint64) + seed) % 251).astype(np.uint8)


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, out.get("PYTHONPATH", "")) if p)
    out["UCX_TEST_SECRET"] = SECRET.decode()
    out.update(extra)
    return out


def ucx() -> Any:
    from aiocoll.transports import ucx as module

    return module


def config(rank: int, world_size: int = 2, **kw: Any) -> TransportConfig:
    kw.setdefault("secret", SECRET)
    kw.setdefault("timeout", 10.0)
    return TransportConfig(rank=rank, world_size=world_size, **kw)


@contextlib.asynccontextmanager
async def pair(sinks: list[Any] | None = None, timeout: float = 10.0) -> AsyncIterator[tuple[list[Any], list[Any], Any]]:
    """Two listening ucx transports in this loop and rank 1's connection to rank 0."""
    sinks = sinks or [RecordingSink(), RecordingSink()]
    transports = [ucx().UcxTransport(config(r, timeout=timeout)) for r in range(2)]
    try:
        addresses = [await t.listen(s) for t, s in zip(transports, sinks)]
        conn = await transports[1].connect(0, addresses[0])
        yield transports, sinks, conn
    finally:
        for t in transports:
            t.abort()


class FakeDevice:
    """Host memory that says it is device memory: on a machine without a GPU, UCX finds the
    pointer is host memory and moves it, so the transport's device-memory path (the array
    interface, frame_device_buffer, the copy of inline payloads) runs for real."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.__cuda_array_interface__ = {
            "shape": array.shape,
            "typestr": array.dtype.str,
            "data": (array.ctypes.data, not array.flags.writeable),
            "strides": array.strides if not array.flags.c_contiguous else None,
            "version": 3,
        }

    def __setitem__(self, index: Any, value: Any) -> None:
        self.array[index] = value


class DeviceSink(RecordingSink):
    """Gives device memory (FakeDevice, or real CUDA memory from ``alloc``) for every frame."""

    def __init__(self, alloc: Any = None) -> None:
        super().__init__()
        self._alloc = alloc or (lambda n: FakeDevice(np.zeros(n, np.uint8)))

    def frame_device_buffer(self, peer: int, key: bytes, nbytes: int) -> Any:
        buffer = self._alloc(nbytes)
        self._pending.append((peer, key, buffer))
        return buffer


# ---------------------------------------------------------------------------- registration


@needs_ucxx
def test_ucx_is_registered_through_the_entry_point() -> None:
    from aiocoll.transports import get_transport

    declared = {ep.name: ep.value for ep in entry_points(group="aiocoll.transports")}
    assert declared.get("ucx") == "aiocoll.transports.ucx:UcxTransport"
    assert get_transport("ucx") is ucx().UcxTransport
    assert ucx().UcxTransport.capabilities.cuda_memory and ucx().UcxTransport.capabilities.host_memory


BLOCK_UCXX = "import sys; sys.modules['ucxx'] = None; "


def test_without_ucxx_choosing_ucx_names_the_extra() -> None:
    code = BLOCK_UCXX + (
        "from aiocoll.transports import get_transport\n"
        "try:\n    get_transport('ucx')\nexcept ImportError as exc:\n    print('ImportError:', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=120)
    assert "ImportError: the ucx transport needs the ucxx package" in out.stdout, out.stdout + out.stderr
    assert "pip install 'aiocoll[ucx-cu12]'" in out.stdout and "'aiocoll[ucx-cu13]'" in out.stdout


def test_without_ucxx_the_listing_says_why() -> None:
    code = BLOCK_UCXX + "import runpy; runpy.run_module('aiocoll.transports', run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=120)
    lines = out.stdout.splitlines()
    (row,) = [i for i, line in enumerate(lines) if line.split()[:1] == ["ucx"]]
    assert lines[row].split()[1] == "unavailable", out.stdout
    assert "aiocoll[ucx-cu12]" in lines[row + 1], out.stdout


# ---------------------------------------------------------------------------- bad input


@needs_ucxx
def test_constructor_refuses_what_it_cannot_honour() -> None:
    import ssl

    with pytest.raises(ValueError, match="shared secret"):
        ucx().UcxTransport(config(0, secret=b""))
    with pytest.raises(ValueError, match="cannot encrypt"):
        ucx().UcxTransport(config(0, ssl_client=ssl.create_default_context()))
    with pytest.raises(ValueError, match="ucx_config"):
        ucx().UcxTransport(config(0, options={"ucx_config": "TLS=tcp"}))
    with pytest.raises(ValueError, match="expected ucx://host:port"):
        ucx().parse_address("tcp://127.0.0.1:5")


@needs_ucxx
async def test_bad_payloads_raise_before_anything_is_sent() -> None:
    async with pair() as (_, sinks, conn):
        with pytest.raises(ValueError, match="key must be"):
            await conn.send(b"short", b"x")
        with pytest.raises(TypeError, match="C-contiguous"):
            await conn.send(key(1), np.arange(10, dtype=np.uint8)[::2])
        with pytest.raises(TypeError, match="C-contiguous"):
            await conn.send(key(1), FakeDevice(np.zeros((4, 4), np.uint8)[:, ::2]))
        await conn.send(key(2), b"still fine")  # nothing above broke the connection
        await sinks[0].wait_frames(1, 10)
        assert [(f.key, bytes(f.data)) for f in sinks[0].frames] == [(key(2), b"still fine")]


# ---------------------------------------------------------------------------- frames


@needs_ucxx
async def test_frames_around_the_inline_limit_arrive_intact() -> None:
    inline = ucx()._INLINE
    sizes = [0, 1, inline - 1, inline, inline + 1, 2 * inline, 1 << 20]
    async with pair() as (_, sinks, conn):
        for i, n in enumerate(sizes):
            await conn.send(key(i), pattern(n, i))
        await sinks[0].wait_frames(len(sizes), 10)
        for i, (n, frame) in enumerate(zip(sizes, sinks[0].frames)):
            assert frame.key == key(i)
            assert np.array_equal(np.frombuffer(frame.data, np.uint8), pattern(n, i)), f"frame of {n} bytes"


@needs_ucxx
async def test_every_frame_sent_before_aclose_arrives_before_the_loss() -> None:
    # The goodbye travels on TCP, the frames on UCX: the receiver must wait for the frames.
    async with pair() as (transports, sinks, conn):
        count = 200
        for i in range(count):
            await conn.send(key(i), pattern(64 + i, i))
        await transports[1].aclose()
        await sinks[0].wait_lost(1, 10)
        assert sinks[0].events == [("frame", 1)] * count + [("lost", 1)]
        assert sinks[0].lost == [(1, None)]
        for i, frame in enumerate(sinks[0].frames):
            assert bytes(frame.data) == pattern(64 + i, i).tobytes()


@needs_ucxx
async def test_device_memory_path_moves_frames_both_ways() -> None:
    # Device-labelled payloads go to UCX as they are, and frame_device_buffer memory is received
    # into; small payloads sent from host memory are copied into it through UCX.
    sizes = [0, 5, 100, ucx()._INLINE, (1 << 20) + 3]
    async with pair(sinks=[DeviceSink(), RecordingSink()]) as (_, sinks, conn):
        for i, n in enumerate(sizes):
            await conn.send(key(i, b"h"), pattern(n, i))  # host -> "device"
            await conn.send(key(i, b"d"), FakeDevice(pattern(n, i + 1)))  # "device" -> "device"
        await sinks[0].wait_frames(2 * len(sizes), 10)
        for i, n in enumerate(sizes):
            for j, tag in enumerate((b"h", b"d")):
                frame = sinks[0].frames[2 * i + j]
                assert frame.key == key(i, tag)
                assert isinstance(frame.data, FakeDevice)
                assert np.array_equal(frame.data.array, pattern(n, i + j)), f"{tag!r} frame of {n} bytes"


@needs_ucxx
async def test_device_conformance_check_passes_with_device_labelled_host_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The check itself, and the transport's device path, on a machine without a GPU; on the GPU
    # machine test_transport_conformance runs it with real CUDA memory.
    from aiocoll.testing import conformance

    fake = conformance.CudaArrays(lambda n: FakeDevice(np.zeros(n, np.uint8)), lambda d: d.array,
                                  lambda data: FakeDevice(data.copy()))
    monkeypatch.setattr(conformance, "cuda_arrays", lambda: fake)
    await conformance.check_device_frames(conformance.TransportSetup(ucx().UcxTransport, secret=SECRET))


@needs_ucxx
async def test_device_frames_are_flagged_so_an_early_one_can_land_in_device_memory() -> None:
    # The receiver learns the sender gave device memory, and asks frame_buffer_from_device.
    class FromDeviceSink(DeviceSink):
        def __init__(self) -> None:
            super().__init__()
            self.asked: list[str] = []

        def frame_device_buffer(self, peer: int, key: bytes, nbytes: int) -> Any:
            self.asked.append("device_buffer")
            return super().frame_device_buffer(peer, key, nbytes)

        def frame_buffer_from_device(self, peer: int, key: bytes, nbytes: int) -> Any:
            self.asked.append("from_device")
            return super().frame_device_buffer(peer, key, nbytes)

    sink = FromDeviceSink()
    async with pair(sinks=[sink, RecordingSink()]) as (_, sinks, conn):
        await conn.send(key(0), FakeDevice(pattern(100_000, 1)))
        await conn.send(key(1), pattern(100_000, 2))
        await sinks[0].wait_frames(2, 10)
    assert sink.asked == ["from_device", "device_buffer"]
    assert np.array_equal(sink.frames[0].data.array, pattern(100_000, 1))


@needs_ucxx
async def test_device_transfers_that_complete_keep_polling_fast() -> None:
    # While device requests are in flight the engine polls every loop turn, and slows down
    # after a while without one finishing. A device receive that stays posted (the next
    # collective's early frame) must not keep it slow while other device transfers complete.
    async with pair(sinks=[DeviceSink(), RecordingSink()]) as (transports, sinks, conn):
        engine = transports[0]._engine
        loop = asyncio.get_running_loop()
        engine.recv(FakeDevice(np.zeros(64, np.uint8)), ucx()._tag(12345, 0), None)  # never matched
        await conn.send(key(0), FakeDevice(pattern(100_000, 1)))
        await sinks[0].wait_frames(1, 10)
        engine._polling_since = marked = loop.time() - 10.0  # as if polling slowly for 10 s
        await conn.send(key(1), FakeDevice(pattern(100_000, 2)))
        await sinks[0].wait_frames(2, 10)
        await asyncio.sleep(0.01)
        assert engine._device_ops >= 1
        assert engine._polling_since is None or engine._polling_since > marked + 5, "polling stayed slow"


@needs_ucxx
async def test_the_engine_copies_host_bytes_into_any_memory() -> None:
    async with pair() as (transports, _, _):
        engine = transports[0]._engine
        dst = np.zeros(3000, np.uint8)
        done: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        engine.copy(FakeDevice(dst), pattern(3000).tobytes(), done.set_result)
        assert await asyncio.wait_for(done, 10) is None
        assert np.array_equal(dst, pattern(3000))


# ---------------------------------------------------------------------------- who gets in


@needs_ucxx
async def test_messages_with_guessed_tags_never_reach_the_sink() -> None:
    # A process that reaches rank 0's UCX worker without passing the handshake: it knows the
    # worker address (here taken from the transport) but not the connection's key.
    async with pair() as (transports, sinks, conn):
        rogue = ucx().UcxTransport(config(1))
        try:
            await rogue.listen(RecordingSink())
            engine = rogue._engine
            ep = engine.endpoint(transports[0]._engine.address)
            header = ucx()._HEADER.pack(ucx()._HEADER_MAGIC, 1, 4) + key(666) + b"evil"
            tags = [*range(64), *(int.from_bytes(os.urandom(8), "little") for _ in range(64)), (1 << 64) - 1]
            for t in tags:
                engine.send(ep, header, ucx()._Tag(t), None)
            await asyncio.sleep(0.3)
            await conn.send(key(1), b"genuine")
            await sinks[0].wait_frames(1, 10)
            await asyncio.sleep(0.1)
            assert [(f.key, bytes(f.data)) for f in sinks[0].frames] == [(key(1), b"genuine")]
            assert not sinks[0].lost
        finally:
            rogue.abort()


# ---------------------------------------------------------------------------- giving up on a frame


@needs_ucxx
async def test_a_payload_whose_sender_gave_up_is_not_delivered(monkeypatch: pytest.MonkeyPatch) -> None:
    # The receiver has read the payload (out of the sender's memory) but not delivered it yet,
    # when the sender gives up on the frame and so may overwrite that memory: the frame must go.
    module = ucx()
    async with pair() as (transports, sinks, conn):
        original = module._Inbound._on_payload

        def sender_gives_up_first(inbound: Any, err: str | None) -> None:
            conn._abort("the test gives up on the frame")
            original(inbound, err)

        monkeypatch.setattr(module._Inbound, "_on_payload", sender_gives_up_first)
        with pytest.raises(TransportError):
            await asyncio.wait_for(conn.send(key(1), pattern(1 << 20)), 10)
        await sinks[0].wait_lost(1, 10)
        assert not sinks[0].frames
        assert isinstance(sinks[0].lost_from(1)[0], TransportError)


def start_peer(role: str, rank: int, rendezvous: Path, seconds: float, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(PEER), role, str(rank), str(rendezvous), str(seconds)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(**extra),
    )


def events(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[list[dict[str, Any]], str]:
    out, err = proc.communicate(timeout=timeout)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")], err


def wait_for_line(proc: subprocess.Popen[str], event: str, timeout: float = 60) -> dict[str, Any]:
    assert proc.stdout is not None
    found: list[dict[str, Any]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{") and json.loads(line)["event"] == event:
                found.append(json.loads(line))
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert found, f"no {event!r} from the peer within {timeout} s"
    return found[0]


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def local_rank(rank: int, rendezvous: Path, sink: Any, timeout: float = 10.0) -> tuple[Any, Any]:
    """This process as ``rank`` of a two-rank world whose other rank is a ucx_peer.py child."""
    transport = ucx().UcxTransport(config(rank, timeout=timeout))
    address = await transport.listen(sink)
    (rendezvous / f"{rank}.tmp").write_text(address)
    (rendezvous / f"{rank}.tmp").rename(rendezvous / str(rank))
    other = rendezvous / str(1 - rank)
    while not other.exists():
        await asyncio.sleep(0.01)
    conn = await transport.connect(1 - rank, other.read_text())
    await conn.send(HELLO, b"")  # ucx_peer.py waits for it before it says it is ready
    await sink.wait_until(lambda: any(f.key == HELLO for f in sink.frames), "the peer's hello", timeout)
    sink.frames[:] = [f for f in sink.frames if f.key != HELLO]
    sink.events.remove(("frame", 1 - rank))
    return transport, conn


@needs_ucxx
async def test_a_cancelled_send_never_delivers_what_its_caller_wrote_afterwards(tmp_path: Path) -> None:
    # The receiver is stopped while rank 1 sends; the send is cancelled and its buffer then
    # overwritten. Resumed, the receiver reads this process's memory through UCX (cma): it must
    # not deliver the overwritten payload.
    receiver = start_peer("sink", 0, tmp_path, 30)
    try:
        transport, conn = await local_rank(1, tmp_path, RecordingSink(), timeout=1.0)
        pid = (await asyncio.to_thread(wait_for_line, receiver, "ready"))["pid"]
        payload = pattern(16 << 20)
        with stopped(pid):
            task = asyncio.create_task(conn.send(key(1), payload))
            await asyncio.sleep(0.3)
            assert not task.done()
            task.cancel()
            started = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await task
            # It waited for the receiver's word, up to the timeout, before letting go.
            assert time.monotonic() - started >= 0.9
            payload.fill(0xEE)
        got, err = await asyncio.to_thread(events, receiver)
        transport.abort()
    finally:
        receiver.kill()
    frames = [e for e in got if e["event"] == "frame"]
    assert all(f["intact"] for f in frames), f"a frame the sender gave up on was delivered: {got}\n{err}"
    assert [e["error"] is not None for e in got if e["event"] == "lost"] == [True], got
    assert receiver.returncode == 0, err


# ---------------------------------------------------------------------------- dead peers


@needs_ucxx
async def test_a_dead_receiver_fails_the_send_instead_of_hanging(tmp_path: Path) -> None:
    receiver = start_peer("sink", 0, tmp_path, 60)
    try:
        sink = RecordingSink()
        transport, conn = await local_rank(1, tmp_path, sink)
        pid = (await asyncio.to_thread(wait_for_line, receiver, "ready"))["pid"]
        os.kill(pid, signal.SIGSTOP)  # the rendezvous of this frame cannot complete
        task = asyncio.create_task(conn.send(key(1), pattern(32 << 20)))
        await asyncio.sleep(0.3)
        assert not task.done()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(TransportError):
            await asyncio.wait_for(task, 10)
        await sink.wait_lost(0, 10)
        assert isinstance(sink.lost_from(0)[0], TransportError)
        await asyncio.wait_for(transport.aclose(), 15)
    finally:
        receiver.kill()
        receiver.communicate()


@needs_ucxx
def test_a_dead_sender_is_reported_and_its_frame_dropped(tmp_path: Path) -> None:
    receiver = start_peer("sink", 0, tmp_path, 60)
    sender = start_peer("send", 1, tmp_path, 32)
    try:
        pid = wait_for_line(receiver, "ready")["pid"]
        wait_for_line(sender, "ready")
        with stopped(pid):
            time.sleep(0.5)  # the sender posts its frame meanwhile
            sender.kill()
            sender.wait(10)
        got, err = events(receiver)
    finally:
        receiver.kill()
        sender.kill()
    assert not [e for e in got if e["event"] == "frame" and not e["intact"]], got
    lost = [e for e in got if e["event"] == "lost"]
    assert len(lost) == 1 and lost[0]["peer"] == 1 and lost[0]["error"], got
    assert receiver.returncode == 0 and got[-1]["event"] == "closed", err


# ---------------------------------------------------------------------------- progress and resources


@needs_ucxx
def test_an_idle_rank_burns_no_cpu(tmp_path: Path) -> None:
    seconds = 10.0
    ranks = [start_peer("idle", r, tmp_path, seconds) for r in range(2)]
    try:
        results = [events(p, timeout=120) for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    for (got, err), proc in zip(results, ranks):
        (idle,) = [e for e in got if e["event"] == "idle"]
        assert proc.returncode == 0, err
        # 1% of one core: event-driven progress wakes only for events (and its rare safety timer).
        assert idle["cpu_s"] < 0.01 * idle["wall_s"], f"an idle rank used {idle['cpu_s']:.3f} s of CPU in {seconds} s"


@needs_ucxx
def test_a_rank_that_never_closes_still_exits(tmp_path: Path) -> None:
    ranks = [start_peer("leave", r, tmp_path, 0) for r in range(2)]
    try:
        results = [events(p, timeout=60) for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    for (got, err), proc in zip(results, ranks):
        assert proc.returncode == 0 and "leaving" in [e["event"] for e in got], err


@needs_ucxx
@pytest.mark.parametrize("role", ["stuck", "abandon"])
def test_a_rank_that_never_closes_exits_with_frames_stuck(tmp_path: Path, role: str) -> None:
    # Its peer is stopped, so a large frame can never complete: leaving the event loop (with its
    # tasks cancelled, or simply abandoned) must still end the process, not wait on UCX forever.
    receiver = start_peer("sink", 0, tmp_path, 120)
    leaver = start_peer(role, 1, tmp_path, 0, UCX_TEST_TIMEOUT="3")
    try:
        pid = wait_for_line(receiver, "ready")["pid"]
        wait_for_line(leaver, "ready")
        with stopped(pid):
            started = time.monotonic()
            got, err = events(leaver, timeout=60)
            took = time.monotonic() - started
    finally:
        leaver.kill()
        receiver.kill()
        receiver.communicate()
    assert leaver.returncode == 0 and "leaving" in [e["event"] for e in got], err
    assert took < 30, f"exit took {took:.1f} s"


def open_fds() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            found.add(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
    return found


def shared_mappings() -> list[str]:
    """Shared-memory segments mapped into this process (UCX's sysv/posix fifos among them):
    a worker that was never destroyed keeps its own mapped."""
    with open("/proc/self/maps") as maps:
        lines = [line.split(maxsplit=5) for line in maps]
    return sorted(f[5].strip() for f in lines if len(f) == 6 and ("SYSV" in f[5] or "/dev/shm" in f[5] or "memfd" in f[5]))


@needs_ucxx
async def test_nothing_outlives_aclose_or_abort() -> None:
    async def cycle(close: str) -> None:
        async with pair() as (transports, sinks, conn):
            back = await transports[0].connect(1, transports[1].address)
            sends = [conn.send(key(i), pattern(n)) for i, n in enumerate((10, 100_000, 3 << 20))]
            await asyncio.gather(*sends, back.send(key(9), b"back"))
            await sinks[0].wait_frames(3, 10)
            if close == "aclose":
                for t in transports:
                    await t.aclose()
            else:
                for t in transports:
                    t.abort()

    await cycle("aclose")  # UCX loads its transports once per process: not a leak
    gc.collect()
    before, threads, mapped = open_fds(), threading.active_count(), shared_mappings()
    for _ in range(3):
        for close in ("aclose", "abort"):
            await cycle(close)
    await asyncio.sleep(0.1)
    gc.collect()
    assert open_fds() - before == set()
    assert threading.active_count() == threads
    assert shared_mappings() == mapped


# ---------------------------------------------------------------------------- under the collectives


@needs_ucxx
def test_every_collective_is_right_over_ucx_between_processes() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "aiocoll", "run", "-n", "3", "--transport", "ucx", "--timeout", "60",
         str(TESTS / "scripts" / "check_collectives.py")],
        capture_output=True, text=True, timeout=600, env=env(PYTHONPATH=os.pathsep.join((ROOT, str(TESTS)))),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in range(3):
        assert f"[{r}] rank {r} ok" in proc.stdout


# ---------------------------------------------------------------------------- one host, shared memory


LANES_SCRIPT = """
import asyncio, numpy as np
from aiocoll.testing.conformance import RecordingSink
from aiocoll.transports import TransportConfig
from aiocoll.transports.ucx import UcxTransport

async def main():
    ts = [UcxTransport(TransportConfig(rank=r, world_size=2, secret=b"s")) for r in range(2)]
    sinks = [RecordingSink() for _ in ts]
    addresses = [await t.listen(s) for t, s in zip(ts, sinks)]
    conn = await ts[1].connect(0, addresses[0])
    await conn.send(b"k" * 32, np.ones(1 << 20, np.uint8))
    await sinks[0].wait_frames(1, 10)
    for t in ts:
        await t.aclose()
    print("moved")

asyncio.run(main())
"""


@needs_ucxx
def test_ranks_of_one_host_use_shared_memory_not_tcp() -> None:
    # Endpoints with UCX error handling would be refused sysv/posix/cma and fall back to TCP.
    out = subprocess.run([sys.executable, "-c", LANES_SCRIPT], capture_output=True, text=True, timeout=120,
                         env=env(UCX_PROTO_INFO="y"))
    text = out.stdout + out.stderr
    assert "moved" in out.stdout, text
    rows = [line for line in text.splitlines() if "eager" in line or "rendezvous" in line]
    assert rows, text
    assert all(("sysv/" in r or "posix/" in r or "cma/" in r) for r in rows), "\n".join(rows)
    assert not any("tcp/" in r for r in rows), "\n".join(rows)


# ---------------------------------------------------------------------------- CUDA


def cuda_alloc() -> Any:
    """A function giving device memory of n bytes, from torch or CuPy, or None without a GPU."""
    try:
        import torch

        if torch.cuda.is_available():
            return lambda n: torch.zeros(n, dtype=torch.uint8, device="cuda")
    except ImportError:
        pass
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return lambda n: cupy.zeros(n, dtype=cupy.uint8)
    except Exception:
        pass
    return None


def to_host(buffer: Any) -> np.ndarray:
    if hasattr(buffer, "cpu"):
        return buffer.cpu().numpy()
    if hasattr(buffer, "get"):
        return buffer.get()
    return np.frombuffer(buffer, np.uint8)


def device(alloc: Any, data: np.ndarray) -> Any:
    buffer = alloc(data.size)
    if hasattr(buffer, "copy_"):
        import torch

        buffer.copy_(torch.from_numpy(data))
        torch.cuda.synchronize()
    else:
        import cupy

        buffer.set(data)
        cupy.cuda.runtime.deviceSynchronize()
    return buffer


@pytest.mark.gpu
@needs_ucxx
async def test_cuda_frames_move_device_to_device_and_across_memory_kinds() -> None:
    alloc = cuda_alloc()
    if alloc is None:
        pytest.skip("no CUDA device (torch or CuPy with a GPU); runs on the GPU machine with pytest -m gpu")
    sizes = [8, 4096, 1 << 20, 64 << 20]
    async with pair(sinks=[DeviceSink(alloc), RecordingSink()]) as (_, sinks, conn):
        for i, n in enumerate(sizes):
            await conn.send(key(i, b"d"), device(alloc, pattern(n, i)))  # device -> device
            await conn.send(key(i, b"h"), pattern(n, i + 1))  # host -> device
        await sinks[0].wait_frames(2 * len(sizes), 60)
        for i, n in enumerate(sizes):
            for j, tag in enumerate((b"d", b"h")):
                frame = sinks[0].frames[2 * i + j]
                assert frame.key == key(i, tag)
                assert np.array_equal(to_host(frame.data), pattern(n, i + j)), f"{tag!r} frame of {n} bytes"


@pytest.mark.gpu
@needs_ucxx
async def test_cuda_payload_into_host_memory() -> None:
    alloc = cuda_alloc()
    if alloc is None:
        pytest.skip("no CUDA device (torch or CuPy with a GPU); runs on the GPU machine with pytest -m gpu")
    async with pair() as (_, sinks, conn):
        for i, n in enumerate((8, 1 << 20)):
            await conn.send(key(i), device(alloc, pattern(n, i)))
        await sinks[0].wait_frames(2, 60)
        for i, (n, frame) in enumerate(zip((8, 1 << 20), sinks[0].frames)):
            assert np.array_equal(np.frombuffer(frame.data, np.uint8), pattern(n, i))


CUDA_LANES_SCRIPT = """
import asyncio, os, sys, numpy as np
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_ucx_transport import DeviceSink, cuda_alloc, device, key, local_rank, pattern, to_host

async def main(rank, rendezvous):
    alloc = cuda_alloc()
    sink = DeviceSink(alloc)
    transport, conn = await local_rank(rank, rendezvous, sink, timeout=60)
    if rank == 1:
        await conn.send(key(1), device(alloc, pattern(64 << 20)))
    else:
        await sink.wait_frames(1, 60)
        assert np.array_equal(to_host(sink.frames[0].data), pattern(64 << 20))
        print("moved")
    await asyncio.sleep(1)
    await transport.aclose()

asyncio.run(main(int(sys.argv[1]), Path(sys.argv[2])))
"""


@pytest.mark.gpu
@needs_ucxx
def test_cuda_frames_between_processes_use_cuda_ipc(tmp_path: Path) -> None:
    # GPU-direct: UCX's protocol for device memory between two processes on one GPU is cuda_ipc,
    # nothing staged through host memory.
    if cuda_alloc() is None:
        pytest.skip("no CUDA device (torch or CuPy with a GPU); runs on the GPU machine with pytest -m gpu")
    script = CUDA_LANES_SCRIPT.format(tests=str(TESTS))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env(UCX_PROTO_INFO="y")) for r in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    assert "moved" in outs[0]
    rows = [line for out in outs for line in out.splitlines() if "cuda memory" in line or "cuda_ipc" in line]
    assert any("cuda_ipc" in line for line in rows), "\n".join(outs)
