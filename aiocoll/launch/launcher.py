"""Start N local ranks of one Python program and supervise them until all have exited.

``aiocoll run`` is a thin shell over :func:`launch`. What the launcher promises:

- Every rank gets the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) plus ``AIOCOLL_SECRET`` (shared by the
  ranks of one job), ``AIOCOLL_JOB_ID``, ``AIOCOLL_TRANSPORT``/``AIOCOLL_TIMEOUT`` when given, and
  ``PYTHONUNBUFFERED=1`` so that output arrives as it is written.
- Output is relayed one whole line at a time with a ``[rank] `` prefix: stdout to stdout, stderr
  to stderr. Lines of different ranks never mix within a line.
- The first rank to exit non-zero (or die by a signal) stops the job: the other ranks get SIGTERM,
  then SIGKILL ``grace`` seconds later, and the launcher reports that rank and returns its exit
  code (``128 + signal`` for a signal).
- SIGINT or SIGTERM sent to the launcher is forwarded to every rank (a second one kills them).
- Nothing outlives the launcher: each rank leads its own process group, and every group is
  emptied (SIGTERM, then SIGKILL after ``grace``) before :func:`launch` returns, including
  processes that a rank started and left behind. The one exception is a launcher that is itself
  SIGKILLed; nothing in-process can help there.
- After every rank has exited, the functions given to :func:`register_cleanup` run with a
  :class:`LaunchInfo`, so that transports can remove what a killed rank could not (shared-memory
  segments named after the job id, for instance).

Ranks read their stdin from ``/dev/null``: N processes sharing one terminal cannot read it sensibly.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TextIO, cast

from ..core.auth import new_secret

__all__ = [
    "LaunchInfo",
    "LaunchResult",
    "check_transport",
    "launch",
    "register_cleanup",
    "run_launch",
    "unregister_cleanup",
]

logger = logging.getLogger(__name__)

# A line longer than this is relayed in pieces rather than buffered without bound (a rank that
# dumps binary data to stdout must not exhaust the launcher's memory).
MAX_LINE = 1 << 20

# How often a process group is probed while waiting for it to empty.
_POLL_S = 0.02


@dataclass(frozen=True)
class LaunchInfo:
    """What cleanup hooks learn about a finished job.

    Attributes:
        job_id: random token of this job, also given to every rank as ``AIOCOLL_JOB_ID``.
        pids: process id of each rank, indexed by rank (fewer if starting a rank failed).
        returncodes: each rank's return code as asyncio reports it (negative: killed by that
            signal), or None for a rank whose exit was not observed.
    """

    job_id: str
    pids: tuple[int, ...]
    returncodes: tuple[int | None, ...]


@dataclass(frozen=True)
class LaunchResult:
    """The outcome of :func:`launch`.

    Attributes:
        exit_code: what the launcher should exit with: 0 when every rank succeeded, the first
            failing rank's exit code (``128 + signal`` if a signal killed it), or
            ``128 + signal`` when the launcher itself was interrupted.
        job_id: the job's ``AIOCOLL_JOB_ID``.
        pids: process id of each rank.
        returncodes: each rank's return code (negative: killed by that signal).
        failed_rank: the first rank seen to fail, or None.
        interrupted_by: the signal that interrupted the launcher, or None.
        message: the one-line report written to stderr, or None on success.
    """

    exit_code: int
    job_id: str
    pids: tuple[int, ...]
    returncodes: tuple[int | None, ...]
    failed_rank: int | None = None
    interrupted_by: signal.Signals | None = None
    message: str | None = None


_cleanup_hooks: list[Callable[[LaunchInfo], None]] = []


def register_cleanup(fn: Callable[[LaunchInfo], None]) -> Callable[[LaunchInfo], None]:
    """Call ``fn(info)`` after the ranks of every later job have exited; usable as a decorator.

    Hooks run in registration order, in the launcher's process and event-loop thread, even when
    the job failed or was interrupted. An exception in a hook is logged and does not stop the
    other hooks. Registering the same function twice has no further effect.
    """
    if fn not in _cleanup_hooks:
        _cleanup_hooks.append(fn)
    return fn


def unregister_cleanup(fn: Callable[[LaunchInfo], None]) -> None:
    """Forget a hook given to :func:`register_cleanup`; unknown functions are ignored."""
    with contextlib.suppress(ValueError):
        _cleanup_hooks.remove(fn)


def _remove_segments_of(cleanup: Callable[[str], None]) -> Callable[[LaunchInfo], None]:
    """The cleanup hook for shared-memory segments (registered once: the same function each time)."""
    global _segment_hook
    if _segment_hook is None:

        def hook(info: LaunchInfo) -> None:
            cleanup(info.job_id)

        _segment_hook = hook
    return _segment_hook


_segment_hook: Callable[[LaunchInfo], None] | None = None


def _run_cleanup_hooks(info: LaunchInfo) -> None:
    for hook in list(_cleanup_hooks):
        try:
            hook(info)
        except Exception:
            logger.exception("aiocoll run: cleanup hook %r failed for job %s", hook, info.job_id)


def check_transport(name: str) -> None:
    """Refuse a transport that no rank could use, before any rank starts.

    Every rank would fail in ``init`` otherwise, each with its own traceback, and the others'
    secondary errors (a store that went away) can hide the one that says why.

    Raises:
        ValueError: ``name`` is unknown (the message lists the known ones), cannot load here
            (its missing dependency is named), or runs ranks in one process (``inproc``).
    """
    if name == "auto":
        return
    if name == "inproc":
        raise ValueError(
            "transport 'inproc' connects ranks that are tasks of one process; aiocoll run starts "
            "one process per rank: use auto, shm or tcp (or aiocoll.testing for inproc)"
        )
    from ..transports import get_transport

    try:
        get_transport(name)
    except ImportError as exc:
        raise ValueError(f"transport {name!r} cannot load here: {exc}") from None


def _free_port(host: str) -> int:
    # Rank 0 binds this port moments later; the gap is the same race torchrun accepts.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _rank_environments(
    base: Mapping[str, str],
    nprocs: int,
    *,
    port: int,
    job_id: str,
    transport: str | None,
    timeout: float | None,
) -> list[dict[str, str]]:
    common = dict(base)
    common.update(
        WORLD_SIZE=str(nprocs),
        LOCAL_WORLD_SIZE=str(nprocs),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        AIOCOLL_SECRET=base.get("AIOCOLL_SECRET") or new_secret().decode(),
        AIOCOLL_JOB_ID=job_id,
        PYTHONUNBUFFERED="1",
    )
    if transport is not None:
        common["AIOCOLL_TRANSPORT"] = transport
    if timeout is not None:
        common["AIOCOLL_TIMEOUT"] = repr(float(timeout))
    # Nothing is added to PYTHONPATH: ranks import the aiocoll this launcher runs because it is
    # installed (the one way transports/ becomes aiocoll.transports). Adding the package's own
    # folder, as a checkout fallback once did, would shadow top-level names such as ``torch``.
    return [dict(common, RANK=str(r), LOCAL_RANK=str(r)) for r in range(nprocs)]


class _Sink:
    """Where relayed bytes go; one synchronous write and flush per batch of whole lines.

    Bytes pass through untouched wherever the stream has a binary side; a text-only stream
    gets them decoded, with undecodable bytes escaped. A closed reader downstream
    (``aiocoll run ... | head``) must not stop the job, so a broken pipe silences the sink.
    """

    def __init__(self, stream: IO[bytes] | TextIO) -> None:
        self._binary: IO[bytes] | None = None
        self._text: TextIO | None = None
        if isinstance(stream, io.TextIOBase):
            buffer = getattr(stream, "buffer", None)
            if buffer is not None:
                # What was printed through the text side must come out before relayed lines.
                stream.flush()
                self._binary = cast("IO[bytes]", buffer)
            else:
                self._text = cast(TextIO, stream)
        else:
            self._binary = cast("IO[bytes]", stream)
        self._broken = False

    def write(self, data: bytes) -> None:
        if self._broken or not data:
            return
        try:
            if self._binary is not None:
                self._binary.write(data)
                self._binary.flush()
            elif self._text is not None:
                self._text.write(data.decode("utf-8", "backslashreplace"))
                self._text.flush()
        except (BrokenPipeError, ValueError):
            # ValueError: the stream was closed under us; the same remedy applies.
            self._broken = True


class _LineRelay:
    """Cuts one pipe's bytes into whole lines and writes each batch with the rank's prefix.

    A carriage return ends a piece too: a progress bar redraws its line with ``\\r`` and no
    newline, and held back until a newline it would show only when finished (and then as one
    line of every redraw, prefixed once). Each piece keeps its own ending, so the terminal
    redraws ``[rank] 40%`` in place as it would without the launcher.
    """

    def __init__(self, prefix: bytes, sink: _Sink, on_line: Callable[[bytes], None] | None = None) -> None:
        self._prefix = prefix
        self._sink = sink
        self._pending = bytearray()
        self._on_line = on_line

    def feed(self, data: bytes) -> None:
        self._pending += data
        end = max(self._pending.rfind(b"\n"), self._pending.rfind(b"\r"))
        if end == len(self._pending) - 1 and self._pending.endswith(b"\r"):
            # Perhaps the first half of a \r\n ending: wait for the next byte to tell.
            end = max(self._pending.rfind(b"\n", 0, end), self._pending.rfind(b"\r", 0, end))
        if end >= 0:
            self._emit(bytes(self._pending[: end + 1]))
            del self._pending[: end + 1]
        if len(self._pending) > MAX_LINE:
            self.flush()

    def flush(self) -> None:
        """Write out a trailing partial line, newline-terminated (at EOF, or when too long)."""
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            # A last redraw (\r) ends its line too, or the launcher's report would overwrite it.
            self._emit(data if data.endswith(b"\n") else data.removesuffix(b"\r") + b"\n")

    def _emit(self, pieces: bytes) -> None:
        """Write ``pieces`` (ending in a line ending), each piece behind the prefix."""
        out = []
        for piece, ending in _PIECE.findall(pieces):
            out.append(self._prefix + piece + ending)
            if self._on_line is not None and ending != b"\r":
                self._on_line(piece)
        self._sink.write(b"".join(out))


# A piece of output and its ending: \r\n counts as one ending, so CRLF output is not doubled.
_PIECE = re.compile(rb"([^\r\n]*)(\r\n|\n|\r)")


#: Errors that a rank raises because another rank failed first (it left, aborted the
#: collective, stopped serving the store); the launcher's report names the cause instead.
CONSEQUENCES = frozenset({
    "PeerFailureError", "RemoteAbortError", "GroupBrokenError", "HandshakeError", "StoreError",
    "TransportError", "ConnectionError", "ConnectionResetError", "ConnectionRefusedError",
    "ConnectionAbortedError", "BrokenPipeError", "KeyboardInterrupt", "CancelledError",
})

#: How long the launcher lets the other ranks run on after a rank failed with a consequence
#: (at most; ``grace`` when shorter), so that the rank whose failure caused it can report its
#: own error instead of being stopped before it prints it.
CAUSE_WAIT_S = 2.0

_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?::|$)")


class _ErrorWatch:
    """Remembers the last exception a rank's stderr showed (the line after a traceback)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._in_traceback = False
        self.error: str | None = None
        self.seen_at: float | None = None

    def line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace")
        if text.startswith("Traceback (most recent call last):"):
            self._in_traceback = True
        elif self._in_traceback and text and not text[0].isspace():
            self._in_traceback = False
            if _EXCEPTION_LINE.match(text):
                self.error = text[:300]
                self.seen_at = self._loop.time()

    @property
    def consequence(self) -> bool:
        """Whether the error is one that another rank's failure explains."""
        match = _EXCEPTION_LINE.match(self.error or "")
        return match is not None and match[1].rsplit(".", 1)[-1] in CONSEQUENCES


