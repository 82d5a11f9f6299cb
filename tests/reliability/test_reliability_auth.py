"""Nobody joins who was not invited: a running job under attack by a process without its secret.

The job is started by ``aiocoll run`` with no AIOCOLL_SECRET set, so the launcher generates
one and only its ranks know it. While the ranks all-reduce in a loop (checking every result),
this test, knowing their addresses but not the secret, tries to: join through the store, read
from it, answer the handshake with a forged proof, speak to the store and to each rank's
listener without a handshake, inject a well-formed frame, and connect as a rank with a wrong
secret over tcp and shm. Every attempt must be refused (the store, which stops listening once
the ranks have met, by not being there), each refusal by a rank logged with a reason, and the
job must finish with correct results.

TLS: ranks pass ``ssl``/``ssl_client`` contexts to init; the collectives run over TLS and a
plaintext intruder is refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import aiocoll
from aiocoll.core import auth as _auth
from aiocoll.core.errors import HandshakeError, StoreError, TransportError
from aiocoll.store.tcp import TcpStoreClient
from aiocoll.testing import run_ranks
from aiocoll.transports import TransportConfig, get_transport

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
from _reliability_harness import ROOT  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process tests run on Linux")

WRONG = b"not-the-secret-" + os.urandom(8).hex().encode()


async def _closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Read until the peer closes; return what it sent (it must close, not keep us waiting)."""
    loop = asyncio.get_running_loop()
    got = b""
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await loop.sock_recv(sock, 4096)
            except ConnectionResetError:
                return got
            if not chunk:
                return got
            got += chunk


