"""The rendezvous store: the interface, the in-process store, and ``open_store``.

A store is a small key/value table that ranks use to find each other before any transport
connects: addresses, secrets, counters. It never carries tensors. Reads block until a key
exists, so "rank 3 publishes its address, everyone reads it" needs no polling loop in callers.

Backends, chosen by ``open_store`` from a URL::

    Store object         returned as is (MemoryStore for a world of many ranks in one process)
    tcp://host:port      _store_tcp: rank 0 serves it unless a server already runs there
    file:///path         _store_file: a directory on a shared filesystem, polled

Every backend shares the limits and encodings below, so a key or value accepted by one is
accepted by all: keys are non-empty ``str`` of at most ``MAX_KEY_BYTES`` UTF-8 bytes, values
are bytes of at most ``MAX_VALUE_BYTES``, and ``add`` keeps its counter as ASCII decimal (so
``get`` on a counter returns e.g. ``b"3"``, as torch's stores do).

Errors: bad arguments raise ValueError or TypeError before anything is sent; everything the
store does wrong or refuses (timeout, closed, lost connection, failed handshake, a counter that
is not a number) raises StoreError.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import NamedTuple, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

from ..core.errors import StoreError
from ..core.timeouts import seconds

#: Longest key, in UTF-8 bytes. Keys name ranks and groups; anything longer is a bug.
MAX_KEY_BYTES = 4096
#: Largest value. Stores carry addresses and small blobs, never tensors.
MAX_VALUE_BYTES = 64 * 1024 * 1024
#: Counters are signed 64-bit so that every backend (and the TCP wire format) agrees on overflow.
COUNTER_MIN = -(2**63)
COUNTER_MAX = 2**63 - 1

#: What ``open_store`` accepts, for error messages.
ACCEPTED_STORES = "tcp://host:port, file:///path, or a Store object"


@runtime_checkable
class Store(Protocol):
    """A rendezvous key/value store shared by the ranks of one world.

    Cancellation: cancelling any call abandons it; a ``set`` or ``add`` that was already sent
    may or may not have happened.
    """

    async def set(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``, replacing any earlier value and waking its readers.

        Raises:
            ValueError, TypeError: the key or value is invalid or too large.
            StoreError: the store is closed or unreachable.
        """
        ...

    async def get(self, key: str, timeout: float | None = None) -> bytes:
        """Return the value of ``key``, waiting until some rank sets it.

        ``timeout`` is in seconds; None waits for as long as the store lives.

        Raises:
            StoreError: the key did not appear within ``timeout`` (the message names it), or the
                store is closed or unreachable.
        """
        ...

    async def add(self, key: str, amount: int = 1) -> int:
        """Atomically add ``amount`` to the counter ``key`` (missing counts as 0); return the sum.

        Raises:
            StoreError: the key holds something other than a decimal integer, the sum leaves the
                signed 64-bit range, or the store is closed or unreachable.
        """
        ...

    async def wait(self, keys: Sequence[str], timeout: float | None = None) -> None:
        """Return once every key in ``keys`` exists.

        Raises:
            StoreError: some keys did not appear within ``timeout`` (the message names them), or
                the store is closed or unreachable.
        """
        ...

    async def delete(self, key: str) -> bool:
        """Remove ``key``; return whether it existed.

        Raises:
            StoreError: the store is closed or unreachable.
        """
        ...

    async def aclose(self) -> None:
        """Release this handle's resources (connections, a served socket). Idempotent."""
        ...


# -- validation shared by every backend -------------------------------------------------------


def check_key(key: object) -> bytes:
    """Return the key's UTF-8 encoding.

    Raises:
        TypeError: the key is not a str.
        ValueError: the key is empty, not encodable as UTF-8, or longer than MAX_KEY_BYTES.
    """
    if not isinstance(key, str):
        raise TypeError(f"store key must be str, not {type(key).__name__}")
    if not key:
        raise ValueError("store key must not be empty")
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"store key {key!r} is not valid UTF-8: {exc}") from None
    if len(raw) > MAX_KEY_BYTES:
        raise ValueError(f"store key of {len(raw)} bytes exceeds {MAX_KEY_BYTES}")
    return raw


