"""The collectives: validate, adapt the arrays, pick an algorithm, run it, wrap the result.

Every function here is a coroutine that never blocks the event loop. Arguments are checked on
the calling rank before anything is sent, so bad input raises ValueError/TypeError there and
then; disagreements between ranks (collective, shape, dtype, op, root, dim...) are caught from
the frame headers and raise MismatchError on every member.

Order: each collective is split in two. ``_<name>_start`` checks the arguments and claims
everything the collective will use from its group's order (its sequence number or numbers, and
its turn on the group's shared-memory engine) without awaiting anything; it returns the
coroutine that runs it. So a collective made of several steps cannot be overtaken halfway by
another one started meanwhile on some members and not on others. Code that issues several
collectives as one (the coalesced ones, aiocoll.torch, the torch.distributed backend) starts
them all first and then awaits them.

Agreement: in a rooted collective (broadcast, reduce, gather, scatter) and in permute some
members only send or only receive, so a member that called something else could go unseen, or
two members that both wait to receive could wait for ever. Their members therefore also exchange
empty frames in ceil(log2 W) dissemination rounds beside the schedule (``agree=True``,
Communicator.agree): every frame says what its sender called, and no member finishes before it
has heard, directly or through members that checked, from every other one.

Cancellation: cancelling the awaiting task aborts the collective on every member (they raise
RemoteAbortError) and marks the group broken: later calls on it raise GroupBrokenError at once.
Sends already handed to the transport complete in the background so the connection stays
usable for other groups.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine, Generator, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

from ..arrays.adapt import as_output, as_payload
from ..arrays.payload import Array, Payload
from ..engines.messages import MESSAGES, OFFLOAD_BYTES, run_p2p
from ..engines.plan import Engine, Plan
from ..arrays.dtypes import WireDtype
from ..engines import gpu
from ..engines.select import engine_for
from ..groups.group import ProcessGroup
from ..groups.forms import resolve_group
from ..arrays.ops import ReduceOp, check_op_dtype, finish_avg, parse_op, reduce_into
from ..core.timeouts import seconds
from ..core.wire import Call, Kind
from ..core.world import current_world
from ..algorithms import direct, dissemination

T = TypeVar("T")


def _group(group: Any) -> ProcessGroup:
    g = resolve_group(group, current_world())
    if g.rank < 0:
        raise ValueError(f"rank {g.world.rank} is not a member of {g.name} (ranks {list(g.ranks)})")
    return g


def _timeout(g: ProcessGroup, timeout: float | None) -> float:
    """The call's timeout; also checks that it runs on the world's event loop.

    Every collective calls this before it claims a sequence number or sends anything, so a
    call from the wrong loop fails on its caller alone and leaves the group intact.

    Raises:
        RuntimeError: called from another event loop than the one that ran ``init``.
        ValueError: ``timeout`` is not a positive, finite number of seconds.
    """
    owner = g.world.loop
    if owner is not None and asyncio.get_running_loop() is not owner:
        # The world's connections and futures belong to its loop: run here, the frames would be
        # sent and read by two loops at once, and the members would disagree on what happened.
        raise RuntimeError(
            f"a collective of {g.name} was called from another event loop than the one that ran "
            "aiocoll.init(); a world's collectives run on its own loop. From another thread, use "
            "aiocoll.sync (its calls run on the world's loop) or "
            "asyncio.run_coroutine_threadsafe(coro, loop) with that loop."
        )
    return g.world.timeout if timeout is None else seconds(timeout)


def _dim(dim: int, ndim: int, what: str = "dim") -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {type(dim).__name__}")
    nd = max(ndim, 1)
    if not -nd <= dim < nd:
        raise ValueError(f"{what}={dim} is out of range for an array of {ndim} dimensions")
    return int(dim) % nd


def _root(root: int, g: ProcessGroup, what: str) -> int:
    if isinstance(root, bool) or not isinstance(root, (int, np.integer)):
        raise TypeError(f"{what} must be an int group rank, got {type(root).__name__}")
    if not 0 <= root < g.size:
        raise ValueError(f"{what}={root} is out of range for {g.name} of size {g.size}")
    return int(root)


def _reducer(op: ReduceOp, p: Payload) -> Any:
    code = p.code

    def reduce(acc: Array, other: Array) -> None:
        reduce_into(op, code, acc, other)

    return reduce


def _flat(a: Array) -> Array:
    return a.reshape(-1)


def _dim_first(a: Array, dim: int) -> Array:
    """``a`` with ``dim`` moved to the front, C-contiguous (a view when dim is 0)."""
    if a.ndim == 0:
        return a.reshape(1)
    return np.ascontiguousarray(np.moveaxis(a, dim, 0)) if dim else a


# --------------------------------------------------------------------------- claiming a place
class _Turn:
    """A collective's place in its group's order: its sequence number, the engine that runs it
    (``aiocoll.engines.select``: chosen here, in one place) and its turn on that engine."""

    __slots__ = ("seq", "engine", "ticket")

    def __init__(self, g: ProcessGroup, collective: str | None = None, nbytes: int = 0) -> None:
        self.engine: Engine = engine_for(g, collective, nbytes) if g.size > 1 else MESSAGES
        self.seq = g.next_seq()
        self.ticket = self.engine.reserve()

    def give_back(self) -> None:
        """The engine turn, if the collective never got to use it (no-op otherwise)."""
        self.engine.abandon(self.ticket)


class Started(Generic[T]):
    """A collective whose place in its group's order is claimed: await it (once) to run it.

    One dropped unawaited leaves the other members waiting for it, as a collective never
    called would; give_back() at least frees the engine turns it holds.
    """

    __slots__ = ("_coro", "turns")

    def __init__(self, coro: Coroutine[Any, Any, T], *turns: _Turn) -> None:
        self._coro = coro
        self.turns = turns

    def __await__(self) -> Generator[Any, None, T]:
        return self._coro.__await__()

    def give_back(self) -> None:
        """Engine turns not used (the collective never ran): see _Turn.give_back."""
        for turn in self.turns:
            turn.give_back()


async def _run_started(s: Started[T]) -> T:
    return await s


async def _together(runs: Sequence[Started[Any]]) -> list[Any]:
    """Run collectives already started concurrently; their results in order.

    If one fails the others are cancelled (the group is broken from the first failed step on,
    so they could only fail too) and awaited; engine turns never used are given back.
    """
    tasks = [asyncio.ensure_future(_run_started(r)) for r in runs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        for r in runs:
            r.give_back()


def _start_plan(g: ProcessGroup, plan: gpu.DeviceRun, timeout: float | None) -> Started[Any]:
    """Claim a place for a collective the GPU engine runs (aiocoll.engines.gpu)."""
    t = _timeout(g, timeout)
    turn = _Turn(g)
    return Started(plan(turn.seq, t), turn)


def _shape(a: Array) -> tuple[int, ...]:
    return tuple(int(n) for n in a.shape)


# --------------------------------------------------------------------------- all_reduce
async def all_reduce(
    x: Any, op: Any = "sum", group: Any = None, *, out: Any = None, timeout: float | None = None
) -> Any:
    """Reduce ``x`` over the group; every member gets the result (bit-identical everywhere).

    Args:
        x: the array (any shape, any numeric dtype or bool).
        op: "sum", "avg", "product", "min", "max", "band", "bor", "bxor" or a ReduceOp.
        out: optional array of x's shape and dtype to write the result into (then returned).

    Returns:
        A new array of x's kind, shape and dtype (or ``out``).

    Raises:
        ValueError / TypeError: unknown op, op not defined for the dtype, bad ``out``.
        CollectiveError: timeout, dead peer, mismatch between ranks (collective, op, dtype,
            shape); raised on every member.
    """
    return await _all_reduce_start(x, op, group, out, timeout)


def _all_reduce_start(x: Any, op: Any, group: Any, out: Any, timeout: float | None) -> Started[Any]:
    g = _group(group)
    rop = parse_op(op)
    if gpu.is_cuda_array(x) and (plan := gpu.plan_all_reduce(g, x, rop, out)) is not None:
        return _start_plan(g, plan, timeout)
    p = as_payload(x)
    check_op_dtype(rop, p.code)
    t = _timeout(g, timeout)
    if out is not None:
        result, finish = as_output(out, p, p.array.shape)
    else:
        result, finish = p.empty(p.array.shape), p.wrap
    flat_in, flat_out = _flat(p.array), _flat(result)
    turn = _Turn(g, "all_reduce", flat_in.nbytes)
    call = Call(("shape", _shape(p.array)))

    async def run() -> Any:
        await _all_reduce_into(g, turn, rop, p, flat_in, flat_out, t, Kind.ALL_REDUCE, "all_reduce", call)
        return finish(result)

    return Started(run(), turn)


async def _all_reduce_into(
    g: ProcessGroup, turn: _Turn, rop: ReduceOp, p: Payload, x: Array, out: Array, t: float, kind: Kind, name: str,
    call: Call,
) -> None:
    if g.size == 1:
        out[...] = x
    else:
        plan = Plan("all_reduce", kind, turn.seq, t, call, p.code, x.size, rop, x=x, out=out, reduce=_reducer(rop, p),
                    offload=x.nbytes >= OFFLOAD_BYTES, name=name)
        await turn.engine.run(g, plan, turn.ticket)
    if rop == ReduceOp.AVG:
        finish_avg(p.code, out, g.size)


# --------------------------------------------------------------------------- all_gather
async def all_gather(x: Any, group: Any = None, *, dim: int = 0, timeout: float | None = None) -> Any:
    """Concatenate every member's ``x`` along ``dim``, in group-rank order.

    Every member must pass an array of the same shape and dtype, and the same ``dim``. A 0-d
    input gives a 1-d result of one element per member.

    Raises:
        ValueError: ``dim`` out of range. CollectiveError: as for all_reduce (MismatchError
            also when members pass other shapes or dims).
    """
    return await _all_gather_start(x, group, dim, timeout)


def _all_gather_start(x: Any, group: Any, dim: int, timeout: float | None) -> Started[Any]:
    g = _group(group)
    if gpu.is_cuda_array(x) and isinstance(dim, int) and not isinstance(dim, bool):
        ndim = len(x.shape)
        if -max(ndim, 1) <= dim < max(ndim, 1) and (plan := gpu.plan_all_gather(g, x, dim % max(ndim, 1))):
            return _start_plan(g, plan, timeout)
    p = as_payload(x)
    d = _dim(dim, p.array.ndim)
    t = _timeout(g, timeout)
    src = _dim_first(p.array, d)
    gathered = p.empty((g.size * src.shape[0], *src.shape[1:]))
    flat_in, flat_out = _flat(src), _flat(gathered)
    turn = _Turn(g, "all_gather", flat_in.nbytes)
    call = Call(("shape", _shape(p.array)), ("dim", d))

    async def run() -> Any:
        nonlocal gathered
        if g.size == 1:
            flat_out[...] = flat_in
        else:
            plan = Plan("all_gather", Kind.ALL_GATHER, turn.seq, t, call, p.code, flat_in.size, x=flat_in, out=flat_out)
            await turn.engine.run(g, plan, turn.ticket)
        if d and p.array.ndim:
            gathered = np.ascontiguousarray(np.moveaxis(gathered, 0, d))
        return p.wrap(gathered)

    return Started(run(), turn)


# --------------------------------------------------------------------------- reduce_scatter
async def reduce_scatter(
    x: Any, op: Any = "sum", group: Any = None, *, dim: int = 0, timeout: float | None = None
) -> Any:
    """Chunk ``group.rank`` (along ``dim``) of the reduction of every member's ``x``.

    Raises:
        ValueError: x.shape[dim] is not divisible by the group size; unknown op; bad dim.
        CollectiveError: as for all_reduce.
    """
    return await _reduce_scatter_start(x, op, group, dim, timeout)


def _reduce_scatter_start(
    x: Any, op: Any, group: Any, dim: int, timeout: float | None
) -> Started[Any]:
    """Check the arguments and claim the collective's place now; the returned coroutine runs it."""
    g = _group(group)
    rop = parse_op(op)
    if gpu.is_cuda_array(x) and isinstance(dim, int) and not isinstance(dim, bool) and len(x.shape):
        ndim = len(x.shape)
        d = dim % ndim if -ndim <= dim < ndim else -1
        if d >= 0 and x.shape[d] % g.size == 0 and (plan := gpu.plan_reduce_scatter(g, x, rop, d)):
            return _start_plan(g, plan, timeout)
    p = as_payload(x)
    check_op_dtype(rop, p.code)
    if p.array.ndim == 0:
        raise ValueError("reduce_scatter needs at least one dimension to scatter along")
    d = _dim(dim, p.array.ndim)
    t = _timeout(g, timeout)
    if p.array.shape[d] % g.size:
        raise ValueError(
            f"reduce_scatter: x.shape[{d}] = {p.array.shape[d]} is not divisible by the group size {g.size}"
        )
    src = _dim_first(p.array, d)
    turn = _Turn(g, "reduce_scatter", src.nbytes)
    call = Call(("shape", _shape(p.array)), ("dim", d))
    return Started(_reduce_scatter_run(g, turn, rop, p, src, d, t, call), turn)


