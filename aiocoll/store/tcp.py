"""The TCP rendezvous store: an asyncio server, its client, and a standalone entry point.

Every connection first runs the HMAC handshake of ``aiocoll.core.auth`` with purpose ``b"store"``;
a peer that fails it is logged (logger ``aiocoll.store``, with its address and the reason) and
dropped before it can send a request. Then, all integers big-endian::

    request   op:u8 | id:u32 | key_len:u16 | body_len:u32 | arg:i64 | key | body
    response  id:u32 | status:u8 | body_len:u32 | body

    op      key    body                          arg                   response body
    SET     key    value                         0                     -
    GET     key    -                             timeout_us, -1=none   value
    ADD     key    -                             amount                new value, i64
    WAIT    -      (len:u16 | key)*              timeout_us, -1=none   -
    DELETE  key    -                             0                     existed, u8
    CANCEL  -      -                             0                     (none: abandons request id)

    status  OK = 0 | ERROR = 1 (body: UTF-8 message, e.g. a timeout naming the key)

Requests carry ids and the server answers each in its own task, so one connection can have a
blocking GET outstanding while it sets other keys; ``get`` on a missing key waits on the
server, never by client polling. Every length is checked against its bound before anything is
read into memory; an unknown opcode, an oversized or malformed field, or a reused request id
drops that client (logged) and nothing else. Values are opaque bytes: nothing is unpickled.

Shutdown: ``TcpStoreServer.aclose`` stops listening, aborts every connection and waits for
every task it started, so nothing is left behind; clients with requests in flight see the
connection drop and raise StoreError instead of hanging.

Standalone: ``AIOCOLL_SECRET=... python -m aiocoll.store.tcp --host 127.0.0.1 --port 29500``
serves until SIGINT or SIGTERM; ranks then find the port taken and connect as clients.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import errno
import functools
import logging
import os
import random
import signal
import socket
import ssl
import struct
import sys
from collections.abc import Sequence
from ssl import SSLContext, SSLError

from ..core import auth as _auth
from ..core.errors import HandshakeError, StoreError
from .base import (
    MAX_KEY_BYTES,
    MAX_VALUE_BYTES,
    MemoryStore,
    Store,
    check_amount,
    check_key,
    check_timeout,
    check_value,
)
from ..core.timeouts import seconds

log = logging.getLogger("aiocoll.store")

PURPOSE = b"store"
PROTOCOL = b"aiocoll-store/1"

REQUEST = struct.Struct("!BIHIq")
RESPONSE = struct.Struct("!IBI")
KEY_LEN = struct.Struct("!H")
I64 = struct.Struct("!q")

#: Bound on a WAIT request's key list (about 256 maximal keys, or many thousands of short ones).
MAX_WAIT_BODY = 1024 * 1024
#: Requests one connection may have outstanding before the server stops reading from it.
MAX_IN_FLIGHT = 1024
#: Largest error message the server sends; responses larger than a value are a broken server.
MAX_MESSAGE = 64 * 1024
NO_TIMEOUT = -1
#: An aiocoll store answers the handshake within milliseconds; a port still silent after this
#: long speaks another protocol (torch's TCPStore waits for its own first request forever).
HANDSHAKE_S = 1.5


class Op(enum.IntEnum):
    SET = 1
    GET = 2
    ADD = 3
    WAIT = 4
    DELETE = 5
    CANCEL = 6


class Status(enum.IntEnum):
    OK = 0
    ERROR = 1


# Longest body each opcode may carry: checked before the body is read.
_BODY_LIMIT = {
    Op.SET: MAX_VALUE_BYTES,
    Op.GET: 0,
    Op.ADD: 0,
    Op.WAIT: MAX_WAIT_BODY,
    Op.DELETE: 0,
    Op.CANCEL: 0,
}


class _ProtocolViolation(Exception):
    """The peer sent something no correct peer sends; the connection is dropped."""


def format_address(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return format_address(str(peer[0]), int(peer[1]))
    return repr(peer)


def _encode_timeout(timeout: float | None) -> int:
    return NO_TIMEOUT if timeout is None else min(int(timeout * 1e6), 2**63 - 1)


def _decode_timeout(arg: int) -> float | None:
    if arg == NO_TIMEOUT:
        return None
    if arg < 0:
        raise _ProtocolViolation(f"negative timeout {arg}")
    return arg / 1e6


def _encode_keys(keys: Sequence[str]) -> bytes:
    parts = []
    for key in keys:
        raw = check_key(key)
        parts.append(KEY_LEN.pack(len(raw)))
        parts.append(raw)
    body = b"".join(parts)
    if len(body) > MAX_WAIT_BODY:
        raise ValueError(f"wait() on {len(keys)} keys exceeds the {MAX_WAIT_BODY}-byte request bound")
    return body


def _decode_keys(body: bytes) -> list[str]:
    keys = []
    view = memoryview(body)
    pos = 0
    while pos < len(view):
        if pos + KEY_LEN.size > len(view):
            raise _ProtocolViolation("truncated key list")
        (n,) = KEY_LEN.unpack_from(view, pos)
        pos += KEY_LEN.size
        if n == 0 or n > MAX_KEY_BYTES or pos + n > len(view):
            raise _ProtocolViolation(f"bad key length {n} in key list")
        keys.append(_decode_key(bytes(view[pos : pos + n])))
        pos += n
    return keys


def _decode_key(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _ProtocolViolation("key is not valid UTF-8") from None


# -- server -----------------------------------------------------------------------------------


class TcpStoreServer:
    """Serves a MemoryStore over authenticated TCP. Start with ``await TcpStoreServer.start()``.

    Connection tasks and per-request tasks are all tracked, so ``aclose`` leaves no task and no
    socket behind.
    """

    def __init__(
        self,
        secret: bytes,
        *,
        ssl: SSLContext | None = None,
        handshake_timeout: float = 10.0,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self._secret = secret
        self._ssl = ssl
        self._handshake_timeout = handshake_timeout
        self._max_in_flight = max_in_flight
        self._state = MemoryStore()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._closed = False
        self._name = "(not listening)"

    @classmethod
    async def start(
        cls,
        host: str | Sequence[str] | None,
        port: int,
        secret: bytes,
        *,
        ssl: SSLContext | None = None,
        handshake_timeout: float = 10.0,
    ) -> TcpStoreServer:
        """Listen on ``host:port`` (port 0 picks a free one; see ``address``).

        Raises:
            OSError: the address cannot be bound (EADDRINUSE when a server already runs there).
        """
        self = cls(secret, ssl=ssl, handshake_timeout=seconds(handshake_timeout, "handshake_timeout"))
        # asyncio's default backlog is 100: a world of more ranks starting at once would have
        # connections refused or dropped (then retried with backoff) before the server accepts.
        self._server = await asyncio.start_server(self._on_connect, host, port, ssl=ssl, backlog=socket.SOMAXCONN)
        self._name = "tcp://" + format_address(*self.address)
        log.info("store %s: listening%s", self._name, " (TLS)" if ssl is not None else "")
        if not secret:
            log.warning("store %s: no shared secret: any client can read and write", self._name)
        return self

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) of the first listening socket."""
        if self._server is None or not self._server.sockets:
            raise StoreError("store server is not listening")
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    @property
    def state(self) -> MemoryStore:
        """The table being served (the serving rank reads and writes it directly)."""
        return self._state

    @property
    def in_flight(self) -> int:
        """Requests received and not yet answered, over all connections."""
        return self._in_flight

    @property
    def connections(self) -> int:
        """Open client connections (authenticated or still in the handshake)."""
        return len(self._connections)

    def stop_listening(self) -> None:
        """Accept no new connection; clients already connected are served as before. Idempotent."""
        if self._server is not None and self._server.is_serving():
            self._server.close()
            log.info("store %s: no longer accepting connections", self._name)

    async def aclose(self) -> None:
        """Stop listening, drop every client, and wait for every task started. Idempotent.

        Clients with requests in flight raise StoreError; a serving rank's own pending calls
        on ``state`` raise StoreError too.
        """
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        self._state.shutdown(f"store {self._name} was closed by its owner")
        # A connection accepted just before close() has its task scheduled but not yet run;
        # one turn of the loop lets it register so that it is cancelled below.
        await asyncio.sleep(0)
        while self._connections:
            tasks = list(self._connections)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._connections.difference_update(tasks)
        if self._server is not None:
            await self._server.wait_closed()
        log.info("store %s: closed", self._name)

    async def __aenter__(self) -> TcpStoreServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if self._closed or task is None:
            writer.transport.abort()
            return
        self._connections.add(task)
        peer = _peer_name(writer)
        try:
            await self._serve_connection(reader, writer, peer)
        except asyncio.CancelledError:
            # Only aclose() cancels this task. Ending it normally matters: Python 3.11's streams
            # call task.exception() on a cancelled connection task and log the CancelledError.
            pass
        finally:
            # abort, not close: a client that stopped reading must not keep us flushing forever.
            # Waiting for the abort to land means aclose() returns with the socket really closed.
            writer.transport.abort()
            # aclose() may cancel us right here, after the client left; the task must still end
            # normally (see above), so the cancellation is absorbed too.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()
            self._connections.discard(task)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        try:
            hello = await _auth.accept(
                reader, writer, self._secret, PURPOSE, PROTOCOL, self._handshake_timeout
            )
        except HandshakeError as exc:
            log.warning("store %s: refused connection from %s: %s", self._name, peer, exc)
            return
        log.debug("store %s: accepted %s (%r)", self._name, peer, hello)
        try:
            await self._serve_requests(reader, writer)
        except _ProtocolViolation as exc:
            log.warning("store %s: dropped client %s: %s", self._name, peer, exc)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                log.warning("store %s: client %s closed mid-request", self._name, peer)
            else:
                log.debug("store %s: client %s disconnected", self._name, peer)
        except ConnectionError as exc:
            log.debug("store %s: client %s connection lost: %s", self._name, peer, exc)

    async def _serve_requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks: dict[int, asyncio.Task[None]] = {}
        slots = asyncio.Semaphore(self._max_in_flight)
        try:
            while True:
                try:
                    header = await reader.readexactly(REQUEST.size)
                except asyncio.IncompleteReadError as exc:
                    if not exc.partial:
                        return
                    raise
                raw_op, rid, key_len, body_len, arg = REQUEST.unpack(header)
                try:
                    op = Op(raw_op)
                except ValueError:
                    raise _ProtocolViolation(f"unknown opcode {raw_op}") from None
                if key_len > MAX_KEY_BYTES:
                    raise _ProtocolViolation(f"key of {key_len} bytes exceeds {MAX_KEY_BYTES}")
                if body_len > _BODY_LIMIT[op]:
                    raise _ProtocolViolation(
                        f"{op.name} body of {body_len} bytes exceeds {_BODY_LIMIT[op]}"
                    )
                needs_key = op in (Op.SET, Op.GET, Op.ADD, Op.DELETE)
                if needs_key != (key_len > 0):
                    raise _ProtocolViolation(f"{op.name} with a key of {key_len} bytes")
                key = _decode_key(await reader.readexactly(key_len)) if key_len else ""
                body = await reader.readexactly(body_len) if body_len else b""
                if op is Op.CANCEL:
                    pending = tasks.get(rid)
                    if pending is not None:
                        pending.cancel()
                    continue
                if rid in tasks:
                    raise _ProtocolViolation(f"request id {rid} reused while in flight")
                work = self._parse(op, key, body, arg)
                # Backpressure: at the bound, stop reading this client until a request finishes.
                await slots.acquire()
                task = asyncio.create_task(self._answer(writer, rid, op, key, work))
                tasks[rid] = task
                self._in_flight += 1
                task.add_done_callback(functools.partial(self._finished, tasks, rid, slots))
        finally:
            pending_tasks = list(tasks.values())
            for task in pending_tasks:
                task.cancel()
            await asyncio.gather(*pending_tasks, return_exceptions=True)

    def _finished(
        self,
        tasks: dict[int, asyncio.Task[None]],
        rid: int,
        slots: asyncio.Semaphore,
        task: asyncio.Task[None],
    ) -> None:
        if tasks.get(rid) is task:
            del tasks[rid]
        self._in_flight -= 1
        slots.release()

    @staticmethod
    def _parse(op: Op, key: str, body: bytes, arg: int) -> tuple[bytes, float | None, list[str], int]:
        if op is Op.SET:
            return body, None, [], 0
        if op is Op.GET:
            return b"", _decode_timeout(arg), [], 0
        if op is Op.ADD:
            return b"", None, [], arg
        if op is Op.WAIT:
            return b"", _decode_timeout(arg), _decode_keys(body), 0
        return b"", None, [], 0

    async def _answer(
        self,
        writer: asyncio.StreamWriter,
        rid: int,
        op: Op,
        key: str,
        work: tuple[bytes, float | None, list[str], int],
    ) -> None:
        value, timeout, keys, amount = work
        status = Status.OK
        reply = b""
        try:
            if op is Op.SET:
                await self._state.set(key, value)
            elif op is Op.GET:
                reply = await self._state.get(key, timeout)
            elif op is Op.ADD:
                reply = I64.pack(await self._state.add(key, amount))
            elif op is Op.WAIT:
                await self._state.wait(keys, timeout)
            elif op is Op.DELETE:
                reply = b"\x01" if await self._state.delete(key) else b"\x00"
        except StoreError as exc:
            status, reply = Status.ERROR, str(exc).encode()[:MAX_MESSAGE]
        except Exception as exc:  # a bug here must answer the client, not strand it
            log.exception("store %s: %s %r failed", self._name, op.name, key)
            status, reply = Status.ERROR, f"internal store error: {exc!r}".encode()[:MAX_MESSAGE]
        # Two writes with no await between them cannot interleave with another task's frame.
        writer.write(RESPONSE.pack(rid, status, len(reply)))
        if reply:
            writer.write(reply)
        with contextlib.suppress(ConnectionError):
            await writer.drain()


