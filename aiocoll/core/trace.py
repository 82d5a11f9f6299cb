"""What each rank's collectives did: a debug log line each, a flight recorder, metrics hooks.

Three views of the same records, one per collective (group, step, op, bytes, start, duration,
outcome), made where the engines begin and end a collective:

- **Debug log.** Every collective that ends is logged at DEBUG on the logger ``aiocoll.trace``:
  ``rank 1: group 'world' step 3 all_reduce 4096 B ok in 0.214 ms``. Switch it on with the
  logging level of that logger, or with ``AIOCOLL_DEBUG=1``, which also adds a handler on
  stderr when logging is not configured.
- **Flight recorder.** Each group keeps its last ``AIOCOLL_FLIGHT_RECORDER`` (default 32)
  collectives on this rank. When a collective fails, the error carries them: as a note shown
  under its traceback (``add_note``; ``str(error)`` is unchanged) and as the attribute
  ``flight_record`` (a tuple of :class:`Record`). :func:`flight_record` reads any group's.
- **Metrics.** :data:`metrics` counts calls, errors and bytes and keeps a latency histogram per
  op (``metrics.snapshot()``, plain dicts to export); :func:`add_hook` calls a function with
  every finished :class:`Record`, for a service's own exporter. Both are per process: in the
  in-process test harness they add up every rank.

The cost on the hot path is two clock reads, an append to a bounded deque and a few dict
updates per collective; nothing is formatted unless DEBUG is on or a collective fails.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..arrays.dtypes import _FROM_NUMPY, WireDtype
from .errors import CollectiveError

if TYPE_CHECKING:
    from ..groups.group import ProcessGroup

log = logging.getLogger("aiocoll.trace")

DEFAULT_FLIGHT_RECORDER = 32

_ITEMSIZE: dict[int, int] = {int(code): dt.itemsize for dt, code in _FROM_NUMPY.items()}
_ITEMSIZE[int(WireDtype.BFLOAT16)] = 2
_ITEMSIZE[int(WireDtype.BYTES)] = 1


def nbytes(dtype: int, count: int) -> int:
    """Bytes of ``count`` elements of wire dtype ``dtype`` (0 for an unknown code)."""
    return _ITEMSIZE.get(int(dtype), 0) * int(count)


@dataclass(slots=True, eq=False)
class Record:
    """One collective on one rank.

    Attributes:
        rank: this rank's global rank.
        group: the group's name.
        seq: the collective's step in the group (the same on every member).
        op: the collective, e.g. ``"all_reduce"``.
        nbytes: the bytes of its input as its frames state them (elements x item size).
        started: ``time.time()`` when it began.
        duration_s: how long it ran, or None while it runs.
        outcome: ``"running"``, ``"ok"``, ``"cancelled"`` or the error's class name.
        error: the error's message, "" unless it failed.
    """

    rank: int
    group: str
    seq: int
    op: str
    nbytes: int
    started: float
    t0: float = field(repr=False)
    duration_s: float | None = None
    outcome: str = "running"
    error: str = ""

    def describe(self, clock: bool = True) -> str:
        """One line: ``[12:00:01.250 ]step 3 all_reduce 4096 B ok in 0.214 ms``."""
        took = f" in {self.duration_s * 1e3:.3f} ms" if self.duration_s is not None else ""
        why = f": {self.error}" if self.error else ""
        when = time.strftime("%H:%M:%S", time.localtime(self.started)) + f".{int(self.started % 1 * 1000):03d}"
        return f"{when + ' ' if clock else ''}step {self.seq} {self.op} {self.nbytes} B {self.outcome}{took}{why}"


class Metrics:
    """Counts, bytes and latency histograms per op, for export (thread-safe)."""

    #: Upper bounds of the latency buckets, in seconds: 1 us, 2 us, 4 us, ... about 69 min.
    BUCKETS: tuple[float, ...] = tuple(2.0**k * 1e-6 for k in range(33))

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops: dict[str, dict[str, Any]] = {}

    def observe(self, record: Record) -> None:
        """Count one finished collective."""
        seconds = record.duration_s or 0.0
        bucket = min(max(0, int(seconds * 1e6)).bit_length(), len(self.BUCKETS) - 1)
        with self._lock:
            m = self._ops.get(record.op)
            if m is None:
                m = self._ops[record.op] = {
                    "count": 0, "errors": 0, "bytes": 0, "seconds": 0.0, "buckets": [0] * len(self.BUCKETS),
                }
            m["count"] += 1
            m["bytes"] += record.nbytes
            m["seconds"] += seconds
            if record.outcome != "ok":
                m["errors"] += 1
            m["buckets"][bucket] += 1

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per op: ``count``, ``errors``, ``bytes``, ``seconds`` (total) and ``latency``, a list of
        ``(upper bound in seconds, count)`` pairs, cumulative as Prometheus histograms are."""
        with self._lock:
            out: dict[str, dict[str, Any]] = {}
            for op, m in self._ops.items():
                running = 0
                latency = []
                for bound, n in zip(self.BUCKETS, m["buckets"]):
                    running += n
                    latency.append((bound, running))
                out[op] = {k: m[k] for k in ("count", "errors", "bytes", "seconds")} | {"latency": latency}
            return out

    def reset(self) -> None:
        """Forget everything counted so far."""
        with self._lock:
            self._ops.clear()


