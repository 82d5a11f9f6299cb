"""Waiting on shared memory without burning a core: memory ordering, bounded spins and doorbells.

Processes that share memory publish progress through 64-bit counters, each written by one
process only. Two facts about x86-64 (total store order) make that safe from Python:

- stores become visible in program order, and loads are not reordered with other loads, so
  "write the data, then write the counter" on one side and "read the counter, then read the
  data" on the other never shows a reader stale data;
- an aligned 8-byte store or load (``memoryview.cast("Q")[i]``) is a single instruction, so a
  counter is never seen half-written.

The one reordering x86 does allow is a load passing an earlier store to another address. That
matters for sleeping: a waiter sets its "sleeping" flag and then re-reads the counter, while the
publisher stores the counter and then reads the flag. Without a fence both could miss the other
and the waiter would sleep through its wake-up. ``fence()`` closes that window; sleeps are also
bounded (``SLEEP_SLICE_S``), so even a missed doorbell costs milliseconds, never a hang.

Other architectures (ARM, POWER) reorder far more, so the importers refuse to load there
(``check_memory_model``).

A waiter spins for a bounded time (``SPIN_S``: a peer usually answers within microseconds and a
spin costs no system call), then sleeps on a doorbell: an abstract-namespace Unix datagram
socket (no file, gone with the process) that the event loop watches with ``add_reader``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import platform
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: Architectures whose memory model the counters rely on.
_TSO = {"x86_64", "amd64", "i386", "i686", "x86"}

#: How long a waiter spins before it sleeps by default (seconds; Settings.shm_spin_us).
SPIN_S = 200e-6
#: Longest single sleep on a doorbell: bounds the cost of a missed wake-up.
SLEEP_SLICE_S = 0.005

# Acquiring and releasing a lock executes a LOCK-prefixed read-modify-write (sem_wait/sem_post
# in CPython's lock), which on x86 is a full barrier: earlier stores drain before later loads.
_fence_lock = threading.Lock()


def check_memory_model() -> None:
    """Raise ImportError unless this CPU orders memory as the shared counters assume (x86 TSO).

    Raises:
        ImportError: another architecture; the shm transport and fast paths are unavailable.
    """
    machine = platform.machine().lower()
    if machine not in _TSO:
        raise ImportError(
            f"aiocoll's shared-memory code relies on x86 total store order; this CPU is {machine!r}. "
            "Use transport='tcp'."
        )


def fence() -> None:
    """A full memory barrier: stores issued before it are visible before loads issued after it."""
    _fence_lock.acquire()
    _fence_lock.release()


def usable_cpus() -> int:
    """Cores this process may run on: spinning pays only when every waiter has one."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def spin_until(ready: Callable[[T], bool], arg: T, seconds: float, yield_cpu: bool = True) -> bool:
    """Poll ``ready(arg)`` for up to ``seconds``; True as soon as it holds.

    With ``yield_cpu`` (Settings.shm_spin_yield) each miss yields the CPU (``sched_yield``): if
    the member we wait for shares our core (a busy machine, more ranks than cores), it runs now
    instead of after our time slice; on an idle core the call returns at once.
    """
    end = time.perf_counter() + seconds
    while True:
        if ready(arg):
            return True
        if time.perf_counter() >= end:
            return False
        if yield_cpu:
            os.sched_yield()


class Doorbell:
    """A wake-up channel any process of this host can ring by name; this process waits on it.

    The name is random (16 hex digits), so strangers cannot guess it; one that rings anyway only
    causes a spurious wake-up, after which the waiter re-checks its condition and sleeps again.
    """

    def __init__(self) -> None:
        self.name = f"aiocoll-bell-{os.getpid()}-{secrets.token_hex(8)}"
        self._rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._rx.bind("\0" + self.name)
            self._rx.setblocking(False)
            self._tx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._tx.setblocking(False)
        except BaseException:
            self._rx.close()
            raise
        self.closed = False

    def ring(self, name: str) -> None:
        """Wake whoever waits on the doorbell called ``name``. Never blocks, never raises."""
        if self.closed or not name:
            return
        try:
            self._tx.sendto(b"\x01", "\0" + name)
        except OSError as exc:
            # EAGAIN: its queue is full of rings already. ECONNREFUSED/ENOENT: it is gone, and
            # whoever watches for dead peers reports that.
            if exc.errno not in (errno.EAGAIN, errno.ECONNREFUSED, errno.ENOENT, errno.EWOULDBLOCK):
                raise

    def drain(self) -> None:
        """Forget the rings received so far."""
        while True:
            try:
                self._rx.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return

    async def wait(self, timeout: float, also: asyncio.Future[Any] | None = None) -> None:
        """Return when rung (rings before the call count), when ``also`` completes, or after
        ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = self._rx.fileno()

        def wake(_: object = None) -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(fd, wake)
        handle = loop.call_later(timeout, wake)
        if also is not None:
            also.add_done_callback(wake)
        try:
            await fut
        finally:
            handle.cancel()
            loop.remove_reader(fd)
            if also is not None:
                also.remove_done_callback(wake)
        self.drain()

    def wait_blocking(self, timeout: float) -> None:
        """Block the calling thread until rung or ``timeout`` seconds pass (worker threads only)."""
        try:
            select.select([self._rx], [], [], timeout)
        except (OSError, ValueError):
            return  # closed under us: the caller sees its abort flag
        self.drain()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._rx.close()
        self._tx.close()


__all__ = ["Doorbell", "SLEEP_SLICE_S", "SPIN_S", "check_memory_model", "fence", "spin_until", "usable_cpus"]
