"""ProcessGroup: an ordered set of global ranks that issue collectives together.

A group is a name, a tag, its ranks in group-rank order, and a 64-bit id that every member
derives on its own from (ranks, tag, how many untagged groups of those ranks it made before).
Creating one therefore needs no collective and no new connection: all groups share the world's
connections, and frames are told apart by the group id in their key.

A group may hold a same-host engine (``aiocoll.engines.select``): a shared segment, a doorbell and
perhaps a thread. It lets them go when it is destroyed (``aiocoll.destroy_group``) or freed.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..engines.shm.engine import ShmEngine
    from ..core.world import World


def group_id(ranks: Sequence[int], tag: str, instance: int) -> int:
    """A 64-bit id every member computes alike; 0 is never produced (reserved)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{tag}\x00{','.join(map(str, ranks))}\x00{instance}".encode())
    return int.from_bytes(h.digest(), "big") or 1


class ProcessGroup:
    """A group of ranks. Obtain one from ``aiocoll.init()``, ``aiocoll.world()`` or ``new_group``.

    Attributes:
        ranks: global ranks in group-rank order.
        rank: this process's rank within the group (-1 if it is not a member).
        size: number of members.
        tag: the registry tag ("" for untagged groups).
        name: a readable unique name, used in error messages and accepted as ``group=``.
        gid: the 64-bit id that tells this group's frames apart.
    """

    def __init__(self, world: World, ranks: Sequence[int], *, tag: str = "", name: str = "", gid: int) -> None:
        self._world = world
        self.ranks: tuple[int, ...] = tuple(int(r) for r in ranks)
        self.tag = tag
        self.gid = gid
        self.name = name or (f"{tag}:{list(self.ranks)}" if tag else f"group{list(self.ranks)}")
        self.size = len(self.ranks)
        self.rank = self.ranks.index(world.rank) if world.rank in self.ranks else -1
        self._index = {r: i for i, r in enumerate(self.ranks)}
        self._seq = 0
        self.p2p_sent: Counter[tuple[int, int]] = Counter()
        self.p2p_received: Counter[tuple[int, int]] = Counter()
        #: Its same-host engine once decided (``aiocoll.engines.select``); None if it has none.
        self.fast_engine: ShmEngine | None = None
        self.fast_decided = False
        self._destroyed = False

    @property
    def world(self) -> World:
        """The world this group belongs to.

        Raises:
            ValueError: the group was destroyed (``aiocoll.destroy_group``): every collective
                on it gets this error before it starts.
        """
        if self._destroyed:
            raise ValueError(
                f"{self.name} was destroyed by aiocoll.destroy_group; make a new group "
                "(new_group) to run collectives on these ranks again"
            )
        return self._world

    @property
    def destroyed(self) -> bool:
        """Whether ``aiocoll.destroy_group`` has been called on this group."""
        return self._destroyed

    def next_seq(self) -> int:
        """The sequence number of the next collective (call it before any await)."""
        seq = self._seq
        self._seq += 1
        return seq

    def group_rank(self, global_rank: int) -> int:
        """Group rank of ``global_rank``.

        Raises:
            ValueError: ``global_rank`` is not a member.
        """
        try:
            return self._index[global_rank]
        except KeyError:
            raise ValueError(f"rank {global_rank} is not a member of {self.name}") from None

    def global_rank(self, group_rank: int) -> int:
        """Global rank of group rank ``group_rank``.

        Raises:
            ValueError: ``group_rank`` is out of range.
        """
        if not 0 <= group_rank < self.size:
            raise ValueError(f"group rank {group_rank} out of range for {self.name} of size {self.size}")
        return self.ranks[group_rank]

    def is_member(self) -> bool:
        return self.rank >= 0

    def __repr__(self) -> str:
        gone = " (destroyed)" if self._destroyed else ""
        return f"<ProcessGroup {self.name} rank {self.rank} of {self.size}{gone}>"
