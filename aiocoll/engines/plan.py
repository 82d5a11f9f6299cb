"""The seam between a collective and the engine that runs it.

A collective (``aiocoll.collectives``) resolves its group, checks its arguments, claims its
place in the group's order, and then hands a :class:`Plan` to the group's engine, chosen in one
place (``aiocoll.engines.select.engine_for``):

- message passing (``aiocoll.engines.messages``): an algorithm's schedule, run over the
  communicator's links, on any transport;
- the same-host engine (``aiocoll.engines.shm``): the collective computed in a segment every
  member maps, for groups whose every link is a transport with ``shared_segments``.

Every engine runs a plan inside the same scope (``aiocoll.engines.scope``): registered with the
communicator (so a dead peer, an abort or a mismatch fails it on every member), bounded by the
plan's timeout (naming the members it still waits for), and ended there, successfully or not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..algorithms import Schedule
from ..core.wire import NO_CALL, Call, Kind

if TYPE_CHECKING:
    from ..groups.group import ProcessGroup

Array = np.ndarray[Any, Any]
Reduce = Callable[[Array, Array], None]


@dataclass(slots=True)
class Plan:
    """What a collective hands its engine: everything checked and claimed, nothing sent yet.

    ``collective`` says what to compute (the engines and the algorithm table know it by that
    name); ``kind``, ``dtype``, ``count``, ``op`` and ``call`` are what every frame of it
    carries, so that members that called something else find out.

    ``x`` and ``out`` are 1-d views of the caller's input and of the result (for broadcast one
    buffer, passed as both; for reduce ``out`` starts as a copy of ``x``). ``schedule``: for
    collectives with one algorithm, the schedule to run (``(rank, size) -> Schedule``); the
    others get theirs from the algorithm table (``aiocoll.algorithms.select``).
    """

    collective: str
    kind: Kind
    seq: int
    timeout: float
    call: Call = NO_CALL
    dtype: int = 0
    count: int = 0
    op: int = 0  # a ReduceOp for reducing collectives; 0 for the others
    root: int = 0
    x: Array | None = None
    out: Array | None = None
    reduce: Reduce | None = None
    schedule: Callable[[int, int], Schedule] | None = None
    agree: bool = False
    check_count: bool = True
    offload: bool = False
    name: str = ""  # what errors call it, when not ``collective`` (e.g. "all_reduce_coalesced")

    @property
    def label(self) -> str:
        """The collective's name in errors and in what the members compare."""
        return self.name or self.collective


class Engine(Protocol):
    """Runs plans for one group (message passing is one engine for every group)."""

    def reserve(self) -> int:
        """Claim a turn, before the collective's first await (its place in the engine's order);
        the returned ticket goes to ``run`` or back through ``abandon``."""
        ...

    def abandon(self, ticket: int) -> None:
        """Give back a turn that will never run."""
        ...

    async def run(self, group: ProcessGroup, plan: Plan, ticket: int) -> None:
        """Run ``plan`` as this member's part of the collective.

        Raises:
            CollectiveError: timeout, dead peer, mismatch or remote abort, on every member.
        """
        ...


__all__ = ["Engine", "Plan"]
