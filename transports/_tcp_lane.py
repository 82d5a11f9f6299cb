"""Blocking socket I/O of large TCP frames on a thread of its own, off the event loop.

Why: on the event loop, one thread per rank does every send, every receive and (between
batches) waits for the reduction; a large frame is handed to the kernel in slices with a loop
turn between them, and sending, receiving and reducing take turns instead of overlapping. A
blocking ``sendmsg``/``recv_into`` releases the GIL for the whole system call, so a thread per
connection moves a large payload while the loop, the other connections' threads and numpy's
reductions (which release the GIL too) run on other cores.

A ``Lane`` belongs to one connection. It duplicates the connection's descriptor (the asyncio
transport keeps its own), and its thread runs one job at a time, in order. The duplicate is a
socket object with a timeout: CPython then waits with ``poll`` and never changes the
descriptor's O_NONBLOCK flag, which the event loop shares. The connection's protocol guarantees
that the event loop does not write (sender) or read (receiver) the socket while a job runs.

Lifetime: ``close()`` stops the thread after its current job, and the thread closes the
duplicate as it ends; ``interrupt()`` first shuts the socket down, so that a job blocked on a
peer that stopped reading, or on one that sends nothing more, fails at once. ``wait_closed``
returns when the thread is gone: no thread outlives its transport.
"""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

# A job's poll() waits at most this long between two bytes moved. Stalls end through
# interrupt() (the transport's abort and close), not through this.
_POLL_TIMEOUT_S = 24 * 3600.0


class PeerClosed(ConnectionError):
    """The peer ended the stream (EOF) before the job had all its bytes."""


def send_all(sock: socket.socket, parts: Sequence[memoryview]) -> None:
    """Write every byte of ``parts`` (header and payload in one ``sendmsg`` where the kernel takes them)."""
    views = [p for p in parts if p.nbytes]
    while views:
        sent = sock.sendmsg(views)
        while sent and views:
            head = views[0]
            if sent >= head.nbytes:
                sent -= head.nbytes
                views.pop(0)
            else:
                views[0] = head[sent:]
                sent = 0


def recv_all(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from the socket.

    Raises:
        PeerClosed: the stream ended first.
    """
    got, total = 0, view.nbytes
    while got < total:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise PeerClosed(f"the peer closed the connection with {total - got} bytes of a frame still to come")
        got += n


class Lane:
    """One thread doing one connection's blocking socket I/O, one job at a time."""

    def __init__(self, fileno: int, name: str) -> None:
        self._sock = socket.socket(fileno=os.dup(fileno))
        try:
            self._sock.settimeout(_POLL_TIMEOUT_S)
        except BaseException:
            self._sock.close()
            raise
        self._jobs: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, asyncio.Future[None], Callable[..., None], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def sock(self) -> socket.socket:
        """The duplicate socket the jobs use."""
        return self._sock

    def submit(self, fn: Callable[..., None], *args: Any) -> asyncio.Future[None]:
        """Run ``fn(self.sock, *args)`` on the thread; the future completes on the calling loop.

        Raises:
            RuntimeError: the lane is closed.
        """
        if self._closed:
            raise RuntimeError("the lane is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._jobs.put((loop, fut, fn, args))
        return fut

    def interrupt(self) -> None:
        """Shut the socket down: a job in progress fails at once, later ones too."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected any more: nothing to wake

    def close(self) -> None:
        """Let the thread end after the jobs already submitted. Idempotent."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def wait_closed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the thread to end (after ``close``); True if it did."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.0005
        while self._thread.is_alive():
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        return True

    def _run(self) -> None:
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                loop, fut, fn, args = job
                error: BaseException | None = None
                try:
                    fn(self._sock, *args)
                except BaseException as exc:  # handed to the loop, which decides
                    error = exc
                try:
                    loop.call_soon_threadsafe(_settle, fut, error)
                except RuntimeError:
                    pass  # the loop is closed: nobody waits any more
        finally:
            self._sock.close()


def _settle(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


__all__ = ["Lane", "PeerClosed", "recv_all", "send_all"]
