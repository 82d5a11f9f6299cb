"""Read a rank's place in the world from the environment its launcher set.

Launchers, first match wins (a launcher matches when its rank or size variable is set)::

    source     rank / size                                  local rank / local size
    torchrun   RANK / WORLD_SIZE                            LOCAL_RANK / LOCAL_WORLD_SIZE
    openmpi    OMPI_COMM_WORLD_RANK / OMPI_COMM_WORLD_SIZE  OMPI_COMM_WORLD_LOCAL_RANK / _LOCAL_SIZE
    mpich      PMI_RANK / PMI_SIZE                          MPI_LOCALRANKID / MPI_LOCALNRANKS
    slurm      SLURM_PROCID / SLURM_NTASKS                  SLURM_LOCALID / SLURM_TASKS_PER_NODE[SLURM_NODEID]

torchrun comes first because it is often run *inside* an MPI or SLURM allocation, whose
variables then describe the launcher's processes, not the ranks.

The store, first match wins::

    AIOCOLL_STORE                          as given
    MASTER_ADDR + MASTER_PORT              tcp://MASTER_ADDR:MASTER_PORT; under torchrun
                                           (TORCHELASTIC_* set) that is torch's own TCPStore,
                                           which ``aiocoll.launch.rendezvous`` opens as such
    slurm (srun)                           tcp://<first host of SLURM_STEP_NODELIST or
                                           SLURM_JOB_NODELIST>:<port of SLURM_JOB_ID.SLURM_STEP_ID>
    openmpi / mpich inside a Slurm job     tcp://<first host of SLURM_JOB_NODELIST>:<port of SLURM_JOB_ID>
    openmpi / mpich, every rank on 1 host  tcp://127.0.0.1:<port of the MPI job id>
    otherwise                              None (MPI across hosts: mpi4py, see rendezvous)

The port of a job id is ``10000 + (first 4 bytes of sha256(job id), big-endian) % 20000``:
below Linux's ephemeral range, the same on every rank, rarely the same for two jobs.
``derived_port`` computes it; ``python -m aiocoll.launch.env`` prints what this environment gives.

``AIOCOLL_TRANSPORT``, ``AIOCOLL_TIMEOUT``, ``AIOCOLL_JOIN_TIMEOUT`` and ``AIOCOLL_SECRET`` are
read alongside; ``AIOCOLL_TIMEOUT``, ``AIOCOLL_JOIN_TIMEOUT`` and ``AIOCOLL_INSECURE`` also
without a launcher (``read_timeout``, ``read_join_timeout``, ``read_insecure``). The job id
(``read_job_id``) namespaces file stores.

Every value is checked: a set variable that is empty, not a number, or out of range raises
ValueError naming the variable, rather than starting a world that can never meet.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import sys
from collections.abc import Iterator
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
    join_timeout: AIOCOLL_JOIN_TIMEOUT (seconds) or None.
    job_id: this job's id (``read_job_id``) or None.
    torch_store: the store is torch's TCPStore that torchrun serves (not an aiocoll store).
    store_from: where ``store`` came from: "AIOCOLL_STORE", "MASTER_ADDR", "slurm", "mpi"
        (derived from the MPI job id on one host), or None. Not compared.
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
    join_timeout: float | None = None
    job_id: str | None = None
    torch_store: bool = False
    store_from: str | None = field(default=None, compare=False)


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


def _explicit_store(environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    store = _get(environ, "AIOCOLL_STORE")
    if store is not None:
        try:
            parse_store_url(store)
        except ValueError as exc:
            raise ValueError(f"AIOCOLL_STORE: {exc}") from None
        return store, "AIOCOLL_STORE"
    addr = _get(environ, "MASTER_ADDR")
    port = _int(environ, "MASTER_PORT")
    if addr is None and port is None:
        return None, None
    if addr is None:
        raise ValueError("MASTER_PORT is set but MASTER_ADDR is not")
    if port is None:
        raise ValueError("MASTER_ADDR is set but MASTER_PORT is not")
    _in_range("MASTER_PORT", port, 1, 65535)
    return _tcp_url("MASTER_ADDR", addr, port), "MASTER_ADDR"


def _tcp_url(name: str, addr: str, port: int) -> str:
    if ":" in addr and not addr.startswith("["):
        addr = f"[{addr}]"  # an IPv6 literal needs brackets in a URL
    url = f"tcp://{addr}:{port}"
    try:
        parse_store_url(url)
    except ValueError:
        raise ValueError(f"{name}={addr!r} is not a host name or address") from None
    return url


def _store(
    environ: Mapping[str, str], source: str, world_size: int, local_world_size: int | None
) -> tuple[str | None, str | None]:
    store, origin = _explicit_store(environ)
    if store is not None or source == "torchrun":
        return store, origin
    if source == "slurm":
        nodes = _get(environ, "SLURM_STEP_NODELIST") or _get(environ, "SLURM_JOB_NODELIST")
        job = _slurm_job(environ, step=True)
        if nodes is not None and job is not None:
            return _tcp_url("SLURM_JOB_NODELIST", first_host(nodes), derived_port(job)), "slurm"
        return None, None
    # MPI: inside a Slurm allocation, the ranks are on its nodes and the first of them runs
    # rank 0 (mpirun's default mapping). The step is left out: mpirun's remote daemons run in a
    # step of their own, while the ranks on mpirun's node see the batch step.
    nodes = _get(environ, "SLURM_JOB_NODELIST")
    job = _slurm_job(environ, step=False)
    if nodes is not None and job is not None:
        return _tcp_url("SLURM_JOB_NODELIST", first_host(nodes), derived_port(job)), "slurm"
    mpi_job = _mpi_job(environ)
    if mpi_job is not None and local_world_size == world_size:
        return f"tcp://127.0.0.1:{derived_port(mpi_job)}", "mpi"
    return None, None


def _slurm_job(environ: Mapping[str, str], *, step: bool) -> str | None:
    job = _get(environ, "SLURM_JOB_ID") or _get(environ, "SLURM_JOBID")
    if job is None:
        return None
    if step:
        # Steps of one job may run at once (srun ... & srun ... &): each is its own world.
        job = f"{job}.{_get(environ, 'SLURM_STEP_ID') or _get(environ, 'SLURM_STEPID') or 0}"
    return job


def _mpi_job(environ: Mapping[str, str]) -> str | None:
    # PMIX_NAMESPACE: Open MPI 5 (PRRTE) and PMIx launchers; the ess jobid: Open MPI 4.
    return _get(environ, "PMIX_NAMESPACE") or _get(environ, "OMPI_MCA_ess_base_jobid")


def derived_port(job_id: str) -> int:
    """The store port of a job whose launcher names no store: 10000 + sha256(job_id) % 20000.

    The same on every rank of the job; below Linux's ephemeral port range (32768-60999), so
    an outgoing connection does not hold it.
    """
    digest = hashlib.sha256(job_id.encode("utf-8", "surrogateescape")).digest()
    return 10000 + int.from_bytes(digest[:4], "big") % 20000


# One item of a Slurm hostlist: a prefix, then bracketed ranges and more text, e.g. "gpu[01-04,07]".
_HOST_ITEM = re.compile(r"([^\[\],]*)\[([^\]]*)\]")


def expand_hostlist(hostlist: str) -> Iterator[str]:
    """The hosts of a Slurm hostlist, in order: ``"node[01-02,07],login"`` gives node01,
    node02, node07, login. Zero padding is kept; several brackets in one name expand as a
    product (``"r[1-2]n[1-2]"``: r1n1, r1n2, r2n1, r2n2). A generator: a large list costs
    nothing until read.

    Raises:
        ValueError: unbalanced brackets or a range that is not ``a`` or ``a-b`` with a <= b.
    """
    for item in _split_top(hostlist):
        yield from _expand_item(item, hostlist)


def first_host(hostlist: str) -> str:
    """The first host of a Slurm hostlist (see ``expand_hostlist``).

    Raises:
        ValueError: the list is malformed or empty.
    """
    for host in expand_hostlist(hostlist):
        return host
    raise ValueError(f"hostlist {hostlist!r} names no host")


def _split_top(hostlist: str) -> Iterator[str]:
    # Commas separate hosts only outside brackets: "n[1,3],m2" is two items.
    depth, start = 0, 0
    for i, ch in enumerate(hostlist):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"hostlist {hostlist!r} has nested brackets")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"hostlist {hostlist!r} has an unmatched ']'")
        elif ch == "," and depth == 0:
            if hostlist[start:i].strip():
                yield hostlist[start:i].strip()
            start = i + 1
    if depth != 0:
        raise ValueError(f"hostlist {hostlist!r} has an unmatched '['")
    if hostlist[start:].strip():
        yield hostlist[start:].strip()


def _expand_item(item: str, whole: str) -> Iterator[str]:
    match = _HOST_ITEM.match(item)
    if match is None:
        if "[" in item or "]" in item:
            raise ValueError(f"hostlist {whole!r}: cannot read {item!r}")
        yield item
        return
    prefix, ranges = match.group(1), match.group(2)
    rest = item[match.end():]
    for number in _expand_ranges(ranges, whole):
        for tail in _expand_item(rest, whole) if rest else iter([""]):
            yield prefix + number + tail


def _expand_ranges(ranges: str, whole: str) -> Iterator[str]:
    for part in ranges.split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"hostlist {whole!r}: {part!r} is not a number or a range a-b")
        if not dash:
            yield low
            continue
        if int(high) < int(low):
            raise ValueError(f"hostlist {whole!r}: range {part!r} runs backwards")
        width = len(low)  # "01-10" keeps two digits, as Slurm does
        for n in range(int(low), int(high) + 1):
            yield str(n).zfill(width)


def _seconds(environ: Mapping[str, str], name: str) -> float | None:
    raw = _get(environ, name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={raw!r} is out of range: must be a positive number of seconds")
    return value


def _timeout(environ: Mapping[str, str]) -> float | None:
    return _seconds(environ, "AIOCOLL_TIMEOUT")


def read_timeout(environ: Mapping[str, str] = os.environ) -> float | None:
    """AIOCOLL_TIMEOUT in seconds, or None where unset (read with or without a launcher).

    Raises:
        ValueError: set but empty, not a number, NaN, infinite, zero or negative.
    """
    return _timeout(environ)


def read_join_timeout(environ: Mapping[str, str] = os.environ) -> float | None:
    """AIOCOLL_JOIN_TIMEOUT in seconds (how long ``init`` waits for the other ranks), or None.

    Raises:
        ValueError: set but empty, not a number, NaN, infinite, zero or negative.
    """
    return _seconds(environ, "AIOCOLL_JOIN_TIMEOUT")


#: Where a job's id is read from, first set wins. TORCHELASTIC_RUN_ID is "none" unless torchrun
#: was given --rdzv-id (or --standalone, which makes a fresh one): "none" names no job.
_JOB_IDS = (
    ("AIOCOLL_JOB_ID", "aiocoll"),
    ("TORCHELASTIC_RUN_ID", "torchrun"),
    ("SLURM_JOB_ID", "slurm"),
    ("PMIX_NAMESPACE", "pmix"),
    ("OMPI_MCA_ess_base_jobid", "openmpi"),
)


def read_job_id(environ: Mapping[str, str] = os.environ) -> str | None:
    """This job's id, as ``<launcher>-<id>``, or None where no launcher names the job.

    From AIOCOLL_JOB_ID (``aiocoll run``), TORCHELASTIC_RUN_ID (torchrun), SLURM_JOB_ID with
    SLURM_STEP_ID, PMIX_NAMESPACE or OMPI_MCA_ess_base_jobid (Open MPI), first set wins. Two
    worlds with one id are one job's worlds (started one after the other, or steps of it).
    """
    for name, launcher in _JOB_IDS:
        value = environ.get(name, "").strip()
        if not value or (name == "TORCHELASTIC_RUN_ID" and value == "none"):
            continue
        if name == "SLURM_JOB_ID":
            value = _slurm_job(environ, step=True) or value
        return f"{launcher}-{value}"
    return None


def is_torchrun(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether torchrun (torch.distributed.elastic) started this process."""
    return any(name in environ for name in ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RUN_ID"))


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

    store, store_from = _store(environ, launcher.source, world_size, local_world_size)
    # Not stripped: the secret is compared byte for byte with what the store server read.
    secret = environ.get("AIOCOLL_SECRET")
    if secret == "":
        raise ValueError("AIOCOLL_SECRET is set but empty")
    return LaunchEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        store=store,
        transport=_get(environ, "AIOCOLL_TRANSPORT"),
        timeout=_timeout(environ),
        # fsencode, as the OS gave it: a secret with undecodable bytes still round-trips.
        secret=os.fsencode(secret) if secret is not None else None,
        source=launcher.source,
        join_timeout=read_join_timeout(environ),
        job_id=read_job_id(environ),
        # MASTER_* under torchrun name the TCPStore its agent serves; AIOCOLL_STORE names ours.
        torch_store=launcher.source == "torchrun" and store_from == "MASTER_ADDR" and is_torchrun(environ),
        store_from=store_from,
    )


def main() -> int:
    """``python -m aiocoll.launch.env``: print what this environment gives (never the secret)."""
    try:
        env = read_launch_env()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if env is None:
        print("no launcher recognised (rank 0 of a world of 1 unless init() is told otherwise)")
        return 0
    for name in ("source", "rank", "world_size", "local_rank", "local_world_size", "store",
                 "store_from", "torch_store", "job_id", "transport", "timeout", "join_timeout"):
        print(f"{name:17} {getattr(env, name)}")
    print(f"{'secret':17} {'set' if env.secret else 'not set'}")
    return 0


__all__ = [
    "LaunchEnv",
    "derived_port",
    "expand_hostlist",
    "first_host",
    "is_torchrun",
    "read_insecure",
    "read_job_id",
    "read_join_timeout",
    "read_launch_env",
    "read_timeout",
]

if __name__ == "__main__":
    sys.exit(main())
