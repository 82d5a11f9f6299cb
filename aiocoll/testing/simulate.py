"""Run sans-IO schedules for N ranks in lockstep: no event loop, no transport, no sockets.

    from aiocoll.testing.simulate import simulate
    from aiocoll.algorithms import ring

    outs = [np.empty(10) for _ in range(4)]
    sim = simulate([ring.ring_all_reduce(r, 4, xs[r], outs[r], add) for r in range(4)])
    sim.ranks[0].bytes_sent, sim.rounds

The simulator keeps the driver's contract (``aiocoll.algorithms._schedule``): each batch a
schedule yields is posted whole, and the schedule resumes once every operation in it is done;
the k-th Send from rank a to rank b meets the k-th Recv on b from a. Time runs in rounds. In
round t every rank without a batch in flight resumes its schedule (its local work) and posts the
next batch; then every batch whose receives have all been sent (in round t or before) completes,
its payloads copied in. A chain of dependent messages therefore costs one round per hop, which
is what ``rounds`` and ``RankStats.finished`` measure: the latency of the schedule in messages.

Sends are eager by default, as over the real transports (a frame that arrives before its
receive is posted waits at the receiver): a send is done when posted. ``rendezvous=True``
makes a send wait until the matching receive is posted too, which finds schedules that only
work because the other side buffers.

A round in which nothing moves while some rank is not finished is a deadlock:
:class:`Deadlock` says "no progress at step t" and what each stuck rank waits for. Messages
that were sent but never received, and payloads whose size differs from the receive's, are
errors too (:class:`ScheduleError`): over a real transport the first would sit unexpected for
ever and the second is a mismatch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..algorithms import Finish, Recv, Schedule, Send, Start


class ScheduleError(AssertionError):
    """The schedules broke the driver's contract (sizes, unreceived messages, bad batches)."""


class Deadlock(ScheduleError):
    """No rank could make progress; the message names the step and what each rank waits for."""


@dataclass
class RankStats:
    """What one rank did.

    steps: batches it yielded (each is one wait of the driver).
    bytes_sent / bytes_received: payload bytes of its sends and receives.
    messages_sent: how many Sends it issued.
    finished: the round in which its last batch completed (0 for a schedule with no batch).
    """

    steps: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    finished: int = 0


@dataclass
class Simulation:
    """The outcome: per-rank statistics and the number of rounds until the last rank finished."""

    ranks: list[RankStats]
    rounds: int

    @property
    def max_bytes_sent(self) -> int:
        return max((r.bytes_sent for r in self.ranks), default=0)

    @property
    def max_steps(self) -> int:
        return max((r.steps for r in self.ranks), default=0)


@dataclass
class _Pending:
    """What a rank waits for: receives to be matched and sends to be taken (and then checked)."""

    recvs: list[tuple[Recv, int]] = field(default_factory=list)  # (op, index among recvs from op.peer)
    sends: list[tuple[Send, int, bytes]] = field(default_factory=list)  # (op, index, payload when posted)


def _payload(a: Any, what: str) -> memoryview:
    if not isinstance(a, np.ndarray):
        raise ScheduleError(f"{what} is a {type(a).__name__}, not a numpy array")
    if not a.flags.c_contiguous:
        raise ScheduleError(f"{what} is not C-contiguous")
    flat: Any = a.reshape(-1)
    return memoryview(flat).cast("B")


