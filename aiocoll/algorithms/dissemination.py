"""Dissemination barrier: ceil(log2 W) rounds of empty messages, any W.

In round k every rank signals rank + 2^k and waits for rank - 2^k; after the last round each
rank has heard, directly or through others, from every rank.
"""

from __future__ import annotations

import numpy as np

from ._schedule import Recv, Schedule, Send

_EMPTY = np.empty(0, dtype=np.uint8)


def dissemination_barrier(rank: int, size: int) -> Schedule:
    dist = 1
    while dist < size:
        yield [Send((rank + dist) % size, _EMPTY), Recv((rank - dist) % size, np.empty(0, dtype=np.uint8))]
        dist <<= 1
