"""From a funcol ``group`` argument (and tag) to what the ops carry: a group name and its size.

The ops take the group as a string (traceable, like torch's group names) plus the group size
where output shapes depend on it, so fake and meta kernels need no group. The string is the
group's registry name, or, where no world exists yet (shapes on meta/fake tensors before
``init``), the expanded form ``ranks:[tag, ranks, group_size]`` that is resolved like PyTorch's
``(tag, rankset, group_size)`` once a world exists.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import torch

from aiocoll.core.errors import NotInitializedError
from aiocoll.groups.group import ProcessGroup
from aiocoll.groups.forms import parse_rank_lists, resolve_expanded, resolve_group, torch_group
from aiocoll.groups.mesh import DeviceMesh
from aiocoll.core.world import World, _current, current_world

_EXPANDED = "ranks:"
TORCH_GROUP = ""
"""The name ``group_key`` gives for a torch.distributed group: the functional collectives then
hand the call to torch's own (``torch.distributed._functional_collectives``) on that group."""
UNKNOWN_SIZE = -1
"""The size ``group_key`` gives for a group name before any world exists (only shapes that do
not depend on the group size can be had then)."""


def _world() -> World | None:
    try:
        return current_world()
    except NotInitializedError:
        return None


def world_or_none() -> World | None:
    """The calling context's world, or None."""
    return _world()


@contextlib.contextmanager
def using_world(world: World | None) -> Iterator[None]:
    """Make ``world`` the current one for the duration, where the context lacks it.

    Autograd runs the backward of CUDA tensors on its own device threads, which do not inherit
    the forward's context (where a rank of an in-process world keeps its world).
    """
    if world is None or world.closed or _world() is world:
        yield
        return
    token = _current.set(world)
    try:
        yield
    finally:
        _current.reset(token)


def group_key(group: Any, tag: str = "") -> tuple[str, int]:
    """See :func:`_group_key`; under torch.compile, run at trace time and taken as a constant."""
    return _traced_group_key(group, tag)  # type: ignore[no-any-return]


def _group_key(group: Any, tag: str = "") -> tuple[str, int]:
    """``(name, size)`` of the group that ``group`` stands for on this rank.

    Accepts every form of ``group=`` (None, ProcessGroup, name, 1-d or 2-d rank list, DeviceMesh,
    ``(mesh, dim)``) and a tag (used for rank lists; ignored for forms that already are a group,
    as in torch). A torch.distributed group (ProcessGroup, its name, a torch DeviceMesh or
    ``(torch mesh, dim)``) gives ``(TORCH_GROUP, size)``. Before ``init``, rank lists still give
    a size, and a group name gives ``UNKNOWN_SIZE`` (for shapes on meta and fake tensors).

    Raises:
        ValueError / TypeError: a bad form, bad ranks or tag (the message lists the forms).
        NotInitializedError: a form other than these before ``aiocoll.init``.
    """
    world = _world()
    if not isinstance(group, str) or world is None or world.registry.by_name(group) is None:
        pg = torch_group(group)  # aiocoll's own group names come first
        if pg is not None:
            return TORCH_GROUP, int(pg.size())
    if world is None:
        if isinstance(group, (list, tuple, range)) and not (group and isinstance(group[0], DeviceMesh)):
            flat, size, _ = parse_rank_lists(group)
            return _EXPANDED + json.dumps([tag or "", flat, size]), size
        if isinstance(group, str):
            return group, UNKNOWN_SIZE  # resolved where the collective runs (it fails there without a world)
        raise NotInitializedError(
            f"aiocoll is not initialised: a {type(group).__name__} group needs a world (only rank lists, "
            "group names and torch.distributed groups work before init, for shapes on meta and fake tensors)"
        )
    g = resolve_group(group, world, tag or "")
    if g.rank < 0:
        raise ValueError(f"rank {world.rank} is not a member of {g.name} (ranks {list(g.ranks)})")
    return g.name, g.size


def group_named(name: str) -> ProcessGroup:
    """The group an op's group string names, in the calling context's world.

    Raises:
        NotInitializedError: no world. ValueError: no such group, or this rank is not a member.
    """
    world = current_world()
    if name.startswith(_EXPANDED):
        tag, ranks, size = json.loads(name[len(_EXPANDED):])
        g = resolve_expanded(tag, ranks, size, world)
    else:
        g = resolve_group(name, world)
    if g.rank < 0:
        raise ValueError(f"rank {world.rank} is not a member of {g.name} (ranks {list(g.ranks)})")
    return g


# Dynamo cannot trace the registry (context variables, dicts of groups); the answer is a
# constant for a given group argument, so it is computed once while tracing.
_traced_group_key = torch.compiler.assume_constant_result(_group_key)  # type: ignore[no-untyped-call]
