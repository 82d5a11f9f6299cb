"""Meeting the other ranks: a foreign protocol on the store's port fails fast with a hint, the
join timeout is apart from the collective timeout, file stores are per job, torch's store
(as torchrun serves it) carries the rendezvous and the secret."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest

import aiocoll
from aiocoll.core.errors import StoreError
from aiocoll.core.world import current_world, in_harness
from aiocoll.store.file import STALE_AFTER_S, job_directory, open_job_store

SECRET = "launch-store-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Foreign:
    """A server of another protocol: silent (waits for its own request, as torch's TCPStore
    does) or chatty (answers with bytes of its own)."""

    def __init__(self, chatty: bool) -> None:
        self.chatty = chatty
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        if self.chatty:
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" + b"x" * 200)
        while await reader.read(1 << 16):  # until the client goes: never a reply it understands
            pass
        writer.transport.abort()

    async def __aenter__(self) -> _Foreign:
        self.writers: set[asyncio.StreamWriter] = set()
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        await self.server.wait_closed()


@pytest.mark.parametrize("chatty", [False, True], ids=["silent", "chatty"])
@pytest.mark.parametrize("rank", [0, 1])
async def test_a_port_speaking_another_protocol_fails_within_2_s_with_a_hint(rank: int, chatty: bool) -> None:
    async with _Foreign(chatty) as foreign:
        started = time.monotonic()
        with pytest.raises(StoreError) as info:
            # Rank 0 finds the port taken and connects as a client, as every other rank does.
            await aiocoll.init(rank=rank, world_size=2, store=f"tcp://127.0.0.1:{foreign.port}",
                               transport="tcp", secret=SECRET, timeout=60, join_timeout=60)
        elapsed = time.monotonic() - started
    assert elapsed < 2.0, elapsed
    assert "AIOCOLL_STORE" in str(info.value), str(info.value)
    with pytest.raises(aiocoll.NotInitializedError):
        aiocoll.world()


async def test_torchs_own_store_on_the_port_fails_within_2_s_naming_it() -> None:
    dist = pytest.importorskip("torch.distributed")
    server = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)
    started = time.monotonic()
    with pytest.raises(StoreError, match="TCPStore"):
        await aiocoll.init(rank=1, world_size=2, store=f"tcp://127.0.0.1:{server.port}", transport="tcp",
                           secret=SECRET, timeout=60, join_timeout=60)
    assert time.monotonic() - started < 2.0
    del server


async def test_the_join_timeout_bounds_meeting_and_nothing_else(monkeypatch) -> None:
    url = f"tcp://127.0.0.1:{_free_port()}"
    # Meeting: a rank alone gives up after the join timeout, not the (long) collective one.
    started = time.monotonic()
    with pytest.raises(StoreError):
        await aiocoll.init(rank=0, world_size=2, store=url, transport="tcp", secret=SECRET, timeout=120,
                           join_timeout=0.5)
    assert time.monotonic() - started < 5
    monkeypatch.setenv("AIOCOLL_JOIN_TIMEOUT", "0.5")
    started = time.monotonic()
    with pytest.raises(StoreError):
        await aiocoll.init(rank=1, world_size=2, store=url, transport="tcp", secret=SECRET, timeout=120)
    assert time.monotonic() - started < 5
    monkeypatch.delenv("AIOCOLL_JOIN_TIMEOUT")

    # A short collective timeout does not hurry the meeting: rank 1 comes 2.5 s late, five
    # times the world's collective timeout.
    url = f"tcp://127.0.0.1:{_free_port()}"

    async def rank(r: int) -> tuple[float, np.ndarray]:
        in_harness.set(True)
        if r == 1:
            await asyncio.sleep(2.5)
        async with aiocoll.init(rank=r, world_size=2, store=url, transport="tcp", secret=SECRET, timeout=0.5,
                                join_timeout=60):
            # The collective gets a wide timeout of its own: only the meeting is under test.
            return current_world().timeout, await aiocoll.all_reduce(np.arange(4.0) + r, timeout=60)

    results = await asyncio.wait_for(asyncio.gather(rank(0), rank(1)), 90)
    for timeout, total in results:
        assert timeout == 0.5
        np.testing.assert_array_equal(total, 2 * np.arange(4.0) + 1)


async def test_a_reused_file_store_directory_does_not_break_the_next_job(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("AIOCOLL_JOIN_TIMEOUT", "1")
    url = f"file://{tmp_path}"
    # Job A: rank 0 starts, rank 1 never comes (a crash, a cancelled allocation).
    monkeypatch.setenv("AIOCOLL_JOB_ID", "job-a")
    with pytest.raises(StoreError):
        await aiocoll.init(rank=0, world_size=2, store=url, transport="tcp", secret=SECRET, timeout=1)

    # Job B in the same directory: both ranks meet and compute.
    monkeypatch.setenv("AIOCOLL_JOB_ID", "job-b")
    monkeypatch.setenv("AIOCOLL_JOIN_TIMEOUT", "30")
    rng = np.random.default_rng()
    data = [rng.integers(-1000, 1000, 17) for _ in range(2)]

    async def rank(r: int) -> np.ndarray:
        in_harness.set(True)
        async with aiocoll.init(rank=r, world_size=2, store=url, transport="tcp", secret=SECRET, timeout=30):
            return await aiocoll.all_reduce(data[r])

    for total in await asyncio.wait_for(asyncio.gather(rank(0), rank(1)), 60):
        np.testing.assert_array_equal(total, data[0] + data[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [job_directory(tmp_path, "aiocoll-job-a").name, job_directory(tmp_path, "aiocoll-job-b").name]
    )


async def test_stale_job_directories_and_temporary_files_are_removed(tmp_path) -> None:
    old = time.time() - STALE_AFTER_S - 60
    stale = job_directory(tmp_path, "gone")
    stale.mkdir()
    (stale / "k-x").write_bytes(b"1")
    (tmp_path / "t-dead.tmp").write_bytes(b"half")
    fresh = job_directory(tmp_path, "running")
    fresh.mkdir()
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("mine")
    for p in (stale, tmp_path / "t-dead.tmp", unrelated):
        os.utime(p, (old, old))
    store = await open_job_store(tmp_path, "new")
    await store.set("k", b"v")
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {fresh.name, unrelated.name, job_directory(tmp_path, "new").name}
    assert (Path(store.path).stat().st_mode & 0o777) == 0o700
    await store.aclose()


async def test_torchs_store_carries_the_rendezvous_and_the_secret_under_torchrun() -> None:
    """What torchrun gives each worker: torch's TCPStore, served by its agent, on MASTER_PORT."""
    dist = pytest.importorskip("torch.distributed")
    from aiocoll.launch.env import read_launch_env
    from aiocoll.launch.rendezvous import launcher_store

    agent = dist.TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False)
    rng = np.random.default_rng()
    data = [rng.standard_normal(9) for _ in range(2)]

    async def rank(r: int) -> tuple[bytes, np.ndarray]:
        in_harness.set(True)
        environ = {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(agent.port), "TORCHELASTIC_RUN_ID": "t1",
                   "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0"}
        env = read_launch_env(environ)
        assert env is not None and env.torch_store
        met = await launcher_store(env, rank=r, world_size=2, secret=b"", join_timeout=30, environ=environ)
        assert met.secret and met.route_to == "127.0.0.1"
        async with aiocoll.init(rank=r, world_size=2, store=met.store, secret=met.secret, transport="tcp",
                                timeout=30):
            return met.secret, await aiocoll.all_reduce(data[r])

    results = await asyncio.wait_for(asyncio.gather(rank(0), rank(1)), 90)
    assert results[0][0] == results[1][0]  # one secret, drawn by rank 0, read by rank 1
    for _, total in results:
        np.testing.assert_allclose(total, data[0] + data[1])
    # The keys live under aiocoll/<restart>/ in torch's store, next to whatever torch keeps there.
    assert agent.check(["aiocoll/0/secret/1"])


async def test_torchs_store_errors_are_store_errors() -> None:
    dist = pytest.importorskip("torch.distributed")
    from aiocoll.store.c10d import C10dStore

    tcp = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)
    # init_process_group("aiocoll") hands over a PrefixStore: its TCPStore's host picks the
    # address this rank listens on (multi-node, the route to MASTER_ADDR).
    assert C10dStore(dist.PrefixStore("p", dist.PrefixStore("q", tcp))).route_to == "127.0.0.1"
    store = C10dStore(dist.HashStore(), name="torch's test store")
    assert store.route_to is None
    await store.set("a", b"1")
    assert await store.get("a", timeout=1) == b"1"
    with pytest.raises(StoreError, match="torch's test store"):
        await store.get("missing", timeout=0.2)
