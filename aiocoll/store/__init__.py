"""The rendezvous store: how ranks find each other (addresses only, never tensors).

``base.py`` defines the Store interface, the in-memory store and store URLs; ``tcp.py`` the
authenticated TCP store (server and client); ``file.py`` the file-system store; ``c10d.py`` the
adapter to torch's stores. ``open_store`` (here) opens the one a URL names.
"""

from __future__ import annotations

import ssl

from ..core.timeouts import seconds
from .base import ACCEPTED_STORES, MAX_KEY_BYTES, MAX_VALUE_BYTES, MemoryStore, Store, StoreURL, parse_store_url
from .file import open_job_store
from .tcp import connect_or_serve


async def open_store(
    spec: str | Store,
    *,
    rank: int,
    world_size: int,
    secret: bytes,
    timeout: float,
    ssl_server: ssl.SSLContext | None = None,
    ssl_client: ssl.SSLContext | None = None,
    bind_all: bool = False,
    job_id: str | None = None,
) -> Store:
    """Open the store named by ``spec`` for ``rank`` of ``world_size``.

    A Store object is returned as is. ``tcp://host:port``: rank 0 tries to serve on that
    address; if the port is taken (or the host is not one of this machine's addresses) it
    connects as a client to the server already running there. Other ranks connect, retrying
    with backoff until ``timeout``. Every TCP connection proves ``secret`` first; an empty
    secret authenticates nothing (the server logs a warning), as with torch's TCPStore.
    ``file:///path`` opens a FileStore in ``path/job-<job id>`` (``job_id``: ``init`` passes
    the launcher's, see ``aiocoll.launch.env.read_job_id``), so that a directory reused by the
    next job starts empty; directories of jobs idle for a day are removed. Without a job id the
    store is ``path`` itself. The filesystem's permissions are its only protection, so
    ``secret`` is not used. ``bind_all``: see ``connect_or_serve``.

    The caller owns the result and must ``aclose`` it; closing rank 0's store stops the server,
    and other ranks' pending calls then raise StoreError.

    Raises:
        ValueError: unknown scheme (listing the accepted ones), malformed URL, bad rank,
            world_size or timeout.
        TypeError: ``spec`` is neither a str nor a Store.
        StoreError: the store could not be served or reached within ``timeout``, or refused
            the handshake.
    """
    if not isinstance(spec, str):
        if isinstance(spec, Store):
            return spec
        raise TypeError(f"store must be a URL or a Store object, not {type(spec).__name__}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is out of range for world_size {world_size}")
    timeout = seconds(timeout)
    url = parse_store_url(spec)
    if url.scheme == "tcp":
        return await connect_or_serve(
            url.host,
            url.port,
            rank=rank,
            secret=secret,
            timeout=timeout,
            ssl_server=ssl_server,
            ssl_client=ssl_client,
            bind_all=bind_all,
        )
    return await open_job_store(url.path, job_id)


__all__ = [
    "ACCEPTED_STORES",
    "MAX_KEY_BYTES",
    "MAX_VALUE_BYTES",
    "MemoryStore",
    "Store",
    "StoreURL",
    "open_store",
    "parse_store_url",
]