def check_value(value: object) -> bytes:
    """Return the value as an immutable ``bytes`` copy.

    Copying matters: a caller may reuse its bytearray after ``set`` returns.

    Raises:
        TypeError: the value is not bytes-like.
        ValueError: the value is larger than MAX_VALUE_BYTES.
    """
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"store value must be bytes, not {type(value).__name__}")
    size = value.nbytes if isinstance(value, memoryview) else len(value)
    if size > MAX_VALUE_BYTES:
        raise ValueError(f"store value of {size} bytes exceeds {MAX_VALUE_BYTES}")
    return bytes(value)


def check_timeout(timeout: float | None) -> float | None:
    """Validate a timeout in seconds: None (no limit) or a finite number >= 0.

    Raises:
        ValueError: not a number, NaN, infinite (None waits without limit) or negative.
    """
    if timeout is None:
        return None
    return seconds(timeout, "store timeout (None waits without limit)", allow_zero=True)


def check_amount(amount: object) -> int:
    """Validate an ``add`` amount.

    Raises:
        TypeError: not an int (bool is refused: ``add(key, True)`` is a bug, not a count).
        ValueError: outside the signed 64-bit range.
    """
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise TypeError(f"add amount must be int, not {type(amount).__name__}")
    if not COUNTER_MIN <= amount <= COUNTER_MAX:
        raise ValueError(f"add amount {amount} is outside the signed 64-bit range")
    return amount


def add_to_counter(key: str, current: bytes | None, amount: int) -> tuple[int, bytes]:
    """Apply ``add`` to a stored counter; return the new value and its encoding.

    Raises:
        StoreError: the stored value is not a decimal integer, or the sum overflows int64.
    """
    if current is None:
        old = 0
    else:
        text = current.decode("ascii", errors="replace").strip()
        # int() alone would accept "1_0" and non-ASCII digits: counters must read the same everywhere.
        digits = text[1:] if text[:1] in "+-" else text
        if not digits.isascii() or not digits.isdigit():
            raise StoreError(f"add on key {key!r}: its value {current[:40]!r} is not a decimal integer")
        old = int(text)
    new = old + amount
    if not COUNTER_MIN <= new <= COUNTER_MAX:
        raise StoreError(f"add on key {key!r}: {old} + {amount} overflows a signed 64-bit counter")
    return new, str(new).encode("ascii")


# -- the in-process store ---------------------------------------------------------------------


