"""Object collectives: Python values between ranks, safely.

Values travel in aiocoll's own safe encoding (``aiocoll.collectives.codec``: no code runs on decode).
``allow_pickle=True`` switches to pickle for arbitrary objects between ranks that trust each
other; every member must pass the same flag, and a receiver that did not opt in refuses pickled
bytes instead of loading them.

Each is one collective with one sequence number: the sizes and then the payloads are the two
halves of a single schedule (a receiver allocates its buffers between them), so nothing started
meanwhile can take a place between the halves on some members and not on others.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np

from .. import algorithms
from .codec import decode, encode
from .tensors import Started, _group, _root, _timeout, _Turn
from ..engines.plan import Plan
from ..groups.group import ProcessGroup
from ..arrays.dtypes import WireDtype
from ..core.wire import Call, Kind
from ..algorithms import Recv, Schedule, Send, tree

_SAFE = b"S"
_PICKLE = b"P"

Array = np.ndarray[Any, Any]


def _dumps(obj: Any, allow_pickle: bool) -> Array:
    raw = _PICKLE + pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if allow_pickle else _SAFE + encode(obj)
    return np.frombuffer(raw, dtype=np.uint8)


def _loads(buf: Array, allow_pickle: bool) -> Any:
    raw = buf.tobytes()
    if raw[:1] == _SAFE:
        return decode(raw[1:])
    if raw[:1] == _PICKLE:
        if not allow_pickle:
            raise ValueError("received pickled bytes but allow_pickle is False on this rank; refusing to unpickle")
        return pickle.loads(raw[1:])  # noqa: S301 - explicit opt-in between trusted ranks
    raise ValueError("object payload with an unknown format marker")


def _length(n: Any, rank: int) -> int:
    size = int(n)
    if size < 1:  # every payload has its format marker
        raise ValueError(f"rank {rank} announced an object payload of {size} bytes")
    return size


def _exchange(rank: int, size: int, blocks: list[Array]) -> Schedule:
    """Every member's block to every other (``blocks[rank]`` filled, the others receive):
    directly in small groups, around the ring in large ones, as all_gather does."""
    if size <= 2 * algorithms.MESH:
        yield [op for p in range(size) if p != rank for op in (Send(p, blocks[rank]), Recv(p, blocks[p]))]
        return
    right, left = (rank + 1) % size, (rank - 1) % size
    for k in range(size - 1):
        yield [Send(right, blocks[(rank - k) % size]), Recv(left, blocks[(rank - k - 1) % size])]


def _gather_schedule(rank: int, size: int, data: Array, got: list[Array]) -> Schedule:
    lengths = np.zeros(size, dtype=np.int64)
    lengths[rank] = data.size
    yield from _exchange(rank, size, [lengths[p : p + 1] for p in range(size)])
    got[:] = [data if p == rank else np.empty(_length(lengths[p], p), np.uint8) for p in range(size)]
    yield from _exchange(rank, size, got)


def _broadcast_schedule(rank: int, size: int, root: int, data: Array | None, got: list[Array]) -> Schedule:
    length = np.array([0 if data is None else data.size], dtype=np.int64)
    yield from tree.binomial_broadcast(rank, size, root, length)
    got.append(data if data is not None else np.empty(_length(length[0], root), np.uint8))
    yield from tree.binomial_broadcast(rank, size, root, got[0])


async def all_gather_object(obj: Any, group: Any = None, *, allow_pickle: bool = False,
                            timeout: float | None = None) -> list[Any]:
    """Every member's ``obj``, in group-rank order.

    Raises:
        ValueError: ``obj`` cannot be encoded safely (pass ``allow_pickle=True``), or a received
            value is malformed. CollectiveError: as for all_gather.
    """
    return await _all_gather_object_start(obj, group, allow_pickle, timeout)


def _all_gather_object_start(obj: Any, group: Any, allow_pickle: bool, timeout: float | None) -> Started[list[Any]]:
    g = _group(group)
    data = _dumps(obj, allow_pickle)
    t = _timeout(g, timeout)
    turn = _Turn(g)

    async def run() -> list[Any]:
        got: list[Array] = [data]
        if g.size > 1:
            plan = Plan("all_gather_object", Kind.ALL_GATHER_OBJECT, turn.seq, t, dtype=WireDtype.BYTES,
                        schedule=lambda rank, size: _gather_schedule(rank, size, data, got))
            await turn.engine.run(g, plan, turn.ticket)
        return [_loads(b, allow_pickle) for b in got]

    return Started(run(), turn)


async def broadcast_object(obj: Any, src: int, group: Any = None, *, allow_pickle: bool = False,
                           timeout: float | None = None) -> Any:
    """Member ``src``'s ``obj`` on every member (the others' ``obj`` is ignored). On ``src``
    itself the result is ``obj`` (not a decoded copy: a root never unpickles its own bytes).

    Raises:
        ValueError: as for all_gather_object. CollectiveError: as for broadcast (MismatchError
            also when members name another ``src``).
    """
    return await _broadcast_object_start(obj, src, group, allow_pickle, timeout)


def _broadcast_object_start(obj: Any, src: int, group: Any, allow_pickle: bool,
                            timeout: float | None) -> Started[Any]:
    g = _group(group)
    root = _root(src, g, "src")
    data = _dumps(obj, allow_pickle) if g.rank == root else None
    payload = _broadcast_payload_start(g, root, data, _timeout(g, timeout))

    async def run() -> Any:
        got = await payload
        return obj if g.rank == root else _loads(got, allow_pickle)

    return Started(run(), *payload.turns)


def _broadcast_payload_start(g: ProcessGroup, root: int, data: Array | None, t: float) -> Started[Array]:
    """broadcast_object's collective: ``data`` (the encoded object, on the root) to every member."""
    turn = _Turn(g)

    async def run() -> Array:
        got: list[Array] = []
        if g.size > 1:
            plan = Plan("broadcast_object", Kind.BROADCAST_OBJECT, turn.seq, t, Call(("src", root)), WireDtype.BYTES,
                        agree=True, schedule=lambda rank, size: _broadcast_schedule(rank, size, root, data, got))
            await turn.engine.run(g, plan, turn.ticket)
        else:
            assert data is not None
            got.append(data)
        return got[0]

    return Started(run(), turn)