@dataclass(frozen=True)
class _Failure:
    rank: int
    returncode: int
    exited_at: float
    watch: _ErrorWatch | None
    stopped: bool = False  # exited after the launcher began stopping the ranks

    @property
    def consequence(self) -> bool:
        # A rank killed by a signal before the launcher sent any was not explained by anything
        # it printed; one the launcher stopped while it printed a consequence is one.
        explained = self.watch is not None and self.watch.consequence
        return explained and (self.returncode > 0 or self.stopped)

    @property
    def when(self) -> float:
        """When it failed: when its error was printed, else when it exited."""
        seen = self.watch.seen_at if self.watch is not None else None
        return self.exited_at if seen is None else min(seen, self.exited_at)


class _RankProtocol(asyncio.SubprocessProtocol):
    """Receives one rank's output and exit, as the event loop reports them (no reader tasks)."""

    def __init__(self, relays: Mapping[int, _LineRelay], loop: asyncio.AbstractEventLoop) -> None:
        self._relays = relays
        self._open = set(relays)
        self._transport: asyncio.SubprocessTransport | None = None
        # asyncio's Process.wait() also waits for the pipes to close, which a grandchild holding
        # them can postpone forever; the exit itself is what supervision needs.
        self.exited: asyncio.Future[int] = loop.create_future()
        self.pipes_closed: asyncio.Future[None] = loop.create_future()
        if not self._open:
            self.pipes_closed.set_result(None)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self._transport = transport

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        assert isinstance(data, bytes)
        self._relays[fd].feed(data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._relays[fd].flush()
        self._open.discard(fd)
        if not self._open and not self.pipes_closed.done():
            self.pipes_closed.set_result(None)

    def process_exited(self) -> None:
        assert self._transport is not None
        code = self._transport.get_returncode()
        assert code is not None
        if not self.exited.done():
            self.exited.set_result(code)


def _describe(returncode: int) -> str:
    if returncode < 0:
        sig = -returncode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "unknown signal"
        return f"signal {sig} ({name})"
    return f"exit code {returncode}"


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _ranks(ranks: Sequence[int]) -> str:
    word = "rank" if len(ranks) == 1 else "ranks"
    return f"{word} {', '.join(map(str, ranks))}"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The id now names someone else's group: ours is gone.
        return False
    return True


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class _Job:
    """One launch: the ranks, their exits, and the decision to stop them."""

    def __init__(
        self,
        cmd: list[str],
        envs: list[dict[str, str]],
        job_id: str,
        *,
        grace: float,
        prefix_output: bool,
        stdout: _Sink,
        stderr: _Sink,
    ) -> None:
        self._cmd = cmd
        self._envs = envs
        self._job_id = job_id
        self._grace = grace
        self._prefix_output = prefix_output
        self._stdout = stdout
        self._stderr = stderr
        self._loop = asyncio.get_running_loop()
        self._transports: list[asyncio.SubprocessTransport] = []
        self._protocols: list[_RankProtocol] = []
        self._pids: list[int] = []
        self._failed: tuple[int, int] | None = None
        self._failures: list[_Failure] = []
        self._watches: dict[int, _ErrorWatch] = {}
        self._stop_later: asyncio.TimerHandle | None = None
        self._stopped_at: float | None = None
        self._interrupt: signal.Signals | None = None
        self._stopped: list[int] = []
        self._killed: list[int] = []
        self._escalation: asyncio.TimerHandle | None = None

    # -- the run ----------------------------------------------------------------------------

    async def run(self, *, handle_signals: bool) -> LaunchResult:
        restore = self._install_signal_handlers() if handle_signals else None
        try:
            try:
                await self._spawn()
                await self._supervise()
                await self._empty_groups()
                await self._drain()
            except BaseException:
                # Cancelled, interrupted or failed to start: nothing we started may survive us.
                for pid in self._pids:
                    _signal_group(pid, signal.SIGKILL)
                if self._protocols:
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait([p.exited for p in self._protocols], timeout=self._grace)
                raise
            finally:
                if self._escalation is not None:
                    self._escalation.cancel()
                if self._stop_later is not None:
                    self._stop_later.cancel()
                for transport in self._transports:
                    transport.close()
                if restore is not None:
                    restore()
        finally:
            _run_cleanup_hooks(self._info())
        return self._result()

    async def _spawn(self) -> None:
        width = len(str(len(self._envs) - 1))
        pipe = subprocess.PIPE if self._prefix_output else None
        for rank, env in enumerate(self._envs):
            relays: dict[int, _LineRelay] = {}
            if self._prefix_output:
                prefix = f"[{rank:>{width}}] ".encode()
                watch = _ErrorWatch(self._loop)
                self._watches[rank] = watch
                relays = {
                    1: _LineRelay(prefix, self._stdout),
                    2: _LineRelay(prefix, self._stderr, on_line=watch.line),
                }
            protocol = _RankProtocol(relays, self._loop)
            transport, _ = await self._loop.subprocess_exec(
                lambda: protocol,
                *self._cmd,
                stdin=subprocess.DEVNULL,
                stdout=pipe,
                stderr=pipe,
                env=env,
                # Its own process group, so that one killpg reaches whatever the rank started;
                # also keeps a terminal's Ctrl-C from hitting ranks behind the launcher's back.
                start_new_session=True,
            )
            self._transports.append(transport)
            self._protocols.append(protocol)
            self._pids.append(transport.get_pid())
            if self._interrupt is not None:
                # Interrupted while this rank was starting: it is stopped like the others.
                self._stopped.append(rank)
                _signal_group(self._pids[-1], self._interrupt)

    async def _supervise(self) -> None:
        rank_of = {p.exited: rank for rank, p in enumerate(self._protocols)}
        pending: set[asyncio.Future[int]] = set(rank_of)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in sorted(done, key=rank_of.__getitem__):
                code = fut.result()
                if code == 0 or self._interrupt is not None:
                    continue
                rank = rank_of[fut]
                stopped = self._stopped_at is not None
                failure = _Failure(rank, code, self._loop.time(), self._watches.get(rank), stopped)
                if stopped:
                    # Stopped by us, most likely; but one that printed its own error before we
                    # stopped it was failing anyway, and may be the cause.
                    seen = failure.watch.seen_at if failure.watch is not None else None
                    assert self._stopped_at is not None
                    if seen is not None and seen <= self._stopped_at and not failure.consequence:
                        self._failures.append(failure)
                    continue
                self._failures.append(failure)
                if self._failed is None:
                    self._failed = (rank, code)
                if failure.consequence and pending and self._stop_later is None:
                    # It failed because another rank did: give that one a moment to say why.
                    wait = min(CAUSE_WAIT_S, self._grace)
                    self._stop_later = self._loop.call_later(wait, self._stop, signal.SIGTERM)
                elif not failure.consequence:
                    self._stop(signal.SIGTERM)
        if self._stop_later is not None:
            self._stop_later.cancel()

    async def _empty_groups(self) -> None:
        """Stop whatever the ranks left running in their groups, politely first."""
        leftover = [pid for pid in self._pids if _group_alive(pid)]
        if not leftover:
            return
        for pid in leftover:
            _signal_group(pid, signal.SIGTERM)
        # Killed members linger as zombies until init reaps them, and killpg still finds those;
        # on hosts whose init reaps lazily this wait lasts that long, never more than grace.
        deadline = self._loop.time() + self._grace
        while leftover and self._loop.time() < deadline:
            await asyncio.sleep(_POLL_S)
            leftover = [pid for pid in leftover if _group_alive(pid)]
        for pid in leftover:
            _signal_group(pid, signal.SIGKILL)

    async def _drain(self) -> None:
        # Pipes reach EOF once every holder is dead; a holder that escaped the group (setsid)
        # cannot be allowed to keep the launcher waiting.
        closed = [p.pipes_closed for p in self._protocols]
        await asyncio.wait(closed, timeout=self._grace)

    # -- stopping ---------------------------------------------------------------------------

    def _running(self) -> list[int]:
        return [rank for rank, p in enumerate(self._protocols) if not p.exited.done()]

    def _stop(self, sig: int) -> None:
        if self._stop_later is not None:
            self._stop_later.cancel()
        if self._stopped_at is None:
            self._stopped_at = self._loop.time()
        self._stopped = self._running()
        for rank in self._stopped:
            _signal_group(self._pids[rank], sig)
        self._escalation = self._loop.call_later(self._grace, self._kill_running)

    def _kill_running(self) -> None:
        running = self._running()
        self._killed.extend(r for r in running if r not in self._killed)
        for rank in running:
            _signal_group(self._pids[rank], signal.SIGKILL)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._interrupt is None and self._failed is None:
            self._interrupt = sig
            # Forwarded as received: Ctrl-C reaches a Python rank as KeyboardInterrupt.
            self._stop(sig)
        else:
            # Asked again while already stopping: no more patience.
            if self._escalation is not None:
                self._escalation.cancel()
            self._kill_running()

    def _install_signal_handlers(self) -> Callable[[], None] | None:
        if threading.current_thread() is not threading.main_thread():
            return None
        installed: list[tuple[signal.Signals, object]] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            try:
                self._loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                continue
            installed.append((sig, previous))

        def restore() -> None:
            for sig, previous in installed:
                self._loop.remove_signal_handler(sig)
                # remove_signal_handler resets to the default; put back what was there
                # (asyncio.run's own SIGINT handler, for one).
                with contextlib.suppress(TypeError, ValueError):
                    signal.signal(sig, previous)  # type: ignore[arg-type]

        return restore

    # -- the report -------------------------------------------------------------------------

    def _returncodes(self) -> tuple[int | None, ...]:
        return tuple(p.exited.result() if p.exited.done() else None for p in self._protocols)

    def _info(self) -> LaunchInfo:
        return LaunchInfo(self._job_id, tuple(self._pids), self._returncodes())

    def _cause(self) -> _Failure:
        """The failure that explains the others: the earliest one that is not a consequence of
        another rank failing, else the first seen."""
        causes = [f for f in self._failures if not f.consequence]
        return min(causes, key=lambda f: f.when) if causes else self._failures[0]

    def _result(self) -> LaunchResult:
        message: str | None = None
        exit_code = 0
        failed_rank: int | None = None
        if self._failed is not None:
            cause = self._cause()
            failed_rank, code = cause.rank, cause.returncode
            exit_code = _exit_code(code)
            message = f"aiocoll run: rank {failed_rank} failed with {_describe(code)}"
            if cause.watch is not None and cause.watch.error and code > 0:
                message += f": {cause.watch.error}"
            first = self._failures[0]
            if first is not cause:
                message += f" (rank {first.rank} failed just before it, a consequence"
                if first.watch is not None and first.watch.error:
                    message += f": {first.watch.error}"
                message += ")"
        elif self._interrupt is not None:
            exit_code = 128 + int(self._interrupt)
            message = f"aiocoll run: interrupted by {self._interrupt.name}"
        if message is not None:
            if self._stopped:
                message += f"; stopped {_ranks(self._stopped)}"
            if self._killed:
                message += f"; killed {_ranks(self._killed)} after {self._grace:g} s grace"
            self._stderr.write(message.encode() + b"\n")
        return LaunchResult(
            exit_code=exit_code,
            job_id=self._job_id,
            pids=tuple(self._pids),
            returncodes=self._returncodes(),
            failed_rank=failed_rank,
            interrupted_by=self._interrupt,
            message=message,
        )


async def launch(
    argv: list[str],
    nprocs: int,
    *,
    transport: str | None,
    timeout: float | None,
    env: Mapping[str, str] | None = None,
    python: str = sys.executable,
    prefix_output: bool = True,
    grace: float = 5.0,
    handle_signals: bool = True,
    stdout: IO[bytes] | TextIO | None = None,
    stderr: IO[bytes] | TextIO | None = None,
) -> LaunchResult:
    """Run ``python *argv`` as ranks 0..nprocs-1 and return when every one has exited.

    ``argv`` is what follows the interpreter: ``["script.py", *args]`` or
    ``["-m", "module", *args]``. ``env`` is the ranks' base environment, replacing
    ``os.environ`` as in :mod:`subprocess`; the launcher's variables are set on top of it, and an
    ``AIOCOLL_SECRET`` already in it is passed through instead of a fresh one.

    With ``prefix_output`` false, ranks write straight to the launcher's own stdout and stderr
    (a terminal stays a terminal for them), unprefixed and unsynchronised. ``stdout`` and
    ``stderr`` redirect the relayed output (default: ``sys.stdout`` and ``sys.stderr``).

    With ``handle_signals`` (and on the main thread), SIGINT and SIGTERM are taken over while the
    job runs: the first is forwarded to every rank, a second kills them.

    The failure report (one line naming the first failing rank, or the interrupting signal) is
    written to ``stderr`` and returned in :attr:`LaunchResult.message`.

    Cancellation kills every rank's process group with SIGKILL, waits up to ``grace`` seconds for
    the ranks to be reaped, runs the cleanup hooks and re-raises.

    Raises:
        ValueError: ``argv`` is empty, ``nprocs`` < 1, ``timeout`` <= 0, ``grace`` < 0, or
            ``transport`` is unknown or cannot load (see :func:`check_transport`).
        OSError: a rank could not be started (the interpreter is missing, say); ranks already
            started are killed first.
    """
    if not argv:
        raise ValueError("argv must name a script or '-m module'")
    if nprocs < 1:
        raise ValueError(f"nprocs must be at least 1, got {nprocs}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if not grace >= 0:
        raise ValueError(f"grace must be >= 0, got {grace}")
    if transport is not None:
        check_transport(transport)
    job_id = secrets.token_hex(8)
    try:  # shared-memory segments of ranks that die mid-setup are removed once the job ends
        from ..sharedmem.segment import cleanup_job
    except ImportError:  # pragma: no cover - platforms without the shm transport
        pass
    else:
        register_cleanup(_remove_segments_of(cleanup_job))
    envs = _rank_environments(
        os.environ if env is None else env,
        nprocs,
        port=_free_port("127.0.0.1"),
        job_id=job_id,
        transport=transport,
        timeout=timeout,
    )
    job = _Job(
        # through aiocoll.launch.rank, which installs the preferred event loop (uvloop) first
        # -P: the working directory must not shadow the aiocoll this launcher runs (a checkout)
        [python, "-P", "-m", "aiocoll.launch.rank", *argv],
        envs,
        job_id,
        grace=grace,
        prefix_output=prefix_output,
        stdout=_Sink(sys.stdout if stdout is None else stdout),
        stderr=_Sink(sys.stderr if stderr is None else stderr),
    )
    return await job.run(handle_signals=handle_signals)


def run_launch(
    argv: list[str],
    nprocs: int,
    *,
    transport: str | None,
    timeout: float | None,
    env: Mapping[str, str] | None = None,
    python: str = sys.executable,
    prefix_output: bool = True,
    grace: float = 5.0,
    handle_signals: bool = True,
    stdout: IO[bytes] | TextIO | None = None,
    stderr: IO[bytes] | TextIO | None = None,
) -> LaunchResult:
    """Blocking :func:`launch` on a fresh event loop.

    Raises:
        RuntimeError: called from a thread that is running an event loop (await
            :func:`launch` there instead).
        ValueError: as :func:`launch`.
        OSError: as :func:`launch`.
    """
    return asyncio.run(
        launch(
            argv,
            nprocs,
            transport=transport,
            timeout=timeout,
            env=env,
            python=python,
            prefix_output=prefix_output,
            grace=grace,
            handle_signals=handle_signals,
            stdout=stdout,
            stderr=stderr,
        )
    )
