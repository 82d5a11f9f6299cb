"""Collective algorithms as sans-IO schedules, and the table that picks one by size.

A reader finds each algorithm by its file: ``ring.py`` (bandwidth-optimal, any group size),
``direct.py`` (one or two rounds over a full mesh), ``tree.py`` (binomial broadcast and reduce),
``dissemination.py`` (barrier). ``_schedule.py`` defines Send/Recv and how a driver runs them.

Selection is automatic (see ``choose``) and can be overridden per collective, for benchmarks
and experiments, with ``force("all_reduce", "ring")`` or the environment variable
``AIOCOLL_ALGO_ALL_REDUCE=ring``.
"""

from __future__ import annotations

import os

from ._schedule import Op, Recv, Schedule, Send, chunk_bounds

#: name -> allowed algorithm names, the first is only a label; choose() decides the default
ALGORITHMS: dict[str, tuple[str, ...]] = {
    "all_reduce": ("direct", "rsag", "ring"),
    "reduce_scatter": ("direct", "ring"),
    "all_gather": ("direct", "ring"),
    "broadcast": ("tree", "scatter_allgather"),
    "reduce": ("tree", "rs_gather"),
}

_forced: dict[str, str] = {}

SMALL = 64 << 10  # bytes a rank may send in a one-round exchange before we switch algorithm
MESH = 8  # largest group that uses the full-mesh algorithms for large payloads


def force(collective: str, algorithm: str | None) -> None:
    """Force ``collective`` to use ``algorithm`` (None: back to automatic choice).

    Raises:
        ValueError: unknown collective or algorithm; the message lists the valid ones.
    """
    if collective not in ALGORITHMS:
        raise ValueError(f"no algorithm choice for {collective!r}; choices exist for {sorted(ALGORITHMS)}")
    if algorithm is None:
        _forced.pop(collective, None)
        return
    if algorithm not in ALGORITHMS[collective]:
        raise ValueError(f"{collective} has no algorithm {algorithm!r}; choose from {ALGORITHMS[collective]}")
    _forced[collective] = algorithm


def choose(collective: str, nbytes: int, size: int) -> str:
    """The algorithm for ``collective`` of ``nbytes`` per rank in a group of ``size``."""
    name = _forced.get(collective) or os.environ.get(f"AIOCOLL_ALGO_{collective.upper()}")
    if name:
        if name not in ALGORITHMS[collective]:
            raise ValueError(f"AIOCOLL_ALGO_{collective.upper()}={name!r}: choose from {ALGORITHMS[collective]}")
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
    raise ValueError(collective)


__all__ = ["ALGORITHMS", "Op", "Recv", "Schedule", "Send", "chunk_bounds", "choose", "force"]
