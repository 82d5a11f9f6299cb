"""Ring reduce-scatter, all-gather and all-reduce: bandwidth-optimal for any group size.

Each rank talks only to its two neighbours. For all-reduce each rank sends 2(W-1)/W of the
payload in 2(W-1) steps: the most latency of our algorithms, the least traffic per link, and
the one that scales to large groups. Chunks are split as evenly as possible, so any element
count works, including fewer elements than ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ._schedule import Recv, Schedule, Send, chunk_bounds

Reduce = Callable[[np.ndarray[Any, Any], np.ndarray[Any, Any]], None]


def ring_reduce_scatter_inplace(
    rank: int, size: int, buf: np.ndarray[Any, Any], reduce: Reduce, shift: int = 0
) -> Schedule:
    """Reduce ``buf`` across ranks in place; afterwards chunk ``(rank + 1 + shift) % size`` is
    complete on this rank (the other chunks hold partial sums)."""
    bounds = chunk_bounds(buf.shape[0], size)
    nxt, prv = (rank + 1) % size, (rank - 1) % size
    tmp = np.empty(max(hi - lo for lo, hi in bounds), dtype=buf.dtype)
    for step in range(size - 1):
        s_lo, s_hi = bounds[(rank - step + shift) % size]
        r_lo, r_hi = bounds[(rank - step - 1 + shift) % size]
        t = tmp[: r_hi - r_lo]
        yield [Send(nxt, buf[s_lo:s_hi]), Recv(prv, t)]
        reduce(buf[r_lo:r_hi], t)


def ring_all_gather_inplace(rank: int, size: int, buf: np.ndarray[Any, Any], have: int) -> Schedule:
    """Fill every chunk of ``buf`` given that this rank holds chunk ``have`` (= rank + offset)."""
    bounds = chunk_bounds(buf.shape[0], size)
    nxt, prv = (rank + 1) % size, (rank - 1) % size
    offset = (have - rank) % size
    for step in range(size - 1):
        s_lo, s_hi = bounds[(rank + offset - step) % size]
        r_lo, r_hi = bounds[(rank + offset - step - 1) % size]
        yield [Send(nxt, buf[s_lo:s_hi]), Recv(prv, buf[r_lo:r_hi])]


def ring_all_reduce(
    rank: int, size: int, x: np.ndarray[Any, Any], out: np.ndarray[Any, Any], reduce: Reduce
) -> Schedule:
    """out = reduction of every rank's x (flat arrays), identical bits on every rank."""
    out[...] = x
    yield from ring_reduce_scatter_inplace(rank, size, out, reduce)
    yield from ring_all_gather_inplace(rank, size, out, (rank + 1) % size)


def ring_reduce_scatter(
    rank: int, size: int, x: np.ndarray[Any, Any], out: np.ndarray[Any, Any], reduce: Reduce
) -> Schedule:
    """out = chunk ``rank`` of the reduction; x holds ``size`` equal chunks."""
    work = x.copy()
    n = x.shape[0] // size
    # shift -1: the chunk that completes on this rank is chunk `rank`
    yield from ring_reduce_scatter_inplace(rank, size, work, reduce, shift=-1)
    out[...] = work[rank * n : (rank + 1) * n]


def ring_all_gather(rank: int, size: int, x: np.ndarray[Any, Any], out: np.ndarray[Any, Any]) -> Schedule:
    """out (size * len(x) elements) = every rank's x in rank order."""
    n = x.shape[0]
    out[rank * n : (rank + 1) * n] = x
    nxt, prv = (rank + 1) % size, (rank - 1) % size
    for step in range(size - 1):
        s = (rank - step) % size
        r = (rank - step - 1) % size
        yield [Send(nxt, out[s * n : (s + 1) * n]), Recv(prv, out[r * n : (r + 1) * n])]
