"""Collective algorithms as sans-IO schedules, and the table that picks one by size.

A reader finds each algorithm by its file: ``ring.py`` (bandwidth-optimal, any group size),
``direct.py`` (one or two rounds over a full mesh), ``tree.py`` (binomial broadcast and reduce),
``composed.py`` (large broadcast and reduce built from full-mesh exchanges),
``dissemination.py`` (barrier). ``_schedule.py`` defines Send/Recv and how a driver runs them;
``select.py`` holds the table and returns the schedule for a collective (see ``select``).
Schedules know nothing of transports: ``aiocoll.testing.simulate`` runs them without sockets.
"""

from __future__ import annotations

from ._schedule import Batch, Finish, Op, Recv, Schedule, Send, Start, chunk_bounds
from .select import ALGORITHMS, MESH, SMALL, choose, select

__all__ = [
    "ALGORITHMS", "MESH", "SMALL", "Batch", "Finish", "Op", "Recv", "Schedule", "Send", "Start", "chunk_bounds", "choose",
    "select",
]
