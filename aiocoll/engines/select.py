"""Which engine runs a group's collective: the same-host shared-memory engine or message passing.

``engine_for(group, collective, nbytes)`` returns the group's shared-memory engine
(``aiocoll.engines.shm``) when all of these hold, else the message-passing engine
(``aiocoll.engines.messages.MESSAGES``):

- the collective is one the shm engine runs (all_reduce, all_gather, reduce_scatter, broadcast);
- the group has 2 to 128 members and this process reaches every other member through one
  transport with ``shared_segments`` (the ``shm`` transport: ``transport="auto"`` or ``"shm"``
  on one host; with ``transport="tcp"`` nothing changes);
- the world's settings allow it (``Settings.shm_engine``, ``AIOCOLL_SHM_FASTPATH``) and
  ``nbytes`` (the per-member input) is at least ``Settings.shm_engine_min_bytes`` for the
  collective (``AIOCOLL_SHM_FASTPATH_MIN_<COLLECTIVE>``; default 0: the engine beat message
  passing over shm at every size measured, BENCHMARKS.md).

The choice must come out the same on every member, since the two engines do not talk to each
other: it depends only on the group, the size and the settings, so set them alike on every
rank (``aiocoll run`` passes the environment to all ranks). A member that chose differently is
reported as a mismatch or a timeout, never as a wrong result.

Lifetime. A group's shm engine (its segment, doorbell and thread) is released when the group is
(``release``): by ``destroy_group``, or, for a group the registry does not keep (see
``aiocoll.groups.registry``), when nothing references it any more; and when its transport
closes (the Transport protocol's ``on_close`` hook). Releasing cannot put the members out of
step: this member can never issue another collective on the group, and every member that still
runs one either finishes it (the segment lives as long as anyone maps it) or is waiting for a
member that has left, and times out naming it. An engine is never made twice for one group.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import TYPE_CHECKING, Any

from ..core.settings import SHM_COLLECTIVES
from .messages import MESSAGES

if TYPE_CHECKING:
    from ..groups.group import ProcessGroup
    from .plan import Engine
    from .shm.engine import ShmEngine

#: Largest group given a shared segment: its size grows with the square of the group's.
MAX_MEMBERS = 128


def engine_for(group: ProcessGroup, collective: str | None, nbytes: int) -> Engine:
    """The engine that runs ``collective`` of ``nbytes`` per member on ``group``.

    ``collective`` None: one the shm engine does not run (message passing). A destroyed
    group keeps its closed shm engine, which raises GroupBrokenError when run, rather than
    quietly taking message passing, which the other members would not take.
    """
    if collective not in SHM_COLLECTIVES or not 2 <= group.size <= MAX_MEMBERS:
        return MESSAGES
    settings = group.world.settings
    if not settings.shm_engine or nbytes < settings.shm_engine_min_bytes.get(collective, 0):
        return MESSAGES
    # Links never change after init, so whether the group can have an engine is decided once
    # (on the group itself: a lookup per collective afterwards).
    if not group.fast_decided:
        group.fast_engine, group.fast_decided = _engine(group), True
    return group.fast_engine or MESSAGES


def _segment_transport(group: ProcessGroup) -> Any:
    """The transport that reaches every other member and can share segments, or None."""
    world = group.world
    names = {world.transport_names.get(p) for p in group.ranks if p != world.rank}
    if len(names) != 1:
        return None
    for t in world.comm.transports:
        if t.name in names and t.capabilities.shared_segments and hasattr(t, "on_close"):
            return t
    return None


def _engine(group: ProcessGroup) -> ShmEngine | None:
    transport = _segment_transport(group)
    if transport is None:
        return None
    from .shm.engine import ShmEngine

    forget_hook: list[Any] = []
    engine = ShmEngine(group, transport, on_close=lambda _: forget_hook[0]() if forget_hook else None)
    forget_hook.append(transport.on_close(engine.close))
    # The finalizer holds the engine, never the group: it runs when the group is freed.
    done = weakref.finalize(group, _retire_soon, engine, asyncio.get_running_loop())
    done.atexit = False
    return engine


def _retire_soon(engine: ShmEngine, loop: asyncio.AbstractEventLoop) -> None:
    # The last reference may go in any thread (a sync API caller's), or inside the garbage
    # collector in the middle of other code of the loop: close the engine on its loop, on a
    # turn of its own.
    try:
        loop.call_soon_threadsafe(engine.retire)
    except RuntimeError:  # the loop is closed: nothing else can be using the engine
        engine.retire()


def release(group: ProcessGroup, why: str) -> None:
    """Release ``group``'s engine, once the operations it is running have finished.

    The group keeps the closed engine: a collective that still reaches it raises
    GroupBrokenError saying ``why`` instead of quietly taking the message-passing path.
    """
    engine = group.fast_engine
    if engine is not None:
        engine.retire(why)


__all__ = ["MAX_MEMBERS", "engine_for", "release"]
