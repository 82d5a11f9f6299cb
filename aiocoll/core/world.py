"""The world: this process's rank, its connections, its groups; ``init``, ``destroy``, ``world``.

Which world is current: ``init`` records the world in a context variable (so that many ranks
can live as tasks of one event loop, as ``aiocoll.testing`` runs them) and, unless it runs
inside that harness, also as the process's world (so that threads and the sync API see it).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import socket
import ssl as _ssl
from collections.abc import Generator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from .auth import new_secret
from .comm import Communicator
from .errors import NotInitializedError, StoreError
from ..groups.group import ProcessGroup, group_id
from ..groups.registry import GroupRegistry
from ..algorithms.dissemination import dissemination_barrier
from ..engines.messages import MESSAGES
from ..engines.plan import Plan
from .settings import Settings
from .wire import Kind
from .timeouts import seconds
from ..transports import Transport, TransportConfig, get_transport

log = logging.getLogger("aiocoll")

DEFAULT_TIMEOUT = 60.0
#: How long ``init`` waits for the other ranks by default: ranks of one job may start minutes
#: apart (nodes booting containers, importing torch), while a collective that takes a minute
#: is stuck.
DEFAULT_JOIN_TIMEOUT = 300.0

_current: contextvars.ContextVar[World | None] = contextvars.ContextVar("aiocoll_world", default=None)
in_harness: contextvars.ContextVar[bool] = contextvars.ContextVar("aiocoll_in_harness", default=False)
_process_world: World | None = None


def host_key() -> str:
    """Identifies this host (and boot): ranks with equal keys can share memory."""
    boot = ""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        pass
    return f"{socket.gethostname()}/{boot}"


class World:
    """Everything one rank holds: communicator, store, world group and group registry."""

    def __init__(
        self, rank: int, world_size: int, comm: Communicator, *, timeout: float, settings: Settings | None = None
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.comm = comm
        self.timeout = timeout
        #: How this world runs its collectives (read once, at init).
        self.settings = settings if settings is not None else Settings()
        #: Whether other ranks of this world run in this very process (aiocoll.testing): then
        #: nothing may spin waiting for them, since they need this process's time to answer.
        self.shares_process = in_harness.get()
        self.store: Any = None
        self.owns_store = False
        self.transport_names: dict[int, str] = {}
        self.registry = GroupRegistry(self)
        self.group = self.registry.add(
            ProcessGroup(self, range(world_size), tag="", name="world", gid=group_id(range(world_size), "world", 0))
        )
        self.closed = False
        self.loop: asyncio.AbstractEventLoop | None = None


def current_world() -> World:
    """The world of the calling context.

    Raises:
        NotInitializedError: ``aiocoll.init()`` has not completed (or ``destroy()`` ran).
    """
    w = _current.get() or _process_world
    if w is None or w.closed:
        raise NotInitializedError("aiocoll is not initialised: await aiocoll.init() first")
    return w


def world() -> ProcessGroup:
    """The root group of all ranks.

    Raises:
        NotInitializedError: before ``init``.
    """
    return current_world().group


NO_SECRET = (
    "no shared secret: without one, anyone who can reach the store or a rank's port could join "
    "this world, read its data and change its results. Set AIOCOLL_SECRET to the same random "
    "string on every rank (e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`) or "
    "pass init(secret=...); or start the ranks with `aiocoll run`, which makes one per job; or "
    "use torch.distributed.init_process_group('aiocoll'), which shares one through torch's "
    "store. On a network where everyone who can connect is trusted, init(insecure=True) or "
    "AIOCOLL_INSECURE=1 starts without one."
)


def _listens(transport: str, store: Any) -> bool:
    """Whether this world opens anything that other processes can connect to."""
    return transport != "inproc" or (isinstance(store, str) and store.lower().startswith("tcp:"))


async def _start(
    rank: int | None,
    world_size: int | None,
    store: Any,
    transport: str | None,
    timeout: float | None,
    secret: bytes | str | None,
    host: str | None,
    ssl: _ssl.SSLContext | None,
    ssl_client: _ssl.SSLContext | None,
    transport_options: Mapping[str, Any] | None,
    insecure: bool,
    settings: Settings | None = None,
    join_timeout: float | None = None,
) -> World:
    from ..launch.env import read_join_timeout, read_launch_env, read_timeout

    if not isinstance(insecure, bool):
        raise TypeError(f"insecure must be True or False, got {insecure!r}")
    env = None
    if rank is None or world_size is None:
        env = read_launch_env()
    if rank is None:
        rank = env.rank if env is not None else 0
    if world_size is None:
        world_size = env.world_size if env is not None else 1
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
    timeout = seconds(timeout) if timeout is not None else (read_timeout() or DEFAULT_TIMEOUT)
    if settings is None:
        settings = Settings.from_env()
    elif not isinstance(settings, Settings):
        raise TypeError(f"settings must be an aiocoll.Settings, got {type(settings).__name__}")
    join = (
        seconds(join_timeout, "join_timeout")
        if join_timeout is not None
        else (read_join_timeout() or DEFAULT_JOIN_TIMEOUT)
    )
    transport = transport or os.environ.get("AIOCOLL_TRANSPORT") or "auto"
    if secret is None:
        secret = os.environ.get("AIOCOLL_SECRET") or (env.secret if env is not None else None)
    secret_b = secret.encode() if isinstance(secret, str) else (secret or b"")
    route: str | None = None
    store_options: dict[str, Any] = {}
    if store is None and env is not None:
        # The launcher's own store or channel where it has one (torchrun, mpirun + mpi4py).
        from ..launch.rendezvous import launcher_store

        met = await launcher_store(env, rank=rank, world_size=world_size, secret=secret_b, join_timeout=join)
        store, route, store_options = met.store, met.route_to, met.options
        secret_b = secret_b or met.secret
        if store is not None and not isinstance(store, str):
            try:
                return await _start_on(rank, world_size, store, route, store_options, env, transport, timeout,
                                       join, secret_b, host, ssl, ssl_client, transport_options, insecure, settings)
            except BaseException:
                await store.aclose()  # opened here, for this world only (an MPI-shared server)
                raise
    if store is None:
        store = os.environ.get("AIOCOLL_STORE")
    return await _start_on(rank, world_size, store, route, store_options, env, transport, timeout, join, secret_b,
                           host, ssl, ssl_client, transport_options, insecure, settings)


async def _start_on(
    rank: int,
    world_size: int,
    store: Any,
    route: str | None,
    store_options: dict[str, Any],
    env: Any,
    transport: str,
    timeout: float,
    join: float,
    secret_b: bytes,
    host: str | None,
    ssl: _ssl.SSLContext | None,
    ssl_client: _ssl.SSLContext | None,
    transport_options: Mapping[str, Any] | None,
    insecure: bool,
    settings: Settings,
) -> World:
    from ..launch.address import choose_host, route_target
    from ..launch.env import read_insecure

    if route is None:
        route = route_target(store)
    comm = Communicator(rank, world_size)
    w = World(rank, world_size, comm, timeout=timeout, settings=settings)
    if world_size == 1 and store is None:
        return w
    if store is None:
        raise ValueError(
            f"a world of {world_size} ranks needs a store to meet: pass store='tcp://host:port' "
            "(or file:///path, or a Store), or set MASTER_ADDR and MASTER_PORT"
        )
    if not secret_b and _listens(transport, store):
        # Refused before anything listens: a world without a secret would serve an open store
        # (and, before this check, handed out its connection secret through it).
        if not (insecure or read_insecure()):
            raise ValueError(NO_SECRET)
        log.warning(
            "rank %d: INSECURE: starting without a shared secret (insecure=True or "
            "AIOCOLL_INSECURE=1): anyone who can reach the store %s or this rank's ports can join "
            "this world, read its data and change its results",
            rank,
            store if isinstance(store, str) else type(store).__name__,
        )
    from ..launch.env import read_job_id
    from ..store import open_store

    if host is None:
        spans = env is not None and env.local_world_size is not None and env.local_world_size < world_size
        host = await choose_host(route, spans_hosts=spans)
    store_options.setdefault("job_id", read_job_id())
    w.store = await open_store(
        store, rank=rank, world_size=world_size, secret=secret_b, timeout=join, ssl_server=ssl,
        ssl_client=ssl_client, **store_options,
    )
    try:
        await _connect_all(w, transport, secret_b, host, join, ssl, ssl_client, dict(transport_options or {}))
    except BaseException:
        comm.abort()
        await w.store.aclose()
        raise
    # Every rank connected to the store before it published its address, and nothing uses the
    # store after this: a store served here stops listening, so that a rank of the next world
    # (init after destroy) cannot reach this one while it closes and take its keys for new.
    stop_listening = getattr(w.store, "stop_listening", None)
    if stop_listening is not None:
        stop_listening()
    return w


def _candidates(transport: str) -> list[str]:
    if transport != "auto":
        return [transport]
    names = ["tcp"]
    try:
        get_transport("shm")
    except Exception:  # shm missing or unusable here: tcp serves same-host peers too
        pass
    else:
        names.insert(0, "shm")
    return names


async def _connect_all(
    w: World,
    transport: str,
    secret: bytes,
    bind: str,
    join: float,
    ssl: _ssl.SSLContext | None,
    ssl_client: _ssl.SSLContext | None,
    options: dict[str, Any],
) -> None:
    rank, size, comm = w.rank, w.world_size, w.comm
    names = _candidates(transport)
    from ..engines.gpu import device_transport

    # A transport for payloads in device memory beside the host one (auto: ucx when ucxx is
    # installed and its UCX can use CUDA): every rank decides alike, and a link gets a device
    # connection only when both ends offer it, so the two directions of a pair always agree.
    device_name = device_transport(transport, w.settings)
    # Each init of this store gets its own keys: a store that outlives a world (a standalone
    # server, a file store, torch's store) still holds the last world's addresses, which a rank
    # starting again must not take for the new ones. Every rank counts its own joins, so ranks
    # that started and left worlds together agree on the round without waiting for each other.
    space = f"aiocoll/{await w.store.add(f'aiocoll/rounds/{rank}', 1)}"
    if not secret and transport != "inproc":
        # Insecure mode (_start refused otherwise): the transports still need a secret, so rank
        # 0 makes one and hands it out through the store, which anyone reaching it can read.
        if rank == 0:
            secret = new_secret()
            await w.store.set(f"{space}/secret", secret)
        else:
            secret = await w.store.get(f"{space}/secret", timeout=join)
    started: dict[str, Transport] = {}
    addresses: dict[str, str] = {}
    for name in names:
        factory = get_transport(name)
        config = TransportConfig(
            rank=rank,
            world_size=size,
            secret=secret,
            host=bind,
            timeout=w.timeout,
            ssl_server=ssl,
            ssl_client=ssl_client,
            options=options,
        )
        t = factory(config)
        started[name] = t
        comm.transports.append(t)
        addresses[name] = await t.listen(comm)
    if device_name is not None and device_name not in started:
        try:
            t = get_transport(device_name)(TransportConfig(
                rank=rank, world_size=size, secret=secret, host=bind, timeout=w.timeout, options=options))
            address = await t.listen(comm)
        except Exception as exc:  # no UCX here after all: CUDA tensors are staged through host memory
            log.info("rank %d: no %s transport for device memory: %s", rank, device_name, exc)
        else:
            if getattr(t, "cuda_ready", False):
                started[device_name] = t
                comm.transports.append(t)
                addresses[device_name] = address
            else:
                await t.aclose()
    me = {"host": host_key(), "addresses": addresses}
    await w.store.set(f"{space}/addr/{rank}", json.dumps(me).encode())

    async def link(peer: int) -> None:
        info = json.loads(await w.store.get(f"{space}/addr/{peer}", timeout=join))
        theirs: dict[str, str] = info["addresses"]
        same_host = info["host"] == me["host"]
        for name in names:
            if name not in theirs:
                continue
            if started[name].capabilities.same_host_only and not same_host:
                continue
            conn = await started[name].connect(peer, theirs[name])
            comm.add_connection(peer, conn)
            w.transport_names[peer] = name
            if started[name].capabilities.cuda_memory:
                comm.add_device_connection(peer, conn)
            elif device_name in started and device_name in theirs:
                comm.add_device_connection(peer, await started[device_name].connect(peer, theirs[device_name]))
            return
        raise StoreError(f"rank {peer} offers transports {sorted(theirs)}, none usable from rank {rank} ({names})")

    await asyncio.gather(*(link(p) for p in range(size) if p != rank))


class _Init:
    """What ``init()`` returns: await it for the world group, or use it with ``async with``."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._world: World | None = None

    async def _do(self) -> ProcessGroup:
        global _process_world
        if _current.get() is not None and not _current.get().closed:  # type: ignore[union-attr]
            raise RuntimeError("aiocoll.init() was already called in this context; destroy() first")
        w = await _start(**self._kwargs)
        w.loop = asyncio.get_running_loop()  # the loop that owns the world (sync API, threads)
        self._world = w
        _current.set(w)
        if not in_harness.get():
            _process_world = w
        return w.group

    def __await__(self) -> Generator[Any, None, ProcessGroup]:
        return self._do().__await__()

    async def __aenter__(self) -> ProcessGroup:
        return await self._do()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        # On an exception: no barrier (the others may be waiting for this rank in a collective
        # it will never join; its goodbye tells them at once), but still a graceful close, so
        # that what this rank sent for the collectives it completed reaches them.
        await leave(barrier=e is None, abort=False)


