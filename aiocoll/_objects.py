"""Object collectives: Python values between ranks, safely.

Values travel in aiocoll's own safe encoding (``aiocoll._codec``: no code runs on decode).
``allow_pickle=True`` switches to pickle for arbitrary objects between ranks that trust each
other; every member must pass the same flag, and a receiver that did not opt in refuses pickled
bytes instead of loading them.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np

from ._codec import decode, encode
from ._collectives import all_gather, broadcast

_SAFE = b"S"
_PICKLE = b"P"


def _dumps(obj: Any, allow_pickle: bool) -> np.ndarray[Any, Any]:
    raw = _PICKLE + pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if allow_pickle else _SAFE + encode(obj)
    return np.frombuffer(raw, dtype=np.uint8)


def _loads(buf: np.ndarray[Any, Any], allow_pickle: bool) -> Any:
    raw = buf.tobytes()
    if raw[:1] == _SAFE:
        return decode(raw[1:])
    if raw[:1] == _PICKLE:
        if not allow_pickle:
            raise ValueError("received pickled bytes but allow_pickle is False on this rank; refusing to unpickle")
        return pickle.loads(raw[1:])  # noqa: S301 - explicit opt-in between trusted ranks
    raise ValueError("object payload with an unknown format marker")


async def all_gather_object(obj: Any, group: Any = None, *, allow_pickle: bool = False,
                            timeout: float | None = None) -> list[Any]:
    """Every member's ``obj``, in group-rank order.

    Raises:
        ValueError: ``obj`` cannot be encoded safely (pass ``allow_pickle=True``), or a received
            value is malformed. CollectiveError: as for all_gather.
    """
    data = _dumps(obj, allow_pickle)
    sizes = await all_gather(np.array([data.size], dtype=np.int64), group, timeout=timeout)
    longest = int(sizes.max())
    padded = np.zeros(longest, dtype=np.uint8)
    padded[: data.size] = data
    gathered = await all_gather(padded, group, timeout=timeout)
    return [
        _loads(gathered[i * longest : i * longest + int(n)], allow_pickle) for i, n in enumerate(sizes.tolist())
    ]


async def broadcast_object(obj: Any, src: int, group: Any = None, *, allow_pickle: bool = False,
                           timeout: float | None = None) -> Any:
    """Member ``src``'s ``obj`` on every member (the others' ``obj`` is ignored).

    Raises:
        ValueError: as for all_gather_object. CollectiveError: as for broadcast.
    """
    from ._collectives import _group

    g = _group(group)
    data = _dumps(obj, allow_pickle) if g.rank == src else np.empty(0, np.uint8)
    size = await broadcast(np.array([data.size], dtype=np.int64), src, g, timeout=timeout)
    buf = data if g.rank == src else np.empty(int(size[0]), dtype=np.uint8)
    got = await broadcast(buf, src, g, timeout=timeout)
    return _loads(got, allow_pickle)
