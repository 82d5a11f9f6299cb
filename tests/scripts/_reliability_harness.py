"""Start the ranks of one job as separate processes (no launcher in between), watch their output.

The reliability tests kill, stop and cut ranks on purpose; the launcher would stop the whole job
at the first death, so these tests start the ranks themselves with the torchrun environment and
read each rank's ``TAG {json}`` lines as they come.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
TESTS = SCRIPTS.parent
try:  # the aiocoll under test: installed, or the checkout these tests belong to
    import aiocoll

    ROOT = Path(aiocoll.__file__).resolve().parents[1]
except ImportError:
    ROOT = TESTS.parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def rank_env(rank: int, size: int, port: int, *, transport: str, secret: str, timeout: float = 30.0,
             addr: str = "127.0.0.1", **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIOCOLL_", "PYTEST_"))}
    env.update(
        RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR=addr, MASTER_PORT=str(port),
        AIOCOLL_SECRET=secret, AIOCOLL_TRANSPORT=transport, AIOCOLL_TIMEOUT=str(timeout),
        AIOCOLL_JOB_ID=f"rel{port}", PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")) if p),
    )
    env.update(extra)
    return env


class Rank:
    """One rank's process and the lines it printed, parsed when they are ``TAG {json}``."""

    def __init__(self, rank: int, argv: Sequence[str], env: dict[str, str], prefix: Sequence[str] = ()) -> None:
        self.rank = rank
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, *argv], env=env, cwd=str(ROOT), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self.err: list[str] = []
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any, into: list[str]) -> None:
        for line in stream:
            with self._cond:
                into.append(line.rstrip("\n"))
                self._cond.notify_all()
        stream.close()

    def records(self, tag: str) -> list[dict[str, Any]]:
        with self._cond:
            return [json.loads(line[len(tag) + 1 :]) for line in self.lines if line.startswith(tag + " ")]

    def wait_for(self, tag: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = [line for line in self.lines if line.startswith(tag + " ")]
                if got:
                    return dict(json.loads(got[0][len(tag) + 1 :]))
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not any(t.is_alive() for t in self._threads)):
                    raise AssertionError(f"rank {self.rank} never printed {tag}:\n{self.tail()}")
                self._cond.wait(min(left, 0.1))

    def tail(self, n: int = 40) -> str:
        with self._cond:
            return "\n".join([*self.lines[-n:], "--- stderr ---", *self.err[-n:]])

    def finish(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"rank {self.rank} did not exit within {timeout} s (hang):\n{self.tail()}")
        for t in self._threads:
            t.join(5)
        return code

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass


class Job:
    """The ranks of one job; as a context manager it kills whatever is left on the way out."""

    def __init__(self, size: int, script: str, *args: str, transport: str, timeout: float = 30.0,
                 secret: str | None = None, prefixes: Sequence[Sequence[str]] | None = None,
                 addrs: Sequence[str] | None = None, master: str = "127.0.0.1", **extra: str) -> None:
        self.size = size
        self.secret = secret or os.urandom(16).hex()
        self.port = free_port() if master == "127.0.0.1" else 29000 + int.from_bytes(os.urandom(2), "big") % 20000
        self.ranks: list[Rank] = []
        self._sync = tempfile.TemporaryDirectory(prefix="aiocoll-rel-")
        extra.setdefault("RELIABILITY_SYNC_DIR", self._sync.name)
        for r in range(size):
            more = dict(extra)
            if addrs is not None:
                more["AIOCOLL_HOST"] = addrs[r]
            env = rank_env(r, size, self.port, transport=transport, secret=self.secret, timeout=timeout,
                           addr=master, **more)
            self.ranks.append(Rank(r, [str(SCRIPTS / script), *args], env, prefixes[r] if prefixes else ()))

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        for r in self.ranks:
            r.kill(signal.SIGCONT)
            r.kill()
        for r in self.ranks:
            try:
                r.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self._sync.cleanup()

    def finish(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        return [r.finish(max(deadline - time.monotonic(), 0.1)) for r in self.ranks]

    def output(self) -> str:
        return "\n\n".join(f"=== rank {r.rank} ===\n{r.tail()}" for r in self.ranks)
