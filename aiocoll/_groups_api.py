"""Public group functions (plain functions: creating a group needs no collective). Minimal; issue 4 extends."""

from __future__ import annotations

from collections.abc import Iterable

from ._group import ProcessGroup
from ._world import current_world


def new_group(ranks: Iterable[int], tag: str = "", name: str = "") -> ProcessGroup:
    """A group of the given global ranks (sorted). Local: no collective, no new connection.

    The same non-empty tag and ranks always give the same group object.

    Raises:
        ValueError: a rank out of range, duplicates, or no ranks.
    """
    return current_world().registry.new_group(ranks, tag=tag, name=name)


def find_group(ranks: Iterable[int], tag: str = "") -> ProcessGroup | None:
    """The group of these ranks (order ignored) and tag, or None."""
    return current_world().registry.find(ranks, tag)


def find_or_create_group(ranks: Iterable[int], tag: str) -> ProcessGroup:
    """The group of these ranks and tag, created if needed.

    Raises:
        ValueError: ``tag`` is empty (an untagged lookup cannot tell repeated groups apart).
    """
    if not tag:
        raise ValueError("find_or_create_group needs a non-empty tag")
    return current_world().registry.new_group(ranks, tag=tag)
