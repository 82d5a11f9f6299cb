"""Which algorithm runs a collective: the table, and ``select``, which returns the schedule.

The table depends only on the collective, the bytes per member and the group's size, so every
member picks the same algorithm. It can be overridden per collective and per world with
``Settings(algorithms={"all_reduce": "ring"})`` (or ``AIOCOLL_ALGO_ALL_REDUCE=ring``); a chosen
algorithm must be the same on every member (a different one is reported as a mismatch or a
timeout, never a wrong value).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from . import composed, direct, ring, tree
from ._schedule import Schedule

Array = np.ndarray[Any, Any]
Reduce = Callable[[Array, Array], None]

#: collective -> the algorithms that can run it
ALGORITHMS: dict[str, tuple[str, ...]] = {
    "all_reduce": ("direct", "rsag", "ring"),
    "reduce_scatter": ("direct", "ring"),
    "all_gather": ("direct", "ring"),
    "broadcast": ("tree", "scatter_allgather"),
    "reduce": ("tree", "rs_gather"),
}

SMALL = 64 << 10  # bytes a rank may send in a one-round exchange before we switch algorithm
MESH = 8  # largest group that uses the full-mesh algorithms for large payloads

def check_choice(collective: str, algorithm: str, where: str = "") -> None:
    """Raises ValueError naming the valid choices when ``algorithm`` cannot run ``collective``."""
    if collective not in ALGORITHMS:
        raise ValueError(f"{where}no algorithm choice for {collective!r}; choices exist for {sorted(ALGORITHMS)}")
    if algorithm not in ALGORITHMS[collective]:
        raise ValueError(f"{where}{collective} has no algorithm {algorithm!r}; choose from {ALGORITHMS[collective]}")


def choose(collective: str, nbytes: int, size: int, chosen: Mapping[str, str] | None = None) -> str:
    """The algorithm's name for ``collective`` of ``nbytes`` per member in a group of ``size``.

    ``chosen``: the world's overrides (``Settings.algorithms``).
    """
    name = (chosen or {}).get(collective)
    if name:
        return name
    if collective == "all_reduce":
        if nbytes * (size - 1) <= SMALL:
            return "direct"
        return "rsag" if size <= MESH else "ring"
    if collective in ("reduce_scatter", "all_gather"):
        return "direct" if size <= 2 * MESH else "ring"
    if collective == "broadcast":
        return "tree" if nbytes <= SMALL or size <= 2 else "scatter_allgather"
    if collective == "reduce":
        return "tree" if nbytes <= SMALL or size <= 2 else "rs_gather"
    raise ValueError(f"no algorithm choice for {collective!r}; choices exist for {sorted(ALGORITHMS)}")


def select(
    collective: str,
    rank: int,
    size: int,
    *,
    x: Array,
    out: Array,
    root: int = 0,
    reduce: Reduce | None = None,
    chosen: Mapping[str, str] | None = None,
) -> Schedule:
    """The schedule that runs ``collective`` on this member (``rank`` of ``size``).

    ``x`` / ``out``: the 1-d input and output (for broadcast one buffer, passed as both; for
    reduce ``out`` starts as a copy of ``x`` and ends with the reduction on the root). ``root``:
    for rooted collectives. ``reduce``: for reducing ones.

    Raises:
        ValueError: ``collective`` has no algorithm table, or a forced choice is not valid.
    """
    name = choose(collective, x.nbytes, size, chosen)
    if collective == "all_reduce":
        assert reduce is not None
        if name == "direct":
            return direct.direct_all_reduce(rank, size, x, out, reduce)
        if name == "rsag":
            return direct.rsag_all_reduce(rank, size, x, out, reduce)
        return ring.ring_all_reduce(rank, size, x, out, reduce)
    if collective == "reduce_scatter":
        assert reduce is not None
        if name == "direct":
            return direct.direct_reduce_scatter(rank, size, x, out, reduce)
        return ring.ring_reduce_scatter(rank, size, x, out, reduce)
    if collective == "all_gather":
        if name == "direct":
            return direct.direct_all_gather(rank, size, x, out)
        return ring.ring_all_gather(rank, size, x, out)
    if collective == "broadcast":
        if name == "tree":
            return tree.binomial_broadcast(rank, size, root, out)
        return composed.scatter_allgather_broadcast(rank, size, root, out)
    if collective == "reduce":
        assert reduce is not None
        if name == "tree":
            return tree.binomial_reduce(rank, size, root, out, reduce)
        return composed.reduce_scatter_gather_reduce(rank, size, root, x, out, reduce)
    raise ValueError(f"no algorithm choice for {collective!r}; choices exist for {sorted(ALGORITHMS)}")
