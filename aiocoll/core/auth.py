"""Mutual challenge-response authentication over any byte stream (HMAC-SHA256).

Both ends prove knowledge of the shared secret without sending it; each proof is bound to both
nonces, both hello messages, a role label and a purpose (``b"store"``, ``b"tcp"``), so a proof
can be neither replayed nor reflected nor moved to another kind of connection. Messages::

    initiator -> acceptor   MAGIC | purpose_len:u8 | purpose | nonce_i[32] | hello_len:u16 | hello
    acceptor  -> initiator  nonce_a[32] | mac_a[32] | hello_len:u16 | hello
    initiator -> acceptor   mac_i[32]
    acceptor  -> initiator  OK (one byte, 0x01)

The initiator sends nothing after its proof until it has read OK, so a caller may hand the raw
connection to another protocol right after the handshake with no bytes left in a stream buffer.

    mac_a = HMAC(secret, b"acceptor"  | transcript)
    mac_i = HMAC(secret, b"initiator" | transcript)
    transcript = purpose | nonce_i | nonce_a | len(hello_i) | hello_i | len(hello_a) | hello_a

Every length is bounded before anything is allocated, every read has a deadline, and a failed
check raises HandshakeError with the reason; the caller drops the connection and logs it. The
hello messages are opaque to this module (transports put the rank in them).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import struct

from .errors import HandshakeError

MAGIC = b"AIOCOLL1"
NONCE_SIZE = 32
MAC_SIZE = 32
MAX_HELLO = 4096
OK = b"\x01"


def new_secret() -> bytes:
    """A fresh random secret, hex-encoded (safe to pass in an environment variable)."""
    return os.urandom(32).hex().encode()


def _mac(secret: bytes, role: bytes, transcript: bytes) -> bytes:
    return hmac.new(secret, role + transcript, hashlib.sha256).digest()


def _transcript(purpose: bytes, nonce_i: bytes, nonce_a: bytes, hello_i: bytes, hello_a: bytes) -> bytes:
    return b"".join(
        (
            purpose,
            nonce_i,
            nonce_a,
            struct.pack("!H", len(hello_i)),
            hello_i,
            struct.pack("!H", len(hello_a)),
            hello_a,
        )
    )


async def _read(reader: asyncio.StreamReader, n: int, what: str) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as exc:
        raise HandshakeError(f"connection closed during handshake ({what})") from exc


async def initiate(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    secret: bytes,
    purpose: bytes,
    hello: bytes,
    timeout: float,
) -> bytes:
    """Run the initiator's side; return the acceptor's hello.

    Raises:
        HandshakeError: the acceptor failed to prove the secret, closed, or timed out.
    """
    if len(hello) > MAX_HELLO or len(purpose) > 255:
        raise ValueError("hello or purpose too long")
    try:
        async with asyncio.timeout(timeout):
            nonce_i = os.urandom(NONCE_SIZE)
            writer.write(
                MAGIC
                + struct.pack("!B", len(purpose))
                + purpose
                + nonce_i
                + struct.pack("!H", len(hello))
                + hello
            )
            await writer.drain()
            nonce_a = await _read(reader, NONCE_SIZE, "acceptor nonce")
            mac_a = await _read(reader, MAC_SIZE, "acceptor proof")
            (n,) = struct.unpack("!H", await _read(reader, 2, "acceptor hello length"))
            if n > MAX_HELLO:
                raise HandshakeError(f"acceptor hello of {n} bytes exceeds {MAX_HELLO}")
            hello_a = await _read(reader, n, "acceptor hello")
            transcript = _transcript(purpose, nonce_i, nonce_a, hello, hello_a)
            if not hmac.compare_digest(mac_a, _mac(secret, b"acceptor", transcript)):
                raise HandshakeError("peer failed to prove the shared secret (wrong AIOCOLL_SECRET?)")
            writer.write(_mac(secret, b"initiator", transcript))
            await writer.drain()
            if await _read(reader, 1, "acceptance") != OK:
                raise HandshakeError("acceptor refused the connection")
            return hello_a
    except TimeoutError as exc:
        raise HandshakeError(f"handshake timed out after {timeout} s") from exc
    except (ConnectionError, OSError) as exc:
        if isinstance(exc, HandshakeError):
            raise
        raise HandshakeError(f"connection failed during handshake: {exc}") from exc


async def accept(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    secret: bytes,
    purpose: bytes,
    hello: bytes,
    timeout: float,
) -> bytes:
    """Run the acceptor's side; return the initiator's hello.

    Raises:
        HandshakeError: bad magic, wrong purpose, oversized fields, a wrong proof, or timeout.
    """
    try:
        async with asyncio.timeout(timeout):
            magic = await _read(reader, len(MAGIC), "magic")
            if magic != MAGIC:
                raise HandshakeError(f"not an aiocoll peer (bad magic {magic!r})")
            (plen,) = struct.unpack("!B", await _read(reader, 1, "purpose length"))
            their_purpose = await _read(reader, plen, "purpose")
            if their_purpose != purpose:
                raise HandshakeError(f"peer wants {their_purpose!r}, this endpoint serves {purpose!r}")
            nonce_i = await _read(reader, NONCE_SIZE, "initiator nonce")
            (n,) = struct.unpack("!H", await _read(reader, 2, "initiator hello length"))
            if n > MAX_HELLO:
                raise HandshakeError(f"initiator hello of {n} bytes exceeds {MAX_HELLO}")
            hello_i = await _read(reader, n, "initiator hello")
            nonce_a = os.urandom(NONCE_SIZE)
            transcript = _transcript(purpose, nonce_i, nonce_a, hello_i, hello)
            writer.write(
                nonce_a + _mac(secret, b"acceptor", transcript) + struct.pack("!H", len(hello)) + hello
            )
            await writer.drain()
            mac_i = await _read(reader, MAC_SIZE, "initiator proof")
            if not hmac.compare_digest(mac_i, _mac(secret, b"initiator", transcript)):
                raise HandshakeError("peer failed to prove the shared secret")
            writer.write(OK)
            return hello_i
    except TimeoutError as exc:
        raise HandshakeError(f"handshake timed out after {timeout} s") from exc
    except (ConnectionError, OSError) as exc:
        if isinstance(exc, HandshakeError):
            raise
        raise HandshakeError(f"connection failed during handshake: {exc}") from exc
