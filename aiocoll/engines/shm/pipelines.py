"""Same-host collectives over a group segment, as sans-IO generators of waits.

Each algorithm copies and reduces between the caller's arrays and the segment
(``aiocoll.engines.shm.layout``) and publishes its progress counters itself; whenever it needs another
member's progress it yields a ``Wait`` and the driver (``aiocoll.engines.shm.engine``) returns once the
condition holds, spinning or sleeping as it sees fit, from the event loop or a worker thread. The
generator's return value is the number of rounds it used (every member's counters advance by it).

The algorithms, for W members and parts of C bytes:

- ``all_reduce_direct`` (small): everyone copies its whole input into its staging slot, then
  every member reduces all W slots itself. One synchronisation, W-1 reductions of the whole
  payload per member.
- ``all_reduce_pipelined``: rounds of W*C bytes; in round k member r owns part r. It copies the
  parts the others own into its staging slot (only those: its own part it reads in place),
  reduces part r of all W inputs straight into its output, publishes that part, and copies the
  other parts' results into its output. The three phases are software-pipelined (copy-in of
  round k, reduction of round k-1 and copy-out of round k-2 in one step), so a member rarely
  waits, and a round's data is touched three times while it is still in the last-level cache.
- ``reduce_scatter_pipelined``: the first two phases of the above, member r owning block r.
- ``all_gather_pipelined`` / ``broadcast_pipelined``: the owner copies a slot's worth in, the
  others copy it out; pipelined one round deep.

Reductions run in rank order (input 0 op input 1 op ...), so the result does not depend on
which member computed it, and every member returns the same bits.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...arrays.dtypes import WireDtype
from ...algorithms import chunk_bounds
from ...arrays.ops import UFUNCS, ReduceOp, reduce_into
from .layout import RELEASED, REDUCED, STAGED, GroupSegment

Array = np.ndarray[Any, Any]

ALGO_DIRECT = 1
ALGO_PIPELINED = 2


@dataclass(frozen=True)
class Wait:
    """Resume once counter ``which`` of every member in ``members`` is at least ``target``.

    ``first`` marks the operation's first wait on its inputs: the driver then also checks that
    those members called the same collective (their descriptors).
    """

    which: int
    target: int
    members: tuple[int, ...]
    first: bool = False


Algorithm = Generator[Wait, None, int]


def _two_stage(rounds: int, first: Callable[[int], Algorithm], second: Callable[[int], Algorithm]) -> Algorithm:
    """Software pipeline of ``rounds`` chunks: stage one of chunk i runs before stage two of
    chunk i - 1, so one chunk is being staged while the previous one is consumed."""
    for i in range(rounds + 1):
        if i < rounds:
            yield from first(i)
        if i >= 1:
            yield from second(i - 1)
    return rounds


@dataclass
class Context:
    """What an algorithm works with: the segment, who this is, where its rounds start, and how
    to publish (store a counter, then wake sleeping members: given by the driver)."""

    seg: GroupSegment
    rank: int
    base: int
    publish: Callable[[tuple[int, ...], int], None]

    @property
    def world(self) -> int:
        return self.seg.world

    @property
    def others(self) -> tuple[int, ...]:
        return tuple(p for p in range(self.seg.world) if p != self.rank)


def combine(op: ReduceOp, code: WireDtype, a: Array, b: Array, out: Array) -> None:
    """out = op(a, b) elementwise; ``out`` may be ``a``."""
    if code == WireDtype.BFLOAT16:
        if out is not a:
            np.copyto(out, a)
        reduce_into(op, code, out, b)
    else:
        UFUNCS[op](a, b, out=out)


def fold(op: ReduceOp, code: WireDtype, sources: list[Array], out: Array) -> None:
    combine(op, code, sources[0], sources[1], out)
    for src in sources[2:]:
        combine(op, code, out, src, out)


def _rounds(n: int, per_round: int) -> int:
    return max(1, -(-n // per_round))


def _bytes(a: Array) -> Array:
    return a.view(np.uint8) if a.size else np.empty(0, np.uint8)


def _reuse(ctx: Context, g: int) -> Wait:
    """Wait until everyone has finished with the round that last used round g's slot."""
    return Wait(RELEASED, g - ctx.seg.depth + 1, ctx.others)


