"""Every form a ``group=`` argument may take: desugared (``expand_group``) or resolved to a group.

The forms (SPEC section 3): None (the world), a ProcessGroup, a group name, a 1-d list of
global ranks, a 2-d list of equal-sized disjoint rank lists (each rank uses the one holding it),
a 1-d DeviceMesh, or ``(DeviceMesh, dim)`` with dim an index or a name. Rank lists may be
lists, tuples, ranges or numpy arrays.

torch.distributed's own objects are accepted too, as PyTorch's functional collectives accept
them: a ``torch.distributed.ProcessGroup``, its group name, a 1-d torch ``DeviceMesh`` and
``(torch DeviceMesh, dim)``. A group of the "aiocoll" backend stands for the aiocoll group it
runs on; a group of another backend for the aiocoll group of the same global ranks, found by
the torch group's tag (``ptd:<n>`` or the tag it was made with), which every member computes
alike. torch is never imported here: these forms exist only once the caller has imported it.

``expand_group`` follows ``torch.distributed._functional_collectives._expand_group``:
``(tag, ranks, group_size)``, where a 2-d list flattens and group_size is one sublist's size.
``resolve_expanded`` is its inverse, run where the collective runs: this rank's chunk of
ranks, found by tag (created if new). ``resolve_group`` goes straight from a form to a group.
"""

from __future__ import annotations

import sys
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


class MeshDimError(ValueError, AssertionError):
    """An n-d mesh given where one group is meant (pass ``(mesh, dim)``).

    A ValueError; also an AssertionError, which is what PyTorch's ``_expand_group`` raises for
    an n-d torch DeviceMesh, so code written against torch catches it the same way.
    """


def _only_1d(ndim: int) -> MeshDimError:
    return MeshDimError(
        f"Only 1D mesh stands for a group by itself: a {ndim}-d DeviceMesh holds a group per dimension; "
        "pass (mesh, dim) to say which"
    )


def _torch_dist() -> Any:
    """``torch.distributed`` if the program has imported it (and it is available), else None."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available():
        return None
    return dist


def torch_group(group: Any) -> Any:
    """The ``torch.distributed.ProcessGroup`` that a torch form stands for, or None for other forms.

    Torch forms: a torch ProcessGroup, a 1-d torch DeviceMesh, ``(torch DeviceMesh, dim)``, and
    a string that names a torch group (only when no aiocoll group has that name: callers look
    in aiocoll's registry first).

    Raises:
        MeshDimError: an n-d torch DeviceMesh without a dim.
        ValueError / KeyError: a bad dim of a torch mesh (torch's own errors).
    """
    dist = _torch_dist()
    if dist is None:
        return None
    if isinstance(group, dist.ProcessGroup):
        return group
    if isinstance(group, str):
        if not dist.is_initialized():
            return None
        from torch.distributed import distributed_c10d as c10d

        try:
            return c10d._resolve_process_group(group)  # type: ignore[attr-defined, arg-type]
        except (ValueError, KeyError, RuntimeError):
            return None
    from torch.distributed.device_mesh import DeviceMesh as TorchMesh

    if isinstance(group, TorchMesh):
        if group.ndim != 1:
            raise _only_1d(group.ndim)
        return group.get_group(0)
    if isinstance(group, tuple) and len(group) == 2 and isinstance(group[0], TorchMesh):
        return group[0].get_group(group[1])
    return None


def torch_expanded(pg: Any, tag: str = "") -> tuple[str, list[int], int]:
    """``(tag, global ranks, size)`` of a torch ProcessGroup, with torch's tag where ``tag`` is empty."""
    from torch.distributed import distributed_c10d as c10d

    return tag or c10d._get_group_tag(pg), list(c10d.get_process_group_ranks(pg)), int(pg.size())


def _from_torch(pg: Any, world: World, tag: str = "") -> ProcessGroup:
    own = getattr(pg, "aiocoll_group", None)  # a group of the "aiocoll" backend
    if isinstance(own, ProcessGroup):
        return _own(own, world)
    t, ranks, size = torch_expanded(pg, tag)
    return resolve_expanded(t, ranks, size, world)


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
        raise _only_1d(mesh.ndim)
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
        pg = torch_group(name)
        if pg is not None:
            return _from_torch(pg, world)
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
    pg = torch_group(group)
    if pg is not None:
        return _from_torch(pg, world)
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
    - torch.distributed forms (ProcessGroup, torch DeviceMesh, ``(torch mesh, dim)``, a torch
      group name): the torch group's ranks and its c10d tag (``ptd:<n>`` or the tag it was made
      with), as PyTorch reports them, unless ``tag`` is given.

    Raises:
        MeshDimError: an n-d mesh (aiocoll's or torch's) without a dim; a ValueError and an
            AssertionError (PyTorch's type for it).
        ValueError: sublists of different sizes;
            an unknown group name; any other object (the message lists the accepted forms).
        TypeError: ranks that are not integers; a tag that is not a string.
        NotInitializedError: a form that needs the world (group name, None) before ``init``.
    """
    tag = check_tag(tag)
    if isinstance(group, str):
        w = world or _maybe_world()
        aiocoll_name = w is not None and w.registry.by_name(group) is not None  # aiocoll's names first
    else:
        aiocoll_name = False
    pg = None if aiocoll_name else torch_group(group)
    if pg is not None:
        return torch_expanded(pg, tag)
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


def _maybe_world() -> World | None:
    from ..core.world import current_world
    from ..core.errors import NotInitializedError

    try:
        return current_world()
    except NotInitializedError:
        return None


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