async def _reduce_scatter_run(
    g: ProcessGroup, turn: _Turn, rop: ReduceOp, p: Payload, src: Array, d: int, t: float, call: Call
) -> Any:
    chunk = p.empty((src.shape[0] // g.size, *src.shape[1:]))
    flat_in, flat_out = _flat(src), _flat(chunk)
    if g.size == 1:
        flat_out[...] = flat_in
    else:
        plan = Plan("reduce_scatter", Kind.REDUCE_SCATTER, turn.seq, t, call, p.code, flat_in.size, rop, x=flat_in,
                    out=flat_out, reduce=_reducer(rop, p), offload=flat_in.nbytes >= OFFLOAD_BYTES)
        await turn.engine.run(g, plan, turn.ticket)
    if rop == ReduceOp.AVG:
        finish_avg(p.code, flat_out, g.size)
    if d:
        chunk = np.ascontiguousarray(np.moveaxis(chunk, 0, d))
    return p.wrap(chunk)


# --------------------------------------------------------------------------- all_to_all
def _splits(splits: Sequence[int] | None, total: int, size: int, what: str) -> list[int]:
    if splits is None:
        if total % size:
            raise ValueError(f"all_to_all: {what} split sizes are None (equal splits) but dim 0 = {total} "
                             f"is not divisible by the group size {size}")
        return [total // size] * size
    out = [int(s) for s in splits]
    if len(out) != size:
        raise ValueError(f"all_to_all: {what}_split_sizes has {len(out)} entries, the group has {size} members")
    if any(s < 0 for s in out):
        raise ValueError(f"all_to_all: {what}_split_sizes has a negative entry: {out}")
    return out


async def all_to_all(
    x: Any,
    group: Any = None,
    *,
    output_split_sizes: Sequence[int] | None = None,
    input_split_sizes: Sequence[int] | None = None,
    timeout: float | None = None,
) -> Any:
    """Rows of ``x`` (dim 0) split by ``input_split_sizes``: block p goes to member p.

    The result is the blocks received from each member, in group-rank order, sized by
    ``output_split_sizes``. None means equal splits of dim 0 (then it must divide evenly).

    Raises:
        ValueError: splits of the wrong length, negative, or not adding up to x.shape[0].
        MismatchError: a member sent a block of another size than this member expects, or
            rows of another shape.
    """
    return await _all_to_all_start(x, group, output_split_sizes, input_split_sizes, timeout)


def _all_to_all_start(
    x: Any, group: Any, output_split_sizes: Sequence[int] | None, input_split_sizes: Sequence[int] | None,
    timeout: float | None,
) -> Started[Any]:
    g = _group(group)
    p = as_payload(x)
    if p.array.ndim == 0:
        raise ValueError("all_to_all needs an array with at least one dimension")
    t = _timeout(g, timeout)
    rows = p.array.shape[0]
    ins = _splits(input_split_sizes, rows, g.size, "input")
    if sum(ins) != rows:
        raise ValueError(f"all_to_all: input_split_sizes {ins} add up to {sum(ins)}, but x.shape[0] = {rows}")
    outs = _splits(output_split_sizes, rows, g.size, "output")
    tail = p.array.shape[1:]
    result = p.empty((sum(outs), *tail))
    row = math.prod(tail)
    flat_in, flat_out = _flat(p.array), _flat(result)
    blocks_in, blocks_out = [], []
    a = b = 0
    for i, o in zip(ins, outs):
        blocks_in.append(flat_in[a * row : (a + i) * row])
        blocks_out.append(flat_out[b * row : (b + o) * row])
        a += i
        b += o
    if blocks_in[g.rank].size != blocks_out[g.rank].size:
        raise ValueError(
            f"all_to_all: this member sends itself {ins[g.rank]} rows but expects {outs[g.rank]} from itself"
        )
    turn = _Turn(g)
    call = Call(("row shape", tuple(int(n) for n in tail)))

    async def run() -> Any:
        plan = Plan("all_to_all", Kind.ALL_TO_ALL, turn.seq, t, call, p.code, row,
                    schedule=lambda rank, size: direct.all_to_all(rank, size, blocks_in, blocks_out))
        await turn.engine.run(g, plan, turn.ticket)
        return p.wrap(result)

    return Started(run(), turn)


# --------------------------------------------------------------------------- broadcast / reduce
async def broadcast(x: Any, src: int, group: Any = None, *, timeout: float | None = None) -> Any:
    """Every member gets a copy of member ``src``'s ``x`` (all pass arrays of one shape and dtype).

    Raises:
        ValueError: ``src`` out of range. CollectiveError: as for all_reduce (MismatchError
            also when members name another ``src``).
    """
    return await _broadcast_start(x, src, group, timeout)


def _broadcast_start(x: Any, src: int, group: Any, timeout: float | None) -> Started[Any]:
    g = _group(group)
    root = _root(src, g, "src")
    p = as_payload(x)
    t = _timeout(g, timeout)
    result = p.array.copy() if g.rank == root else p.empty(p.array.shape)
    buf = _flat(result)
    turn = _Turn(g, "broadcast", buf.nbytes)
    call = Call(("src", root), ("shape", _shape(p.array)))

    async def run() -> Any:
        if g.size > 1:
            plan = Plan("broadcast", Kind.BROADCAST, turn.seq, t, call, p.code, buf.size, root=root, x=buf, out=buf,
                        agree=True)
            await turn.engine.run(g, plan, turn.ticket)
        return p.wrap(result)

    return Started(run(), turn)


async def reduce(
    x: Any, dst: int, op: Any = "sum", group: Any = None, *, timeout: float | None = None
) -> Any:
    """Member ``dst`` gets the reduction; every other member gets a copy of its own ``x``.

    Raises:
        ValueError: ``dst`` out of range, unknown op. CollectiveError: as for all_reduce
            (MismatchError also when members name another ``dst``).
    """
    return await _reduce_start(x, dst, op, group, timeout)


def _reduce_start(x: Any, dst: int, op: Any, group: Any, timeout: float | None) -> Started[Any]:
    g = _group(group)
    root = _root(dst, g, "dst")
    rop = parse_op(op)
    p = as_payload(x)
    check_op_dtype(rop, p.code)
    t = _timeout(g, timeout)
    acc = p.array.copy()
    buf = _flat(acc)
    turn = _Turn(g)
    call = Call(("dst", root), ("shape", _shape(p.array)))

    async def run() -> Any:
        if g.size > 1:
            plan = Plan("reduce", Kind.REDUCE, turn.seq, t, call, p.code, buf.size, rop, root=root, x=_flat(p.array),
                        out=buf, reduce=_reducer(rop, p), agree=True, offload=buf.nbytes >= OFFLOAD_BYTES)
            await turn.engine.run(g, plan, turn.ticket)
        if g.rank != root:
            return p.wrap(p.array.copy())
        if rop == ReduceOp.AVG:
            finish_avg(p.code, buf, g.size)
        return p.wrap(acc)

    return Started(run(), turn)


# --------------------------------------------------------------------------- gather / scatter
async def gather(x: Any, dst: int, group: Any = None, *, dim: int = 0, timeout: float | None = None) -> Any:
    """Member ``dst`` gets every member's ``x`` concatenated along ``dim``; the others get None.

    Raises:
        ValueError: ``dst`` or ``dim`` out of range. CollectiveError: as for all_reduce
            (MismatchError also when members pass other shapes, dims or ``dst``).
    """
    return await _gather_start(x, dst, group, dim, timeout)


def _gather_start(x: Any, dst: int, group: Any, dim: int, timeout: float | None) -> Started[Any]:
    g = _group(group)
    root = _root(dst, g, "dst")
    p = as_payload(x)
    d = _dim(dim, p.array.ndim)
    t = _timeout(g, timeout)
    src = _dim_first(p.array, d)
    flat_in = _flat(src)
    gathered = p.empty((g.size * src.shape[0], *src.shape[1:])) if g.rank == root else None
    turn = _Turn(g)
    call = Call(("dst", root), ("shape", _shape(p.array)), ("dim", d))

    async def run() -> Any:
        nonlocal gathered
        flat_out = None if gathered is None else _flat(gathered)
        if g.size > 1:
            plan = Plan("gather", Kind.GATHER, turn.seq, t, call, p.code, flat_in.size, agree=True,
                        schedule=lambda rank, size: direct.gather(rank, size, root, flat_in, flat_out))
            await turn.engine.run(g, plan, turn.ticket)
        elif flat_out is not None:
            flat_out[...] = flat_in
        if gathered is None:
            return None
        if d and p.array.ndim:
            gathered = np.ascontiguousarray(np.moveaxis(gathered, 0, d))
        return p.wrap(gathered)

    return Started(run(), turn)


async def scatter(x: Any, src: int, group: Any = None, *, dim: int = 0, timeout: float | None = None) -> Any:
    """Member r gets chunk r (along ``dim``) of member ``src``'s ``x``.

    Every member passes an array of the full shape and dtype (only ``src``'s values are used),
    as with broadcast; x.shape[dim] must be divisible by the group size.

    Raises:
        ValueError: ``src``/``dim`` out of range or the size does not divide.
        CollectiveError: as for all_reduce (MismatchError also when members pass other
            shapes, dims or ``src``).
    """
    return await _scatter_start(x, src, group, dim, timeout)


def _scatter_start(x: Any, src: int, group: Any, dim: int, timeout: float | None) -> Started[Any]:
    g = _group(group)
    root = _root(src, g, "src")
    p = as_payload(x)
    if p.array.ndim == 0:
        raise ValueError("scatter needs an array with at least one dimension")
    d = _dim(dim, p.array.ndim)
    t = _timeout(g, timeout)
    if p.array.shape[d] % g.size:
        raise ValueError(f"scatter: x.shape[{d}] = {p.array.shape[d]} is not divisible by the group size {g.size}")
    full = _dim_first(p.array, d) if g.rank == root else None
    chunk_shape = (p.array.shape[d] // g.size, *np.moveaxis(np.empty(p.array.shape, dtype=np.uint8), d, 0).shape[1:])
    chunk = p.empty(chunk_shape)
    turn = _Turn(g)
    call = Call(("src", root), ("shape", _shape(p.array)), ("dim", d))

    async def run() -> Any:
        nonlocal chunk
        flat_full, flat_chunk = None if full is None else _flat(full), _flat(chunk)
        if g.size > 1:
            plan = Plan("scatter", Kind.SCATTER, turn.seq, t, call, p.code, p.array.size, agree=True, check_count=False,
                        schedule=lambda rank, size: direct.scatter(rank, size, root, flat_full, flat_chunk))
            await turn.engine.run(g, plan, turn.ticket)
        elif flat_full is not None:
            flat_chunk[...] = flat_full
        if d:
            chunk = np.ascontiguousarray(np.moveaxis(chunk, 0, d))
        return p.wrap(chunk)

    return Started(run(), turn)


# --------------------------------------------------------------------------- barrier
async def barrier(group: Any = None, *, timeout: float | None = None) -> None:
    """Return once every member of the group has entered the barrier.

    Raises:
        CollectiveError: timeout or dead peer, on every member.
    """
    await _barrier_start(group, timeout)


def _barrier_start(group: Any, timeout: float | None) -> Started[None]:
    g = _group(group)
    t = _timeout(g, timeout)
    turn = _Turn(g)

    async def run() -> None:
        if g.size > 1:
            plan = Plan("barrier", Kind.BARRIER, turn.seq, t, schedule=dissemination.dissemination_barrier)
            await turn.engine.run(g, plan, turn.ticket)

    return Started(run(), turn)


# --------------------------------------------------------------------------- point to point
def _tag(tag: int) -> int:
    if isinstance(tag, bool) or not isinstance(tag, (int, np.integer)) or not 0 <= tag < 2**32:
        raise ValueError(f"tag must be an int in [0, 2**32), got {tag!r}")
    return int(tag)


async def send(x: Any, dst: int, group: Any = None, *, tag: int = 0, timeout: float | None = None) -> None:
    """Send ``x`` to group rank ``dst``; returns once ``x`` may be modified again.

    Messages between two members on one tag arrive in order; different tags are independent.

    Raises:
        ValueError: ``dst`` out of range or is this rank; bad tag. CollectiveError: timeout, dead peer.
    """
    g = _group(group)
    peer = _root(dst, g, "dst")
    if peer == g.rank:
        raise ValueError("send: dst is this rank; a rank cannot send to itself")
    p = as_payload(x)
    await run_p2p(g, peer, _flat(p.array), receive=False, tag=_tag(tag), dtype=p.code, count=p.array.size,
                  timeout=_timeout(g, timeout))


async def recv(
    like: Any, src: int, group: Any = None, *, tag: int = 0, out: Any = None, timeout: float | None = None
) -> Any:
    """Receive a message from group rank ``src``: an array with ``like``'s shape, dtype and kind.

    With ``out=``, the message is written into ``out`` (which is returned); ``like`` may then be
    ``out`` itself.

    Raises:
        ValueError: ``src`` out of range or is this rank; bad tag.
        MismatchError: the message has another dtype or size than ``like``.
        CollectiveError: timeout, dead peer.
    """
    g = _group(group)
    peer = _root(src, g, "src")
    if peer == g.rank:
        raise ValueError("recv: src is this rank; a rank cannot receive from itself")
    p = as_payload(like, "like")
    if out is not None:
        result, finish = as_output(out, p, p.array.shape)
    else:
        result, finish = p.empty(p.array.shape), p.wrap
    await run_p2p(g, peer, _flat(result), receive=True, tag=_tag(tag), dtype=p.code, count=p.array.size,
                  timeout=_timeout(g, timeout))
    return finish(result)


async def permute(x: Any, src_dst: Sequence[int], group: Any = None, *, timeout: float | None = None) -> Any:
    """Member m's ``x`` goes to member ``src_dst[m]``; returns what this member received.

    ``src_dst`` must be a permutation of the group ranks (group-local numbering), the same on
    every member.

    Raises:
        ValueError: ``src_dst`` is not a permutation of range(group size).
        MismatchError: the array received has another shape or dtype, or members passed
            another ``src_dst``.
    """
    return await _permute_start(x, src_dst, group, timeout)


def _permute_start(x: Any, src_dst: Sequence[int], group: Any, timeout: float | None) -> Started[Any]:
    g = _group(group)
    perm = [int(v) for v in src_dst]
    if sorted(perm) != list(range(g.size)):
        raise ValueError(f"permute: src_dst must be a permutation of range({g.size}), got {list(src_dst)}")
    p = as_payload(x)
    t = _timeout(g, timeout)
    result = p.empty(p.array.shape)
    dst = perm[g.rank]
    src = perm.index(g.rank)
    turn = _Turn(g)
    call = Call(("src_dst", perm), ("shape", _shape(p.array)))

    async def run() -> Any:
        flat_in, flat_out = _flat(p.array), _flat(result)
        if g.size > 1:
            plan = Plan("permute", Kind.PERMUTE, turn.seq, t, call, p.code, p.array.size, agree=True,
                        schedule=lambda rank, size: direct.permute(rank, dst, src, flat_in, flat_out))
            await turn.engine.run(g, plan, turn.ticket)
        else:
            flat_out[...] = flat_in
        return p.wrap(result)

    return Started(run(), turn)


# --------------------------------------------------------------------------- coalesced
async def all_reduce_coalesced(
    xs: Sequence[Any], op: Any = "sum", group: Any = None, *, timeout: float | None = None
) -> list[Any]:
    """all_reduce of several arrays (any shapes, any dtypes) in one operation per dtype.

    Arrays of one dtype are packed into one buffer and reduced together.

    Raises:
        as all_reduce, for any of the arrays.
    """
    return await _all_reduce_coalesced_start(xs, op, group, timeout)


def _all_reduce_coalesced_start(
    xs: Sequence[Any], op: Any, group: Any, timeout: float | None
) -> Started[list[Any]]:
    g = _group(group)
    rop = parse_op(op)
    payloads = [as_payload(x, f"xs[{i}]") for i, x in enumerate(xs)]
    for p in payloads:
        check_op_dtype(rop, p.code)
    t = _timeout(g, timeout)
    by_code: dict[int, list[int]] = {}
    for i, p in enumerate(payloads):
        by_code.setdefault(int(p.code), []).append(i)
    # Every place is claimed here, before the first await: collectives started meanwhile by
    # other tasks must not slip in between on some members and not on others.
    jobs = []
    for idx in by_code.values():
        packed = np.concatenate([_flat(payloads[i].array) for i in idx])
        out = np.empty_like(packed)
        call = Call(("shapes", [_shape(payloads[i].array) for i in idx]))
        jobs.append((idx, packed, out, call, _Turn(g, "all_reduce", packed.nbytes)))

    async def run() -> list[Any]:
        await _together([
            Started(
                _all_reduce_into(g, turn, rop, payloads[idx[0]], packed, out, t, Kind.ALL_REDUCE, "all_reduce_coalesced", call),
                turn,
            )
            for idx, packed, out, call, turn in jobs
        ])
        results: list[Any] = [None] * len(payloads)
        for idx, _, out, _, _ in jobs:
            offset = 0
            for i in idx:
                p = payloads[i]
                results[i] = p.wrap(out[offset : offset + p.array.size].reshape(p.array.shape).copy())
                offset += p.array.size
        return results

    return Started(run(), *(job[4] for job in jobs))


async def all_gather_coalesced(xs: Sequence[Any], group: Any = None, *, timeout: float | None = None) -> list[Any]:
    """all_gather (along dim 0) of several arrays of any shapes and dtypes, as one message.

    Raises:
        as all_gather, for any of the arrays.
    """
    return await _all_gather_coalesced_start(xs, group, timeout)


def _all_gather_coalesced_start(xs: Sequence[Any], group: Any, timeout: float | None) -> Started[list[Any]]:
    g = _group(group)
    payloads = [as_payload(x, f"xs[{i}]") for i, x in enumerate(xs)]
    t = _timeout(g, timeout)
    parts = [_dim_first(p.array, 0) for p in payloads]
    packed = np.concatenate([_flat(a).view(np.uint8) for a in parts]) if parts else np.empty(0, np.uint8)
    n = packed.size
    gathered = np.empty(g.size * n, dtype=np.uint8)
    turn = _Turn(g)
    # Packed as bytes: the dtypes must be compared as part of the call.
    call = Call(("shapes", [_shape(p.array) for p in payloads]), ("dtypes", [p.code.name.lower() for p in payloads]))

    async def run() -> list[Any]:
        if g.size == 1:
            gathered[...] = packed
        else:
            plan = Plan("all_gather_coalesced", Kind.ALL_GATHER, turn.seq, t, call, WireDtype.BYTES, n,
                        schedule=lambda rank, size: direct.direct_all_gather(rank, size, packed, gathered))
            await turn.engine.run(g, plan, turn.ticket)
        results = []
        offset = 0
        for p, a in zip(payloads, parts):
            nb = a.nbytes
            pieces = [
                gathered[r * n + offset : r * n + offset + nb].view(a.dtype).reshape(a.shape) for r in range(g.size)
            ]
            results.append(p.wrap(np.concatenate(pieces, axis=0)))
            offset += nb
        return results

    return Started(run(), turn)


async def reduce_scatter_coalesced(
    xs: Sequence[Any],
    op: Any = "sum",
    group: Any = None,
    dims: Sequence[int] | None = None,
    *,
    timeout: float | None = None,
) -> list[Any]:
    """reduce_scatter of several arrays, each along its own dim (``dims``, default all 0).

    Raises:
        ValueError: ``dims`` of another length than ``xs``; as reduce_scatter for each array.
    """
    return await _reduce_scatter_coalesced_start(xs, op, group, dims, timeout)


def _reduce_scatter_coalesced_start(
    xs: Sequence[Any], op: Any, group: Any, dims: Sequence[int] | None, timeout: float | None
) -> Started[list[Any]]:
    dims_l = list(dims) if dims is not None else [0] * len(xs)
    if len(dims_l) != len(xs):
        raise ValueError(f"reduce_scatter_coalesced: {len(xs)} arrays but {len(dims_l)} dims")
    g = _group(group)
    rop = parse_op(op)
    # Check every array before the first one starts, so a bad one cannot leave the members
    # with different numbers of collectives issued.
    for i, (x, d) in enumerate(zip(xs, dims_l)):
        p = as_payload(x, f"xs[{i}]")
        check_op_dtype(rop, p.code)
        if p.array.ndim == 0:
            raise ValueError(f"reduce_scatter_coalesced: xs[{i}] is 0-d")
        dd = _dim(d, p.array.ndim, f"dims[{i}]")
        if p.array.shape[dd] % g.size:
            raise ValueError(
                f"reduce_scatter_coalesced: xs[{i}].shape[{dd}] = {p.array.shape[dd]} is not divisible "
                f"by the group size {g.size}"
            )
    return together([_reduce_scatter_start(x, rop, g, d, timeout) for x, d in zip(xs, dims_l)])


def together(runs: Sequence[Started[Any]]) -> Started[list[Any]]:
    """Collectives already started (``start``), as one: awaiting it runs them concurrently and
    gives their results in order."""
    return Started(_together(runs), *(turn for r in runs for turn in r.turns))


# --------------------------------------------------------------------------- for aiocoll.torch
def start(name: str, *args: Any, **kwargs: Any) -> Started[Any]:
    """Start collective ``name`` now (arguments checked, its place in the group's order
    claimed) and return it, to be awaited: for callers that issue several collectives
    as one unit and must claim every place before their first await.

    Raises:
        as the collective ``name``; KeyError for an unknown name.
    """
    return _STARTS[name](*args, **kwargs)


def _start_all_reduce(x: Any, op: Any = "sum", group: Any = None, *, out: Any = None,
                      timeout: float | None = None) -> Started[Any]:
    return _all_reduce_start(x, op, group, out, timeout)


def _start_all_gather(x: Any, group: Any = None, *, dim: int = 0, timeout: float | None = None) -> Started[Any]:
    return _all_gather_start(x, group, dim, timeout)


def _start_reduce_scatter(x: Any, op: Any = "sum", group: Any = None, *, dim: int = 0,
                          timeout: float | None = None) -> Started[Any]:
    return _reduce_scatter_start(x, op, group, dim, timeout)


def _start_all_to_all(x: Any, group: Any = None, *, output_split_sizes: Sequence[int] | None = None,
                      input_split_sizes: Sequence[int] | None = None,
                      timeout: float | None = None) -> Started[Any]:
    return _all_to_all_start(x, group, output_split_sizes, input_split_sizes, timeout)


def _start_broadcast(x: Any, src: int, group: Any = None, *, timeout: float | None = None) -> Started[Any]:
    return _broadcast_start(x, src, group, timeout)


def _start_reduce(x: Any, dst: int, op: Any = "sum", group: Any = None, *,
                  timeout: float | None = None) -> Started[Any]:
    return _reduce_start(x, dst, op, group, timeout)


def _start_gather(x: Any, dst: int, group: Any = None, *, dim: int = 0, timeout: float | None = None) -> Started[Any]:
    return _gather_start(x, dst, group, dim, timeout)


def _start_scatter(x: Any, src: int, group: Any = None, *, dim: int = 0, timeout: float | None = None) -> Started[Any]:
    return _scatter_start(x, src, group, dim, timeout)


def _start_permute(x: Any, src_dst: Sequence[int], group: Any = None, *,
                   timeout: float | None = None) -> Started[Any]:
    return _permute_start(x, src_dst, group, timeout)


def _start_all_reduce_coalesced(xs: Sequence[Any], op: Any = "sum", group: Any = None, *,
                                timeout: float | None = None) -> Started[Any]:
    return _all_reduce_coalesced_start(xs, op, group, timeout)


def _start_all_gather_coalesced(xs: Sequence[Any], group: Any = None, *,
                                timeout: float | None = None) -> Started[Any]:
    return _all_gather_coalesced_start(xs, group, timeout)


def _start_reduce_scatter_coalesced(xs: Sequence[Any], op: Any = "sum", group: Any = None,
                                    dims: Sequence[int] | None = None, *,
                                    timeout: float | None = None) -> Started[Any]:
    return _reduce_scatter_coalesced_start(xs, op, group, dims, timeout)


def _start_barrier(group: Any = None, *, timeout: float | None = None) -> Started[Any]:
    return _barrier_start(group, timeout)


_STARTS: dict[str, Callable[..., Started[Any]]] = {
    "all_reduce": _start_all_reduce,
    "all_gather": _start_all_gather,
    "reduce_scatter": _start_reduce_scatter,
    "all_to_all": _start_all_to_all,
    "broadcast": _start_broadcast,
    "reduce": _start_reduce,
    "gather": _start_gather,
    "scatter": _start_scatter,
    "permute": _start_permute,
    "barrier": _start_barrier,
    "all_reduce_coalesced": _start_all_reduce_coalesced,
    "all_gather_coalesced": _start_all_gather_coalesced,
    "reduce_scatter_coalesced": _start_reduce_scatter_coalesced,
}
