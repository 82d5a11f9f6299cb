"""The vocabulary of sans-IO collective algorithms.

An algorithm is a generator. Each ``yield`` hands the driver a batch of Send and Recv
operations that may run concurrently; the driver performs them all and resumes the generator,
which then computes locally (reductions, copies) and yields the next batch. Algorithms see
group ranks and numpy arrays only: no sockets, no asyncio, no transports. The same schedule
runs over any transport, and a test can run it with a fake driver.

Matching: the k-th Send from rank a to rank b within one collective meets the k-th Recv on b
from a. An algorithm only has to issue, between each pair of ranks, sends and receives in
the same order on both sides.
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
Schedule = Generator[list[Op], None, None]


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
