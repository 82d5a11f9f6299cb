"""Read a rank's place in the world from the environment its launcher set.

Launchers, first match wins (a launcher matches when its rank or size variable is set)::

    source     rank / size                                  local rank / local size
    torchrun   RANK / WORLD_SIZE                            LOCAL_RANK / LOCAL_WORLD_SIZE
    openmpi    OMPI_COMM_WORLD_RANK / OMPI_COMM_WORLD_SIZE  OMPI_COMM_WORLD_LOCAL_RANK / _LOCAL_SIZE
    mpich      PMI_RANK / PMI_SIZE                          MPI_LOCALRANKID / MPI_LOCALNRANKS
    slurm      SLURM_PROCID / SLURM_NTASKS                  SLURM_LOCALID / SLURM_TASKS_PER_NODE[SLURM_NODEID]

torchrun comes first because it is often run *inside* an MPI or SLURM allocation, whose
variables then describe the launcher's processes, not the ranks. The store is
``AIOCOLL_STORE`` if set, else ``tcp://MASTER_ADDR:MASTER_PORT`` if both are set, else None
(MPI and SLURM do not provide one; the caller says it needs one). ``AIOCOLL_TRANSPORT``,
``AIOCOLL_TIMEOUT`` and ``AIOCOLL_SECRET`` are read alongside; ``AIOCOLL_TIMEOUT`` and
``AIOCOLL_INSECURE`` also without a launcher (``read_timeout``, ``read_insecure``).

Every value is checked: a set variable that is empty, not a number, or out of range raises
ValueError naming the variable, rather than starting a world that can never meet.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from ..store.base import parse_store_url


@dataclass(frozen=True)
class LaunchEnv:
    """What the environment says about this rank.

    rank / world_size: global rank and world size.
    local_rank / local_world_size: position among the ranks on this host; None where the
        launcher does not say.
    store: store URL, or None if the environment names none.
    transport / timeout / secret: from AIOCOLL_TRANSPORT, AIOCOLL_TIMEOUT (seconds) and
        AIOCOLL_SECRET; None where unset. The secret is left out of the repr.
    source: the launcher recognised: "torchrun", "openmpi", "mpich" or "slurm".
    """

    rank: int
    world_size: int
    local_rank: int | None
    local_world_size: int | None
    store: str | None
    transport: str | None
    timeout: float | None
    secret: bytes | None = field(repr=False)
    source: str


class _Launcher(NamedTuple):
    source: str
    rank: str
    size: str
    local_rank: str
    local_size: str | None  # None: derived some other way (SLURM)


_LAUNCHERS = (
    _Launcher("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    _Launcher(
        "openmpi",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    _Launcher("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    _Launcher("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", None),
)

# ASCII digits only: int() would also take "1_000", " ١٢ " and friends.
_INTEGER = re.compile(r"[+-]?[0-9]+")
# SLURM_TASKS_PER_NODE, e.g. "2(x3),1": three nodes with 2 tasks, then one with 1.
_TASKS_ITEM = re.compile(r"([0-9]+)(?:\(x([0-9]+)\))?")


def _get(environ: Mapping[str, str], name: str) -> str | None:
    raw = environ.get(name)
    if raw is None:
        return None
    if not raw.strip():
        raise ValueError(f"{name} is set but empty")
    return raw.strip()


def _int(environ: Mapping[str, str], name: str) -> int | None:
    raw = _get(environ, name)
    if raw is None:
        return None
    if not _INTEGER.fullmatch(raw):
        raise ValueError(f"{name}={raw!r} is not an integer")
    return int(raw)


def _required_int(environ: Mapping[str, str], name: str, launcher: str) -> int:
    value = _int(environ, name)
    if value is None:
        raise ValueError(f"{name} is not set, but other {launcher} variables are")
    return value


def _in_range(name: str, value: int, low: int, high: int, why: str = "") -> None:
    if not low <= value <= high:
        raise ValueError(f"{name}={value} is out of range: must be in [{low}, {high}]{why}")


def _slurm_local_size(environ: Mapping[str, str]) -> int | None:
    raw = _get(environ, "SLURM_TASKS_PER_NODE")
    node = _int(environ, "SLURM_NODEID")
    if raw is None or node is None:
        return None
    counts: list[int] = []
    for item in raw.split(","):
        match = _TASKS_ITEM.fullmatch(item.strip())
        if match is None:
            raise ValueError(f"SLURM_TASKS_PER_NODE={raw!r} is not of the form 2(x3),1")
        tasks, repeat = int(match.group(1)), int(match.group(2) or 1)
        if repeat > 1_000_000:  # a node count, not an allocation size: refuse absurd expansions
            raise ValueError(f"SLURM_TASKS_PER_NODE={raw!r} repeats {repeat} times")
        counts.extend([tasks] * repeat)
    _in_range("SLURM_NODEID", node, 0, len(counts) - 1, f" (SLURM_TASKS_PER_NODE={raw!r})")
    return counts[node]


def _store(environ: Mapping[str, str]) -> str | None:
    store = _get(environ, "AIOCOLL_STORE")
    if store is not None:
        try:
            parse_store_url(store)
        except ValueError as exc:
            raise ValueError(f"AIOCOLL_STORE: {exc}") from None
        return store
    addr = _get(environ, "MASTER_ADDR")
    port = _int(environ, "MASTER_PORT")
    if addr is None and port is None:
        return None
    if addr is None:
        raise ValueError("MASTER_PORT is set but MASTER_ADDR is not")
    if port is None:
        raise ValueError("MASTER_ADDR is set but MASTER_PORT is not")
    _in_range("MASTER_PORT", port, 1, 65535)
    if ":" in addr and not addr.startswith("["):
        addr = f"[{addr}]"  # an IPv6 literal needs brackets in a URL
    url = f"tcp://{addr}:{port}"
    try:
        parse_store_url(url)
    except ValueError:
        raise ValueError(f"MASTER_ADDR={addr!r} is not a host name or address") from None
    return url


def _timeout(environ: Mapping[str, str]) -> float | None:
    raw = _get(environ, "AIOCOLL_TIMEOUT")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"AIOCOLL_TIMEOUT={raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"AIOCOLL_TIMEOUT={raw!r} is out of range: must be a positive number of seconds")
    return value


def read_timeout(environ: Mapping[str, str] = os.environ) -> float | None:
    """AIOCOLL_TIMEOUT in seconds, or None where unset (read with or without a launcher).

    Raises:
        ValueError: set but empty, not a number, NaN, infinite, zero or negative.
    """
    return _timeout(environ)


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def read_insecure(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether AIOCOLL_INSECURE opts in to starting a world without a shared secret.

    Raises:
        ValueError: set to something other than 1/true/yes/on or 0/false/no/off (an unclear
            answer to "may anyone on the network join?" is not taken as yes or no).
    """
    raw = _get(environ, "AIOCOLL_INSECURE")
    if raw is None:
        return False
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError(f"AIOCOLL_INSECURE={raw!r}: use 1 (start without a shared secret) or 0")


