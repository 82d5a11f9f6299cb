"""Same-host fast paths: collectives computed in shared memory instead of by message passing.

``fastpath_for(group, collective, nbytes)`` returns the group's shared-memory engine
(``aiocoll.engines.shm.engine``) or None, and the collective then runs its ordinary algorithm. The
engine is used when all of these hold:

- the group has 2 to 128 members and this process reaches every other member through the
  ``shm`` transport (so all are on this host: ``transport="auto"`` or ``"shm"``; with
  ``transport="tcp"`` nothing changes);
- the fast path is on: ``AIOCOLL_SHM_FASTPATH`` is unset, ``1``/``on``/``auto`` (``0``/``off``
  turns it off), or ``configure(enabled=...)`` said so;
- ``nbytes`` (the per-member input) is at least the collective's minimum:
  ``AIOCOLL_SHM_FASTPATH_MIN_ALL_REDUCE`` (and ``_ALL_GATHER``, ``_REDUCE_SCATTER``,
  ``_BROADCAST``) or ``configure(min_bytes=...)``. The default is 0: the engine beat message
  passing over shm at every size measured (BENCHMARKS.md), because it needs no frames, no
  matching and no extra copies.

The choice must come out the same on every member, since the two paths do not talk to each
other: it depends only on the group, the size and these settings, so set them alike on every
rank (``aiocoll run`` passes the environment to all ranks). A member that chose differently is
reported as a mismatch or a timeout, never as a wrong result.

Lifetime. A group's engine (its segment, doorbell and thread) is released when the group is
(``release``): by ``destroy_group``, or, for a group the registry does not keep (see
``aiocoll.groups.registry``), when nothing references it any more. Either way this member can
never issue another collective on the group, so releasing cannot put the members out of step:
every member that still runs one either finishes it (the segment lives as long as anyone maps
it) or is waiting for a member that has left, and times out naming it. Nothing is released on
one member's whim (no cache that evicts), and an engine is never made twice for one group.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..groups.group import ProcessGroup

if TYPE_CHECKING:
    from .shm.engine import ShmEngine

#: Collectives the engine runs.
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")
#: Largest group given a shared segment: its size grows with the square of the group's.
MAX_MEMBERS = 128

_enabled: bool | None = None  # None: from the environment
_min_bytes: dict[str, int] = {}
_settings: tuple[bool, dict[str, int]] | None = None  # (enabled, minimum bytes) as last read


def configure(*, enabled: bool | None = None, min_bytes: Mapping[str, int] | None = None) -> None:
    """Override the environment for this process: ``enabled`` (None: back to the environment)
    and the per-collective minimum sizes in ``min_bytes`` (a negative value removes one).

    Raises:
        ValueError: an unknown collective in ``min_bytes``.
    """
    global _enabled, _settings
    _enabled = enabled
    _settings = None
    for name, value in (min_bytes or {}).items():
        if name not in COLLECTIVES:
            raise ValueError(f"no fast path for {name!r}; fast paths exist for {', '.join(COLLECTIVES)}")
        if value < 0:
            _min_bytes.pop(name, None)
        else:
            _min_bytes[name] = int(value)


def _is_enabled() -> bool:
    if _enabled is not None:
        return _enabled
    raw = os.environ.get("AIOCOLL_SHM_FASTPATH", "auto").strip().lower()
    if raw in ("", "1", "on", "auto", "true", "yes"):
        return True
    if raw in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"AIOCOLL_SHM_FASTPATH={raw!r}: use on or off")


def _minimum(collective: str) -> int:
    if collective in _min_bytes:
        return _min_bytes[collective]
    raw = os.environ.get(f"AIOCOLL_SHM_FASTPATH_MIN_{collective.upper()}", "")
    try:
        return int(raw) if raw else 0
    except ValueError:
        raise ValueError(f"AIOCOLL_SHM_FASTPATH_MIN_{collective.upper()}={raw!r} is not an integer") from None


def _read_settings() -> tuple[bool, dict[str, int]]:
    global _settings
    if _settings is None:
        _settings = (_is_enabled(), {name: _minimum(name) for name in COLLECTIVES})
    return _settings


def reload_settings() -> None:
    """Read the AIOCOLL_SHM_FASTPATH* environment variables again (they are read once)."""
    global _settings
    _settings = None


def _shm_transport(group: ProcessGroup) -> Any:
    for t in group.world.comm.transports:
        if getattr(t, "name", None) == "shm" and hasattr(t, "closers"):
            return t
    return None


def fastpath_for(group: ProcessGroup, collective: str, nbytes: int) -> ShmEngine | None:
    """The engine to run ``collective`` of ``nbytes`` per member on ``group``, or None.

    Raises:
        ValueError: a malformed AIOCOLL_SHM_FASTPATH* variable; ``group`` was destroyed.
    """
    if not 2 <= group.size <= MAX_MEMBERS:
        return None
    enabled, minimum = _read_settings()
    if not enabled or nbytes < minimum.get(collective, 1 << 62):
        return None
    # Links never change after init, so whether the group can have an engine is decided once
    # (on the group itself: a lookup per collective afterwards).
    if group.fast_decided:
        return group.fast_engine
    engine = _engine(group)
    group.fast_engine, group.fast_decided = engine, True
    return engine


def _engine(group: ProcessGroup) -> ShmEngine | None:
    world = group.world
    names = world.transport_names
    if any(names.get(p) != "shm" for p in group.ranks if p != world.rank):
        return None
    transport = _shm_transport(group)
    if transport is None:
        return None
    from .shm.engine import ShmEngine

    def forget(e: ShmEngine) -> None:
        with contextlib.suppress(ValueError):  # gone already when the transport runs its closers
            transport.closers.remove(e.close)

    engine = ShmEngine(group, transport, on_close=forget)
    transport.closers.append(engine.close)
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


__all__ = ["COLLECTIVES", "configure", "fastpath_for", "release", "reload_settings"]