async def _raw(host: str, port: int, payload: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (host, port))
        try:
            await loop.sock_sendall(sock, payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # dropped before we finished: also a refusal
        return await _closed_by_peer(sock)
    finally:
        sock.close()


async def _forged_proof(host: str, port: int, purpose: bytes, hello: bytes) -> bytes:
    """Run the initiator's side honestly up to the proof, then send a random one."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (host, port))
        await loop.sock_sendall(
            sock, _auth.MAGIC + bytes([len(purpose)]) + purpose + os.urandom(32) + struct.pack("!H", len(hello)) + hello
        )
        await loop.sock_sendall(sock, os.urandom(32))  # not HMAC(secret, transcript)
        return await _closed_by_peer(sock)
    finally:
        sock.close()


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition("//")[2].rpartition(":")
    return host, int(port)


async def _attack(addrs: list[dict], transport: str) -> dict[str, int]:
    """Every attack on every rank; returns how many of each were refused (all must be)."""
    refused: dict[str, int] = {}

    def count(name: str) -> None:
        refused[name] = refused.get(name, 0) + 1

    store_host, store_port = _host_port("tcp://" + addrs[0]["store"])
    # 1-3. the store: once the ranks have met, rank 0 stops accepting connections to it, so
    # joining through it (with a wrong secret), a forged proof and a request without handshake
    # all find nothing to talk to. (The store's own refusals, while it listens, are tested in
    # test_store.py and test_reliability_fuzz.py.)
    with pytest.raises(StoreError, match="could not reach"):
        await TcpStoreClient.connect(store_host, store_port, secret=WRONG, timeout=1)
    count("store: wrong secret")
    with pytest.raises(ConnectionRefusedError):
        await _forged_proof(store_host, store_port, b"store", b"")
    count("store: forged proof")
    with pytest.raises(ConnectionRefusedError):
        await _raw(store_host, store_port, struct.pack("!BIHIq", 2, 1, 13, 0, -1) + b"aiocoll/1/addr/0")
    count("store: request without handshake")
    for a in addrs:
        host, port = _host_port(a["tcp"])
        # 4. a well-formed frame (magic, length, key, payload) with no handshake before it
        frame = b"ACF1" + struct.pack("!Q", 8) + bytes(32) + b"\x00" * 8
        await _raw(host, port, frame)
        count("tcp: injected frame")
        # 5. the handshake with a forged proof, claiming to be rank 0
        await _forged_proof(host, port, b"tcp", struct.pack("!II", 0, len(addrs)))
        count("tcp: forged proof")
        # 6. a real transport with the wrong secret
        wrong = get_transport("tcp")(TransportConfig(rank=(a["rank"] + 1) % len(addrs), world_size=len(addrs),
                                                      secret=WRONG, timeout=5))
        try:
            with pytest.raises(HandshakeError):
                await wrong.connect(a["rank"], a["tcp"])
        finally:
            await wrong.aclose()
        count("tcp: wrong secret")
        if transport == "shm":
            # 7. the same over shared memory
            wrong = get_transport("shm")(TransportConfig(rank=(a["rank"] + 1) % len(addrs), world_size=len(addrs),
                                                          secret=WRONG, timeout=5))
            try:
                with pytest.raises((HandshakeError, TransportError)):
                    await wrong.connect(a["rank"], a["shm"])
            finally:
                await wrong.aclose()
            count("shm: wrong secret")
    return refused


@pytest.mark.parametrize("transport", ["tcp", "shm"])
async def test_a_process_without_the_secret_is_refused_and_the_job_carries_on(transport, tmp_path):
    stop = tmp_path / "stop"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOCOLL_")}  # the launcher makes the secret
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(SCRIPTS.parent)])
    # tcp listeners are made for shm jobs too (they serve other hosts): attack both
    run_transport = "tcp" if transport == "tcp" else "auto"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiocoll", "run", "-n", "3", "--transport", run_transport, "--timeout", "30",
        str(SCRIPTS / "reliability_auth.py"), str(stop),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
    )
    out_lines: list[str] = []
    try:
        addrs: dict[int, dict] = {}
        async with asyncio.timeout(60):
            while len(addrs) < 3:
                line = (await proc.stdout.readline()).decode()
                assert line, "the job ended before printing its addresses"
                out_lines.append(line)
                if "ADDR " in line:
                    a = json.loads(line.split("ADDR ", 1)[1])
                    addrs[a["rank"]] = a
        if transport == "shm":
            assert all("shm" in a for a in addrs.values()), addrs
        refused = await _attack([addrs[r] for r in range(3)], transport)
        await asyncio.sleep(0.3)  # the job keeps going after the attacks
        stop.touch()
        async with asyncio.timeout(60):
            rest, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
    out = "".join(out_lines) + rest.decode()
    err = err.decode()
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    done = [json.loads(line.split("DONE ", 1)[1]) for line in out.splitlines() if "DONE " in line]
    assert sorted(d["rank"] for d in done) == [0, 1, 2] and all(d["rounds"] > 0 for d in done), out
    # each refusal logged by its rank with the reason
    tcp_drops = [line for line in err.splitlines() if "dropped a connection from" in line or "dropped the connection from" in line]
    assert len(tcp_drops) >= 3 * 3, err[-3000:]  # frame, forged proof, wrong secret on each rank
    assert any("bad magic" in line or "not an aiocoll peer" in line for line in tcp_drops), tcp_drops
    assert any("failed to prove" in line for line in tcp_drops), tcp_drops
    if transport == "shm":
        assert err.count("shm: rank") >= 3 and "dropped an incoming connection" in err, err[-3000:]
    assert sum(refused.values()) == 3 + 3 * (3 if transport == "tcp" else 4)


# -- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_contexts(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate (CI images have it)")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


async def test_collectives_run_over_tls_and_a_plaintext_peer_is_refused(tls_contexts):
    server, client = tls_contexts
    addresses: dict[int, str] = {}

    async def body(rank):
        from aiocoll.core.world import current_world

        t = current_world().comm.transports[0]
        addresses[rank] = t.address
        assert t._config.ssl_server is server  # the contexts reached the transport
        x = np.arange(100_000, dtype=np.float64) + rank
        y = await aiocoll.all_reduce(x)
        np.testing.assert_array_equal(y, 3 * np.arange(100_000, dtype=np.float64) + 3)
        await aiocoll.barrier()
        if rank == 0:
            # plaintext aiocoll handshake against a TLS listener: dropped, never answered
            host, port = _host_port(addresses[1])
            got = await _raw(host, port, _auth.MAGIC + bytes([3]) + b"tcp" + os.urandom(32) + b"\x00\x08" + bytes(8))
            assert len(got) < 32, got  # a TLS alert at most; an acceptor's reply is 74 bytes
        await aiocoll.barrier()
        return "ok"

    results = await run_ranks(body, 3, transport="tcp", secret="tls-test", ssl=server, ssl_client=client, timeout=20)
    assert results == ["ok"] * 3


async def test_init_with_the_wrong_secret_cannot_join_a_running_world():
    """A would-be rank 2 with the wrong secret: init fails (StoreError), the real ranks'
    collective is untouched, and the store never learns a key from it."""
    from aiocoll.store import open_store
    from _reliability_harness import free_port

    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    stores = []
    started = time.monotonic()
    try:
        real0 = await open_store(url, rank=0, world_size=3, secret=b"right", timeout=5)
        stores.append(real0)
        with pytest.raises(StoreError):
            intruder = await open_store(url, rank=2, world_size=3, secret=WRONG, timeout=3)
            stores.append(intruder)
        real1 = await open_store(url, rank=1, world_size=3, secret=b"right", timeout=5)
        stores.append(real1)
        await real1.set("k", b"v")
        assert await real0.get("k", timeout=2) == b"v"
    finally:
        for s in stores:
            await s.aclose()
    assert time.monotonic() - started < 10
