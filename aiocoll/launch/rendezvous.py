"""Where the ranks of a launched job meet, when ``init`` is given no store: from the launcher.

``launcher_store`` turns what ``read_launch_env`` found into a store (and, where the launcher
has a trusted channel of its own, a shared secret)::

    torchrun            torch's own TCPStore on MASTER_ADDR:MASTER_PORT (served by torchrun's
                        agent, or by rank 0 as torch's env:// does), through the adapter the
                        torch backend uses (``aiocoll.store.c10d``), keys under
                        aiocoll/<restart count>/. Without
                        AIOCOLL_SECRET, rank 0 draws a secret and shares it through that store,
                        as init_process_group("aiocoll") does: whoever can read torch's store can
                        join torch.distributed's process group anyway.
    mpirun + mpi4py     rank 0 serves a store on a free port of its address (see ``address``)
                        and broadcasts the URL, and (without AIOCOLL_SECRET) a fresh secret,
                        with MPI_Bcast of bytes (nothing pickled); used also inside Slurm.
    srun, or mpirun     the store ``read_launch_env`` derived (first host of the node list, a
    without mpi4py      port of the job id); rank 0 serves it on every interface, because a
                        node's own name may resolve to 127.0.1.1 there; the secret must come
                        from AIOCOLL_SECRET, exported before srun / mpirun.

Blocking launcher calls (torch's store, MPI) run on worker threads: the event loop stays free.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from ..core.auth import new_secret
from ..core.errors import StoreError
from ..store.base import Store, parse_store_url
from .address import choose_host, route_target
from .env import LaunchEnv

log = logging.getLogger("aiocoll")
T = TypeVar("T")


@dataclass
class Meeting:
    """Where to meet: a store (URL or object), a secret the launcher shared (or empty), the host
    whose route picks this rank's address, and options for ``open_store``."""

    store: str | Store | None
    secret: bytes = b""
    route_to: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


async def launcher_store(
    env: LaunchEnv,
    *,
    rank: int,
    world_size: int,
    secret: bytes,
    join_timeout: float,
    environ: Mapping[str, str] = os.environ,
) -> Meeting:
    """Where this rank of a launched job meets the others (see the module docstring).

    Raises:
        StoreError: torch's store or the MPI exchange failed or timed out.
        RuntimeError: torchrun started us but torch cannot be imported.
    """
    if env.torch_store and world_size > 1:
        return await _torchrun(env, rank, world_size, secret, join_timeout, environ)
    if (
        env.source in ("openmpi", "mpich")
        and env.store_from in (None, "slurm", "mpi")
        and world_size > 1
        and importlib.util.find_spec("mpi4py") is not None
    ):
        met = await _mpi4py(env, rank, world_size, secret, join_timeout, environ)
        if met is not None:
            return met
    if env.store_from in ("slurm", "mpi") and env.store is not None:
        if env.store_from == "slurm" and env.local_world_size != world_size:
            # Rank 0's node name may resolve to loopback on its own host (127.0.1.1 in
            # /etc/hosts): serving every interface keeps it reachable by the others.
            return Meeting(env.store, route_to=route_target(env.store), options={"bind_all": True})
        return Meeting(env.store, route_to=route_target(env.store))
    if env.store is None and env.source in ("openmpi", "mpich") and world_size > 1:
        raise ValueError(
            f"mpirun ({env.source}) gives no store: install mpi4py (rank 0 then shares its address "
            "over MPI), or set MASTER_ADDR and MASTER_PORT (or AIOCOLL_STORE). Without them aiocoll "
            "derives a store only for ranks all on one host of an MPI that names its job "
            "(PMIX_NAMESPACE, OMPI_MCA_ess_base_jobid: Open MPI), or inside a Slurm allocation"
        )
    return Meeting(env.store, route_to=route_target(env.store))


# -- torchrun ---------------------------------------------------------------------------------


