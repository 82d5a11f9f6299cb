"""Shared-memory segments: anonymous ones passed as file descriptors, named ones that live briefly.

Two kinds, both mapped ``MAP_SHARED`` and both gone from the file system by the time data flows:

- **Anonymous** (``create_anonymous``): a ``memfd_create`` file that never has a name. The shm
  transport hands its descriptor to the peer over a Unix socket (``SCM_RIGHTS``), so nothing can
  leak whatever happens to either process. Where memfd is missing, a file under /dev/shm is
  created and unlinked at once, before its descriptor is shared.
- **Named** (``create_named`` / ``open_named``): a file under /dev/shm that the members of a group
  open by name. The name exists only until every member has mapped it; then the creator unlinks
  it (``unlink_named``). A member that crashes in that window leaves the name behind, so names
  carry the job id and the creator's pid: ``aiocoll-<job>-<pid>-<label>-<random>``. The launcher
  removes a finished job's names (``cleanup_job``, a hook for ``aiocoll run``), surviving members
  remove a name when setup fails, and ``sweep_stale`` removes names whose creator is dead.

A mapping outlives its name and its descriptor: the memory is freed when the last process
unmaps it (or dies).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._launcher import LaunchInfo

#: Where POSIX shared memory lives on Linux.
SHM_DIR = Path("/dev/shm")
#: Every named segment of aiocoll starts with this.
PREFIX = "aiocoll-"
_NAME = re.compile(r"^aiocoll-([0-9A-Za-z]+)-(\d+)-([0-9A-Za-z_]+)-([0-9a-f]+)$")
_JOB = re.compile(r"^[0-9A-Za-z]{1,32}$")
#: A named segment lives for milliseconds; one older than this whose creator is dead is litter.
STALE_AGE_S = 60.0


def job_token() -> str:
    """The job id that named segments carry: ``AIOCOLL_JOB_ID`` when set (``aiocoll run`` sets
    it), else ``"nojob"``."""
    job = os.environ.get("AIOCOLL_JOB_ID", "")
    return job if _JOB.match(job) else "nojob"


def _map(fd: int, size: int, populate: bool) -> mmap.mmap:
    # Populating costs the page faults up front, where they do not disturb a timed collective;
    # memory that may never be touched (a ring of a quiet link) is left to fault in lazily.
    flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def create_anonymous(size: int, label: str) -> int:
    """A new zero-filled shared-memory file of ``size`` bytes with no name; returns its descriptor.

    The caller owns the descriptor (close-on-exec is set).

    Raises:
        OSError: the kernel refused (out of memory, descriptor limit).
    """
    try:
        fd = os.memfd_create(f"aiocoll-{label}", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        # No memfd (old kernel, seccomp): a /dev/shm file that is unlinked before anyone else
        # can see its descriptor has the same lifetime.
        path = SHM_DIR / f"{PREFIX}{job_token()}-{os.getpid()}-{label}-{secrets.token_hex(8)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.unlink(path)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_fd(fd: int, size: int, *, populate: bool = False) -> mmap.mmap:
    """Map ``size`` bytes (0: all) of the shared-memory file ``fd`` read-write and shared;
    ``populate`` maps every page now.

    Raises:
        ValueError: the file is smaller than ``size`` (a peer lied or truncated it).
        OSError: mmap failed.
    """
    actual = os.fstat(fd).st_size
    if actual < size or actual == 0:
        raise ValueError(f"shared segment holds {actual} bytes, {size or 'some'} expected")
    return _map(fd, size or actual, populate)


def create_named(label: str, size: int) -> tuple[str, mmap.mmap]:
    """Create and map a new named segment under /dev/shm; return (name, mapping).

    The caller must ``unlink_named(name)`` once every user has opened it.

    Raises:
        OSError: /dev/shm is missing or full.
    """
    if not re.fullmatch(r"[0-9A-Za-z_]+", label):
        raise ValueError(f"segment label must be alphanumeric, got {label!r}")
    name = f"{PREFIX}{job_token()}-{os.getpid()}-{label}-{secrets.token_hex(8)}"
    fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        return name, _map(fd, size, True)
    except BaseException:
        unlink_named(name)
        raise
    finally:
        os.close(fd)


def open_named(name: str, size: int = 0) -> mmap.mmap:
    """Map ``size`` bytes (0: all) of the named segment ``name`` (made by ``create_named``).

    Raises:
        ValueError: ``name`` is not an aiocoll segment name, or the segment is too small.
        FileNotFoundError: the segment does not exist (any more).
    """
    if not _NAME.match(name):
        raise ValueError(f"not an aiocoll segment name: {name!r}")
    fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CLOEXEC)
    try:
        return map_fd(fd, size, populate=True)
    finally:
        os.close(fd)


def unlink_named(name: str) -> bool:
    """Remove the name ``name`` from /dev/shm; True if it was there. Mappings stay valid."""
    if not _NAME.match(name):
        raise ValueError(f"not an aiocoll segment name: {name!r}")
    try:
        os.unlink(SHM_DIR / name)
    except FileNotFoundError:
        return False
    return True


def named_segments(job: str | None = None) -> Iterator[str]:
    """Names of aiocoll segments under /dev/shm (only ``job``'s when given)."""
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return
    for entry in entries:
        m = _NAME.match(entry)
        if m and (job is None or m.group(1) == job):
            yield entry


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(min_age_s: float = STALE_AGE_S) -> list[str]:
    """Remove named segments whose creator process is gone and that are older than ``min_age_s``.

    Returns the names removed. Only files this user may delete are touched.
    """
    removed = []
    now = time.time()
    for name in named_segments():
        m = _NAME.match(name)
        assert m is not None
        if _alive(int(m.group(2))):
            continue
        with contextlib.suppress(OSError):
            if now - os.stat(SHM_DIR / name).st_mtime < min_age_s:
                continue
            os.unlink(SHM_DIR / name)
            removed.append(name)
    return removed


def cleanup_job(info: LaunchInfo) -> None:
    """Launcher hook: remove every named segment of the finished job ``info.job_id``.

    A rank killed between creating a group segment and the other members mapping it leaves the
    name behind; by the time this runs every rank has exited, so nobody needs it any more.
    """
    if not _JOB.match(info.job_id):
        return
    for name in list(named_segments(info.job_id)):
        with contextlib.suppress(OSError):
            os.unlink(SHM_DIR / name)


__all__ = [
    "PREFIX",
    "SHM_DIR",
    "cleanup_job",
    "create_anonymous",
    "create_named",
    "job_token",
    "map_fd",
    "named_segments",
    "open_named",
    "sweep_stale",
    "unlink_named",
]
