"""Run the shm engine's pipelines for W members in one thread, over one plain buffer.

    from aiocoll.testing.simulate_shm import ShmSim
    sim = ShmSim(world=4, part=4096, depth=2)
    sim.run(lambda ctx: pipelines.all_reduce_pipelined(ctx, op, code, xs[ctx.rank], outs[ctx.rank]))

The pipelines (``aiocoll.engines.shm.pipelines``) are generators that copy and reduce through a
group segment and yield a ``Wait`` whenever they need other members' counters. Here every
member's generator shares one segment laid out in an ordinary ``bytearray``; a scheduler resumes
members one yield at a time, in an order drawn from a seeded random generator, so that many
interleavings are tried, and only when the member's wait is satisfied. No process, thread,
doorbell or event loop is involved, so a failure replays exactly from its seed.

A pass over all members in which none can move while some are unfinished is a deadlock
(:class:`~aiocoll.testing.simulate.Deadlock`, "no progress at step k"); members that return
different round counts break the engine's bookkeeping (:class:`ScheduleError`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from ..engines.shm.layout import REDUCED, RELEASED, STAGED, GroupSegment, segment_bytes
from ..engines.shm.pipelines import Algorithm, Context, Wait
from .simulate import Deadlock, ScheduleError


@dataclass
class MemberStats:
    """waits: how many times this member yielded; blocked: how many of those found the
    condition unmet when first checked (it had to wait for another member)."""

    waits: int = 0
    blocked: int = 0


@dataclass
class ShmSim:
    """One group segment in a bytearray, and the bookkeeping the engine keeps across operations
    (``base``: the round where the next operation starts)."""

    world: int
    part: int = 4096
    depth: int = 2
    direct_max: int = 0
    seed: int = 0
    base: int = 0
    stats: list[MemberStats] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.buffer = bytearray(segment_bytes(self.world, self.part, self.depth))
        self.seg = GroupSegment(self.buffer, world=self.world, part=self.part, depth=self.depth,
                                direct_max=self.direct_max)
        self._random = random.Random(self.seed)
        self.stats = [MemberStats() for _ in range(self.world)]

    def _publisher(self, rank: int) -> Callable[[tuple[int, ...], int], None]:
        def publish(which: tuple[int, ...], value: int) -> None:
            for w in which:
                self.seg.set_counter(rank, w, value)

        return publish

    def _ready(self, w: Wait) -> bool:
        return all(self.seg.counter(p, w.which) >= w.target for p in w.members)

    def run(self, build: Callable[[Context], Algorithm]) -> int:
        """Run one operation on every member (``build(ctx)`` makes member ``ctx.rank``'s
        generator); returns its rounds and advances ``base`` by them.

        Raises:
            Deadlock: no member can move.
            ScheduleError: members disagree on the rounds the operation used.
        """
        gens = [build(Context(self.seg, r, self.base, self._publisher(r))) for r in range(self.world)]
        waiting: list[Wait | None] = [None] * self.world
        started = [False] * self.world
        rounds: list[int | None] = [None] * self.world
        step = 0
        while any(r is None for r in rounds):
            step += 1
            moved = False
            order = list(range(self.world))
            self._random.shuffle(order)
            for r in order:
                if rounds[r] is not None:
                    continue
                w = waiting[r]
                if started[r] and w is not None and not self._ready(w):
                    continue
                try:
                    nxt = gens[r].send(None) if started[r] else next(gens[r])
                except StopIteration as stop:
                    rounds[r] = int(stop.value)
                    moved = True
                    continue
                started[r] = True
                moved = True
                self.stats[r].waits += 1
                if not self._ready(nxt):
                    self.stats[r].blocked += 1
                waiting[r] = nxt
            if not moved:
                stuck = {r: waiting[r] for r in range(self.world) if rounds[r] is None}
                raise Deadlock(f"no progress at step {step}: members waiting {stuck}")
        if len(set(rounds)) != 1:
            raise ScheduleError(f"members used different numbers of rounds: {rounds}")
        used = rounds[0]
        assert used is not None
        # The engine advances every member's counters by the rounds used: they must all be there.
        for r in range(self.world):
            for which in (STAGED, REDUCED, RELEASED):
                if self.seg.counter(r, which) != self.base + used:
                    raise ScheduleError(
                        f"member {r}: counter {which} is {self.seg.counter(r, which)} after the operation, "
                        f"expected {self.base + used}"
                    )
        self.base += used
        return used


__all__ = ["MemberStats", "ShmSim"]
