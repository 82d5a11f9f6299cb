"""Binomial trees: broadcast and reduce in ceil(log2 W) rounds, for small payloads.

Ranks are renumbered relative to the root (v = (rank - root) mod W); in round k a rank whose
relative number has bit k set talks to the rank 2^k below it. Works for any W.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ._schedule import Recv, Schedule, Send

Reduce = Callable[[np.ndarray[Any, Any], np.ndarray[Any, Any]], None]


def binomial_broadcast(rank: int, size: int, root: int, buf: np.ndarray[Any, Any]) -> Schedule:
    """``buf`` holds root's data on root; afterwards on every rank."""
    v = (rank - root) % size
    mask = 1
    while mask < size:
        if v & mask:
            yield [Recv((v - mask + root) % size, buf)]
            break
        mask <<= 1
    mask >>= 1
    sends = []
    while mask > 0:
        if v + mask < size:
            sends.append(Send((v + mask + root) % size, buf))
        mask >>= 1
    if sends:
        yield list(sends)


def binomial_reduce(rank: int, size: int, root: int, acc: np.ndarray[Any, Any], reduce: Reduce) -> Schedule:
    """``acc`` holds this rank's input (a scratch copy); afterwards the reduction on root."""
    v = (rank - root) % size
    tmp = np.empty_like(acc)
    mask = 1
    while mask < size:
        if v & mask:
            yield [Send((v - mask + root) % size, acc)]
            return
        child = v + mask
        if child < size:
            yield [Recv((child + root) % size, tmp)]
            reduce(acc, tmp)
        mask <<= 1
