"""Every form a ``group=`` argument may take: desugared (``expand_group``) or resolved to a group.

The forms (SPEC section 3): None (the world), a ProcessGroup, a group name, a 1-d list of
global ranks, a 2-d list of equal-sized disjoint rank lists (each rank uses the one holding it),
a 1-d DeviceMesh, or ``(DeviceMesh, dim)`` with dim an index or a name. Rank lists may be
lists, tuples, ranges or numpy arrays.

``expand_group`` follows ``torch.distributed._functional_collectives._expand_group``:
``(tag, ranks, group_size)``, where a 2-d list flattens and group_size is one sublist's size.
``resolve_expanded`` is its inverse, run where the collective runs: this rank's chunk of
ranks, found by tag (created if new). ``resolve_group`` goes straight from a form to a group.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .group import ProcessGroup
from .registry import as_rank, check_tag, untagged_tag
from .mesh import DeviceMesh

if TYPE_CHECKING:
    from ..core.world import World

FORMS = (
    "None (the world), a ProcessGroup, a group name, a list of global ranks, a 2-d list of "
    "equal-sized rank lists, a 1-d DeviceMesh, or (DeviceMesh, dim)"
)

_LISTS = (list, tuple, range, np.ndarray)


def _is_mesh_pair(group: Any) -> bool:
    return isinstance(group, tuple) and len(group) > 0 and isinstance(group[0], DeviceMesh)


def _mesh_pair_group(group: tuple[Any, ...]) -> ProcessGroup:
    if len(group) != 2:
        raise ValueError(f"a mesh group is (DeviceMesh, dim), got a tuple of {len(group)} items")
    mesh: DeviceMesh = group[0]
    dim = group[1]
    if isinstance(dim, (bool, np.bool_)) or not isinstance(dim, (int, np.integer, str)):
        raise ValueError(f"a mesh group is (DeviceMesh, dim) with dim an int or a name, got dim={dim!r}")
    return mesh.get_group(dim if isinstance(dim, str) else int(dim))


def _mesh_group(mesh: DeviceMesh) -> ProcessGroup:
    if mesh.ndim != 1:
        raise ValueError(
            f"a {mesh.ndim}-d DeviceMesh holds a group per dimension: pass (mesh, dim) to say which "
            "(only a 1-d mesh stands for a group by itself)"
        )
    return mesh.get_group()


def parse_rank_lists(group: Any) -> tuple[list[int], int, list[list[int]] | None]:
    """A 1-d or 2-d rank list as (flattened ranks, group size, the sublists or None for 1-d).

    Raises:
        TypeError: an entry is not an integer (or a list of integers).
        ValueError: empty; sublists of different sizes (PyTorch's rule); a rank repeated;
            ranks mixed with lists; more than two levels.
    """
    items: list[Any] = group.tolist() if isinstance(group, np.ndarray) else list(group)
    if not items:
        raise ValueError("an empty rank list is not a group")
    nested = [isinstance(x, _LISTS) for x in items]
    if all(nested):
        subs: list[list[int]] = []
        for item in items:
            sub = item.tolist() if isinstance(item, np.ndarray) else list(item)
            if any(isinstance(r, _LISTS) for r in sub):
                raise ValueError(f"a group is a 1-d or 2-d rank list, got more levels: {sub!r}")
            subs.append([as_rank(r) for r in sub])
        size = len(subs[0])
        for sub in subs[1:]:
            if len(sub) != size:
                raise ValueError(f"group sizes must be identical, found {size} and {len(sub)} in {subs}")
        if size == 0:
            raise ValueError("a 2-d rank list of empty sublists is not a group")
        flat = [r for sub in subs for r in sub]
        _no_repeats(flat, "subgroups of a 2-d rank list must be disjoint")
        return flat, size, subs
    if any(nested):
        raise ValueError(f"a rank list mixes ranks and lists: {items!r}")
    flat = [as_rank(r) for r in items]
    _no_repeats(flat, "a group's ranks must be distinct")
    return flat, len(flat), None


def _no_repeats(ranks: list[int], what: str) -> None:
    dup = sorted(r for r, n in Counter(ranks).items() if n > 1)
    if dup:
        raise ValueError(f"{what}: rank{'s' if len(dup) > 1 else ''} {dup} repeated")


def _is_rank_list(group: Any) -> bool:
    return isinstance(group, _LISTS) and not _is_mesh_pair(group)


def _by_name(name: str, world: World) -> ProcessGroup:
    found = world.registry.by_name(name)
    if found is None:
        raise ValueError(f"no group named {name!r}")
    return found


def _own(group: ProcessGroup, world: World) -> ProcessGroup:
    if group.world is not world:
        raise ValueError(
            f"{group.name} belongs to another world (one destroyed, or another rank's in a test harness)"
        )
    return group


def _bad_form(group: Any) -> ValueError:
    return ValueError(f"cannot use {type(group).__name__} {group!r:.80} as a group: pass {FORMS}")


def _find_or_make(ranks: Sequence[int], tag: str, world: World) -> ProcessGroup:
    """The group of ``ranks``: by tag (created if new), or untagged (the first, else a new one)."""
    if tag:
        return world.registry.find_or_create(ranks, tag)
    return world.registry.find(ranks) or world.registry.new_group(ranks)


def _mine(subs: list[list[int]], world: World) -> list[int]:
    for sub in subs:
        if world.rank in sub:
            return sub
    raise ValueError(f"rank {world.rank} is in none of the subgroups {subs}")


def resolve_group(group: Any, world: World, tag: str = "") -> ProcessGroup:
    """The ProcessGroup that ``group`` (any accepted form) stands for on this rank.

    A rank list is looked up untagged (the first such group) and created if new, or, with a
    ``tag``, found or created under that tag. With a 2-d list this rank uses the sublist that
    holds it; with ``(mesh, dim)``, the mesh's group along ``dim`` that holds it. ``tag`` is
    ignored for forms that already are a group (as in torch).

    Raises:
        ValueError: unknown name; a 2-d list none of whose sublists holds this rank; an n-d
            mesh without a dim; bad ranks; a form that is not accepted (the message lists them).
        TypeError: ranks that are not integers.
    """
    tag = check_tag(tag)
    if group is None:
        return world.group
    if isinstance(group, ProcessGroup):
        return _own(group, world)
    if isinstance(group, str):
        return _by_name(group, world)
    if isinstance(group, DeviceMesh):
        return _own(_mesh_group(group), world)
    if _is_mesh_pair(group):
        return _own(_mesh_pair_group(group), world)
    if _is_rank_list(group):
        flat, _, subs = parse_rank_lists(group)
        return _find_or_make(flat if subs is None else _mine(subs, world), tag, world)
    raise _bad_form(group)


def expand_group(group: Any, tag: str = "", world: World | None = None) -> tuple[str, list[int], int]:
    """``(tag, ranks, group_size)`` for ``group``, by PyTorch's ``_expand_group`` rules.

    - 1-d rank list: the ranks as given, the tag as given, its length.
    - 2-d rank list: the sublists concatenated, the tag as given, one sublist's size (the
      sublists must have equal sizes).
    - ProcessGroup, group name, None (the world): its ranks and its tag, unless ``tag`` is
      given. An untagged group reports ``"untagged:<name>"`` so that ``find_group`` finds
      that very group again.
    - 1-d DeviceMesh: its group; ``(mesh, dim)``: this rank's group along dim.

    Raises:
        ValueError: sublists of different sizes; an n-d mesh without a dim ("pass (mesh, dim)");
            an unknown group name; any other object (the message lists the accepted forms).
        TypeError: ranks that are not integers; a tag that is not a string.
        NotInitializedError: a form that needs the world (group name, None) before ``init``.
    """
    tag = check_tag(tag)
    if _is_rank_list(group):
        flat, size, _ = parse_rank_lists(group)
        return tag, flat, size
    if isinstance(group, ProcessGroup):
        g = group
    elif isinstance(group, DeviceMesh):
        g = _mesh_group(group)
    elif _is_mesh_pair(group):
        g = _mesh_pair_group(group)
    elif group is None or isinstance(group, str):
        if world is None:
            from ..core.world import current_world

            world = current_world()
        g = world.group if group is None else _by_name(group, world)
    else:
        raise _bad_form(group)
    return tag or untagged_tag(g), list(g.ranks), g.size


def resolve_expanded(tag: str, ranks: Sequence[int], group_size: int, world: World) -> ProcessGroup:
    """The group that ``expand_group``'s ``(tag, ranks, group_size)`` means on this rank.

    ``ranks`` is cut into chunks of ``group_size``; this rank uses the chunk that holds it,
    found by ``tag`` (created if new; untagged: the first such group, else a new one).

    Raises:
        ValueError: ``len(ranks)`` is not a multiple of ``group_size``; no chunk holds this rank;
            an ``"untagged:"`` tag naming no such group; bad ranks.
    """
    tag = check_tag(tag)
    if isinstance(group_size, (bool, np.bool_)) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    flat = [as_rank(r) for r in ranks]
    if not flat or len(flat) % group_size:
        raise ValueError(f"{len(flat)} ranks do not split into groups of {group_size}")
    subs = [flat[i : i + group_size] for i in range(0, len(flat), group_size)]
    return _find_or_make(_mine(subs, world), tag, world)