# --------------------------------------------------------------------------- all_reduce
def all_reduce_direct(ctx: Context, op: ReduceOp, code: WireDtype, x: Array, out: Array) -> Algorithm:
    seg, r, g = ctx.seg, ctx.rank, ctx.base
    slot = g % seg.depth
    nb = x.nbytes
    yield _reuse(ctx, g)
    seg.stage[r][slot][:nb] = _bytes(x)
    ctx.publish((STAGED,), g + 1)
    yield Wait(STAGED, g + 1, ctx.others, first=True)
    if x.size:
        # Own input from the slot too: ``out`` may be ``x`` (all_reduce with out=x).
        fold(op, code, [seg.stage[p][slot][:nb].view(x.dtype) for p in range(ctx.world)], out)
    ctx.publish((REDUCED, RELEASED), g + 1)
    return 1


def all_reduce_pipelined(ctx: Context, op: ReduceOp, code: WireDtype, x: Array, out: Array) -> Algorithm:
    seg, r, W, C, D = ctx.seg, ctx.rank, ctx.world, ctx.seg.part, ctx.seg.depth
    s = x.itemsize
    per_part = C // s
    per_round = W * per_part
    n = x.size
    R = _rounds(n, per_round)
    xb, ob = _bytes(x), _bytes(out)
    others = ctx.others

    def parts(k: int) -> list[tuple[int, int]]:
        lo = k * per_round
        return [(lo + a, lo + b) for a, b in chunk_bounds(min(per_round, n - lo), W)]

    def copy_in(k: int) -> Algorithm:
        g = ctx.base + k
        yield _reuse(ctx, g)
        st = seg.stage[r][g % D]
        for p, (lo, hi) in enumerate(parts(k)):
            if p != r:
                st[p * C : p * C + (hi - lo) * s] = xb[lo * s : hi * s]
        ctx.publish((STAGED,), g + 1)
        return 0

    def reduce(k: int) -> Algorithm:
        g = ctx.base + k
        slot = g % D
        yield Wait(STAGED, g + 1, others, first=(k == 0))
        lo, hi = parts(k)[r]
        m = hi - lo
        if m:
            sources = [
                x[lo:hi] if p == r else seg.stage[p][slot][r * C : r * C + m * s].view(x.dtype) for p in range(W)
            ]
            # Reduced into the shared result area, then copied out: the same work as the other
            # way round, and ``out`` may be ``x`` (out=x), whose own part must be read first.
            res = seg.result[r][slot][: m * s]
            fold(op, code, sources, res.view(x.dtype))
            ob[lo * s : hi * s] = res
        ctx.publish((REDUCED,), g + 1)
        return 0

    def copy_out(k: int) -> Algorithm:
        g = ctx.base + k
        slot = g % D
        yield Wait(REDUCED, g + 1, others)
        for p, (lo, hi) in enumerate(parts(k)):
            if p != r:
                ob[lo * s : hi * s] = seg.result[p][slot][: (hi - lo) * s]
        ctx.publish((RELEASED,), g + 1)
        return 0

    # Software pipeline: copy-in of round i, reduction of round i-1, copy-out of round i-2.
    for i in range(R + 2):
        if i < R:
            yield from copy_in(i)
        if 0 <= i - 1 < R:
            yield from reduce(i - 1)
        if 0 <= i - 2 < R:
            yield from copy_out(i - 2)
    return R


# --------------------------------------------------------------------------- reduce_scatter
def reduce_scatter_pipelined(ctx: Context, op: ReduceOp, code: WireDtype, x: Array, out: Array) -> Algorithm:
    """``x`` holds W blocks of ``out.size`` elements; block r's reduction goes to ``out``."""
    seg, r, W, C, D = ctx.seg, ctx.rank, ctx.world, ctx.seg.part, ctx.seg.depth
    s = x.itemsize
    m = out.size
    per_part = C // s
    R = _rounds(m, per_part)
    xb = _bytes(x)
    others = ctx.others

    def chunk(k: int) -> tuple[int, int]:
        return k * per_part, min((k + 1) * per_part, m)

    def copy_in(k: int) -> Algorithm:
        g = ctx.base + k
        yield _reuse(ctx, g)
        lo, hi = chunk(k)
        st = seg.stage[r][g % D]
        for p in others:
            st[p * C : p * C + (hi - lo) * s] = xb[(p * m + lo) * s : (p * m + hi) * s]
        ctx.publish((STAGED,), g + 1)
        return 0

    def reduce(k: int) -> Algorithm:
        g = ctx.base + k
        slot = g % D
        yield Wait(STAGED, g + 1, others, first=(k == 0))
        lo, hi = chunk(k)
        if hi > lo:
            sources = [
                x[r * m + lo : r * m + hi] if p == r else seg.stage[p][slot][r * C : r * C + (hi - lo) * s].view(x.dtype)
                for p in range(W)
            ]
            fold(op, code, sources, out[lo:hi])
        ctx.publish((REDUCED, RELEASED), g + 1)
        return 0

    return (yield from _two_stage(R, copy_in, reduce))


