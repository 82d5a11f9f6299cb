"""A ``torch.distributed.Store`` (torch's TCPStore, FileStore, PrefixStore...) as an aiocoll Store.

torch's stores block, so every call runs on a worker thread and the event loop stays free.
Used where torch owns the rendezvous: ``init_process_group("aiocoll")`` (its store) and
``aiocoll.init()`` under torchrun (the agent's store on MASTER_PORT). This module imports
nothing from torch: it only calls the object it is given, so it costs nothing to import.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from ..core.errors import StoreError

T = TypeVar("T")


def _tcp_host(store: Any) -> str | None:
    """The host of the TCPStore under ``store`` (through PrefixStores), or None."""
    for _ in range(16):  # PrefixStores nest a few deep (torch's per-group prefixes), never more
        host = getattr(store, "host", None)
        if isinstance(host, str) and host:
            return host
        store = getattr(store, "underlying_store", None)
        if store is None:
            return None
    return None


class C10dStore:
    """An aiocoll Store over a ``torch.distributed.Store``.

    torch's errors (its timeouts, a lost connection) raise StoreError naming the store and the
    call. ``aclose`` leaves the torch store open: torch owns it. ``route_to`` is the host the
    store lives on, where known (it picks the address this rank listens on).
    """

    def __init__(self, store: Any, *, name: str = "torch's store", route_to: str | None = None) -> None:
        self._store = store
        self._name = name
        self.route_to = route_to if route_to is not None else _tcp_host(store)

    def __repr__(self) -> str:
        return f"C10dStore({self._name})"

    async def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except Exception as exc:  # torch raises RuntimeError subclasses (DistStoreError...)
            raise StoreError(f"{self._name}: {what} failed: {exc}") from exc

    async def set(self, key: str, value: bytes) -> None:
        """See Store.set.

        Raises:
            StoreError: torch's store failed.
        """
        await self._call(f"set {key!r}", self._store.set, key, value)

    async def get(self, key: str, timeout: float | None = None) -> bytes:
        """See Store.get.

        Raises:
            StoreError: the key did not appear within ``timeout``, or torch's store failed.
        """
        await self.wait([key], timeout)
        return bytes(await self._call(f"get {key!r}", self._store.get, key))

    async def add(self, key: str, amount: int = 1) -> int:
        """See Store.add.

        Raises:
            StoreError: torch's store failed.
        """
        return int(await self._call(f"add {key!r}", self._store.add, key, amount))

    async def wait(self, keys: Sequence[str], timeout: float | None = None) -> None:
        """See Store.wait.

        Raises:
            StoreError: some keys did not appear within ``timeout``, or torch's store failed.
        """
        what = f"wait for {list(keys)!r} (timeout {timeout} s)"
        if timeout is None:
            await self._call(what, self._store.wait, list(keys))
        else:
            await self._call(what, self._store.wait, list(keys), timedelta(seconds=timeout))

    async def delete(self, key: str) -> bool:
        """See Store.delete.

        Raises:
            StoreError: torch's store failed.
        """
        return bool(await self._call(f"delete {key!r}", self._store.delete_key, key))

    async def aclose(self) -> None:
        """Nothing to release here: torch owns its store."""
        return None


__all__ = ["C10dStore"]