def simulate(schedules: Sequence[Schedule], *, rendezvous: bool = False, max_rounds: int = 1_000_000) -> Simulation:
    """Run ``schedules[r]`` as rank r of a group of ``len(schedules)``, in lockstep.

    ``Start`` batches are posted and the schedule resumed in the same round; a ``Finish`` (or
    the end of the schedule, with operations still started) waits like a plain batch. A started
    receive's payload is written only when it is finished (a schedule that reads it earlier
    computes wrong values), and a started send's data must be unchanged when it is finished.

    Args:
        schedules: one generator per rank (group ranks 0..n-1), as an algorithm returns them.
        rendezvous: a send completes only once its receive is posted (default: eager).
        max_rounds: give up (ScheduleError) after this many rounds.

    Returns:
        The per-rank statistics and the round count.

    Raises:
        Deadlock: no rank can progress while some are unfinished ("no progress at step t").
        ScheduleError: a peer out of range, a payload whose size differs from its receive's,
            a message sent and never received, a started send whose data changed, a Finish of
            something not started, or more than ``max_rounds`` rounds.
    """
    n = len(schedules)
    stats = [RankStats() for _ in range(n)]
    # (src, dst) -> payload snapshots in send order
    wire: dict[tuple[int, int], list[bytes]] = {}
    sent_count: dict[tuple[int, int], int] = {}
    recv_count: dict[tuple[int, int], int] = {}
    received: dict[tuple[int, int], int] = {}  # how many receives completed, per (src, dst)
    pending: list[_Pending | None] = [None] * n
    # per rank: id(op) -> the posted entry of each started, unfinished op
    started: list[dict[int, tuple[Any, int, bytes]]] = [{} for _ in range(n)]
    ending = [False] * n
    done = [False] * n
    gens = list(schedules)

    def post(rank: int, batch: Iterable[Any]) -> list[tuple[Any, int, bytes]]:
        posted: list[tuple[Any, int, bytes]] = []
        for op in batch:
            if not isinstance(op, (Send, Recv)) or not 0 <= op.peer < n:
                raise ScheduleError(f"rank {rank} yielded {op!r}: not a Send/Recv to a rank of 0..{n - 1}")
            if op.peer == rank:
                raise ScheduleError(f"rank {rank} yielded {op!r}: a message to itself")
            if isinstance(op, Send):
                data = bytes(_payload(op.data, f"rank {rank}'s send to {op.peer}"))
                key = (rank, op.peer)
                k = sent_count.get(key, 0)
                sent_count[key] = k + 1
                wire.setdefault(key, []).append(data)
                stats[rank].bytes_sent += len(data)
                stats[rank].messages_sent += 1
                posted.append((op, k, data))
            else:
                _payload(op.into, f"rank {rank}'s receive from {op.peer}")
                if not op.into.flags.writeable:
                    raise ScheduleError(f"rank {rank}'s receive from {op.peer} is read-only")
                key = (op.peer, rank)
                k = recv_count.get(key, 0)
                recv_count[key] = k + 1
                posted.append((op, k, b""))
        return posted

    def wait_for(entries: Iterable[tuple[Any, int, bytes]]) -> _Pending:
        p = _Pending()
        for op, k, data in entries:
            if isinstance(op, Send):
                p.sends.append((op, k, data))
            else:
                p.recvs.append((op, k))
        return p

    def advance(rank: int, t: int) -> bool:
        mine = started[rank]
        while True:
            try:
                batch = next(gens[rank])
            except StopIteration:
                if mine:
                    ending[rank] = True
                    pending[rank] = wait_for(mine.values())
                    mine.clear()
                    return True
                done[rank] = True
                stats[rank].finished = t - 1  # its last batch completed in the round before
                return True
            if isinstance(batch, Start):
                for posted in post(rank, batch.ops):
                    mine[id(posted[0])] = posted
                continue
            stats[rank].steps += 1
            if isinstance(batch, Finish):
                entries = []
                for op in batch.ops:
                    entry = mine.pop(id(op), None)
                    if entry is None:
                        raise ScheduleError(f"rank {rank} finished {op!r}, which it had not started")
                    entries.append(entry)
                pending[rank] = wait_for(entries)
            else:
                pending[rank] = wait_for(post(rank, batch))
            return True

    def try_complete(rank: int, t: int) -> bool:
        p = pending[rank]
        assert p is not None
        for op, k in p.recvs:
            if len(wire.get((op.peer, rank), ())) <= k:
                return False
        if rendezvous:
            for send, k, _data in p.sends:
                if recv_count.get((rank, send.peer), 0) <= k:
                    return False
        for send, k, data in p.sends:
            if bytes(_payload(send.data, "send")) != data:
                raise ScheduleError(f"rank {rank} changed the data of its send {k} to rank {send.peer} before it finished")
        for op, k in p.recvs:
            key = (op.peer, rank)
            data = wire[key][k]
            view = _payload(op.into, f"rank {rank}'s receive from {op.peer}")
            if len(data) != view.nbytes:
                raise ScheduleError(
                    f"rank {op.peer} sent {len(data)} bytes to rank {rank}, which received into {view.nbytes}"
                )
            view[:] = data
            received[key] = received.get(key, 0) + 1
            stats[rank].bytes_received += len(data)
        pending[rank] = None
        if ending[rank]:
            done[rank] = True
            stats[rank].finished = t
        return True

    t = 0
    while not all(done):
        t += 1
        if t > max_rounds:
            raise ScheduleError(f"gave up after {max_rounds} rounds")
        moved = False
        for r in range(n):
            if not done[r] and pending[r] is None:
                moved |= advance(r, t)
        for r in range(n):
            if pending[r] is not None:
                moved |= try_complete(r, t)
        if not moved and not all(done):
            raise Deadlock(f"no progress at step {t}: " + _stuck(pending, done, wire, recv_count, rendezvous))
    for (src, dst), q in wire.items():
        if received.get((src, dst), 0) < len(q):
            unreceived = len(q) - received.get((src, dst), 0)
            raise ScheduleError(f"rank {src} sent {unreceived} message(s) to rank {dst} that were never received")
    return Simulation(stats, max((s.finished for s in stats), default=0))


def _stuck(
    pending: list[_Pending | None],
    done: list[bool],
    wire: dict[tuple[int, int], list[bytes]],
    recv_posted: dict[tuple[int, int], int],
    rendezvous: bool,
) -> str:
    parts = []
    for r, p in enumerate(pending):
        if done[r] or p is None:
            continue
        waits = sorted({op.peer for op, k in p.recvs if len(wire.get((op.peer, r), ())) <= k})
        what = f"rank {r} waits for a message from ranks {waits}" if waits else f"rank {r} is blocked"
        if rendezvous:
            unposted = sorted({op.peer for op, k, _ in p.sends if recv_posted.get((r, op.peer), 0) <= k})
            if unposted:
                what += f" and for ranks {unposted} to post their receives"
        parts.append(what)
        if len(parts) == 8:
            parts.append("...")
            break
    return "; ".join(parts)


__all__ = ["Deadlock", "RankStats", "ScheduleError", "Simulation", "simulate"]
