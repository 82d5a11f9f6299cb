"""Every collective kind as one call plus the exact result it must give, for the reliability scripts.

Each rank derives every rank's input itself (integers, so sums are exact in any order), so a
result is checked without trusting another rank. ``OPS`` maps a name to ``(call, check)``:
``call(group, rank, size)`` runs the collective on ``group`` (group rank == world rank here,
the groups hold every rank) and ``check(result, rank, size)`` returns None or what is wrong.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

import aiocoll

N = 2048  # elements per rank: small enough for 15 in flight, large enough for several frames


def x(r: int, n: int = N, dtype: Any = np.int64) -> np.ndarray:
    return (np.arange(n, dtype=np.int64) + 1000 * (r + 1)).astype(dtype)


def _diff(got: Any, want: Any) -> str | None:
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape or got.dtype != want.dtype or not np.array_equal(got, want):
        return f"got {got.dtype}{got.shape} {got.ravel()[:4]}, want {want.dtype}{want.shape} {want.ravel()[:4]}"
    return None


def _all(xs: list[Any], wants: list[Any]) -> str | None:
    if len(xs) != len(wants):
        return f"{len(xs)} results, want {len(wants)}"
    for a, b in zip(xs, wants):
        if (d := _diff(a, b)) is not None:
            return d
    return None


async def _send_recv(g: Any, rank: int, size: int) -> Any:
    nxt, prv = (rank + 1) % size, (rank - 1) % size
    sending = asyncio.ensure_future(aiocoll.send(x(rank), nxt, g, tag=3))
    try:
        got = await aiocoll.recv(np.empty(N, np.int64), prv, g, tag=3)
    finally:
        # Wait for our send too, so that no task of ours outlives the call (its error wins).
        done = await asyncio.gather(sending, return_exceptions=True)
    if isinstance(done[0], BaseException):
        raise done[0]
    return got


Call = Callable[[Any, int, int], Awaitable[Any]]
Check = Callable[[Any, int, int], "str | None"]

OPS: dict[str, tuple[Call, Check]] = {
    "all_reduce": (
        lambda g, r, s: aiocoll.all_reduce(x(r, dtype=np.float32), group=g),
        lambda y, r, s: _diff(y, sum(x(p) for p in range(s)).astype(np.float32)),
    ),
    "all_gather": (
        lambda g, r, s: aiocoll.all_gather(x(r), g),
        lambda y, r, s: _diff(y, np.concatenate([x(p) for p in range(s)])),
    ),
    "reduce_scatter": (
        lambda g, r, s: aiocoll.reduce_scatter(x(r, N * s), group=g),
        lambda y, r, s: _diff(y, sum(x(p, N * s) for p in range(s))[r * N : (r + 1) * N]),
    ),
    "all_to_all": (
        lambda g, r, s: aiocoll.all_to_all(x(r, N * s), g),
        lambda y, r, s: _diff(y, np.concatenate([x(p, N * s)[r * N : (r + 1) * N] for p in range(s)])),
    ),
    "broadcast": (
        lambda g, r, s: aiocoll.broadcast(x(r), s - 1, g),
        lambda y, r, s: _diff(y, x(s - 1)),
    ),
    "reduce": (
        lambda g, r, s: aiocoll.reduce(x(r), 0, group=g),
        lambda y, r, s: _diff(y, sum(x(p) for p in range(s)) if r == 0 else x(r)),
    ),
    "gather": (
        lambda g, r, s: aiocoll.gather(x(r), 0, g),
        lambda y, r, s: _diff(y, np.concatenate([x(p) for p in range(s)])) if r == 0 else None,
    ),
    "scatter": (
        lambda g, r, s: aiocoll.scatter(x(r, N * s), s - 1, g),
        lambda y, r, s: _diff(y, x(s - 1, N * s)[r * N : (r + 1) * N]),
    ),
    "barrier": (
        lambda g, r, s: aiocoll.barrier(g),
        lambda y, r, s: None if y is None else f"barrier returned {y!r}",
    ),
    "send_recv": (
        _send_recv,
        lambda y, r, s: _diff(y, x((r - 1) % s)),
    ),
    "permute": (
        lambda g, r, s: aiocoll.permute(x(r), [(m + 1) % s for m in range(s)], g),
        lambda y, r, s: _diff(y, x((r - 1) % s)),
    ),
    "all_reduce_coalesced": (
        lambda g, r, s: aiocoll.all_reduce_coalesced([x(r, 7), x(r, 5, np.float64)], "max", g),
        lambda y, r, s: _all(y, [x(s - 1, 7), x(s - 1, 5, np.float64)]),
    ),
    "all_gather_coalesced": (
        lambda g, r, s: aiocoll.all_gather_coalesced([x(r, 3), x(r, 4, np.int16)], g),
        lambda y, r, s: _all(
            y, [np.concatenate([x(p, 3) for p in range(s)]), np.concatenate([x(p, 4, np.int16) for p in range(s)])]
        ),
    ),
    "reduce_scatter_coalesced": (
        lambda g, r, s: aiocoll.reduce_scatter_coalesced([x(r, 2 * s), x(r, 3 * s, np.float64)], "sum", g),
        lambda y, r, s: _all(
            y,
            [
                sum(x(p, 2 * s) for p in range(s))[2 * r : 2 * r + 2],
                sum(x(p, 3 * s, np.float64) for p in range(s))[3 * r : 3 * r + 3],
            ],
        ),
    ),
    "all_gather_object": (
        lambda g, r, s: aiocoll.all_gather_object({"rank": r, "tag": "x" * r}, g),
        lambda y, r, s: None if y == [{"rank": p, "tag": "x" * p} for p in range(s)] else f"got {y!r}",
    ),
    "broadcast_object": (
        lambda g, r, s: aiocoll.broadcast_object(("from", r), s - 1, g),
        lambda y, r, s: None if y == ("from", s - 1) else f"got {y!r}",
    ),
}


def groups(size: int) -> dict[str, Any]:
    """One group of every rank per collective kind, so that kinds in flight at once never share
    a group's issue order (object collectives issue two collectives one after the other)."""
    return {name: aiocoll.new_group(list(range(size)), tag=f"rel-{name}") for name in OPS}