async def _torchrun(
    env: LaunchEnv, rank: int, world_size: int, secret: bytes, join_timeout: float, environ: Mapping[str, str]
) -> Meeting:
    assert env.store is not None
    url = parse_store_url(env.store)
    try:
        import torch.distributed as dist

        from ..store.c10d import C10dStore
    except ImportError as exc:
        raise RuntimeError(f"torchrun started this process, but torch.distributed cannot be imported: {exc}") from exc
    # torch's env:// rendezvous: the agent serves the store when it says so, else rank 0 does.
    agent = environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    restart = environ.get("TORCHELASTIC_RESTART_COUNT", "0").strip() or "0"

    def connect() -> Any:
        base = dist.TCPStore(  # type: ignore[attr-defined]
            url.host,
            url.port,
            world_size,
            is_master=not agent and rank == 0,
            timeout=timedelta(seconds=join_timeout),
            wait_for_workers=False,
            multi_tenant=True,  # init_process_group in the same process shares the server
        )
        # A restarted attempt starts from fresh keys: torchrun's store outlives its workers.
        return dist.PrefixStore(f"aiocoll/{restart}", base)  # type: ignore[attr-defined]

    name = f"torch's store tcp://{url.host}:{url.port} (torchrun)"
    try:
        raw = await asyncio.to_thread(connect)
    except Exception as exc:
        raise StoreError(f"cannot connect to {name} within {join_timeout} s: {exc}") from exc
    store = C10dStore(raw, name=name, route_to=url.host)
    if not secret:
        # One key per start of this rank: a rank that starts a second world in the same
        # attempt must not read the first one's secret before rank 0 has set the new one.
        started = await store.add(f"secret-starts/{rank}", 1)
        key = f"secret/{started}"
        if rank == 0:
            await store.set(key, new_secret())
        secret = await store.get(key, timeout=join_timeout)
    return Meeting(store, secret=secret, route_to=url.host)


# -- mpirun with mpi4py -----------------------------------------------------------------------


async def _mpi4py(
    env: LaunchEnv, rank: int, world_size: int, secret: bytes, join_timeout: float, environ: Mapping[str, str]
) -> Meeting | None:
    from ..store.tcp import ServedStore, TcpStoreClient, TcpStoreServer, format_address

    try:
        comm = await asyncio.wait_for(_in_daemon_thread(_mpi_world), join_timeout)
    except Exception as exc:  # mpi4py present but unusable (no libmpi): use the environment
        log.warning("mpi4py is installed but MPI cannot start (%s): deriving the store from the environment", exc)
        return None
    if comm.Get_size() != world_size or comm.Get_rank() != rank:
        raise StoreError(
            f"MPI says rank {comm.Get_rank()} of {comm.Get_size()}, init was asked for rank {rank} of "
            f"{world_size}: pass neither, or the same"
        )
    server = None
    payload = b""
    drew = not secret  # a secret drawn here is sent; one every rank was given is not
    if rank == 0:
        secret = secret or new_secret()
        spans = env.local_world_size != world_size
        host = await choose_host(None, spans_hosts=spans, environ=environ)
        try:
            server = await TcpStoreServer.start(host, 0, secret)
        except OSError as exc:
            payload = json.dumps({"error": f"rank 0 cannot serve a store on {host}: {exc}"}).encode()
        else:
            bound_host, port = server.address
            payload = json.dumps({"host": bound_host, "port": port, "secret": secret.decode() if drew else None}).encode()
    try:
        received = await asyncio.wait_for(_in_daemon_thread(_bcast, comm, payload), join_timeout)
    except BaseException:
        if server is not None:
            await server.aclose()
        raise
    info = json.loads(received)
    if "error" in info:
        raise StoreError(info["error"])
    if rank == 0:
        assert server is not None
        store: Store = ServedStore(server)
    else:
        if info["secret"] is not None and not secret:
            secret = info["secret"].encode()
        store = await TcpStoreClient.connect(
            info["host"], info["port"], secret=secret, timeout=join_timeout, hello=f"rank {rank}".encode()
        )
    log.debug("rank %d: store %s shared over MPI", rank, format_address(info["host"], info["port"]))
    return Meeting(store, secret=secret, route_to=info["host"])


def _in_daemon_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    # A blocked MPI call cannot be interrupted; on a daemon thread it does not keep the process
    # from exiting after the join timeout (asyncio's executor threads are joined at exit).
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn(*args)
        except BaseException as exc:
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop closed while MPI blocked: nobody waits any more
            pass

    threading.Thread(target=run, name="aiocoll-mpi", daemon=True).start()
    return future


def _mpi_world() -> Any:
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _bcast(comm: Any, payload: bytes) -> bytes:
    # Bytes with MPI_Bcast, never mpi4py's pickling bcast: nothing received is unpickled.
    import numpy as np

    size = np.array([len(payload)], dtype=np.int64)
    comm.Bcast(size, root=0)
    buf = bytearray(payload) if comm.Get_rank() == 0 else bytearray(int(size[0]))
    comm.Bcast(buf, root=0)
    return bytes(buf)


__all__ = ["Meeting", "launcher_store"]
