"""The rendezvous store: one conformance suite over every backend, then each backend's own promises."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("aiocoll") is None:
    # --import-mode=importlib leaves sys.path alone; without an install, test this tree.
    sys.path.insert(0, str(REPO))

from aiocoll.core import auth as _auth  # noqa: E402
from aiocoll.core.errors import StoreError  # noqa: E402
from aiocoll.store import MAX_KEY_BYTES, MAX_VALUE_BYTES, MemoryStore, Store, open_store  # noqa: E402
from aiocoll.store.file import FileStore  # noqa: E402
from aiocoll.store.tcp import (  # noqa: E402
    REQUEST,
    Op,
    ServedStore,
    TcpStoreClient,
    TcpStoreServer,
)
from aiocoll.store.tcp import main as standalone_main  # noqa: E402

SECRET = b"test-secret"

MakeHandle = Callable[[], Awaitable[Store]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def eventually(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.01)


def store_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "aiocoll.store" and r.levelno >= logging.WARNING]


# -- one suite, every backend ------------------------------------------------------------------


@pytest.fixture(params=["memory", "tcp-served", "tcp-client", "file"])
async def make_handle(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeHandle]:
    """A factory of handles onto one fresh store; every handle is closed afterwards."""
    handles: list[Store] = []
    server: TcpStoreServer | None = None
    kind = request.param

    if kind == "memory":
        shared = MemoryStore()

        async def make() -> Store:
            return shared

    elif kind == "tcp-served":
        # The first handle is rank 0 serving; later ones are other ranks' clients.
        url = f"tcp://127.0.0.1:{free_port()}"

        async def make() -> Store:
            rank = 0 if not handles else 1
            handle = await open_store(url, rank=rank, world_size=2, secret=SECRET, timeout=5.0)
            handles.append(handle)
            return handle

    elif kind == "tcp-client":
        server = await TcpStoreServer.start("127.0.0.1", 0, SECRET)
        host, port = server.address

        async def make() -> Store:
            handle = await TcpStoreClient.connect(host, port, secret=SECRET, timeout=5.0)
            handles.append(handle)
            return handle

    else:

        async def make() -> Store:
            handle = FileStore(tmp_path / "store")
            handles.append(handle)
            return handle

    if kind == "tcp-served":
        await make()  # rank 0 must exist before the test's handles, as in a real world
    yield make
    for handle in reversed(handles):
        await handle.aclose()
    if server is not None:
        await server.aclose()


async def test_set_then_get_returns_the_same_bytes(make_handle: MakeHandle) -> None:
    a, b = await make_handle(), await make_handle()
    await a.set("rank/0/addr", bytes(range(256)))
    await a.set("ключ ✓", b"")
    assert await b.get("rank/0/addr", timeout=2) == bytes(range(256))
    assert await b.get("ключ ✓", timeout=2) == b""


async def test_set_replaces_the_earlier_value(make_handle: MakeHandle) -> None:
    a = await make_handle()
    await a.set("k", b"old")
    await a.set("k", b"new")
    assert await a.get("k", timeout=2) == b"new"


async def test_get_blocks_until_another_handle_sets_the_key(make_handle: MakeHandle) -> None:
    reader, writer = await make_handle(), await make_handle()
    pending = asyncio.create_task(reader.get("late", timeout=5))
    await asyncio.sleep(0.1)
    assert not pending.done()
    await writer.set("late", b"here")
    assert await asyncio.wait_for(pending, 2) == b"here"


async def test_get_timeout_raises_store_error_naming_the_key(make_handle: MakeHandle) -> None:
    store = await make_handle()
    start = time.monotonic()
    with pytest.raises(StoreError, match="'never/set'"):
        await store.get("never/set", timeout=0.2)
    assert 0.15 <= time.monotonic() - start < 2.0


async def test_add_counts_from_zero_and_get_reads_the_decimal(make_handle: MakeHandle) -> None:
    store = await make_handle()
    assert await store.add("n") == 1
    assert await store.add("n", 5) == 6
    assert await store.add("n", -10) == -4
    assert await store.get("n", timeout=2) == b"-4"


async def test_concurrent_add_from_many_handles_is_atomic(make_handle: MakeHandle) -> None:
    handles = [await make_handle() for _ in range(6)]
    results = await asyncio.gather(*(h.add("counter") for h in handles for _ in range(20)))
    assert sorted(results) == list(range(1, 121))
    assert await handles[0].get("counter", timeout=2) == b"120"


async def test_add_on_a_value_that_is_not_a_counter_raises_store_error(make_handle: MakeHandle) -> None:
    store = await make_handle()
    await store.set("addr", b"10.0.0.1:1234")
    with pytest.raises(StoreError, match="'addr'"):
        await store.add("addr", 1)
    assert await store.get("addr", timeout=2) == b"10.0.0.1:1234"


async def test_wait_returns_once_every_key_exists(make_handle: MakeHandle) -> None:
    waiter, setter = await make_handle(), await make_handle()
    pending = asyncio.create_task(waiter.wait(["a", "b", "c"], timeout=5))
    await setter.set("a", b"1")
    await setter.set("c", b"3")
    await asyncio.sleep(0.1)
    assert not pending.done()
    await setter.set("b", b"2")
    await asyncio.wait_for(pending, 2)


async def test_wait_timeout_names_the_missing_keys(make_handle: MakeHandle) -> None:
    store = await make_handle()
    await store.set("present", b"")
    with pytest.raises(StoreError, match="'absent'") as info:
        await store.wait(["present", "absent"], timeout=0.2)
    assert "'present'" not in str(info.value)


async def test_delete_reports_whether_the_key_existed(make_handle: MakeHandle) -> None:
    a, b = await make_handle(), await make_handle()
    await a.set("gone", b"x")
    assert await b.delete("gone") is True
    assert await b.delete("gone") is False
    with pytest.raises(StoreError, match="'gone'"):
        await a.get("gone", timeout=0.1)


async def test_invalid_keys_and_values_are_refused_before_sending(make_handle: MakeHandle) -> None:
    store = await make_handle()
    with pytest.raises(TypeError):
        await store.set(b"bytes-key", b"v")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        await store.set("", b"v")
    with pytest.raises(ValueError, match="exceeds"):
        await store.get("k" * (MAX_KEY_BYTES + 1), timeout=0)
    with pytest.raises(TypeError):
        await store.set("k", "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await store.wait("single-key")
    with pytest.raises(ValueError):
        await store.get("k", timeout=-1)
    # The handle still works after refusing: nothing reached the store.
    await store.set("k", b"ok")
    assert await store.get("k", timeout=2) == b"ok"


async def test_the_stored_value_is_a_copy_of_the_callers_buffer(make_handle: MakeHandle) -> None:
    store = await make_handle()
    buf = bytearray(b"abc")
    await store.set("buf", buf)  # type: ignore[arg-type]
    buf[:] = b"xyz"
    assert await store.get("buf", timeout=2) == b"abc"


# -- MemoryStore ------------------------------------------------------------------------------


async def test_memory_store_refuses_a_value_over_the_bound() -> None:
    store = MemoryStore()
    with pytest.raises(ValueError, match="exceeds"):
        await store.set("big", bytes(MAX_VALUE_BYTES + 1))
    await store.set("edge", bytes(1024))
    assert len(await store.get("edge")) == 1024


async def test_memory_store_aclose_leaves_the_shared_table_to_other_ranks() -> None:
    store = MemoryStore()
    await store.set("k", b"v")
    await store.aclose()
    assert await store.get("k", timeout=0) == b"v"


async def test_memory_store_shutdown_fails_pending_and_later_calls() -> None:
    store = MemoryStore()
    pending = asyncio.create_task(store.get("k"))
    await asyncio.sleep(0)
    store.shutdown("owner went away")
    with pytest.raises(StoreError, match="owner went away"):
        await asyncio.wait_for(pending, 2)
    with pytest.raises(StoreError, match="owner went away"):
        await store.set("k", b"v")


async def test_memory_store_forgets_waiters_that_gave_up() -> None:
    store = MemoryStore()
    with pytest.raises(StoreError):
        await store.get("k", timeout=0.01)
    task = asyncio.create_task(store.get("j"))
    await asyncio.sleep(0)
    assert store.waiting_keys == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert store.waiting_keys == 0


# -- open_store -------------------------------------------------------------------------------


async def test_open_store_returns_a_store_object_as_is() -> None:
    store = MemoryStore()
    assert await open_store(store, rank=3, world_size=4, secret=b"", timeout=1) is store


async def test_open_store_unknown_scheme_lists_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match=r"tcp://host:port, file:///path") as info:
        await open_store("redis://h:1", rank=0, world_size=1, secret=SECRET, timeout=1)
    assert "redis://h:1" in str(info.value)


@pytest.mark.parametrize(
    "url",
    ["tcp://127.0.0.1", "tcp://:29500", "tcp://h:0", "tcp://h:99999", "tcp://h:1/path", "file://relative/dir"],
)
async def test_open_store_refuses_malformed_urls(url: str) -> None:
    with pytest.raises(ValueError):
        await open_store(url, rank=0, world_size=1, secret=SECRET, timeout=1)


async def test_open_store_refuses_a_rank_outside_the_world() -> None:
    with pytest.raises(ValueError, match="rank 2"):
        await open_store("tcp://127.0.0.1:1", rank=2, world_size=2, secret=SECRET, timeout=1)


async def test_open_store_refuses_something_that_is_not_a_store() -> None:
    with pytest.raises(TypeError):
        await open_store(42, rank=0, world_size=1, secret=SECRET, timeout=1)  # type: ignore[arg-type]


async def test_open_store_file_url_opens_a_file_store(tmp_path: Path) -> None:
    store = await open_store(f"file://{tmp_path}/s%20p", rank=1, world_size=2, secret=b"", timeout=1)
    assert isinstance(store, FileStore)
    assert store.path == tmp_path / "s p"
    await store.set("k", b"v")
    assert store.path_of("k").read_bytes() == b"v"


# -- TCP store --------------------------------------------------------------------------------


async def test_rank0_serves_and_ranks_started_earlier_wait_for_it() -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    early = asyncio.create_task(open_store(url, rank=1, world_size=2, secret=SECRET, timeout=5))
    await asyncio.sleep(0.2)  # rank 1 is retrying against a closed port
    assert not early.done()
    rank0 = await open_store(url, rank=0, world_size=2, secret=SECRET, timeout=5)
    rank1 = await asyncio.wait_for(early, 5)
    try:
        assert isinstance(rank0, ServedStore)
        assert isinstance(rank1, TcpStoreClient)
        await rank1.set("from1", b"a")
        await rank0.set("from0", b"b")
        assert await rank0.get("from1", timeout=2) == b"a"
        assert await rank1.get("from0", timeout=2) == b"b"
    finally:
        await rank1.aclose()
        await rank0.aclose()


async def test_connecting_to_nothing_gives_up_at_the_timeout() -> None:
    port = free_port()
    start = time.monotonic()
    with pytest.raises(StoreError, match=f"127.0.0.1:{port}"):
        await open_store(f"tcp://127.0.0.1:{port}", rank=1, world_size=2, secret=SECRET, timeout=0.3)
    assert time.monotonic() - start < 2.0


async def test_rank0_uses_a_standalone_server_already_running() -> None:
    env = dict(os.environ, AIOCOLL_SECRET=SECRET.decode(), PYTHONPATH=str(REPO))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiocoll.store.tcp", "--host", "127.0.0.1", "--port", "0",
        env=env, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("aiocoll store listening on 127.0.0.1:"), line
        url = "tcp://" + line.rsplit(" ", 1)[1].strip()
        rank0 = await open_store(url, rank=0, world_size=2, secret=SECRET, timeout=5)
        rank1 = await open_store(url, rank=1, world_size=2, secret=SECRET, timeout=5)
        assert isinstance(rank0, TcpStoreClient)  # the port was taken, so rank 0 did not serve
        await rank0.set("k", b"from rank 0")
        await rank0.aclose()
        # Rank 0 closing its client does not stop a server it does not own.
        assert await rank1.get("k", timeout=2) == b"from rank 0"
        await rank1.aclose()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, stderr.decode()


def test_standalone_server_refuses_to_start_without_a_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("AIOCOLL_SECRET", raising=False)
    assert standalone_main(["--port", "0"]) == 2
    assert "AIOCOLL_SECRET" in capsys.readouterr().err


async def test_get_waits_on_the_server_not_by_client_polling() -> None:
    async with await TcpStoreServer.start("127.0.0.1", 0, SECRET) as server:
        client = await TcpStoreClient.connect(*server.address, secret=SECRET, timeout=5)
        pending = asyncio.create_task(client.get("k", timeout=5))
        await eventually(lambda: server.in_flight == 1)
        await asyncio.sleep(0.2)
        assert server.in_flight == 1  # one request held by the server, not a stream of retries
        assert server.state.waiting_keys == 1
        await server.state.set("k", b"v")
        assert await asyncio.wait_for(pending, 2) == b"v"
        await eventually(lambda: server.in_flight == 0)
        await client.aclose()


async def test_a_cancelled_get_is_abandoned_on_the_server() -> None:
    async with await TcpStoreServer.start("127.0.0.1", 0, SECRET) as server:
        client = await TcpStoreClient.connect(*server.address, secret=SECRET, timeout=5)
        pending = asyncio.create_task(client.get("k"))
        await eventually(lambda: server.in_flight == 1)
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
        await eventually(lambda: server.in_flight == 0 and server.state.waiting_keys == 0)
        await client.set("still", b"usable")
        assert await client.get("still", timeout=2) == b"usable"
        await client.aclose()


async def test_owner_close_fails_other_ranks_pending_requests_instead_of_hanging() -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    rank0 = await open_store(url, rank=0, world_size=3, secret=SECRET, timeout=5)
    rank1 = await open_store(url, rank=1, world_size=3, secret=SECRET, timeout=5)
    rank2 = await open_store(url, rank=2, world_size=3, secret=SECRET, timeout=5)
    blocked = [
        asyncio.create_task(rank1.get("never")),  # no timeout: only the close can end it
        asyncio.create_task(rank2.wait(["never", "either"])),
        asyncio.create_task(rank0.get("never")),
    ]
    await asyncio.sleep(0.1)
    await rank0.aclose()
    results = await asyncio.wait_for(asyncio.gather(*blocked, return_exceptions=True), 3)
    assert all(isinstance(r, StoreError) for r in results), results
    with pytest.raises(StoreError):
        await rank1.set("after", b"close")
    await rank1.aclose()
    await rank2.aclose()


async def test_close_leaves_no_tasks_and_frees_the_port() -> None:
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    rank0 = await open_store(url, rank=0, world_size=4, secret=SECRET, timeout=5)
    others = [await open_store(url, rank=r, world_size=4, secret=SECRET, timeout=5) for r in (1, 2, 3)]
    await asyncio.gather(*(s.add("n") for s in others))
    pending = asyncio.create_task(others[0].get("never"))
    await asyncio.sleep(0.05)
    assert isinstance(rank0, ServedStore)
    server = rank0.server
    assert server.connections == 3
    await rank0.aclose()
    await asyncio.gather(pending, return_exceptions=True)
    for store in others:
        await store.aclose()
    assert server.connections == 0 and server.in_flight == 0
    assert asyncio.all_tasks() == {asyncio.current_task()}
    with socket.socket() as s:  # the listening socket is really gone (closed connections may linger)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


# -- the TCP server under attack --------------------------------------------------------------


async def _closed_by_peer(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), 3) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
async def served() -> AsyncIterator[tuple[TcpStoreServer, TcpStoreClient]]:
    """A server and one good client holding a key, to show the server keeps serving it."""
    server = await TcpStoreServer.start("127.0.0.1", 0, SECRET)
    good = await TcpStoreClient.connect(*server.address, secret=SECRET, timeout=5)
    await good.set("precious", b"data")
    yield server, good
    await good.aclose()
    await server.aclose()


async def _still_serves(server: TcpStoreServer, good: TcpStoreClient) -> None:
    assert await good.get("precious", timeout=2) == b"data"
    assert await good.add("after") == 1
    await eventually(lambda: server.connections == 1)


async def test_a_client_with_the_wrong_secret_is_refused_and_logged(
    served: tuple[TcpStoreServer, TcpStoreClient], caplog: pytest.LogCaptureFixture
) -> None:
    server, good = served
    caplog.set_level(logging.WARNING, logger="aiocoll.store")
    with pytest.raises(StoreError, match="handshake"):
        await TcpStoreClient.connect(*server.address, secret=b"wrong", timeout=5)
    await eventually(lambda: any("refused connection from 127.0.0.1:" in m for m in store_warnings(caplog)))
    await _still_serves(server, good)


async def test_a_forged_proof_is_refused_before_any_request_is_read(
    served: tuple[TcpStoreServer, TcpStoreClient], caplog: pytest.LogCaptureFixture
) -> None:
    # A peer without the secret that plays the handshake to the end, then asks for a key.
    server, good = served
    caplog.set_level(logging.WARNING, logger="aiocoll.store")
    reader, writer = await asyncio.open_connection(*server.address)
    writer.write(_auth.MAGIC + bytes([5]) + b"store" + os.urandom(32) + b"\x00\x00")
    await reader.readexactly(32 + 32)
    hello_len = int.from_bytes(await reader.readexactly(2), "big")
    await reader.readexactly(hello_len)
    writer.write(bytes(32))  # a made-up proof
    writer.write(REQUEST.pack(Op.GET, 1, 8, 0, -1) + b"precious")
    assert await _closed_by_peer(reader)
    writer.close()
    await eventually(lambda: any("failed to prove the shared secret" in m for m in store_warnings(caplog)))
    await _still_serves(server, good)


async def test_garbage_instead_of_a_handshake_is_refused_and_logged(
    served: tuple[TcpStoreServer, TcpStoreClient], caplog: pytest.LogCaptureFixture
) -> None:
    server, good = served
    caplog.set_level(logging.WARNING, logger="aiocoll.store")
    reader, writer = await asyncio.open_connection(*server.address)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await _closed_by_peer(reader)
    writer.close()
    await eventually(lambda: any("bad magic" in m for m in store_warnings(caplog)))
    await _still_serves(server, good)


async def _authenticated_raw(server: TcpStoreServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*server.address)
    await _auth.initiate(reader, writer, SECRET, b"store", b"raw", 5.0)
    return reader, writer


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (REQUEST.pack(99, 1, 0, 0, 0), "unknown opcode 99"),
        (REQUEST.pack(Op.SET, 1, 1, MAX_VALUE_BYTES + 1, 0) + b"k", "exceeds"),
        (REQUEST.pack(Op.GET, 1, 60000, 0, -1), "exceeds"),
        (REQUEST.pack(Op.GET, 1, 2, 0, -1) + b"\xff\xfe", "UTF-8"),
        (REQUEST.pack(Op.GET, 1, 1, 0, -7) + b"k", "negative timeout"),
        (REQUEST.pack(Op.WAIT, 1, 0, 3, 0) + b"\x00\x09k", "key length"),
    ],
    ids=["unknown-opcode", "oversized-value", "oversized-key", "bad-utf8", "bad-timeout", "bad-key-list"],
)
async def test_a_malformed_request_drops_only_that_client(
    served: tuple[TcpStoreServer, TcpStoreClient],
    caplog: pytest.LogCaptureFixture,
    frame: bytes,
    reason: str,
) -> None:
    server, good = served
    caplog.set_level(logging.WARNING, logger="aiocoll.store")
    reader, writer = await _authenticated_raw(server)
    writer.write(frame)
    # Dropped at the header: the server did not wait for (or allocate) the announced body.
    assert await _closed_by_peer(reader)
    writer.close()
    await eventually(
        lambda: any("dropped client 127.0.0.1:" in m and reason in m for m in store_warnings(caplog))
    )
    await _still_serves(server, good)


async def test_an_authenticated_raw_client_is_answered_by_request_id(
    served: tuple[TcpStoreServer, TcpStoreClient],
) -> None:
    # The wire format as documented, spoken by hand: a GET for a present key answers at once.
    server, _ = served
    reader, writer = await _authenticated_raw(server)
    writer.write(REQUEST.pack(Op.GET, 77, 8, 0, -1) + b"precious")
    header = await asyncio.wait_for(reader.readexactly(9), 3)
    assert header == (77).to_bytes(4, "big") + b"\x00" + (4).to_bytes(4, "big")
    assert await reader.readexactly(4) == b"data"
    writer.close()


# -- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_store_round_trips_and_refuses_plaintext(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    url = f"tcp://127.0.0.1:{free_port()}"
    rank0 = await open_store(url, rank=0, world_size=2, secret=SECRET, timeout=5, ssl_server=server_ctx)
    try:
        rank1 = await open_store(url, rank=1, world_size=2, secret=SECRET, timeout=5, ssl_client=client_ctx)
        await rank1.set("k", b"over tls")
        assert await rank0.get("k", timeout=2) == b"over tls"
        await rank1.aclose()
        with pytest.raises(StoreError):
            await open_store(url, rank=1, world_size=2, secret=SECRET, timeout=2)
    finally:
        await rank0.aclose()


# -- FileStore --------------------------------------------------------------------------------


async def test_file_store_keeps_raw_bytes_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    await store.set("addr/0", b"\x00\x01pickle-free")
    await store.add("n", 3)
    assert store.path_of("addr/0").read_bytes() == b"\x00\x01pickle-free"
    assert store.path_of("n").read_bytes() == b"3"
    assert not list(tmp_path.glob("t-*"))


async def test_file_store_names_any_key_safely(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    for key in ["../../etc/passwd", "a/b", "x" * 4000, "lock"]:
        await store.set(key, key.encode())
        assert store.path_of(key).parent == tmp_path
        assert await store.get(key, timeout=1) == key.encode()
    assert store.path_of("a/b") != store.path_of("a_b")


async def test_file_store_sees_a_key_written_by_another_process(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    pending = asyncio.create_task(store.get("from-child", timeout=20))
    code = (
        "import asyncio, sys; from aiocoll.store.file import FileStore; "
        "asyncio.run(FileStore(sys.argv[1]).set('from-child', b'hi'))"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, str(tmp_path), env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO
    )
    assert await proc.wait() == 0
    assert await asyncio.wait_for(pending, 5) == b"hi"


async def test_file_store_refuses_a_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(ValueError, match="not a directory"):
        FileStore(tmp_path / "f")


async def test_file_store_refuses_calls_after_close(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    await store.aclose()
    with pytest.raises(StoreError, match="closed"):
        await store.set("k", b"v")
