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

from ._schedule import Finish, Op, Recv, Schedule, Send, Start, chunk_bounds

Reduce = Callable[[np.ndarray[Any, Any], np.ndarray[Any, Any]], None]
Array = np.ndarray[Any, Any]


def direct_all_reduce(rank: int, size: int, x: Array, out: Array, reduce: Reduce) -> Schedule:
    """One round: everyone sends x to everyone and reduces all W inputs in rank order.

    ``out`` may be ``x`` (in place): this rank's input is then copied before ``out`` is written.
    """
    if rank and np.may_share_memory(x, out):
        x = x.copy()  # out[...] = inputs[0] below would overwrite it before its turn
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


#: Bytes of payload per segment of the pipelined rsag: each segment's frames are 1/W of it.
#: Large enough that a frame goes through the tcp transport's I/O thread (256 KiB and up at
#: 8 ranks and fewer), small enough that the first reduction starts soon and several segments
#: are in flight while one is reduced.
SEGMENT = 4 << 20
#: At most this many segments (bounds the number of frames per pair in one collective).
MAX_SEGMENTS = 64


def segments(x: Array, size: int, segment_bytes: int = SEGMENT) -> int:
    """How many segments rsag splits ``x`` into in a group of ``size``."""
    return max(1, min(MAX_SEGMENTS, int(x.nbytes) // max(segment_bytes, 1), int(x.shape[0]) // size))


def rsag_all_reduce(
    rank: int, size: int, x: Array, out: Array, reduce: Reduce, segment_bytes: int = SEGMENT
) -> Schedule:
    """Reduce-scatter (rank r owns chunk r) then all-gather of the owned chunks, pipelined.

    The payload is cut into segments (``segments``), each reduce-scattered and all-gathered on
    its own: while segment k is reduced, segment k+1's reduce-scatter and segment k-1's
    all-gather are on the wire, so reductions overlap transfers instead of taking turns with
    them. Bytes per rank: 2(W-1)/W of the payload, as with one segment. Every rank reduces its
    chunks in rank order (bit-identical results). ``out`` may be ``x`` (in place).
    ``segment_bytes``: the payload per segment (the number is capped by ``MAX_SEGMENTS``).
    """
    n = x.shape[0]
    nseg = segments(x, size, segment_bytes)
    seg_bounds = chunk_bounds(n, nseg)
    others = [p for p in range(size) if p != rank]
    in_place = np.may_share_memory(x, out)
    widest = max(hi - lo for lo, hi in seg_bounds)
    chunk = -(-widest // size)
    # Two sets of receive buffers: segment k+1 arrives in one while segment k is reduced from the other.
    spare = [np.empty((size, chunk), dtype=x.dtype) for _ in range(min(nseg, 2))]

    def owned(k: int) -> list[tuple[int, int]]:
        # Rank p owns piece (p + k) % W of segment k: the pieces one element longer (when W
        # does not divide the segment) go to a different rank each segment, which keeps the
        # bytes per rank within a piece of 2(W-1)/W of the payload.
        lo, hi = seg_bounds[k]
        pieces = chunk_bounds(hi - lo, size)
        return [pieces[(p + k) % size] for p in range(size)]

    def reduce_scatter(k: int) -> tuple[list[Op], list[Array]]:
        lo, hi = seg_bounds[k]
        bounds = owned(k)
        c_lo, c_hi = bounds[rank]
        parts: list[Array] = [x[lo + c_lo : lo + c_hi]] * size
        ops: list[Op] = []
        for p in others:
            p_lo, p_hi = bounds[p]
            parts[p] = spare[k % len(spare)][p, : c_hi - c_lo]
            ops += [Recv(p, parts[p]), Send(p, x[lo + p_lo : lo + p_hi])]
        if in_place and rank:
            # out's chunk is this rank's input too: keep it until its turn in the reduction
            parts[rank] = spare[k % len(spare)][rank, : c_hi - c_lo]
            parts[rank][...] = x[lo + c_lo : lo + c_hi]
        return ops, parts

    def all_gather(k: int) -> tuple[list[Op], list[Op]]:
        lo, hi = seg_bounds[k]
        bounds = owned(k)
        c_lo, c_hi = bounds[rank]
        recvs: list[Op] = []
        sends: list[Op] = []
        for p in others:
            p_lo, p_hi = bounds[p]
            recvs.append(Recv(p, out[lo + p_lo : lo + p_hi]))
            sends.append(Send(p, out[lo + c_lo : lo + c_hi]))
        return recvs, sends

    # Per pair, both sides issue: RS(0), then per segment k: RS(k+1) and AG(k)'s receives (so
    # that AG frames find their receive posted, not a scratch buffer), AG(k)'s sends. In place,
    # AG(k)'s receives write x, which RS(k)'s sends read: they are posted after RS(k) finished.
    early = not in_place
    gathered: list[Op] = []
    scattering, parts = reduce_scatter(0)
    yield Start(scattering)
    for k in range(nseg):
        ag_recvs, ag_sends = all_gather(k)
        batch: list[Op] = []
        if k + 1 < nseg:
            following, next_parts = reduce_scatter(k + 1)
            batch += following
        if early:
            batch += ag_recvs
        if batch:
            yield Start(batch)
        yield Finish(scattering)
        lo, hi = seg_bounds[k]
        c_lo, c_hi = owned(k)[rank]
        mine = out[lo + c_lo : lo + c_hi]
        mine[...] = parts[0]
        for p in range(1, size):
            reduce(mine, parts[p])
        if gathered:
            yield Finish(gathered)  # bounds what is in flight to about two segments
        yield Start(ag_sends if early else ag_recvs + ag_sends)
        gathered = ag_recvs + ag_sends
        if k + 1 < nseg:
            scattering, parts = following, next_parts
    yield Finish(gathered)


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