class MemoryStore:
    """A store in this process's memory: a dict and one wake-up event per awaited key.

    Several ranks share one instance (a world of many ranks in one process, as tests run it);
    all of them must use it from the same event loop. It is also the table behind the TCP
    server. ``aclose`` does nothing, because one rank finishing must not pull the table from
    under the others; ``shutdown`` is the owner's way to end it for everyone.
    """

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        # One event per key that someone awaits; set() pops and fires it, so a woken waiter
        # re-checks the table and, if the key vanished again, waits on a fresh event. The last
        # waiter to leave (timeout, cancel) removes it, so abandoned gets leave nothing behind.
        self._events: dict[str, _KeyWaiters] = {}
        self._closed: str | None = None

    def _check_open(self) -> None:
        if self._closed is not None:
            raise StoreError(self._closed)

    def _wake(self, key: str) -> None:
        waiters = self._events.pop(key, None)
        if waiters is not None:
            waiters.event.set()

    async def _until_present(self, key: str) -> bytes:
        while True:
            self._check_open()
            value = self._data.get(key)
            if value is not None:
                return value
            waiters = self._events.get(key)
            if waiters is None:
                waiters = self._events[key] = _KeyWaiters()
            waiters.count += 1
            try:
                await waiters.event.wait()
            finally:
                waiters.count -= 1
                if waiters.count == 0 and self._events.get(key) is waiters:
                    del self._events[key]

    async def set(self, key: str, value: bytes) -> None:
        """See Store.set.

        Raises:
            ValueError, TypeError: invalid key or value.
            StoreError: the store was shut down.
        """
        check_key(key)
        data = check_value(value)
        self._check_open()
        self._data[key] = data
        self._wake(key)

    async def get(self, key: str, timeout: float | None = None) -> bytes:
        """See Store.get.

        Raises:
            ValueError, TypeError: invalid key or timeout.
            StoreError: timeout (naming the key) or the store was shut down.
        """
        check_key(key)
        timeout = check_timeout(timeout)
        try:
            async with asyncio.timeout(timeout):
                return await self._until_present(key)
        except TimeoutError:
            raise StoreError(f"timed out after {timeout} s waiting for key {key!r}") from None

    async def add(self, key: str, amount: int = 1) -> int:
        """See Store.add.

        Raises:
            ValueError, TypeError: invalid key or amount.
            StoreError: the value is not a counter, the sum overflows, or the store was shut down.
        """
        check_key(key)
        check_amount(amount)
        self._check_open()
        new, encoded = add_to_counter(key, self._data.get(key), amount)
        self._data[key] = encoded
        self._wake(key)
        return new

    async def wait(self, keys: Sequence[str], timeout: float | None = None) -> None:
        """See Store.wait.

        Raises:
            ValueError, TypeError: invalid keys or timeout.
            StoreError: timeout (naming the missing keys) or the store was shut down.
        """
        keys = _check_keys(keys)
        timeout = check_timeout(timeout)
        try:
            async with asyncio.timeout(timeout):
                for key in keys:
                    await self._until_present(key)
        except TimeoutError:
            missing = [k for k in keys if k not in self._data]
            raise StoreError(f"timed out after {timeout} s waiting for keys {missing!r}") from None

    async def delete(self, key: str) -> bool:
        """See Store.delete.

        Raises:
            ValueError, TypeError: invalid key.
            StoreError: the store was shut down.
        """
        check_key(key)
        self._check_open()
        return self._data.pop(key, None) is not None

    async def aclose(self) -> None:
        """Do nothing: the instance is shared, so one rank's close must not end it for others."""

    def shutdown(self, reason: str = "store closed") -> None:
        """End the store for every user: pending and later calls raise StoreError(reason)."""
        if self._closed is None:
            self._closed = reason
            self._data.clear()
            for key in list(self._events):
                self._wake(key)

    @property
    def waiting_keys(self) -> int:
        """How many distinct keys have waiters right now (for tests and debugging)."""
        return len(self._events)


class _KeyWaiters:
    __slots__ = ("event", "count")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.count = 0


def _check_keys(keys: Sequence[str]) -> list[str]:
    if isinstance(keys, str | bytes):
        # A bare str is a Sequence[str] of characters: almost certainly a forgotten list.
        raise TypeError("wait() takes a sequence of keys, not a single key")
    keys = list(keys)
    for key in keys:
        check_key(key)
    return keys


# -- URLs and the dispatcher ------------------------------------------------------------------


class StoreURL(NamedTuple):
    """A parsed store URL: ``scheme`` is ``"tcp"`` (host, port) or ``"file"`` (path)."""

    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""


def parse_store_url(url: str) -> StoreURL:
    """Parse ``tcp://host:port`` (IPv6 as ``tcp://[::1]:port``) or ``file:///absolute/path``.

    Raises:
        ValueError: unknown scheme (the message lists the accepted ones) or a malformed URL.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "tcp":
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"store URL {url!r} has an invalid port") from None
        if not parts.hostname or port is None or port == 0:
            raise ValueError(f"store URL {url!r} needs a host and a non-zero port: tcp://host:port")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise ValueError(f"store URL {url!r} must be exactly tcp://host:port")
        return StoreURL("tcp", host=parts.hostname, port=port)
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise ValueError(
                f"store URL {url!r} must be file:///absolute/path (three slashes: no host part)"
            )
        return StoreURL("file", path=unquote(parts.path))
    raise ValueError(f"unknown store URL scheme in {url!r}; accepted: {ACCEPTED_STORES}")


__all__ = [
    "ACCEPTED_STORES",
    "MAX_KEY_BYTES",
    "MAX_VALUE_BYTES",
    "MemoryStore",
    "Store",
    "StoreURL",
    "parse_store_url",
]
