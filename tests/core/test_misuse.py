"""Misuse gets a clear error on the caller, at once, and leaves the group usable.

- a collective called from another event loop than the world's (another thread's, or a second
  ``asyncio.run``): RuntimeError before anything is sent; the sync API's worker threads still work;
- ``timeout=`` that is NaN, infinite, zero or negative, or not a number: ValueError from init,
  every collective and every store;
- ``init`` after ``destroy`` in one process, round after round, with a store served by rank 0,
  a standalone store and a file store;
- the object codec: only its own ValueError subclass, whatever the bytes (fuzzed);
- no secret in a repr; listen backlogs of SOMAXCONN.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import aiocoll
import aiocoll.sync as coll
from aiocoll.collectives import codec as _codec
from aiocoll.collectives.codec import CodecError
from aiocoll.store import MemoryStore, open_store
from aiocoll.store.file import FileStore
from aiocoll.store.tcp import TcpStoreClient, TcpStoreServer
from aiocoll.testing import run_ranks
from aiocoll.transports import TransportConfig, get_transport

from _reference import in_thread

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


# --------------------------------------------------------------------------- another event loop
@pytest.mark.parametrize("transport", ["inproc", "tcp"])
async def test_a_collective_from_another_event_loop_raises_at_once_and_the_group_stays_usable(transport):
    async def body(rank: int) -> list[float]:
        x = np.full(4, rank + 1.0)

        def elsewhere() -> None:
            asyncio.run(aiocoll.all_reduce(x))  # a second loop, in another thread

        for _ in range(3):
            with pytest.raises(RuntimeError, match="another event loop"):
                await in_thread(elsewhere)
        # Nothing was sent and no step was claimed: the world goes on as if nothing happened,
        # and blocking calls from worker threads still run on the world's own loop.
        y = await aiocoll.all_reduce(x)
        coll.bind()
        z = await in_thread(coll.all_reduce, x)
        np.testing.assert_array_equal(y, z)
        await aiocoll.barrier()
        return y.tolist()

    results = await run_ranks(body, 2, transport=transport, timeout=10)
    assert results == [[3.0] * 4, [3.0] * 4]


async def test_every_collective_checks_the_loop_before_it_sends():
    calls = {
        "all_reduce": lambda x: aiocoll.all_reduce(x),
        "all_gather": lambda x: aiocoll.all_gather(x),
        "reduce_scatter": lambda x: aiocoll.reduce_scatter(x),
        "all_to_all": lambda x: aiocoll.all_to_all(x),
        "broadcast": lambda x: aiocoll.broadcast(x, 0),
        "reduce": lambda x: aiocoll.reduce(x, 0),
        "gather": lambda x: aiocoll.gather(x, 0),
        "scatter": lambda x: aiocoll.scatter(x, 0),
        "barrier": lambda x: aiocoll.barrier(),
        "send": lambda x: aiocoll.send(x, 1 - aiocoll.world().rank),
        "recv": lambda x: aiocoll.recv(x, 1 - aiocoll.world().rank),
        "permute": lambda x: aiocoll.permute(x, [1, 0]),
        "all_reduce_coalesced": lambda x: aiocoll.all_reduce_coalesced([x, x]),
        "all_gather_coalesced": lambda x: aiocoll.all_gather_coalesced([x]),
        "reduce_scatter_coalesced": lambda x: aiocoll.reduce_scatter_coalesced([x], "sum"),
        "all_gather_object": lambda x: aiocoll.all_gather_object({"a": 1}),
        "broadcast_object": lambda x: aiocoll.broadcast_object([1, 2], 0),
    }

    async def body(rank: int) -> str:
        x = np.arange(4, dtype=np.float64)
        for name, call in calls.items():
            with pytest.raises(RuntimeError, match="another event loop"):
                await in_thread(lambda: asyncio.run(call(x)))
        y = await aiocoll.all_reduce(x)
        np.testing.assert_array_equal(y, 2 * x)
        return "ok"

    assert await run_ranks(body, 2, transport="tcp", timeout=10) == ["ok", "ok"]


# --------------------------------------------------------------------------- timeouts
# Zero and negative numbers were refused already; these went through (or raised TypeError).
BAD_TIMEOUTS = [math.nan, math.inf, "5", b"5", True, [5]]
BAD_IDS = ["nan", "inf", "str", "bytes", "bool", "list"]


@pytest.mark.parametrize("bad", BAD_TIMEOUTS, ids=BAD_IDS)
async def test_init_refuses_a_bad_timeout(bad):
    try:
        with pytest.raises(ValueError, match="timeout"):
            await aiocoll.init(rank=0, world_size=1, timeout=bad)
        with pytest.raises(aiocoll.NotInitializedError):
            aiocoll.world()
    finally:
        await aiocoll.destroy()  # a world that should not exist must not outlive the test


@pytest.mark.parametrize("raw", ["nan", "inf", "-3", "0"])
async def test_init_refuses_a_bad_aiocoll_timeout_without_a_launcher(raw, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AIOCOLL_TIMEOUT", raw)
    try:
        with pytest.raises(ValueError, match="AIOCOLL_TIMEOUT"):
            await aiocoll.init(rank=0, world_size=1)
    finally:
        await aiocoll.destroy()


@pytest.mark.parametrize("bad", BAD_TIMEOUTS, ids=BAD_IDS)
async def test_every_collective_refuses_a_bad_timeout_on_the_caller_and_sends_nothing(bad):
    calls = {
        "all_reduce": lambda x, t: aiocoll.all_reduce(x, timeout=t),
        "all_gather": lambda x, t: aiocoll.all_gather(x, timeout=t),
        "reduce_scatter": lambda x, t: aiocoll.reduce_scatter(x, timeout=t),
        "all_to_all": lambda x, t: aiocoll.all_to_all(x, timeout=t),
        "broadcast": lambda x, t: aiocoll.broadcast(x, 0, timeout=t),
        "reduce": lambda x, t: aiocoll.reduce(x, 0, timeout=t),
        "gather": lambda x, t: aiocoll.gather(x, 0, timeout=t),
        "scatter": lambda x, t: aiocoll.scatter(x, 0, timeout=t),
        "barrier": lambda x, t: aiocoll.barrier(timeout=t),
        "send": lambda x, t: aiocoll.send(x, 1 - aiocoll.world().rank, timeout=t),
        "recv": lambda x, t: aiocoll.recv(x, 1 - aiocoll.world().rank, timeout=t),
        "permute": lambda x, t: aiocoll.permute(x, [1, 0], timeout=t),
        "all_reduce_coalesced": lambda x, t: aiocoll.all_reduce_coalesced([x], timeout=t),
        "all_gather_coalesced": lambda x, t: aiocoll.all_gather_coalesced([x], timeout=t),
        "reduce_scatter_coalesced": lambda x, t: aiocoll.reduce_scatter_coalesced([x], "sum", timeout=t),
        "all_gather_object": lambda x, t: aiocoll.all_gather_object(1, timeout=t),
        "broadcast_object": lambda x, t: aiocoll.broadcast_object(1, 0, timeout=t),
    }

    async def body(rank: int) -> str:
        x = np.arange(4, dtype=np.float32) + rank
        for name, call in calls.items():
            with pytest.raises(ValueError, match="timeout|seconds"):
                await call(x, bad)
        # Nothing was sent, no step claimed: the next collectives match up as if none happened.
        np.testing.assert_array_equal(await aiocoll.all_reduce(x), 2 * np.arange(4, dtype=np.float32) + 1)
        return "ok"

    assert await run_ranks(body, 2, transport="tcp", timeout=10) == ["ok", "ok"]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, "5", True], ids=["nan", "inf", "negative", "str", "bool"])
async def test_every_store_refuses_a_bad_timeout(bad, tmp_path):
    server = await TcpStoreServer.start("127.0.0.1", 0, b"s")
    client = await TcpStoreClient.connect(*server.address, secret=b"s", timeout=5)
    stores: list[Any] = [MemoryStore(), FileStore(str(tmp_path)), client]
    try:
        for store in stores:
            await store.set("k", b"v")
            with pytest.raises(ValueError, match="timeout"):
                await store.get("k", timeout=bad)
            with pytest.raises(ValueError, match="timeout"):
                await store.wait(["k"], timeout=bad)
            assert await store.get("k", timeout=0) == b"v"  # zero: look once
        with pytest.raises(ValueError, match="timeout"):
            await open_store(f"tcp://127.0.0.1:{server.address[1]}", rank=1, world_size=2, secret=b"s", timeout=bad)
        with pytest.raises(ValueError, match="timeout"):
            await TcpStoreClient.connect(*server.address, secret=b"s", timeout=bad)
    finally:
        await client.aclose()
        await server.aclose()


# --------------------------------------------------------------------------- init after destroy
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rounds(n: int, transport: str, rounds: int, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("AIOCOLL_SECRET", "AIOCOLL_STORE")}
    return subprocess.run(
        [sys.executable, "-m", "aiocoll", "run", "-n", str(n), "--transport", transport, "--timeout", "30",
         str(SCRIPTS / "init_rounds.py"), str(rounds)],
        capture_output=True, text=True, timeout=240, env={**base, **env}, cwd=REPO,
    )


def _assert_rounds(proc: subprocess.CompletedProcess[str], n: int, rounds: int) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in range(n):
        assert f"rank {r} round {rounds - 1} ok" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.parametrize("transport", ["tcp", "auto"])
def test_init_after_destroy_works_round_after_round_with_the_store_rank_0_serves(transport):
    # Rank 0 serves the store afresh every round; a rank done with destroy() used to reach the
    # old one while it closed and failed (2 of 3 runs failed at round 2).
    _assert_rounds(_rounds(3, transport, 6), 3, 6)


def test_init_after_destroy_works_round_after_round_with_a_store_that_outlives_the_worlds(tmp_path):
    # A standalone server keeps every round's keys: each round must not read the last one's.
    secret = "rounds-" + os.urandom(8).hex()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOCOLL_")}
    server = subprocess.Popen(
        [sys.executable, "-m", "aiocoll.store.tcp", "--port", str(port)],
        env={**env, "AIOCOLL_SECRET": secret}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert server.stdout is not None
        assert "listening" in server.stdout.readline()
        store = f"tcp://127.0.0.1:{port}"
        _assert_rounds(_rounds(3, "tcp", 6, AIOCOLL_STORE=store, AIOCOLL_SECRET=secret), 3, 6)
        # the next job through the same store: its ranks' round counters go on from there
        _assert_rounds(_rounds(3, "tcp", 2, AIOCOLL_STORE=store, AIOCOLL_SECRET=secret), 3, 2)
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)


def test_init_after_destroy_works_round_after_round_with_a_file_store(tmp_path):
    _assert_rounds(_rounds(3, "tcp", 6, AIOCOLL_STORE=f"file://{tmp_path}"), 3, 6)


# --------------------------------------------------------------------------- the object codec
_SAMPLES = [
    None, True, -(2**70), 1.5, 2j, "héllo", b"\x00\xff", [1, [2, (3,)]], {"a": 1, 2: [None]},
    np.arange(6, dtype=np.float32).reshape(2, 3), np.float64(3.5), np.array([True, False]),
    np.arange(4, dtype=">i8"), np.zeros((0, 3), np.int16), np.array(5 + 1j, np.complex64),
]
# Pieces that reach deep paths: numpy's dtype mini-language, huge varints, nesting.
_PIECES = [b"i4,(", b"[(", b"O", b"(2,)f4", b"<f4)", b"\xff\xff\xff\xff\x0f", b"\x09" * 8, b"|b1", bytes([10]) + b"<f4"]


def test_the_codec_raises_its_own_error_for_what_numpy_would_parse_as_code():
    array_tag = bytes([12])
    for dtype in [b"i4,(", b"(2,)f4", b"|1)", b"<023", b"[('a','<f4')]", b"O", b"<U4", b"M8[s]"]:
        with pytest.raises(CodecError, match="dtype"):
            _codec.decode(array_tag + bytes([len(dtype)]) + dtype + b"\x01\x01" + bytes(16))


@pytest.mark.parametrize("seed", range(4))
def test_the_codec_raises_only_codec_error_on_fuzzed_bytes(seed):
    rng = random.Random(seed)
    seeds = [_codec.encode(s) for s in _SAMPLES]
    for _ in range(25_000):
        data = bytearray(rng.choice(seeds)) if rng.random() < 0.8 else bytearray(rng.randbytes(rng.randint(0, 40)))
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            if op < 0.4 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif op < 0.6:
                data.insert(rng.randint(0, len(data)), rng.randrange(256))
            elif op < 0.75 and data:
                del data[rng.randrange(len(data))]
            elif op < 0.9:
                at = rng.randint(0, len(data))
                data[at:at] = rng.choice(_PIECES)
            else:
                data += rng.choice(seeds)
        try:
            _codec.decode(bytes(data))
        except CodecError:
            pass  # a ValueError subclass with a message; anything else fails the test


def test_the_codec_round_trips_and_encodes_only_with_its_own_error():
    for s in _SAMPLES:
        got = _codec.decode(_codec.encode(s))
        if isinstance(s, np.ndarray):
            np.testing.assert_array_equal(got, s)
        else:
            assert got == s
    assert issubclass(CodecError, ValueError)

    class Sneaky(int):  # changes the dict being encoded while it is iterated (RuntimeError)
        def __abs__(self) -> int:
            shifty[len(shifty) + 100] = 0
            return int(self)

    shifty = {Sneaky(1): 1, 2: 2}
    for bad in [shifty, object(), np.array(["a"]), [eval("[" * 150 + "]" * 150)]]:
        with pytest.raises(CodecError):
            _codec.encode(bad)


# --------------------------------------------------------------------------- reprs and backlogs
def test_no_repr_shows_the_secret(tmp_path):
    secret = b"hunter2-" + os.urandom(4).hex().encode()
    config = TransportConfig(rank=0, world_size=2, secret=secret)
    assert secret.decode() not in repr(config) and secret.decode() not in str(config)
    from aiocoll.launch.env import read_launch_env

    env = read_launch_env({"RANK": "0", "WORLD_SIZE": "2", "AIOCOLL_SECRET": secret.decode()})
    assert env is not None and secret.decode() not in repr(env)

    async def stores() -> list[str]:
        server = await TcpStoreServer.start("127.0.0.1", 0, secret)
        served = await open_store(f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=2, secret=secret, timeout=5)
        client = await TcpStoreClient.connect(*server.address, secret=secret, timeout=5)
        try:
            return [repr(o) for o in (server, served, client, FileStore(str(tmp_path)))]
        finally:
            await client.aclose()
            await served.aclose()
            await server.aclose()

    for text in asyncio.run(stores()):
        assert secret.decode() not in text


def _backlog(kind: str, needle: str) -> int:
    out = subprocess.run(["ss", "-H", "-n", "-l", kind], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if needle in line:
            return int(line.split()[3 if kind == "-x" else 2])
    raise AssertionError(f"no listening socket {needle} in:\n{out}")


@pytest.mark.skipif(shutil.which("ss") is None, reason="reads listen backlogs with ss (iproute2, in CI images)")
async def test_every_listener_has_a_backlog_of_somaxconn():
    expected = min(socket.SOMAXCONN, int(Path("/proc/sys/net/core/somaxconn").read_text()))

    class Sink:
        def frame_buffer(self, peer: int, key: bytes, nbytes: int) -> memoryview:
            return memoryview(bytearray(nbytes))

        def frame_received(self, peer: int, key: bytes, buffer: memoryview) -> None:
            pass

        def peer_lost(self, peer: int, exc: BaseException | None) -> None:
            pass

    tcp = get_transport("tcp")(TransportConfig(0, 2, secret=b"s"))
    shm = get_transport("shm")(TransportConfig(0, 2, secret=b"s"))
    store = await TcpStoreServer.start("127.0.0.1", 0, b"s")
    try:
        tcp_port = (await tcp.listen(Sink())).rsplit(":", 1)[1]
        shm_name = (await shm.listen(Sink())).split("@", 1)[1]
        assert _backlog("-t", f"127.0.0.1:{tcp_port} ") == expected
        assert _backlog("-t", f"127.0.0.1:{store.address[1]} ") == expected
        assert _backlog("-x", f"@{shm_name} ") == expected
    finally:
        await tcp.aclose()
        await shm.aclose()
        await store.aclose()
