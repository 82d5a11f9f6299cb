"""What every engine does around a plan: begin, deadline, blame, end.

``begin`` registers the collective with the communicator and says what its frames must carry
(so that a dead peer, another member's abort or a mismatched call fails it on every member,
whichever engine runs it). ``timed_out`` builds the error a collective raises at its deadline,
naming the members it blames; each engine knows whom it waits for (message passing: the peers
whose frames have not come, less those that said they wait themselves; the shm engine: the
members whose counters did not move). ``end`` is ``Communicator.end``: the collective is
unregistered, and on failure its group is broken and the other members are told.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING

from ..core.comm import ActiveOp, Communicator
from ..core.errors import CollectiveTimeoutError
from ..core.wire import FrameKey

if TYPE_CHECKING:
    from ..groups.group import ProcessGroup
    from .plan import Plan

#: A collective tells the other members it is still waiting this long before its timeout
#: (at most; a quarter of the timeout when that is shorter). Members that have not said so by
#: the timeout are the ones named: see Communicator.announce_waiting.
WAITING_LEAD_S = 1.0


def begin(group: ProcessGroup, plan: Plan, members: frozenset[int] | None = None) -> ActiveOp:
    """Register ``plan`` with the communicator and say what each of its frames must carry."""
    comm = group.world.comm
    active = comm.begin(group.name, group.gid, plan.seq, plan.label, members or frozenset(group.ranks))
    key = FrameKey(group.gid, plan.seq, 0, int(plan.kind), int(plan.op), int(plan.dtype), 0, plan.count,
                   plan.call.digest)
    comm.expect(active, key, plan.call, check_count=plan.check_count, timeout=plan.timeout)
    return active


def announce_later(group: ProcessGroup, active: ActiveOp, timeout: float | None) -> asyncio.TimerHandle | None:
    """Shortly before the deadline, tell the other members this one is still waiting."""
    if timeout is None or len(active.members) < 3:
        return None  # with two members, the one we wait for is the one to name
    lead = min(WAITING_LEAD_S, timeout / 4)
    comm = group.world.comm
    return asyncio.get_running_loop().call_later(timeout - lead, comm.announce_waiting, active)


def timed_out(
    comm: Communicator, active: ActiveOp, timeout: float | None, waiting: Collection[int],
    blame: Iterable[int] | None = None, why: str = "",
) -> CollectiveTimeoutError:
    """The error for a collective that reached its deadline.

    ``waiting``: the members it still waits for. ``blame``: those to name (default: those it
    waits for that did not say they wait themselves, else every member not heard from).
    ``why``: the engine's own account, replacing the default "still waiting for ranks ...".
    """
    if blame is None:
        silent = comm.silent_members(active, timeout or 0.0)
        blamed = (set(waiting) & silent) or silent or set(waiting)
    else:
        blamed = set(blame)
    if not why:
        why = f"; still waiting for ranks {sorted(waiting)}" if waiting else ""
        if blamed != set(waiting):
            why += f"; not heard from ranks {sorted(blamed)}"
    return CollectiveTimeoutError(
        f"{active.op} did not complete within {timeout} s{why}", group=active.group, seq=active.seq, op=active.op,
        ranks=blamed,
    )


__all__ = ["WAITING_LEAD_S", "announce_later", "begin", "timed_out"]
