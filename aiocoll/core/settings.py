"""One world's tuning: every knob of the engines and algorithms in one object.

A world reads its settings once, when ``init`` runs: ``init(settings=Settings(...))``, or, left
out, ``Settings.from_env()``. Each field has an ``AIOCOLL_*`` variable (the table ``VARIABLES``;
README lists it); a malformed variable raises at ``init`` naming it. Nothing here is module
state: two worlds in one process (tests, ``aiocoll.testing.run_ranks``) can differ.

Settings that decide which path a collective takes (the algorithm table, the shared-memory
engine and its sizes) must be the same on every member: a member that chose differently is
reported as a mismatch or a timeout, never as a wrong value. ``aiocoll run`` passes its
environment to every rank.

Where to begin, start, connect and authenticate (store, transport, timeout, secret, host) are
``init``'s own arguments, with their variables read where ``init`` resolves them
(``aiocoll.launch.env``); README's table lists those too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from ..algorithms.select import ALGORITHMS, check_choice

#: Collectives the shared-memory engine runs (a minimum size can be set for each).
SHM_COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")

_ON = ("1", "on", "true", "yes", "auto")
_OFF = ("0", "off", "false", "no")


@dataclass(frozen=True)
class Settings:
    """How one world runs its collectives. Every field has a default; see ``VARIABLES``.

    Attributes:
        algorithms: collective -> algorithm for message passing, e.g. ``{"all_reduce": "ring"}``
            (``AIOCOLL_ALGO_<COLLECTIVE>``); choices in ``aiocoll.algorithms.ALGORITHMS``.
        shm_engine: run same-host groups' collectives on the shared-memory engine
            (``AIOCOLL_SHM_FASTPATH``, on by default).
        shm_engine_min_bytes: collective -> smallest per-member payload the engine takes
            (``AIOCOLL_SHM_FASTPATH_MIN_<COLLECTIVE>``; default 0: every size).
        shm_part_bytes: bytes each member owns per pipeline round (``AIOCOLL_SHM_PART_BYTES``;
            0: chosen from the group's size).
        shm_depth: slots of the pipelines, 3 to 8 (``AIOCOLL_SHM_DEPTH``): fewer cannot work,
            since the all_reduce pipeline keeps three rounds in flight.
        shm_direct_max: payloads up to this size use the one-round algorithms
            (``AIOCOLL_SHM_DIRECT_MAX``).
        shm_thread_min: operations from this size run in the engine's worker thread
            (``AIOCOLL_SHM_THREAD_MIN``; default: never).
        shm_spin_us: how long a waiting member spins before it sleeps, in microseconds
            (``AIOCOLL_SHM_SPIN_US``; 0: never spin). Spinning is also off when the group has
            more members than this process may use cores, and for ranks that share one process.
        shm_spin_yield: yield the CPU between polls while spinning (``AIOCOLL_SHM_SPIN_YIELD``).
        gpu_transport: ``auto`` starts ucx beside the host transports for CUDA payloads when
            ucxx and a CUDA driver are present (with ``transport="auto"``); ``off`` stages CUDA
            arrays through host memory (``AIOCOLL_GPU_TRANSPORT``).
        gpu_direct_min_bytes: CUDA payloads from this many bytes per member move device to
            device; smaller ones are faster staged through the host
            (``AIOCOLL_GPU_DIRECT_MIN_BYTES``).
    """

    algorithms: Mapping[str, str] = field(default_factory=dict)
    shm_engine: bool = True
    shm_engine_min_bytes: Mapping[str, int] = field(default_factory=dict)
    shm_part_bytes: int = 0
    shm_depth: int = 4
    shm_direct_max: int = 32 << 10
    shm_thread_min: int = 1 << 62
    shm_spin_us: float = 200.0
    shm_spin_yield: bool = True
    gpu_transport: str = "auto"
    gpu_direct_min_bytes: int = 256 << 10

    def __post_init__(self) -> None:
        for name, algorithm in self.algorithms.items():
            check_choice(name, algorithm, "Settings.algorithms: ")
        for name, value in self.shm_engine_min_bytes.items():
            if name not in SHM_COLLECTIVES:
                raise ValueError(f"Settings.shm_engine_min_bytes: the shm engine runs no {name!r}; it runs "
                                 f"{', '.join(SHM_COLLECTIVES)}")
            _non_negative(f"shm_engine_min_bytes[{name!r}]", value)
        if self.gpu_transport not in ("auto", "off"):
            raise ValueError(f"Settings.gpu_transport must be 'auto' or 'off', got {self.gpu_transport!r}")
        _non_negative("gpu_direct_min_bytes", self.gpu_direct_min_bytes)
        _non_negative("shm_part_bytes", self.shm_part_bytes)
        _non_negative("shm_direct_max", self.shm_direct_max)
        _non_negative("shm_thread_min", self.shm_thread_min)
        if isinstance(self.shm_depth, bool) or not isinstance(self.shm_depth, int) or not 3 <= self.shm_depth <= 8:
            # 3: the all_reduce pipeline keeps three rounds in flight (aiocoll.engines.shm.layout.MIN_DEPTH);
            # 8: the descriptor slots of a member's control block.
            raise ValueError(f"Settings.shm_depth must be an integer from 3 to 8, got {self.shm_depth!r}")
        if not isinstance(self.shm_spin_us, (int, float)) or not 0 <= self.shm_spin_us < 1e7:
            raise ValueError(f"Settings.shm_spin_us must be a number of microseconds >= 0, got {self.shm_spin_us!r}")
        # Frozen all the way down: a world's settings cannot change under running collectives.
        object.__setattr__(self, "algorithms", MappingProxyType(dict(self.algorithms)))
        object.__setattr__(self, "shm_engine_min_bytes", MappingProxyType(dict(self.shm_engine_min_bytes)))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``AIOCOLL_*`` variables (``environ``: default ``os.environ``), then
        ``overrides`` (field=value) on top.

        Raises:
            ValueError: a malformed variable (the message names it) or override.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        algos = {}
        for name in ALGORITHMS:
            raw = env.get(f"AIOCOLL_ALGO_{name.upper()}", "").strip()
            if raw:
                check_choice(name, raw, f"AIOCOLL_ALGO_{name.upper()}: ")
                algos[name] = raw
        values["algorithms"] = algos
        raw = env.get("AIOCOLL_SHM_FASTPATH", "").strip().lower()
        if raw:
            values["shm_engine"] = _flag("AIOCOLL_SHM_FASTPATH", raw)
        mins = {}
        for name in SHM_COLLECTIVES:
            var = f"AIOCOLL_SHM_FASTPATH_MIN_{name.upper()}"
            if env.get(var, "").strip():
                mins[name] = _int(var, env[var])
        values["shm_engine_min_bytes"] = mins
        for var, attr in (("AIOCOLL_SHM_PART_BYTES", "shm_part_bytes"), ("AIOCOLL_SHM_DEPTH", "shm_depth"),
                          ("AIOCOLL_SHM_DIRECT_MAX", "shm_direct_max"), ("AIOCOLL_SHM_THREAD_MIN", "shm_thread_min")):
            if env.get(var, "").strip():
                values[attr] = _int(var, env[var])
        raw = env.get("AIOCOLL_SHM_SPIN_US", "").strip()
        if raw:
            try:
                values["shm_spin_us"] = float(raw)
            except ValueError:
                raise ValueError(f"AIOCOLL_SHM_SPIN_US={raw!r} is not a number of microseconds") from None
        raw = env.get("AIOCOLL_SHM_SPIN_YIELD", "").strip().lower()
        if raw:
            values["shm_spin_yield"] = _flag("AIOCOLL_SHM_SPIN_YIELD", raw)
        raw = env.get("AIOCOLL_GPU_TRANSPORT", "").strip().lower()
        if raw:
            if raw in _OFF:
                raw = "off"
            if raw not in ("auto", "off"):
                raise ValueError(f"AIOCOLL_GPU_TRANSPORT={raw!r}: use auto or off")
            values["gpu_transport"] = raw
        if env.get("AIOCOLL_GPU_DIRECT_MIN_BYTES", "").strip():
            values["gpu_direct_min_bytes"] = _int("AIOCOLL_GPU_DIRECT_MIN_BYTES", env["AIOCOLL_GPU_DIRECT_MIN_BYTES"])
        known = {f.name for f in fields(cls)}
        for key in overrides:
            if key not in known:
                raise ValueError(f"Settings has no field {key!r}; fields: {', '.join(sorted(known))}")
        values.update(overrides)
        try:
            return cls(**values)
        except ValueError as exc:
            raise ValueError(f"{exc} (from the AIOCOLL_* environment or the overrides)") from None


def _non_negative(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Settings.{what} must be an integer >= 0, got {value!r}")


def _int(var: str, raw: str) -> int:
    try:
        return int(raw.strip(), 0)
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not an integer") from None


def _flag(var: str, raw: str) -> bool:
    if raw in _ON:
        return True
    if raw in _OFF:
        return False
    raise ValueError(f"{var}={raw!r}: use on or off")


#: Every variable aiocoll reads: (name, default, meaning, read by). README's table is checked
#: against it. Those read by ``Settings.from_env`` end up in the world's ``Settings``.
VARIABLES: tuple[tuple[str, str, str, str], ...] = (
    ("AIOCOLL_TRANSPORT", "auto", "init's transport: auto, tcp, shm, ucx, inproc or a plugin's name", "init"),
    ("AIOCOLL_STORE", "from MASTER_ADDR/MASTER_PORT", "init's store: tcp://host:port or file:///path", "init"),
    ("AIOCOLL_TIMEOUT", "60", "default seconds for every collective and for meeting the other ranks", "init"),
    ("AIOCOLL_SECRET", "none (aiocoll run makes one per job)", "shared secret that authenticates the store and every connection", "init, the store"),
    ("AIOCOLL_INSECURE", "0", "1: start without a shared secret (anyone who reaches the store can join)", "init"),
    ("AIOCOLL_HOST", "the routed interface", "address to listen on and advertise", "init (launch.address)"),
    ("AIOCOLL_IFNAME", "unset", "interface(s) to listen on, NCCL_SOCKET_IFNAME syntax (e.g. eth0, ^docker)",
     "init (launch.address)"),
    ("AIOCOLL_JOIN_TIMEOUT", "300", "seconds init waits for the store and the other ranks", "init"),
    ("AIOCOLL_JOB_ID", "set by aiocoll run", "names this job's shared-memory objects, for cleanup", "aiocoll run (sets it), shm segments"),
    ("AIOCOLL_TCP_BULK_BYTES", "262144", "tcp frames from this size move on a thread per connection (0: never)",
     "the tcp transport"),
    ("AIOCOLL_GPU_TRANSPORT", "auto", "auto: ucx beside the host transports for CUDA payloads when ucxx and CUDA are "
     "present; off: stage CUDA arrays through host memory", "Settings.from_env (init)"),
    ("AIOCOLL_GPU_DIRECT_MIN_BYTES", "262144", "CUDA payloads from this size per member move device to device",
     "Settings.from_env (init)"),
    ("AIOCOLL_PINNED_POOL_BYTES", "2 GiB", "most idle pinned host memory kept for staging CUDA arrays",
     "the CUDA staging pool"),
    ("AIOCOLL_DEBUG", "off", "1: a debug line per collective on the aiocoll.trace logger", "aiocoll.core.trace"),
    ("AIOCOLL_FLIGHT_RECORDER", "32", "collectives each group's flight recorder keeps (0: none)", "aiocoll.core.trace"),
    ("AIOCOLL_LOOP", "uvloop if installed", "event loop for aiocoll run and the sync API: asyncio or uvloop", "aiocoll run, sync API"),
    ("AIOCOLL_ALGO_<COLLECTIVE>", "by size", "force an algorithm: " + "; ".join(
        f"{k.upper()}: {'/'.join(v)}" for k, v in ALGORITHMS.items()), "Settings.from_env (init)"),
    ("AIOCOLL_SHM_FASTPATH", "on", "run same-host groups on the shared-memory engine", "Settings.from_env (init)"),
    ("AIOCOLL_SHM_FASTPATH_MIN_<COLLECTIVE>", "0", "smallest per-member bytes the shm engine takes (ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, BROADCAST)", "Settings.from_env (init)"),
    ("AIOCOLL_SHM_PART_BYTES", "by group size", "bytes each member owns per shm pipeline round", "Settings.from_env (init)"),
    ("AIOCOLL_SHM_DEPTH", "4", "shm pipeline slots, 3 to 8 (rounds in flight)", "Settings.from_env (init)"),
    ("AIOCOLL_SHM_DIRECT_MAX", "32768", "shm payloads up to this size use one-round algorithms", "Settings.from_env (init)"),
    ("AIOCOLL_SHM_THREAD_MIN", "never", "shm operations from this size run in the engine's worker thread", "Settings.from_env (init)"),
    ("AIOCOLL_SHM_SPIN_US", "200", "microseconds a waiting shm member spins before sleeping (0: never)", "Settings.from_env (init)"),
    ("AIOCOLL_SHM_SPIN_YIELD", "on", "yield the CPU between polls while spinning", "Settings.from_env (init)"),
)

__all__ = ["SHM_COLLECTIVES", "Settings", "VARIABLES"]