def init(
    rank: int | None = None,
    world_size: int | None = None,
    store: Any = None,
    transport: str | None = None,
    timeout: float | None = None,
    *,
    secret: bytes | str | None = None,
    host: str | None = None,
    ssl: _ssl.SSLContext | None = None,
    ssl_client: _ssl.SSLContext | None = None,
    transport_options: Mapping[str, Any] | None = None,
    insecure: bool = False,
    settings: Settings | None = None,
    join_timeout: float | None = None,
) -> _Init:
    """Join the world: ``pg = await aiocoll.init(...)`` or ``async with aiocoll.init(...) as pg``.

    Arguments left out come from the environment (torchrun, Open MPI, MPICH or SLURM variables;
    ``AIOCOLL_TRANSPORT``, ``AIOCOLL_TIMEOUT``, ``AIOCOLL_JOIN_TIMEOUT``, ``AIOCOLL_SECRET``,
    ``AIOCOLL_INSECURE``, ``AIOCOLL_HOST``, ``AIOCOLL_IFNAME``), else rank 0 of a world of 1.
    With no store given, a launcher's is used: torch's store under torchrun (which also shares
    the secret), one rank 0 announces over MPI under mpirun with mpi4py, or one derived from
    Slurm's node list and job id (``aiocoll.launch.env`` and ``aiocoll.launch.rendezvous``).

    A world of several ranks needs a shared secret (``secret=``, ``AIOCOLL_SECRET``, or the one
    ``aiocoll run`` makes per job): it authenticates the store and every connection. Without
    one, ``init`` refuses unless ``insecure=True`` or ``AIOCOLL_INSECURE=1`` (logged as a
    warning): then anyone who can reach the store can join. Worlds on ``inproc`` with an
    in-process store open nothing to other processes and need no secret.

    Args:
        store: ``"tcp://host:port"`` (rank 0 serves it unless one runs), ``"file:///path"``, or
            a Store object. Not needed for a world of one.
        transport: ``"auto"`` (shared memory on one host, TCP between hosts), ``"tcp"``,
            ``"shm"``, ``"ucx"``, ``"inproc"``, or a plugin's name.
        timeout: default seconds for every collective (a positive, finite number).
        join_timeout: seconds to wait for the store and the other ranks to meet (default
            ``AIOCOLL_JOIN_TIMEOUT``, else 300).
        secret: shared secret that authenticates the store and every connection.
        insecure: start without a shared secret (see above).
        host: address to listen on and advertise (default ``AIOCOLL_HOST``, else the address
            of ``AIOCOLL_IFNAME``, else of the interface that routes to the store's host:
            127.0.0.1 for a store on this host; see ``aiocoll.launch.address``).
        settings: how this world runs its collectives (algorithms, the shared-memory engine);
            default ``Settings.from_env()``, the ``AIOCOLL_*`` variables. See
            ``aiocoll.Settings``.
        ssl / ssl_client: TLS contexts for TCP between hosts.

    Raises:
        ValueError: bad rank, world size, timeout, no store for a world of several ranks, or no
            shared secret (and no opt-in to run without one).
        StoreError / TransportError / HandshakeError: the ranks could not meet.
    """
    return _Init(
        insecure=insecure,
        rank=rank,
        world_size=world_size,
        store=store,
        transport=transport,
        timeout=timeout,
        secret=secret,
        host=host,
        ssl=ssl,
        ssl_client=ssl_client,
        transport_options=transport_options,
        settings=settings,
        join_timeout=join_timeout,
    )


