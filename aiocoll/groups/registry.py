"""The group registry of one world: every group this rank made, found by (ranks, tag) or by name.

Rules (SPEC section 3):

- A tagged group is unique per (sorted ranks, tag): asking again returns the same object.
- Untagged groups may repeat. The k-th untagged group of some ranks gets instance k, so every
  member derives the same id without talking to the others (see ``_group.group_id``).
- Lookups ignore rank order. ``find(ranks, "")`` returns the first untagged group of those ranks:
  for all ranks that is the world, which the world adds first.
- An untagged group still round-trips through ``expand_group`` and ``find``: it is known by the
  reserved tag ``"untagged:<name>"`` (``untagged_tag``), which names this exact instance.

What the registry keeps alive, and why. Tagged groups, always: asking again must give the same
group, with the same sequence numbers, on every member, whenever each member asks. The first
untagged group of each set of ranks, likewise: it is what ``find(ranks, "")`` and a rank list
given as ``group=`` stand for (the world, for all ranks). Every other untagged group only as
long as the program references it: nobody can ask for it again, so once it is unreferenced it is
freed with its same-host engine (segment, doorbell, thread), on each member when that member
drops it. Lookups never see such a group once its program has dropped it, so what members find
never depends on when a garbage collector ran. ``remove`` (``destroy_group``) lets go of any
group but the world; the same tag and ranks then give a new group with a new id (its
*incarnation* counts in the id), which works even if the destroyed one was broken.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from .group import ProcessGroup, group_id

if TYPE_CHECKING:
    from ..core.world import World

UNTAGGED_PREFIX = "untagged:"
"""Tags that start with this name one untagged group by its name; users cannot create them."""


def check_tag(tag: Any) -> str:
    """``tag`` as a string (None means untagged).

    Raises:
        TypeError: ``tag`` is not a string or None.
    """
    if tag is None:
        return ""
    if not isinstance(tag, str):
        raise TypeError(f"a group tag must be a string, got {type(tag).__name__}")
    return tag


def as_rank(r: Any) -> int:
    """``r`` as a non-negative int rank (numpy integers accepted).

    Raises:
        TypeError: ``r`` is not an integer (bools are refused too).
        ValueError: ``r`` is negative.
    """
    if isinstance(r, (bool, np.bool_)) or not isinstance(r, (int, np.integer)):
        raise TypeError(f"group ranks must be integers, got {r!r} ({type(r).__name__})")
    if r < 0:
        raise ValueError(f"group ranks must be non-negative, got {int(r)}")
    return int(r)


def untagged_tag(group: ProcessGroup) -> str:
    """The tag that ``expand_group`` reports for ``group``: its own, or one naming this instance."""
    return group.tag or UNTAGGED_PREFIX + group.name


class GroupRegistry:
    """Every live group this rank made, by (sorted ranks, tag) and by name."""

    def __init__(self, world: World) -> None:
        self._world = world
        self._tagged: dict[tuple[tuple[int, ...], str], ProcessGroup] = {}
        self._first: dict[tuple[int, ...], ProcessGroup] = {}  # the untagged group find() returns
        self._by_name: weakref.WeakValueDictionary[str, ProcessGroup] = weakref.WeakValueDictionary()
        self._instances: Counter[tuple[int, ...]] = Counter()
        self._incarnations: Counter[tuple[tuple[int, ...], str]] = Counter()

    def check_ranks(self, ranks: Iterable[Any]) -> tuple[int, ...]:
        """``ranks`` validated and sorted.

        Raises:
            TypeError: ``ranks`` is not iterable, or holds something other than integers.
            ValueError: no ranks, a rank out of range for the world, or a duplicate.
        """
        if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Iterable):
            raise TypeError(f"group ranks must be a sequence of integers, got {type(ranks).__name__}")
        out = [as_rank(r) for r in ranks]
        size = self._world.world_size
        for r in out:
            if r >= size:
                raise ValueError(f"rank {r} out of range for a world of size {size}")
        if not out:
            raise ValueError("a group needs at least one rank")
        if len(set(out)) != len(out):
            dup = sorted(r for r, n in Counter(out).items() if n > 1)
            raise ValueError(f"duplicate ranks {dup} in group {out}")
        return tuple(sorted(out))

    def add(self, group: ProcessGroup) -> ProcessGroup:
        """Register ``group`` (the world uses this for its root group).

        Raises:
            ValueError: another group already has this name, or this tag and these ranks.
        """
        if group.name in self._by_name:
            raise ValueError(f"a group named {group.name!r} already exists: {self._by_name[group.name]!r}")
        key = tuple(sorted(group.ranks))
        if group.tag:
            if (key, group.tag) in self._tagged:
                raise ValueError(f"a group tagged {group.tag!r} with ranks {list(key)} already exists")
            self._tagged[(key, group.tag)] = group
        else:
            self._first.setdefault(key, group)
        self._by_name[group.name] = group
        return group

    def remove(self, group: ProcessGroup) -> None:
        """Forget ``group`` (``destroy_group``): lookups no longer find it, and the same tag and
        ranks make a new group with a new id."""
        key = tuple(sorted(group.ranks))
        if group.tag:
            if self._tagged.get((key, group.tag)) is group:
                del self._tagged[(key, group.tag)]
                self._incarnations[(key, group.tag)] += 1
        elif self._first.get(key) is group:
            del self._first[key]
        if self._by_name.get(group.name) is group:
            del self._by_name[group.name]

    def renew_world(self) -> ProcessGroup:
        """Replace the world's root group by a fresh one of the same ranks (``renew_group``).

        Its id comes from a reserved tag and a count of renewals, which every member keeps
        alike by renewing the same number of times.
        """
        w = self._world
        old = w.group
        key = tuple(range(w.world_size))
        reserved = UNTAGGED_PREFIX + "world"  # users cannot make a group with this tag
        self._incarnations[(key, reserved)] += 1
        n = self._incarnations[(key, reserved)]
        new = ProcessGroup(w, key, tag="", name=f"world#{n}", gid=group_id(key, reserved, n))
        self.remove(old)
        self.add(new)
        w.group = new
        return new

    def new_group(self, ranks: Iterable[Any], tag: str | None = "", name: str = "") -> ProcessGroup:
        """A group of ``ranks``: the existing one for a known (ranks, tag), else a new one.

        Raises:
            TypeError: ranks not integers, tag or name not a string.
            ValueError: bad ranks; a reserved tag; a name already used by another group.
        """
        tag = check_tag(tag)
        if not isinstance(name, str):
            raise TypeError(f"a group name must be a string, got {type(name).__name__}")
        sorted_ranks = self.check_ranks(ranks)
        if tag.startswith(UNTAGGED_PREFIX):
            raise ValueError(
                f"tags starting with {UNTAGGED_PREFIX!r} are reserved (they name untagged groups); "
                f"got {tag!r}"
            )
        if tag:
            existing = self._tagged.get((sorted_ranks, tag))
            if existing is not None:
                if name and name != existing.name:
                    raise ValueError(
                        f"the group tagged {tag!r} with ranks {list(sorted_ranks)} already exists "
                        f"named {existing.name!r}, not {name!r}"
                    )
                return existing
            n = self._incarnations[(sorted_ranks, tag)]
        else:
            n = self._instances[sorted_ranks]
        if not name:
            name = f"{tag}:{list(sorted_ranks)}" if tag else f"group{list(sorted_ranks)}"
            if n:
                name += f"#{n}"
        if name in self._by_name:
            raise ValueError(f"a group named {name!r} already exists: {self._by_name[name]!r}")
        group = ProcessGroup(self._world, sorted_ranks, tag=tag, name=name, gid=group_id(sorted_ranks, tag, n))
        if not tag:
            self._instances[sorted_ranks] += 1
        return self.add(group)

    def find(self, ranks: Iterable[Any], tag: str | None = "") -> ProcessGroup | None:
        """The group of ``ranks`` (any order) and ``tag``, or None.

        ``""`` finds the first untagged group of those ranks (the world for all ranks);
        ``"untagged:<name>"`` finds that untagged group.

        Raises:
            TypeError / ValueError: bad ranks or tag, as for ``new_group``.
        """
        tag = check_tag(tag)
        sorted_ranks = self.check_ranks(ranks)
        if tag.startswith(UNTAGGED_PREFIX):
            group = self._by_name.get(tag[len(UNTAGGED_PREFIX):])
            if group is None or group.tag or tuple(sorted(group.ranks)) != sorted_ranks:
                return None
            return group
        if tag:
            return self._tagged.get((sorted_ranks, tag))
        return self._first.get(sorted_ranks)

    def find_or_create(self, ranks: Iterable[Any], tag: str) -> ProcessGroup:
        """The group of ``ranks`` and ``tag``, created if needed.

        Raises:
            ValueError: empty tag (an untagged lookup cannot tell repeated groups apart); an
                ``"untagged:"`` tag that names no such group; bad ranks.
        """
        tag = check_tag(tag)
        sorted_ranks = self.check_ranks(ranks)
        if not tag:
            raise ValueError(
                "find_or_create_group needs a non-empty tag: untagged groups may repeat, so an "
                "empty tag cannot say which to find (use find_group, or new_group to make one)"
            )
        found = self.find(sorted_ranks, tag)
        if found is not None:
            return found
        if tag.startswith(UNTAGGED_PREFIX):
            raise ValueError(f"no untagged group {tag[len(UNTAGGED_PREFIX):]!r} with ranks {list(sorted_ranks)}")
        return self.new_group(sorted_ranks, tag=tag)

    def by_name(self, name: str) -> ProcessGroup | None:
        """The group named ``name``, or None."""
        return self._by_name.get(name)

    def __iter__(self) -> Iterator[ProcessGroup]:
        """The groups alive now."""
        return iter(list(self._by_name.values()))

    def __len__(self) -> int:
        return len(self._by_name)
