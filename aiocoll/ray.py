"""Collective groups among Ray actors: ``await aiocoll.ray.init()`` inside each actor.

    import aiocoll, aiocoll.ray, ray

    @ray.remote
    class Worker:                                   # an async actor: methods are coroutines
        async def setup(self, rank, world_size):
            await aiocoll.ray.init(rank=rank, world_size=world_size, group_name="train")
        async def step(self, x):
            return await aiocoll.all_reduce(x)      # runs on the actor's event loop

    workers = [Worker.remote() for _ in range(4)]
    ray.get([w.setup.remote(i, 4) for i, w in enumerate(workers)])

Or declare the group from the driver and let each actor find its rank::

    aiocoll.ray.create_group(workers, group_name="train")     # rank = position in the list
    ... inside each actor: await aiocoll.ray.init(group_name="train")

Rendezvous goes through Ray: a named actor per group (``aiocoll:<group_name>`` in the Ray
namespace ``aiocoll``) holds the store's keys and a secret it draws once; whoever can call
actors of this Ray cluster can run code in it anyway, so that secret is no weaker than Ray
itself. Between actors the data goes over aiocoll's own transports, never through Ray's object
store: ``transport="auto"`` uses shared memory between actors of one node and TCP between
nodes, each actor listening on its Ray node's address (``ray.util.get_node_ip_address``)
unless ``AIOCOLL_HOST`` or ``AIOCOLL_IFNAME`` says otherwise.

Threaded (non-async) actors call ``aiocoll.ray.init_sync`` and then ``aiocoll.sync``'s
collectives. The rendezvous actor lives as long as the process that made it (the driver with
``create_group``, else the first member to join); ``destroy_group`` removes it once every member
has left (``await aiocoll.destroy()``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    import ray as _ray_module
except ImportError as exc:  # pragma: no cover - exercised where Ray is missing
    raise ImportError(f"aiocoll.ray needs Ray: pip install 'aiocoll[ray]' ({exc})") from exc

# Typed as Any: Ray's stubs differ between releases (and are absent where Ray is not installed).
ray: Any = _ray_module

from .core.auth import new_secret
from .core.errors import StoreError
from .groups.group import ProcessGroup
from .launch.address import chosen_by_user
from .store.base import MemoryStore

NAMESPACE = "aiocoll"
DEFAULT_GROUP = "default"


def _actor_name(group_name: str) -> str:
    if not isinstance(group_name, str) or not group_name:
        raise ValueError(f"group_name must be a non-empty str, got {group_name!r}")
    return f"aiocoll:{group_name}"


class _Rendezvous:
    """The store of one group, in an async Ray actor: every call answers (ok, value) or
    (error, message), so that a StoreError reaches the caller as a StoreError."""

    def __init__(self, secret: bytes) -> None:
        self._store = MemoryStore()
        self._secret = secret
        self._members: dict[str, int] = {}
        self._world_size = 0

    async def secret(self) -> bytes:
        return self._secret

    async def declare(self, members: dict[str, int], world_size: int) -> None:
        self._members = dict(members)
        self._world_size = world_size

    async def member(self, actor_id: str) -> tuple[int, int] | None:
        rank = self._members.get(actor_id)
        return None if rank is None else (rank, self._world_size)

    async def call(self, op: str, *args: Any) -> tuple[bool, Any]:
        try:
            return True, await getattr(self._store, op)(*args)
        except StoreError as exc:
            return False, str(exc)


_RendezvousActor: Any = ray.remote(num_cpus=0, max_concurrency=10_000)(_Rendezvous)


class RayStore:
    """The aiocoll Store of a group, kept by its rendezvous actor (see the module docstring)."""

    def __init__(self, actor: Any, group_name: str) -> None:
        self._actor = actor
        self._name = group_name

    def __repr__(self) -> str:
        return f"RayStore({self._name!r})"

    async def _call(self, op: str, *args: Any) -> Any:
        try:
            ok, value = await self._actor.call.remote(op, *args)
        except ray.exceptions.RayError as exc:
            raise StoreError(f"Ray rendezvous of group {self._name!r}: {op} failed: {exc}") from exc
        if not ok:
            raise StoreError(f"Ray rendezvous of group {self._name!r}: {value}")
        return value

    async def set(self, key: str, value: bytes) -> None:
        """See Store.set.

        Raises:
            StoreError: the rendezvous actor failed or is gone.
        """
        await self._call("set", key, bytes(value))

    async def get(self, key: str, timeout: float | None = None) -> bytes:
        """See Store.get.

        Raises:
            StoreError: timeout, or the rendezvous actor failed or is gone.
        """
        value: bytes = await self._call("get", key, timeout)
        return value

    async def add(self, key: str, amount: int = 1) -> int:
        """See Store.add.

        Raises:
            StoreError: not a counter, or the rendezvous actor failed or is gone.
        """
        value: int = await self._call("add", key, amount)
        return value

    async def wait(self, keys: Sequence[str], timeout: float | None = None) -> None:
        """See Store.wait.

        Raises:
            StoreError: timeout, or the rendezvous actor failed or is gone.
        """
        await self._call("wait", list(keys), timeout)

    async def delete(self, key: str) -> bool:
        """See Store.delete.

        Raises:
            StoreError: the rendezvous actor failed or is gone.
        """
        value: bool = await self._call("delete", key)
        return value

    async def aclose(self) -> None:
        """Nothing to release: the rendezvous actor is the group's, not this member's."""


# Handles held by this process: Ray ends a (non-detached) actor once no handle to it is left,
# so the process that made the rendezvous actor keeps it alive until destroy_group.
_handles: dict[str, Any] = {}


def _rendezvous(group_name: str) -> Any:
    # get_if_exists: the first member (or create_group) creates it; the secret passed by the
    # others is ignored, and everyone asks the actor for the one it holds.
    handle = _handles.get(group_name)
    if handle is None:
        handle = _RendezvousActor.options(
            name=_actor_name(group_name), namespace=NAMESPACE, get_if_exists=True
        ).remote(new_secret())
        _handles[group_name] = handle
    return handle


def create_group(actors: Sequence[Any], *, group_name: str = DEFAULT_GROUP) -> None:
    """Declare, from the driver, that ``actors`` form a group, ranked in list order; each then
    joins with ``await aiocoll.ray.init(group_name=...)`` (no rank or size needed).

    Raises:
        ValueError: no actors, the same actor twice, or a bad group name.
    """
    ids = [a._ray_actor_id.hex() for a in actors]
    if not ids:
        raise ValueError("create_group needs at least one actor")
    if len(set(ids)) != len(ids):
        raise ValueError("create_group got the same actor twice")
    ray.get(_rendezvous(group_name).declare.remote({aid: r for r, aid in enumerate(ids)}, len(ids)))


def destroy_group(group_name: str = DEFAULT_GROUP) -> None:
    """Remove the group's rendezvous actor (after its members have left). Idempotent.

    Raises:
        ValueError: a bad group name.
    """
    _handles.pop(group_name, None)
    try:
        actor = ray.get_actor(_actor_name(group_name), namespace=NAMESPACE)
    except ValueError:
        return
    ray.kill(actor)


def _host() -> str | None:
    # The node's address unless the user picked one: other nodes reach it, whereas the route
    # to the rendezvous actor says nothing about where the members are.
    if chosen_by_user():
        return None
    address: str = ray.util.get_node_ip_address()
    return address


def _not_declared(group_name: str, me: str | None) -> ValueError:
    return ValueError(
        "pass rank= and world_size=, or declare the group from the driver first: "
        f"aiocoll.ray.create_group(actors, group_name={group_name!r}) "
        f"({'this actor is not in it' if me else 'this is not an actor'})"
    )


async def _arguments(group_name: str, rank: int | None, world_size: int | None) -> tuple[RayStore, bytes, int, int]:
    actor = _rendezvous(group_name)
    if rank is None or world_size is None:
        me = ray.get_runtime_context().get_actor_id()
        found = await actor.member.remote(me) if me is not None else None
        if found is None:
            raise _not_declared(group_name, me)
        rank, world_size = (found[0] if rank is None else rank), (found[1] if world_size is None else world_size)
    secret: bytes = await actor.secret.remote()
    return RayStore(actor, group_name), secret, rank, world_size


def _arguments_blocking(group_name: str, rank: int | None, world_size: int | None) -> tuple[RayStore, bytes, int, int]:
    actor = _rendezvous(group_name)
    if rank is None or world_size is None:
        me = ray.get_runtime_context().get_actor_id()
        found = ray.get(actor.member.remote(me)) if me is not None else None
        if found is None:
            raise _not_declared(group_name, me)
        rank, world_size = (found[0] if rank is None else rank), (found[1] if world_size is None else world_size)
    secret: bytes = ray.get(actor.secret.remote())
    return RayStore(actor, group_name), secret, rank, world_size


async def init(
    rank: int | None = None,
    world_size: int | None = None,
    *,
    group_name: str = DEFAULT_GROUP,
    transport: str | None = None,
    timeout: float | None = None,
    join_timeout: float | None = None,
) -> ProcessGroup:
    """Join group ``group_name`` from inside an async Ray actor; returns the world group.

    Afterwards every aiocoll collective works in this actor's coroutines (they share the
    actor's event loop). Leave with ``await aiocoll.destroy()``.

    Raises:
        ValueError: rank or world size neither given nor declared by ``create_group``.
        StoreError / TransportError / HandshakeError: the members could not meet.
    """
    from .core.world import init as _init

    store, secret, rank, world_size = await _arguments(group_name, rank, world_size)
    return await _init(
        rank, world_size, store, transport, timeout, secret=secret, host=_host(), join_timeout=join_timeout
    )


def init_sync(
    rank: int | None = None,
    world_size: int | None = None,
    *,
    group_name: str = DEFAULT_GROUP,
    transport: str | None = None,
    timeout: float | None = None,
    join_timeout: float | None = None,
) -> ProcessGroup:
    """``init`` for threaded (non-async) actors: joins on ``aiocoll.sync``'s background loop;
    then use ``aiocoll.sync``'s collectives and ``aiocoll.sync.destroy()``.

    Raises:
        RuntimeError: called from a running event loop (use ``await aiocoll.ray.init``).
        ValueError, StoreError, TransportError, HandshakeError: as ``init``.
    """
    from . import sync

    store, secret, r, n = _arguments_blocking(group_name, rank, world_size)
    return sync.init(r, n, store, transport, timeout, secret=secret, host=_host(), join_timeout=join_timeout)


__all__ = ["RayStore", "create_group", "destroy_group", "init", "init_sync"]
