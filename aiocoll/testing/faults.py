"""Fault injection for tests of distributed code: kill a rank, cut a link, slow a rank, stop one.

Called from inside a rank (the body given to ``run_ranks`` or ``run_processes``), about that
rank::

    async def body(rank):
        if rank == 2:
            faults.kill()                       # rank 2 dies here, without a goodbye
        with pytest.raises(aiocoll.PeerFailureError):
            await aiocoll.all_reduce(x)         # the others are told who died

What each one looks like to the other ranks is what the real fault looks like: a killed rank
is a crashed process (its connections break without a goodbye), a cut link a connection that
broke, a delayed rank a slow sender, a stopped process one that no longer answers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from ..core.errors import TransportError
from ..core.world import current_world, in_harness


class RankKilled(Exception):
    """This rank was ended by :func:`kill` in a test harness.

    ``run_ranks`` takes it as an expected outcome: the rank's slot holds it, the others go on.
    """


def kill() -> NoReturn:
    """End this rank now, as a crash would: no goodbye, nothing flushed.

    In a process (``run_processes``, ``aiocoll run``) that is SIGKILL. In ``run_ranks``, the
    rank's connections are aborted (peers see it as lost) and :class:`RankKilled` is raised,
    which ends its body.

    Raises:
        RankKilled: in a test harness (always, by design).
        NotInitializedError: outside a rank.
    """
    w = current_world()
    if not in_harness.get():
        os.kill(os.getpid(), signal.SIGKILL)
    w.closed = True  # this rank takes no further part; leave() has nothing left to do
    w.comm.abort()
    raise RankKilled(f"rank {w.rank} was killed by aiocoll.testing.faults.kill()")


def cut_link(peer: int) -> None:
    """Break this rank's connection to global rank ``peer``, as a network fault would.

    Both ends see the connection break: this rank at once, ``peer`` as its transport notices
    (at once over tcp, shm and inproc). Collectives that still need a frame across the link
    fail with ``PeerFailureError`` on every member; the rest of the world is untouched.

    Raises:
        ValueError: ``peer`` is this rank or has no connection to it.
        NotInitializedError: outside a rank.
    """
    w = current_world()
    conn = w.comm._conns.get(peer)
    if peer == w.rank or conn is None:
        raise ValueError(f"rank {w.rank} has no connection to rank {peer} to cut")
    why = TransportError(f"link between ranks {w.rank} and {peer} cut by aiocoll.testing.faults.cut_link")
    target = getattr(conn, "_target", None)  # inproc: the other end hears only if told
    conn.abort()
    if target is not None:
        target._lose(w.rank, why)
    w.comm.peer_lost(peer, why)


def delay_sends(seconds: float) -> Callable[[], None]:
    """Make every frame this rank sends from now on wait ``seconds`` first (a slow rank, a slow
    network); return a function that undoes it.

    Frames keep their order: each connection's sends are delayed, not reordered.

    Raises:
        ValueError: ``seconds`` is negative.
        NotInitializedError: outside a rank.
    """
    if not seconds >= 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}")
    w = current_world()
    originals: list[tuple[Any, Any]] = []
    shortcuts: list[Any] = []
    for conn in list(w.comm._conns.values()):
        original = conn.send

        async def slow(key: bytes, payload: Any, _send: Any = original) -> None:
            await asyncio.sleep(seconds)
            await _send(key, payload)

        setattr(conn, "send", slow)
        originals.append((conn, original))
        # Small frames may be written at once, without send() (a connection's send_now): that
        # shortcut is closed while the delay holds, so that every frame takes the slow way.
        now = getattr(conn, "send_now", None)
        if now is not None:
            setattr(conn, "send_now", lambda key, payload: False)
            shortcuts.append((conn, now))

    def restore() -> None:
        for conn, original in originals:
            setattr(conn, "send", original)
        for conn, now in shortcuts:
            setattr(conn, "send_now", now)

    return restore


def stop(seconds: float) -> None:
    """Freeze this process for ``seconds`` (SIGSTOP, then SIGCONT from a helper): its
    connections stay open but nothing answers, as with a rank stuck in a long GC or swapped out.

    Only in a process of its own (``run_processes``, ``aiocoll run``): in ``run_ranks`` every rank
    shares one process. There, ``await asyncio.sleep(seconds)`` in a rank's body stops that rank's
    part instead.

    Raises:
        RuntimeError: called in the in-process harness.
        ValueError: ``seconds`` is negative.
    """
    if in_harness.get():
        raise RuntimeError(
            "faults.stop() freezes the whole process, and run_ranks' ranks share one: "
            "use run_processes, or await asyncio.sleep() in the rank to stop only its part"
        )
    if not seconds >= 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}")
    subprocess.Popen(
        [sys.executable, "-c", f"import os, signal, time; time.sleep({float(seconds)!r}); "
         f"os.kill({os.getpid()}, signal.SIGCONT)"],
        start_new_session=False,
    )
    os.kill(os.getpid(), signal.SIGSTOP)


__all__ = ["RankKilled", "cut_link", "delay_sends", "kill", "stop"]
