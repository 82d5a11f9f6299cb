"""Shared-memory segments: files with no name, mapped by every process that holds a descriptor.

Every segment aiocoll makes (a link's ring, a group's shared segment) is a ``memfd_create``
file: it never has a name, and the process that makes it hands its descriptor to the others
over a Unix socket (``SCM_RIGHTS``). Its memory is freed when the last descriptor is closed and
the last mapping is unmapped, which the kernel does for every process that dies: a crash or a
SIGKILL at any moment leaves nothing behind, without help from a launcher.

Where memfd is missing (old kernel, seccomp) an ``O_TMPFILE`` file under /dev/shm does the
same. Only if that fails too is a named file made and unlinked at once, before its descriptor
is shared; a process killed in those microseconds leaves the name, which carries the job id and
the creator's pid (``aiocoll-<job>-<pid>-<label>-<random>``) so that ``sweep_stale`` and the
launcher's hook (``cleanup_job``) can remove it.

A mapping outlives its descriptor: the memory is freed when the last process unmaps it (or dies).
Pages are committed when first touched, so a segment costs what its users write into it.
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
#: Where POSIX shared memory lives on Linux.
SHM_DIR = Path("/dev/shm")
#: Every named segment of aiocoll starts with this.
PREFIX = "aiocoll-"
_NAME = re.compile(r"^aiocoll-([0-9A-Za-z]+)-(\d+)-([0-9A-Za-z_]+)-([0-9a-f]+)$")
_JOB = re.compile(r"^[0-9A-Za-z]{1,32}$")
#: A named segment lives for microseconds; one older than this whose creator is dead is litter.
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

    The caller owns the descriptor (close-on-exec is set). No page is committed yet.

    Raises:
        ValueError: ``label`` is not alphanumeric.
        OSError: the kernel refused (out of memory, descriptor limit).
    """
    if not re.fullmatch(r"[0-9A-Za-z_]+", label):
        raise ValueError(f"segment label must be alphanumeric, got {label!r}")
    try:
        fd = os.memfd_create(f"aiocoll-{label}", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        fd = _unnamed_file(label)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unnamed_file(label: str) -> int:
    # No memfd (old kernel, seccomp): a file of /dev/shm that is never linked...
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if tmpfile:
        try:
            return os.open(SHM_DIR, os.O_RDWR | tmpfile | os.O_CLOEXEC, 0o600)
        except OSError:
            pass
    # ...or, last, one unlinked before anyone else can see its descriptor.
    path = SHM_DIR / f"{PREFIX}{job_token()}-{os.getpid()}-{label}-{secrets.token_hex(8)}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.unlink(path)
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


def named_segments(job: str | None = None) -> Iterator[str]:
    """Names of aiocoll segments under /dev/shm (only ``job``'s when given): litter of the last
    resort of ``create_anonymous``, or of versions of aiocoll that shared group segments by name."""
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


def cleanup_job(job_id: str) -> None:
    """Remove every named segment of the finished job ``job_id`` (``aiocoll run`` calls it once
    every rank has exited).

    Segments have no names unless neither memfd nor ``O_TMPFILE`` works (see the module
    docstring); by the time this runs every rank has exited, so nobody needs one any more.
    """
    if not _JOB.match(job_id):
        return
    for name in list(named_segments(job_id)):
        with contextlib.suppress(OSError):
            os.unlink(SHM_DIR / name)


__all__ = [
    "PREFIX",
    "SHM_DIR",
    "cleanup_job",
    "create_anonymous",
    "job_token",
    "map_fd",
    "named_segments",
    "sweep_stale",
]