# --------------------------------------------------------------------------- all_gather
def all_gather_pipelined(ctx: Context, x: Array, out: Array) -> Algorithm:
    """``out`` gets every member's ``x`` (W blocks of ``x.size`` elements, in rank order)."""
    seg, r, W, D = ctx.seg, ctx.rank, ctx.world, ctx.seg.depth
    s = x.itemsize
    n = x.size
    per_round = seg.slot_bytes // s
    R = _rounds(n, per_round)
    xb, ob = _bytes(x), _bytes(out)
    others = ctx.others

    def chunk(k: int) -> tuple[int, int]:
        return k * per_round, min((k + 1) * per_round, n)

    def copy_in(k: int) -> Algorithm:
        g = ctx.base + k
        yield _reuse(ctx, g)
        lo, hi = chunk(k)
        seg.stage[r][g % D][: (hi - lo) * s] = xb[lo * s : hi * s]
        ctx.publish((STAGED,), g + 1)
        ob[(r * n + lo) * s : (r * n + hi) * s] = xb[lo * s : hi * s]
        return 0

    def copy_out(k: int) -> Algorithm:
        g = ctx.base + k
        slot = g % D
        yield Wait(STAGED, g + 1, others, first=(k == 0))
        lo, hi = chunk(k)
        for p in range(W):
            if p != r:
                ob[(p * n + lo) * s : (p * n + hi) * s] = seg.stage[p][slot][: (hi - lo) * s]
        ctx.publish((REDUCED, RELEASED), g + 1)
        return 0

    return (yield from _two_stage(R, copy_in, copy_out))


# --------------------------------------------------------------------------- broadcast
def broadcast_pipelined(ctx: Context, root: int, buf: Array) -> Algorithm:
    """Copy member ``root``'s ``buf`` into everyone's ``buf``.

    In the first round every member also waits for every other to arrive and checks its
    descriptor (members that are not the root publish STAGED on arrival, as the other collectives'
    members do once their input is in): otherwise the root, which needs nobody, would finish
    whatever the others called (another collective, another root), and so would members that
    took themselves for roots. The root publishes RELEASED of that round only after its check, so
    nobody reuses the descriptor slot before it has been read.
    """
    seg, r, D = ctx.seg, ctx.rank, ctx.seg.depth
    s = buf.itemsize
    n = buf.size
    per_round = seg.slot_bytes // s
    R = _rounds(n, per_round)
    bb = _bytes(buf)
    for k in range(R):
        g = ctx.base + k
        slot = g % D
        lo, hi = k * per_round, min((k + 1) * per_round, n)
        if r == root:
            yield _reuse(ctx, g)
            seg.stage[r][slot][: (hi - lo) * s] = bb[lo * s : hi * s]
            if k == 0:
                ctx.publish((STAGED,), g + 1)
                yield Wait(STAGED, g + 1, ctx.others, first=True)
                ctx.publish((REDUCED, RELEASED), g + 1)
            else:
                ctx.publish((STAGED, REDUCED, RELEASED), g + 1)
        else:
            if k == 0:
                ctx.publish((STAGED,), g + 1)
                yield Wait(STAGED, g + 1, ctx.others, first=True)
            else:
                yield Wait(STAGED, g + 1, (root,))
            bb[lo * s : hi * s] = seg.stage[root][slot][: (hi - lo) * s]
            ctx.publish((STAGED, REDUCED, RELEASED), g + 1)
    return R


__all__ = [
    "ALGO_DIRECT",
    "ALGO_PIPELINED",
    "Algorithm",
    "Context",
    "Wait",
    "all_gather_pipelined",
    "all_reduce_direct",
    "all_reduce_pipelined",
    "broadcast_pipelined",
    "combine",
    "fold",
    "reduce_scatter_pipelined",
]
