"""Every form a ``group=`` argument may take, resolved to a ProcessGroup. (Minimal; extended by issue 4.)"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._group import ProcessGroup

if TYPE_CHECKING:
    from ._world import World


def resolve_group(group: Any, world: World) -> ProcessGroup:
    """Resolve ``group`` (None, a ProcessGroup, a group name, or a list of global ranks).

    Raises:
        ValueError: unknown name, or a form that is not accepted (the message lists the forms).
    """
    if group is None:
        return world.group
    if isinstance(group, ProcessGroup):
        return group
    if isinstance(group, str):
        found = world.registry.by_name(group)
        if found is None:
            raise ValueError(f"no group named {group!r}")
        return found
    if isinstance(group, (list, tuple)) and all(isinstance(r, int) for r in group):
        return world.registry.find(group) or world.registry.new_group(group)
    raise ValueError(
        f"cannot use {type(group).__name__} as a group: pass None, a ProcessGroup, a group name, "
        "or a list of ranks"
    )
