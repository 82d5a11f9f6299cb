"""The vocabulary of sans-IO collective algorithms.

An algorithm is a generator. Each ``yield`` hands the driver a batch of Send and Recv
operations that may run concurrently; the driver performs them all and resumes the generator,
which then computes locally (reductions, copies) and yields the next batch. Algorithms see
group ranks and numpy arrays only: no sockets, no asyncio, no transports. The same schedule
runs over any transport, and a test can run it with a fake driver.

Matching: the k-th Send from rank a to rank b within one collective meets the k-th Recv on b
from a. An algorithm only has to issue, between each pair of ranks, sends and receives in
the same order on both sides.

Overlap: a plain list is started and waited for before the schedule resumes. To compute while
messages move (reduce one segment while the next is in flight), a schedule yields
``Start(ops)``: the driver starts them and resumes the schedule at once; a later
``Finish(ops)`` (the same Send/Recv objects) resumes it once those are done. Until then a
started Send's data must not change and a started Recv's memory must not be touched. Whatever
was started and not finished is waited for when the schedule ends. Start order is issue order
for matching, whatever order the Finishes come in.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(slots=True)
class Send:
    """Send ``data`` (C-contiguous) to group rank ``peer``. ``data`` must not change until resumed."""

    peer: int
    data: np.ndarray[Any, Any]


@dataclass(slots=True)
class Recv:
    """Receive into ``into`` (C-contiguous, writable) from group rank ``peer``."""

    peer: int
    into: np.ndarray[Any, Any]


Op = Send | Recv


@dataclass(slots=True)
class Start:
    """Start ``ops`` and resume the schedule at once (they are waited for by a later Finish)."""

    ops: list[Op]


@dataclass(slots=True)
class Finish:
    """Resume the schedule once ``ops`` (each given to an earlier Start) are done."""

    ops: list[Op]


Batch = list[Op] | Start | Finish
Schedule = Generator[Batch, None, None]


def chunk_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Split ``n`` elements into ``parts`` contiguous runs whose sizes differ by at most one."""
    base, extra = divmod(n, parts)
    bounds = []
    start = 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds
