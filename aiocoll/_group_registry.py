"""The group registry of one world: tags, names, and lookups. (Minimal; extended by issue 4.)"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ._group import ProcessGroup, group_id

if TYPE_CHECKING:
    from ._world import World


class GroupRegistry:
    """Every group this rank made, by (sorted ranks, tag) and by name."""

    def __init__(self, world: World) -> None:
        self._world = world
        self._tagged: dict[tuple[tuple[int, ...], str], ProcessGroup] = {}
        self._untagged: dict[tuple[int, ...], list[ProcessGroup]] = {}
        self._by_name: dict[str, ProcessGroup] = {}
        self._instances: Counter[tuple[tuple[int, ...], str]] = Counter()

    def _check_ranks(self, ranks: Iterable[int]) -> tuple[int, ...]:
        out = []
        for r in ranks:
            if isinstance(r, bool) or not isinstance(r, int):
                try:
                    r = int(r)  # numpy integers
                except (TypeError, ValueError):
                    raise TypeError(f"group ranks must be integers, got {r!r}") from None
            if not 0 <= r < self._world.world_size:
                raise ValueError(f"rank {r} out of range for a world of size {self._world.world_size}")
            out.append(int(r))
        if not out:
            raise ValueError("a group needs at least one rank")
        if len(set(out)) != len(out):
            raise ValueError(f"duplicate ranks in group {out}")
        return tuple(sorted(out))

    def add(self, group: ProcessGroup) -> ProcessGroup:
        key = (tuple(sorted(group.ranks)), group.tag)
        if group.tag:
            self._tagged[key] = group
        else:
            self._untagged.setdefault(key[0], []).append(group)
        self._by_name[group.name] = group
        return group

    def new_group(self, ranks: Iterable[int], tag: str = "", name: str = "") -> ProcessGroup:
        sorted_ranks = self._check_ranks(ranks)
        if tag and (sorted_ranks, tag) in self._tagged:
            return self._tagged[(sorted_ranks, tag)]
        n = self._instances[(sorted_ranks, tag)]
        self._instances[(sorted_ranks, tag)] += 1
        if not name:
            name = f"{tag}:{list(sorted_ranks)}" if tag else f"group{list(sorted_ranks)}"
            if n:
                name += f"#{n}"
        group = ProcessGroup(self._world, sorted_ranks, tag=tag, name=name, gid=group_id(sorted_ranks, tag, n))
        return self.add(group)

    def find(self, ranks: Iterable[int], tag: str = "") -> ProcessGroup | None:
        sorted_ranks = tuple(sorted(int(r) for r in ranks))
        if tag:
            return self._tagged.get((sorted_ranks, tag))
        found = self._untagged.get(sorted_ranks)
        return found[0] if found else None

    def by_name(self, name: str) -> ProcessGroup | None:
        return self._by_name.get(name)
