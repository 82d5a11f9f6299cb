"""Rooted collectives for large payloads, composed of the full-mesh exchanges in ``direct.py``.

A binomial tree moves the whole payload ceil(log2 W) times along its deepest path; these move
each byte about twice, spread over every link, which wins once the payload is large.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._schedule import Recv, Schedule, Send, chunk_bounds
from .direct import direct_all_gather_chunks, direct_reduce_scatter_chunks
from .tree import Reduce


def scatter_allgather_broadcast(rank: int, size: int, root: int, buf: np.ndarray[Any, Any]) -> Schedule:
    """Broadcast: the root sends chunk p to member p, then every member all-gathers the chunks.

    ``buf`` (1-d) holds the root's data on the root; afterwards on every member.
    """
    bounds = chunk_bounds(buf.shape[0], size)
    lo, hi = bounds[rank]
    if rank == root:
        yield [Send(p, buf[a:b]) for p, (a, b) in enumerate(bounds) if p != root]
    else:
        yield [Recv(root, buf[lo:hi])]
    yield from direct_all_gather_chunks(rank, size, buf, bounds)


def reduce_scatter_gather_reduce(
    rank: int, size: int, root: int, x: np.ndarray[Any, Any], out: np.ndarray[Any, Any], reduce: Reduce
) -> Schedule:
    """Reduce: a reduce-scatter (member r owns chunk r), then every chunk goes to the root.

    ``x`` (1-d) is this member's input; ``out`` (same size) holds the reduction on the root
    (elsewhere only this member's own chunk of it).
    """
    bounds = chunk_bounds(x.shape[0], size)
    lo, hi = bounds[rank]
    yield from direct_reduce_scatter_chunks(rank, size, x, out[lo:hi], bounds, reduce)
    if rank == root:
        yield [Recv(p, out[a:b]) for p, (a, b) in enumerate(bounds) if p != root]
    else:
        yield [Send(root, out[lo:hi])]
