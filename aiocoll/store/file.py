"""A store in a directory on a shared filesystem, for ranks with no network rendezvous.

One file per key, holding the raw value bytes (nothing is pickled)::

    <dir>/k-<readable prefix of the key>-<sha256 of the key>   a value
    <dir>/t-<random>.tmp                                        a write in progress
    <dir>/lock                                                  serialises add()

Jobs: ``open_store`` (through ``open_job_store``) puts each job's keys in a directory of its
own, ``<dir>/job-<readable id>-<sha256 of the id>``, named after the launcher's job id, so a
directory reused by the next job (or by a job that crashed halfway through meeting) never
hands it the last job's addresses or counters. Nothing needs the keys once the ranks have met,
so job directories untouched for ``STALE_AFTER_S`` (a day) are removed when a job opens the
store, as are temporary files of writers that died.

The hash makes any key a safe, fixed-length file name; the prefix is only for people reading
the directory. ``set`` writes a temporary file and ``os.replace``s it over the key's file, so a
reader sees the old value or the new one, never half of one. ``add`` holds ``fcntl.flock`` on
the lock file across its read-modify-write; flock works between processes and between open
files of one process, and Linux NFS clients emulate it with byte-range locks.

Waiting is polling, because filesystems (NFS, Lustre, GPFS) deliver no change notification
across hosts: ``get`` and ``wait`` look for the file, then sleep ``poll_min`` (1 ms), doubling
each time up to ``poll_max`` (100 ms), until the key appears or the timeout passes. A key
therefore shows up at most ``poll_max`` after its file becomes visible here; on NFS,
visibility itself can lag by the attribute and lookup caches (``actimeo``, ``lookupcache``),
so mount with ``lookupcache=positive`` or shorter ``actimeo`` for fast rendezvous.

All file I/O runs in worker threads so that a slow filesystem never blocks the event loop.
The directory is created with mode 0700: file permissions are this store's only protection.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from ..core.errors import StoreError
from .base import (
    MAX_VALUE_BYTES,
    add_to_counter,
    check_amount,
    check_key,
    check_timeout,
    check_value,
)

_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")
_PREFIX_CHARS = 48
#: A job directory (or a temporary file) not modified for this long belongs to a job that has
#: met long ago or died: ranks only use the store while they meet.
STALE_AFTER_S = 24 * 3600.0


class FileStore:
    """A store kept as files in ``path``, a directory shared by every rank (created if missing).

    Cancellation: a cancelled call may leave its worker thread to finish the file operation it
    started; a ``set`` either fully happens or not at all.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, poll_min: float = 0.001, poll_max: float = 0.1
    ) -> None:
        """Open (and create) the store directory.

        Raises:
            ValueError: ``path`` exists and is not a directory, or bad poll intervals.
            StoreError: the directory cannot be created.
        """
        if not 0 < poll_min <= poll_max:
            raise ValueError(f"need 0 < poll_min <= poll_max, got {poll_min} and {poll_max}")
        self._dir = Path(path)
        if self._dir.exists() and not self._dir.is_dir():
            raise ValueError(f"file store path {str(self._dir)!r} exists and is not a directory")
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create file store directory {str(self._dir)!r}: {exc}") from exc
        self._poll_min = poll_min
        self._poll_max = poll_max
        self._closed = False

    @property
    def path(self) -> Path:
        """The store's directory."""
        return self._dir

    def __repr__(self) -> str:
        return f"FileStore({str(self._dir)!r})"

    def path_of(self, key: str) -> Path:
        """The file that holds ``key``'s value.

        Raises:
            ValueError, TypeError: invalid key.
        """
        raw = check_key(key)
        prefix = _UNSAFE.sub("_", key[:_PREFIX_CHARS])
        return self._dir / f"k-{prefix}-{hashlib.sha256(raw).hexdigest()}"

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self!r} is closed")

    # -- blocking helpers, run in worker threads ----------------------------------------------

    def _read(self, target: Path) -> bytes | None:
        try:
            with open(target, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > MAX_VALUE_BYTES:
                    raise StoreError(f"{target} holds {size} bytes, more than {MAX_VALUE_BYTES}")
                return f.read(MAX_VALUE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {target}: {exc}") from exc

    def _write(self, target: Path, data: bytes) -> None:
        tmp = self._dir / f"t-{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
            # No fsync: the store must be atomic for readers, not durable across a crash.
            os.replace(tmp, target)
        except OSError as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise StoreError(f"cannot write {target}: {exc}") from exc

    def _add(self, key: str, target: Path, amount: int) -> int:
        try:
            lock = open(self._dir / "lock", "ab")
        except OSError as exc:
            raise StoreError(f"cannot open the lock file of {self!r}: {exc}") from exc
        with lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            # Closing the file releases the lock, also when the read or write raises.
            new, encoded = add_to_counter(key, self._read(target), amount)
            self._write(target, encoded)
            return new

    def _delete(self, target: Path) -> bool:
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot delete {target}: {exc}") from exc
        return True

    # -- the Store interface ----------------------------------------------------------------

    async def set(self, key: str, value: bytes) -> None:
        """See Store.set; atomic: readers see the old value or the new one.

        Raises:
            ValueError, TypeError: invalid key or value.
            StoreError: the file cannot be written, or the store is closed.
        """
        target = self.path_of(key)
        data = check_value(value)
        self._check_open()
        await asyncio.to_thread(self._write, target, data)

    def _probe(self, targets: list[Path], read: bool) -> dict[Path, bytes]:
        # One thread hop per polling round, however many keys are awaited.
        found: dict[Path, bytes] = {}
        for target in targets:
            if read:
                value = self._read(target)
                if value is not None:
                    found[target] = value
            elif target.exists():
                found[target] = b""
        return found

    async def _poll(self, targets: list[Path], timeout: float | None, *, read: bool) -> dict[Path, bytes]:
        # Returns once every target exists: their contents if ``read``, else empty bytes.
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        delay = self._poll_min
        found: dict[Path, bytes] = {}
        while True:
            self._check_open()
            missing = [target for target in targets if target not in found]
            found.update(await asyncio.to_thread(self._probe, missing, read))
            if len(found) == len(targets):
                return found
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError
                await asyncio.sleep(min(delay, remaining))
            else:
                await asyncio.sleep(delay)
            delay = min(delay * 2, self._poll_max)

    async def get(self, key: str, timeout: float | None = None) -> bytes:
        """See Store.get; waits by polling (see the module docstring).

        Raises:
            ValueError, TypeError: invalid key or timeout.
            StoreError: timeout (naming the key), an unreadable file, or the store is closed.
        """
        target = self.path_of(key)
        timeout = check_timeout(timeout)
        try:
            found = await self._poll([target], timeout, read=True)
        except TimeoutError:
            raise StoreError(f"timed out after {timeout} s waiting for key {key!r} in {self!r}") from None
        return found[target]

    async def add(self, key: str, amount: int = 1) -> int:
        """See Store.add; serialised by flock on ``<dir>/lock``.

        Raises:
            ValueError, TypeError: invalid key or amount.
            StoreError: not a counter, overflow, a file error, or the store is closed.
        """
        target = self.path_of(key)
        check_amount(amount)
        self._check_open()
        return await asyncio.to_thread(self._add, key, target, amount)

    async def wait(self, keys: Sequence[str], timeout: float | None = None) -> None:
        """See Store.wait; waits by polling.

        Raises:
            ValueError, TypeError: invalid keys or timeout.
            StoreError: timeout (naming the missing keys), or the store is closed.
        """
        if isinstance(keys, str | bytes):
            raise TypeError("wait() takes a sequence of keys, not a single key")
        keys = list(keys)
        targets = {self.path_of(key): key for key in keys}
        timeout = check_timeout(timeout)
        try:
            await self._poll(list(targets), timeout, read=False)
        except TimeoutError:
            missing = [key for target, key in targets.items() if not target.exists()]
            raise StoreError(f"timed out after {timeout} s waiting for keys {missing!r} in {self!r}") from None

    async def delete(self, key: str) -> bool:
        """See Store.delete.

        Raises:
            ValueError, TypeError: invalid key.
            StoreError: the file cannot be removed, or the store is closed.
        """
        target = self.path_of(key)
        self._check_open()
        return await asyncio.to_thread(self._delete, target)

    async def aclose(self) -> None:
        """Stop using the directory (its files stay for other ranks). Idempotent."""
        self._closed = True


def job_directory(root: str | os.PathLike[str], job_id: str) -> Path:
    """The directory that holds ``job_id``'s keys under ``root``."""
    prefix = _UNSAFE.sub("_", job_id[:_PREFIX_CHARS])
    digest = hashlib.sha256(job_id.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return Path(root) / f"job-{prefix}-{digest}"


def remove_stale(root: str | os.PathLike[str], keep: Path | None = None, *, older_than: float = STALE_AFTER_S) -> list[Path]:
    """Remove job directories and temporary files under ``root`` idle for ``older_than`` s.

    Returns what was removed. Errors are ignored: another job may be removing the same entry.
    """
    removed: list[Path] = []
    cutoff = time.time() - older_than
    try:
        entries = list(Path(root).iterdir())
    except OSError:
        return removed
    for entry in entries:
        if entry == keep or not (entry.name.startswith("job-") or entry.name.endswith(".tmp")):
            continue
        try:
            if entry.lstat().st_mtime >= cutoff:
                continue
            if entry.is_dir() and not entry.is_symlink():
                # A stale job's own temporary files are swept with it.
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed


async def open_job_store(root: str | os.PathLike[str], job_id: str | None) -> FileStore:
    """A FileStore for ``job_id`` under ``root`` (``root`` itself when None); stale entries
    of other jobs are removed first (see the module docstring).

    Raises:
        ValueError: ``root`` exists and is not a directory.
        StoreError: a directory cannot be created.
    """
    path = Path(root) if job_id is None else job_directory(root, job_id)
    if job_id is not None and not Path(root).is_dir():
        try:  # 0700 like the store's own directory: job names are nobody else's business
            await asyncio.to_thread(Path(root).mkdir, 0o700, True, True)
        except OSError as exc:
            raise StoreError(f"cannot create file store directory {str(root)!r}: {exc}") from exc
    store = await asyncio.to_thread(FileStore, path)
    await asyncio.to_thread(remove_stale, root, path)
    return store


__all__ = ["FileStore", "STALE_AFTER_S", "job_directory", "open_job_store", "remove_stale"]