#: Longest ``destroy()`` spends closing gracefully (peers still joining, background sends,
#: goodbyes) before it aborts what is left; the world's timeout when that is shorter.
CLOSE_TIMEOUT_S = 30.0
#: Of that, longest it waits for frames still being sent in the background (notices, sends of
#: cancelled calls); the sends of every collective that completed are out already.
FLUSH_TIMEOUT_S = 5.0


async def destroy(*, abort: bool = False) -> None:
    """Leave the world: wait for the other ranks (a barrier, unless ``abort``), then close.

    Closing is graceful whether or not the barrier succeeded (a broken group, a dead peer):
    every frame this rank sent (its part of every collective it completed, its aborts and
    notices) is delivered before the peers see it leave, and a peer still joining the world is
    waited for; all of it bounded by the world's timeout (at most 30 s), then the rest is
    aborted. Every connection, listener, shared segment and background task is released. Safe
    to call twice.

    Args:
        abort: wait for nothing: drop every connection at once (after at most 1 s for aborts
            and notices being sent). Peers see this rank as crashed.

    Raises:
        asyncio.CancelledError: the caller was cancelled; everything is aborted and released.
    """
    await leave(barrier=not abort, abort=abort)


async def leave(*, barrier: bool, abort: bool) -> None:
    """``destroy()`` with the barrier chosen apart from the abort: ``async with init()`` and the
    test harness leave after an exception without a barrier (the others may be stuck waiting
    for this rank, and are better told at once by its goodbye) but still gracefully."""
    global _process_world
    w = _current.get() or _process_world
    if w is None or w.closed:
        return
    interrupted = False
    met = False
    try:
        if barrier and w.world_size > 1:
            try:
                # The world group's barrier, handed straight to the message engine (what
                # aiocoll.barrier does), so that the world needs nothing from the collectives.
                g = w.group
                plan = Plan("barrier", Kind.BARRIER, g.next_seq(), min(w.timeout, 30.0),
                            schedule=dissemination_barrier)
                await MESSAGES.run(g, plan)
                met = True
            except Exception as exc:  # a dead peer must not keep us from cleaning up
                log.warning("rank %d: barrier in destroy() failed: %s", w.rank, exc)
    except BaseException:
        interrupted = True
        raise
    finally:
        w.closed = True
        try:
            if abort or interrupted:
                # Aborts and notices about the failure that brought us here are still being sent
                # in the background; without them the others would blame this rank for leaving.
                await w.comm.aflush(min(w.timeout, 1.0))
                w.comm.abort()
            else:
                await _close(w, everyone_met=met)
        finally:
            if w.store is not None:
                await w.store.aclose()
            if _current.get() is w:
                _current.set(None)
            if _process_world is w:
                _process_world = None


async def _close(w: World, *, everyone_met: bool) -> None:
    """Close ``w``'s communicator gracefully within CLOSE_TIMEOUT_S, then abort what is left."""
    bound = min(w.timeout, CLOSE_TIMEOUT_S)
    try:
        async with asyncio.timeout(bound):
            if not everyone_met and w.world_size > 1:
                late = await w.comm.wait_joined(bound / 2)  # the other half is for closing
                if late:
                    log.warning("rank %d: leaving before ranks %s connected to it", w.rank, sorted(late))
            await w.comm.aclose(flush_timeout=min(bound, FLUSH_TIMEOUT_S))
    except TimeoutError:
        log.warning("rank %d: closing gracefully took over %s s; the rest is aborted", w.rank, bound)
        w.comm.abort()
    except BaseException:
        w.comm.abort()
        raise