def read_launch_env(environ: Mapping[str, str] = os.environ) -> LaunchEnv | None:
    """Recognise the launcher from ``environ`` and read this rank's place in the world.

    Returns None when no launcher's variables are present (a plain ``python script.py``).

    Raises:
        ValueError: a variable of the recognised launcher, MASTER_ADDR/MASTER_PORT, or an
            AIOCOLL_* variable is empty, not a number, out of range, or missing its partner;
            the message names the variable.
    """
    for launcher in _LAUNCHERS:
        if launcher.rank in environ or launcher.size in environ:
            break
    else:
        return None

    world_size = _required_int(environ, launcher.size, launcher.source)
    _in_range(launcher.size, world_size, 1, 2**31 - 1)
    rank = _required_int(environ, launcher.rank, launcher.source)
    _in_range(launcher.rank, rank, 0, world_size - 1, f" ({launcher.size}={world_size})")

    if launcher.local_size is not None:
        local_size_name = launcher.local_size
        local_world_size = _int(environ, launcher.local_size)
    else:
        local_size_name = "SLURM_TASKS_PER_NODE"
        local_world_size = _slurm_local_size(environ)
    if local_world_size is not None:
        _in_range(local_size_name, local_world_size, 1, world_size, f" ({launcher.size}={world_size})")

    local_rank = _int(environ, launcher.local_rank)
    if local_rank is not None:
        if local_world_size is not None:
            limit, why = local_world_size - 1, f" ({local_size_name}={local_world_size})"
        else:
            limit, why = world_size - 1, f" ({launcher.size}={world_size})"
        _in_range(launcher.local_rank, local_rank, 0, limit, why)

    # Not stripped: the secret is compared byte for byte with what the store server read.
    secret = environ.get("AIOCOLL_SECRET")
    if secret == "":
        raise ValueError("AIOCOLL_SECRET is set but empty")
    return LaunchEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        store=_store(environ),
        transport=_get(environ, "AIOCOLL_TRANSPORT"),
        timeout=_timeout(environ),
        # fsencode, as the OS gave it: a secret with undecodable bytes still round-trips.
        secret=os.fsencode(secret) if secret is not None else None,
        source=launcher.source,
    )


__all__ = ["LaunchEnv", "read_insecure", "read_launch_env", "read_timeout"]
