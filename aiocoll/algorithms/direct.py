"""Direct exchanges: every rank talks to every other in one or two rounds.

With a full mesh of connections and a handful of ranks per group (one per GPU or core of a
host) these have the fewest rounds: all-reduce in one round for small payloads, and in two
rounds (reduce-scatter then all-gather, each rank owning one chunk) for large ones, which
moves exactly as many bytes per rank as the ring does. Reductions run in rank order, so every
rank computes bit-identical results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._schedule import Op, Recv, Schedule, Send, chunk_bounds

Reduce = Callable[[np.ndarray[Any, Any], np.ndarray[Any, Any]], None]
Array = np.ndarray[Any, Any]


def direct_all_reduce(rank: int, size: int, x: Array, out: Array, reduce: Reduce) -> Schedule:
    """One round: everyone sends x to everyone and reduces all W inputs in rank order."""
    inputs: list[Array] = [x] * size
    ops: list[Op] = []
    for p in range(size):
        if p != rank:
            inputs[p] = np.empty_like(x)
            ops += [Send(p, x), Recv(p, inputs[p])]
    yield ops
    out[...] = inputs[0]
    for p in range(1, size):
        reduce(out, inputs[p])


def direct_reduce_scatter_chunks(
    rank: int, size: int, x: Array, mine: Array, bounds: Sequence[tuple[int, int]], reduce: Reduce
) -> Schedule:
    """Chunk ``rank`` (per ``bounds``) of the reduction of every rank's x, into ``mine``."""
    lo, hi = bounds[rank]
    parts: list[Array] = [x[lo:hi]] * size
    ops: list[Op] = []
    for p in range(size):
        if p != rank:
            p_lo, p_hi = bounds[p]
            parts[p] = np.empty(hi - lo, dtype=x.dtype)
            ops += [Send(p, x[p_lo:p_hi]), Recv(p, parts[p])]
    yield ops
    mine[...] = parts[0]
    for p in range(1, size):
        reduce(mine, parts[p])


def direct_all_gather_chunks(rank: int, size: int, out: Array, bounds: Sequence[tuple[int, int]]) -> Schedule:
    """Everyone holds chunk ``rank`` of ``out`` (per ``bounds``); afterwards all of ``out``."""
    lo, hi = bounds[rank]
    ops: list[Op] = []
    for p in range(size):
        if p != rank:
            p_lo, p_hi = bounds[p]
            ops += [Send(p, out[lo:hi]), Recv(p, out[p_lo:p_hi])]
    yield ops


def rsag_all_reduce(rank: int, size: int, x: Array, out: Array, reduce: Reduce) -> Schedule:
    """Two rounds: reduce-scatter (rank r owns chunk r) then all-gather of the owned chunks."""
    bounds = chunk_bounds(x.shape[0], size)
    lo, hi = bounds[rank]
    yield from direct_reduce_scatter_chunks(rank, size, x, out[lo:hi], bounds, reduce)
    yield from direct_all_gather_chunks(rank, size, out, bounds)


def direct_reduce_scatter(rank: int, size: int, x: Array, out: Array, reduce: Reduce) -> Schedule:
    """out = chunk ``rank`` of the reduction; x holds ``size`` equal chunks."""
    n = x.shape[0] // size
    bounds = [(p * n, (p + 1) * n) for p in range(size)]
    yield from direct_reduce_scatter_chunks(rank, size, x, out, bounds, reduce)


def direct_all_gather(rank: int, size: int, x: Array, out: Array) -> Schedule:
    """out = every rank's x in rank order (all of equal length)."""
    n = x.shape[0]
    out[rank * n : (rank + 1) * n] = x
    yield from direct_all_gather_chunks(rank, size, out, [(p * n, (p + 1) * n) for p in range(size)])


def all_to_all(rank: int, size: int, blocks_in: Sequence[Array], blocks_out: Sequence[Array]) -> Schedule:
    """Block p of this rank's input goes to rank p, landing in block ``rank`` of p's output."""
    blocks_out[rank][...] = blocks_in[rank]
    ops: list[Op] = []
    for p in range(size):
        if p != rank:
            ops += [Send(p, blocks_in[p]), Recv(p, blocks_out[p])]
    yield ops


def gather(rank: int, size: int, root: int, x: Array, out: Array | None) -> Schedule:
    """``out`` on root = every rank's x in rank order; the others only send."""
    if rank != root:
        yield [Send(root, x)]
        return
    assert out is not None
    n = x.shape[0]
    out[rank * n : (rank + 1) * n] = x
    yield [Recv(p, out[p * n : (p + 1) * n]) for p in range(size) if p != rank]


def scatter(rank: int, size: int, root: int, x: Array | None, out: Array) -> Schedule:
    """Chunk p of root's x (``size`` equal chunks) lands in ``out`` on rank p."""
    n = out.shape[0]
    if rank != root:
        yield [Recv(root, out)]
        return
    assert x is not None
    out[...] = x[rank * n : (rank + 1) * n]
    yield [Send(p, x[p * n : (p + 1) * n]) for p in range(size) if p != rank]


def permute(rank: int, dst: int, src: int, x: Array, out: Array) -> Schedule:
    """Send x to ``dst`` and receive ``out`` from ``src`` (either may be this rank)."""
    if dst == rank:
        out[...] = x
        return
    yield [Send(dst, x), Recv(src, out)]