# -- client -----------------------------------------------------------------------------------


def _hint(name: str, exc: HandshakeError) -> str:
    if "timed out" in str(exc):
        return (
            f"{name} accepted the connection but did not answer aiocoll's store handshake within "
            f"{HANDSHAKE_S} s, so something else listens there, such as torch's TCPStore on "
            "MASTER_PORT (torch.distributed.init_process_group, or a torchrun that aiocoll did not "
            "recognise). Under torchrun aiocoll uses torch's store by itself (TORCHELASTIC_* "
            "variables); otherwise give aiocoll a port of its own: AIOCOLL_STORE=tcp://host:port "
            "or another MASTER_PORT"
        )
    return (
        "the shared secret differs from the one this store was started with (AIOCOLL_SECRET), or "
        f"{name} is not an aiocoll store: give aiocoll a port of its own (AIOCOLL_STORE)"
    )


class TcpStoreClient:
    """A connection to a TcpStoreServer. Create with ``await TcpStoreClient.connect(...)``.

    Calls may run concurrently from many tasks; each is a request with its own id, answered
    in whatever order the server finishes them.
    """

    #: Extra seconds the client waits past a request's own timeout for the server's answer,
    #: so that the server, not the client's clock, normally reports the timeout.
    grace: float = 5.0

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str) -> None:
        self._reader = reader
        self._writer = writer
        self._name = name
        self._pending: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self._next_id = 0
        self._broken: str | None = None
        self._closed = False
        self._reader_task = asyncio.create_task(self._read_responses())

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        secret: bytes,
        timeout: float,
        hello: bytes = b"",
        ssl: SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> TcpStoreClient:
        """Connect and authenticate, retrying refused connections with backoff until ``timeout``.

        A failed handshake or TLS verification is not retried: it will not get better.

        Raises:
            StoreError: nothing answered within ``timeout``, the server failed the handshake (or
                we did), or it is not an aiocoll store.
        """
        timeout = seconds(timeout)
        name = "tcp://" + format_address(host, port)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.01
        last_error: BaseException | None = None
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise StoreError(f"could not reach store {name} within {timeout} s: {last_error}")
            try:
                async with asyncio.timeout(remaining):
                    reader, writer = await asyncio.open_connection(
                        host,
                        port,
                        ssl=ssl,
                        server_hostname=(server_hostname or host) if ssl is not None else None,
                    )
            except SSLError as exc:
                raise StoreError(f"TLS with store {name} failed: {exc}") from exc
            except OSError as exc:  # refused, unreachable, DNS not ready yet, timeout
                last_error = exc
                # Jitter keeps a whole world that started together from retrying in lockstep.
                pause = min(delay * random.uniform(0.5, 1.0), max(0.0, deadline - loop.time()))
                await asyncio.sleep(pause)
                delay = min(delay * 2, 1.0)
                continue
            try:
                server_hello = await _auth.initiate(
                    reader, writer, secret, PURPOSE, hello, min(HANDSHAKE_S, max(remaining, 0.1))
                )
            except HandshakeError as exc:
                writer.transport.abort()
                raise StoreError(f"store {name} handshake failed: {exc}; {_hint(name, exc)}") from exc
            except BaseException:
                writer.transport.abort()
                raise
            if server_hello != PROTOCOL:
                writer.transport.abort()
                raise StoreError(
                    f"store {name} speaks {server_hello!r}, this client speaks {PROTOCOL!r}"
                )
            return cls(reader, writer, name)

    def _fail(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(StoreError(self._broken))

    async def _read_responses(self) -> None:
        reason = f"store {self._name}: client closed"
        try:
            while True:
                header = await self._reader.readexactly(RESPONSE.size)
                rid, status, body_len = RESPONSE.unpack(header)
                if status not in (Status.OK, Status.ERROR) or body_len > MAX_VALUE_BYTES:
                    reason = f"store {self._name} sent a malformed response; connection dropped"
                    log.warning("%s", reason)
                    self._writer.transport.abort()
                    return
                body = await self._reader.readexactly(body_len) if body_len else b""
                future = self._pending.pop(rid, None)
                if future is not None and not future.done():
                    future.set_result((status, body))
        except asyncio.IncompleteReadError:
            reason = f"connection to store {self._name} lost (closed by the server)"
        except OSError as exc:
            reason = f"connection to store {self._name} lost ({exc})"
        finally:
            self._fail(reason)

    def _abandon(self, rid: int) -> None:
        # The caller gave up: tell the server so that a blocked GET does not hold its slot.
        self._pending.pop(rid, None)
        if self._broken is None and not self._writer.is_closing():
            self._writer.write(REQUEST.pack(Op.CANCEL, rid, 0, 0, 0))

    async def _request(
        self, op: Op, key: bytes, body: bytes, arg: int, timeout: float | None
    ) -> bytes:
        if self._broken is not None:
            raise StoreError(self._broken)
        rid = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        future: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        guard = None if timeout is None else timeout + self.grace
        try:
            self._writer.write(REQUEST.pack(op, rid, len(key), len(body), arg) + key)
            if body:
                self._writer.write(body)
            async with asyncio.timeout(guard):
                await self._writer.drain()
                status, reply = await future
        except asyncio.CancelledError:
            self._abandon(rid)
            raise
        except TimeoutError:
            self._abandon(rid)
            raise StoreError(
                f"store {self._name} did not answer {op.name} {key.decode()!r} within {guard} s"
            ) from None
        except ConnectionError as exc:
            self._fail(f"connection to store {self._name} lost ({exc})")
            raise StoreError(self._broken or str(exc)) from exc
        if status == Status.ERROR:
            message = reply.decode("utf-8", errors="replace")
            raise StoreError(message if self._name in message else f"store {self._name}: {message}")
        return reply

    async def set(self, key: str, value: bytes) -> None:
        """See Store.set.

        Raises:
            ValueError, TypeError: invalid key or value.
            StoreError: the connection is lost or closed.
        """
        await self._request(Op.SET, check_key(key), check_value(value), 0, None)

    async def get(self, key: str, timeout: float | None = None) -> bytes:
        """See Store.get; the server waits for the key, the client only awaits the answer.

        Raises:
            ValueError, TypeError: invalid key or timeout.
            StoreError: timeout (naming the key), or the connection is lost or closed.
        """
        raw = check_key(key)
        timeout = check_timeout(timeout)
        return await self._request(Op.GET, raw, b"", _encode_timeout(timeout), timeout)

    async def add(self, key: str, amount: int = 1) -> int:
        """See Store.add.

        Raises:
            ValueError, TypeError: invalid key or amount.
            StoreError: not a counter, overflow, or the connection is lost or closed.
        """
        reply = await self._request(Op.ADD, check_key(key), b"", check_amount(amount), None)
        if len(reply) != I64.size:
            raise StoreError(f"store {self._name} answered ADD with {len(reply)} bytes")
        value: int = I64.unpack(reply)[0]
        return value

    async def wait(self, keys: Sequence[str], timeout: float | None = None) -> None:
        """See Store.wait.

        Raises:
            ValueError, TypeError: invalid keys or timeout, or too many keys for one request.
            StoreError: timeout (naming the missing keys), or the connection is lost or closed.
        """
        if isinstance(keys, str | bytes):
            raise TypeError("wait() takes a sequence of keys, not a single key")
        body = _encode_keys(keys)
        timeout = check_timeout(timeout)
        if body:
            await self._request(Op.WAIT, b"", body, _encode_timeout(timeout), timeout)

    async def delete(self, key: str) -> bool:
        """See Store.delete.

        Raises:
            ValueError, TypeError: invalid key.
            StoreError: the connection is lost or closed.
        """
        return await self._request(Op.DELETE, check_key(key), b"", 0, None) == b"\x01"

    async def aclose(self) -> None:
        """Close the connection; pending calls raise StoreError. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._fail(f"store {self._name}: client closed")
        self._reader_task.cancel()
        await asyncio.gather(self._reader_task, return_exceptions=True)
        self._writer.close()
        try:
            # A TLS close waits for the peer's close_notify; a dead peer must not hold us.
            async with asyncio.timeout(1.0):
                await self._writer.wait_closed()
        except (TimeoutError, ConnectionError, OSError):
            self._writer.transport.abort()


class ServedStore:
    """The store as the serving rank sees it: direct calls on the server's table, no socket.

    ``init`` calls ``stop_listening`` once every rank has met (nothing uses the store after
    that); ``aclose`` stops the server; other ranks' pending calls then raise StoreError.
    """

    def __init__(self, server: TcpStoreServer) -> None:
        self.server = server

    async def set(self, key: str, value: bytes) -> None:
        """See Store.set."""
        await self.server.state.set(key, value)

    async def get(self, key: str, timeout: float | None = None) -> bytes:
        """See Store.get."""
        return await self.server.state.get(key, timeout)

    async def add(self, key: str, amount: int = 1) -> int:
        """See Store.add."""
        return await self.server.state.add(key, amount)

    async def wait(self, keys: Sequence[str], timeout: float | None = None) -> None:
        """See Store.wait."""
        await self.server.state.wait(keys, timeout)

    async def delete(self, key: str) -> bool:
        """See Store.delete."""
        return await self.server.state.delete(key)

    def stop_listening(self) -> None:
        """Accept no new client (see TcpStoreServer.stop_listening); connected ones stay."""
        self.server.stop_listening()

    async def aclose(self) -> None:
        """Stop serving. Idempotent."""
        await self.server.aclose()


async def connect_or_serve(
    host: str,
    port: int,
    *,
    rank: int,
    secret: bytes,
    timeout: float,
    ssl_server: SSLContext | None = None,
    ssl_client: SSLContext | None = None,
    bind_all: bool = False,
) -> Store:
    """Rank 0 serves ``host:port`` unless it is taken; everyone else connects as a client.

    A taken port (EADDRINUSE) or a host that is not this machine's (EADDRNOTAVAIL) means the
    store is served elsewhere, e.g. by ``python -m aiocoll.store.tcp``, so rank 0 connects.
    ``bind_all``: rank 0 serves the port on every interface (a store whose host is a node
    name, which may resolve to loopback on that node itself), still connecting to ``host``.

    Raises:
        StoreError: binding failed for another reason, or the server could not be reached or
            refused the handshake within ``timeout``.
    """
    if rank == 0:
        try:
            server = await TcpStoreServer.start(None if bind_all else host, port, secret, ssl=ssl_server)
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                raise StoreError(f"cannot serve the store on {format_address(host, port)}: {exc}") from exc
            log.info(
                "store tcp://%s is served elsewhere (%s); rank 0 connects as a client",
                format_address(host, port),
                os.strerror(exc.errno),
            )
        else:
            return ServedStore(server)
    return await TcpStoreClient.connect(
        host, port, secret=secret, timeout=timeout, hello=f"rank {rank}".encode(), ssl=ssl_client
    )


# -- standalone -------------------------------------------------------------------------------


async def _serve_until_signalled(host: str, port: int, secret: bytes, context: SSLContext | None) -> None:
    server = await TcpStoreServer.start(host, port, secret, ssl=context)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    # Printed, not only logged: a parent started with --port 0 reads the real port from here.
    bound_host, bound_port = server.address
    print(f"aiocoll store listening on {format_address(bound_host, bound_port)}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    """Run a standalone store server until SIGINT/SIGTERM; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m aiocoll.store.tcp",
        description="Serve an aiocoll rendezvous store. The shared secret is read from AIOCOLL_SECRET.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=29500, help="port (default 29500; 0 picks one)")
    parser.add_argument("--certfile", help="PEM certificate chain: serve over TLS")
    parser.add_argument("--keyfile", help="PEM private key for --certfile")
    args = parser.parse_args(argv)
    secret = os.environ.get("AIOCOLL_SECRET", "")
    if not secret:
        print("error: set AIOCOLL_SECRET to the secret the ranks share", file=sys.stderr)
        return 2
    context = None
    if args.certfile:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.certfile, args.keyfile)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(_serve_until_signalled(args.host, args.port, os.fsencode(secret), context))
    return 0


if __name__ == "__main__":
    sys.exit(main())