#: The process's metrics (see :class:`Metrics`).
metrics = Metrics()

_hooks: list[Callable[[Record], None]] = []
_recorders: weakref.WeakKeyDictionary[ProcessGroup, deque[Record]] = weakref.WeakKeyDictionary()


def add_hook(fn: Callable[[Record], None]) -> Callable[[Record], None]:
    """Call ``fn(record)`` after every collective ends on this process; usable as a decorator.

    It runs on the event loop, so it must be quick (count, enqueue); an exception in it is
    logged and does not reach the collective. Adding a function twice has no further effect.
    """
    if fn not in _hooks:
        _hooks.append(fn)
    return fn


def remove_hook(fn: Callable[[Record], None]) -> None:
    """Stop calling ``fn``; unknown functions are ignored."""
    if fn in _hooks:
        _hooks.remove(fn)


def flight_record(group: ProcessGroup) -> tuple[Record, ...]:
    """The last collectives of ``group`` on this rank, oldest first (running ones included)."""
    return tuple(_recorders.get(group, ()))


def _settings() -> tuple[bool, int]:
    """``AIOCOLL_DEBUG`` (on when set to anything but "", 0, false, no, off) and
    ``AIOCOLL_FLIGHT_RECORDER`` (collectives kept per group; 0 keeps none)."""
    debug = os.environ.get("AIOCOLL_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")
    text = os.environ.get("AIOCOLL_FLIGHT_RECORDER", "").strip()
    try:
        keep = int(text) if text else DEFAULT_FLIGHT_RECORDER
    except ValueError:
        raise ValueError(f"AIOCOLL_FLIGHT_RECORDER must be a whole number of collectives, got {text!r}") from None
    if keep < 0:
        raise ValueError(f"AIOCOLL_FLIGHT_RECORDER must be >= 0, got {keep}")
    return debug, keep


_debug, _keep = _settings()
if _debug:
    log.setLevel(logging.DEBUG)
    if not log.handlers and not logging.getLogger().handlers:
        _handler = logging.StreamHandler(sys.stderr)
        _handler.setFormatter(logging.Formatter("%(asctime)s aiocoll %(message)s"))
        log.addHandler(_handler)


def begin(group: ProcessGroup, seq: int, op: str, size: int) -> Record:
    """Record that collective ``seq`` (``op``, ``size`` bytes) of ``group`` begins here."""
    record = Record(group.world.rank, group.name, seq, op, size, time.time(), time.perf_counter())
    if _keep:
        kept = _recorders.get(group)
        if kept is None:
            kept = _recorders[group] = deque(maxlen=_keep)
        kept.append(record)
    return record


def end(record: Record, exc: BaseException | None = None) -> None:
    """Record that the collective ended (with ``exc`` if it failed); on a CollectiveError, attach
    the group's flight record to it."""
    record.duration_s = time.perf_counter() - record.t0
    if exc is None:
        record.outcome = "ok"
    elif isinstance(exc, BaseException) and not isinstance(exc, Exception):
        record.outcome = "cancelled" if type(exc).__name__ == "CancelledError" else type(exc).__name__
    else:
        record.outcome = type(exc).__name__
        record.error = str(exc)[:500]
    metrics.observe(record)
    for hook in list(_hooks):
        try:
            hook(record)
        except Exception:
            log.exception("aiocoll: metrics hook %r failed", hook)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("rank %d: group %r %s", record.rank, record.group, record.describe(clock=False))
    if isinstance(exc, CollectiveError) and getattr(exc, "flight_record", None) is None:
        kept = tuple(k for k in _recorders_of(record))
        exc.flight_record = kept  # type: ignore[attr-defined]
        lines = "\n".join("  " + r.describe() for r in kept)
        exc.add_note(f"last {len(kept)} collectives of group {record.group!r} on rank {record.rank} "
                     f"(AIOCOLL_FLIGHT_RECORDER):\n{lines}")


def _recorders_of(record: Record) -> tuple[Record, ...]:
    for kept in list(_recorders.values()):
        if kept and record in kept:
            return tuple(kept)
    return (record,)


__all__ = ["Metrics", "Record", "add_hook", "flight_record", "metrics", "nbytes", "remove_hook"]
