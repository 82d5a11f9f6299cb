"""Public group functions. Plain functions: making, finding or destroying a group needs no
collective, no new connection and no world-wide call order; every member derives the same group
id alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ..engines import select as _fastpath
from .group import ProcessGroup
from .forms import expand_group as _expand_group
from .forms import resolve_group
from ..core.world import current_world


def new_group(ranks: Iterable[int], tag: str | None = "", name: str = "") -> ProcessGroup:
    """A group of the given global ranks (sorted: group rank i is the i-th smallest).

    Local: no collective, no new connection. The same non-empty ``tag`` and ranks (in any
    order) always give the same object. Untagged groups may repeat: the k-th untagged group of
    some ranks on one member is the k-th on every member, so make them in the same order on
    every member (other groups in between do not matter).

    Args:
        tag: "" or None for an untagged group. Tags starting with ``"untagged:"`` are reserved.
        name: a unique name, accepted wherever a group goes (default: derived from tag and ranks).

    Raises:
        TypeError: ranks are not integers; tag or name is not a string.
        ValueError: no ranks, a rank out of range, a duplicate; a reserved tag; the name is taken.
        NotInitializedError: before ``aiocoll.init``.
    """
    return current_world().registry.new_group(ranks, tag=tag, name=name)


def new_subgroups(
    group_size: int, tag: str | None = None, *, group: Any = None
) -> tuple[ProcessGroup | None, list[ProcessGroup]]:
    """Split ``group`` (default: the world) into contiguous groups of ``group_size`` members.

    ``new_subgroups(2)`` in a world of 4 gives [0, 1] and [2, 3]. Returns ``(mine, all)``:
    the subgroup holding this rank (None if this rank is not in ``group``) and every
    subgroup in order. With a ``tag`` the same call returns the same objects; without one,
    each call makes new (untagged) groups.

    Raises:
        TypeError: ``group_size`` is not an int.
        ValueError: ``group_size`` is not positive, exceeds the group's size or does not divide it.
        NotInitializedError: before ``aiocoll.init``.
    """
    if isinstance(group_size, (bool, np.bool_)) or not isinstance(group_size, (int, np.integer)):
        raise TypeError(f"group_size must be an int, got {group_size!r}")
    world = current_world()
    parent = resolve_group(group, world)
    if group_size <= 0:
        raise ValueError(f"group_size ({group_size}) must be positive")
    if group_size > parent.size:
        raise ValueError(f"group_size ({group_size}) must not exceed the group size ({parent.size})")
    if parent.size % group_size:
        raise ValueError(f"the group size ({parent.size}) must be divisible by group_size ({group_size})")
    groups = [
        world.registry.new_group(parent.ranks[i : i + int(group_size)], tag=tag)
        for i in range(0, parent.size, int(group_size))
    ]
    mine = next((g for g in groups if g.rank >= 0), None)
    return mine, groups


def find_group(ranks: Iterable[int], tag: str | None = "") -> ProcessGroup | None:
    """The group of these ranks (order ignored) and tag, or None.

    An empty tag finds the first untagged group of those ranks; for all ranks, the world. The
    tag ``expand_group`` reports for an untagged group (``"untagged:<name>"``) finds that group.

    Raises:
        TypeError / ValueError: bad ranks or tag, as for ``new_group``.
        NotInitializedError: before ``aiocoll.init``.
    """
    return current_world().registry.find(ranks, tag)


def find_or_create_group(ranks: Iterable[int], tag: str) -> ProcessGroup:
    """The group of these ranks (order ignored) and tag, created if needed.

    Raises:
        ValueError: ``tag`` is empty (untagged groups may repeat, so it cannot say which); an
            ``"untagged:"`` tag that names no group of these ranks; bad ranks.
        TypeError: ranks are not integers; tag is not a string.
        NotInitializedError: before ``aiocoll.init``.
    """
    return current_world().registry.find_or_create(ranks, tag)


def expand_group(group: Any, tag: str = "") -> tuple[str, list[int], int]:
    """``(tag, ranks, group_size)`` for any group form, by PyTorch's ``_expand_group`` rules.

    - a list of ranks: the tag as given, the ranks, their number;
    - a 2-d list: the tag as given, the sublists concatenated, the size of one sublist;
    - a ProcessGroup, a group name or None (the world): its ranks and its own tag unless
      ``tag`` is given (an untagged group reports ``"untagged:<name>"``, which ``find_group``
      resolves to that very group);
    - a 1-d DeviceMesh: its group, likewise; ``(mesh, dim)``: this rank's group along ``dim``.

    Raises:
        ValueError: sublists of different sizes; an n-d DeviceMesh without a dim (pass
            ``(mesh, dim)``); an unknown name; anything else (the message names the accepted forms).
        TypeError: ranks that are not integers; a tag that is not a string.
        NotInitializedError: a group name or None before ``aiocoll.init``.
    """
    return _expand_group(group, tag)


def destroy_group(group: ProcessGroup | str) -> None:
    """Release ``group`` on this rank: its shared-memory segment, doorbell and worker thread.

    Like ``torch.distributed.destroy_process_group(group)``: every member calls it, after the
    last collective it starts on the group. Local: no collective, no waiting. Collectives
    already running on the group finish first; then what it holds is released. Afterwards
    every collective on the group raises ValueError before it starts, lookups no longer find
    it, and ``new_group`` with the same tag and ranks makes a new group (a new id, so it works
    even if the destroyed one was broken). Destroying a group twice does nothing.

    Untagged groups other than the first of their ranks are also released when nothing
    references them any more; tagged groups live until this is called (or the world ends),
    because the same tag must give the same group on every member.

    Args:
        group: a ProcessGroup or a group's name.

    Raises:
        TypeError: ``group`` is neither a ProcessGroup nor a name.
        ValueError: ``group`` is the world (end it with ``aiocoll.destroy()``), an unknown
            name, or a group of another world.
        NotInitializedError: before ``aiocoll.init``.
    """
    world = current_world()
    if isinstance(group, str):
        found = world.registry.by_name(group)
        if found is None:
            raise ValueError(f"no group named {group!r}")
        group = found
    elif not isinstance(group, ProcessGroup):
        raise TypeError(f"destroy_group takes a ProcessGroup or a group name, got {type(group).__name__}")
    if group.destroyed:
        return
    if group._world is not world:
        raise ValueError(f"{group.name} belongs to another world (one destroyed, or another rank's in a test harness)")
    if group is world.group:
        raise ValueError("the world group cannot be destroyed on its own: end the world with aiocoll.destroy()")
    world.registry.remove(group)
    group._destroyed = True
    _fastpath.release(group, f"{group.name} was destroyed (aiocoll.destroy_group)")


def renew_group(group: ProcessGroup | str | None = None) -> ProcessGroup:
    """A fresh group with the same members, to go on after a collective on ``group`` failed.

    A failed collective (a timeout, a mismatch, a cancelled call) breaks its group for good on
    every member: later calls raise ``GroupBrokenError`` at once. Every member calls
    ``renew_group`` after it has seen the failure, and gets a new group of the same ranks with a
    new id, which no frame of the broken one can reach. Local, like ``new_group``: no
    collective, no waiting, so every member must renew the same groups in the same order.

    ``None`` (or the world group) renews the world: the new group becomes the default group
    (``group=None``, ``aiocoll.world()``) and the old one keeps failing. Any other group is
    destroyed (as ``destroy_group``) and replaced by a new one with its ranks and tag.

    A member that died stays dead: a collective on the new group fails at once with
    ``PeerFailureError`` naming it. Recovering from that takes a new world (``destroy`` and
    ``init`` again, or a restart of the job).

    Args:
        group: a ProcessGroup, a group's name, or None for the world.

    Raises:
        TypeError: ``group`` is neither a ProcessGroup, a name nor None.
        ValueError: an unknown name, a group of another world, or one already destroyed.
        NotInitializedError: before ``aiocoll.init``.
    """
    world = current_world()
    if group is None:
        group = world.group
    elif isinstance(group, str):
        found = world.registry.by_name(group)
        if found is None:
            raise ValueError(f"no group named {group!r}")
        group = found
    elif not isinstance(group, ProcessGroup):
        raise TypeError(f"renew_group takes a ProcessGroup, a group name or None, got {type(group).__name__}")
    if group.destroyed:
        raise ValueError(f"{group.name} was destroyed; renew the group that replaced it, or make one (new_group)")
    if group._world is not world:
        raise ValueError(f"{group.name} belongs to another world (one destroyed, or another rank's in a test harness)")
    if group is world.group:
        old = group
        new = world.registry.renew_world()
        _fastpath.release(old, f"{old.name} was renewed as {new.name} (aiocoll.renew_group)")
        return new
    ranks, tag = group.ranks, group.tag
    destroy_group(group)
    return world.registry.new_group(ranks, tag=tag)
