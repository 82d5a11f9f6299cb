"""Run a module-level function as N ranks, one process each, through ``aiocoll run``'s launcher.

    from aiocoll.testing import run_processes

    async def body(rank):                       # at module level: each process imports it
        return (await aiocoll.all_reduce(np.array([rank]))).tolist()

    async def test_sum():
        assert await run_processes(body, 4) == [[6]] * 4

Each process imports the function's file by path (so test modules work whether or not they are
importable by name), joins the world with ``aiocoll.init()`` and calls ``fn(rank)``, awaiting
it if it is a coroutine function; a plain function runs on a thread of its own, so that it
may make blocking calls (``aiocoll.sync``). What it returns comes back as JSON (numpy arrays and numpy
scalars as lists and numbers): results cross a process boundary, and nothing is unpickled.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


class RanksFailed(AssertionError):
    """A rank of :func:`run_processes` failed; the message is the launcher's report (naming the
    failure that caused the others) followed by the ranks' output.

    Attributes:
        exit_code: the launcher's exit code (the failing rank's, ``128 + signal`` for a signal).
        output: everything the ranks wrote, prefixed by rank.
    """

    def __init__(self, message: str, *, exit_code: int, output: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.output = output


def _target(fn: Callable[..., Any]) -> tuple[str, str]:
    qualname = getattr(fn, "__qualname__", "")
    if not qualname or "<" in qualname:
        raise ValueError(
            f"run_processes needs a function defined at module level (each process imports it), "
            f"got {qualname or fn!r}"
        )
    try:
        path = inspect.getfile(fn)
    except TypeError:
        raise ValueError(f"run_processes cannot find the file that defines {qualname}") from None
    return str(Path(path).resolve()), qualname


async def run_processes(
    fn: Callable[[int], Any],
    world_size: int,
    *,
    transport: str = "auto",
    timeout: float = 60.0,
    grace: float = 5.0,
) -> list[Any]:
    """Run ``fn(rank)`` in ``world_size`` processes of one world; return each rank's result.

    Args:
        fn: a function defined at module level, sync or async; its result must be JSON-able
            (numpy arrays and scalars are converted).
        transport: as for ``aiocoll run`` (default ``"auto"``: shared memory on this host).
        timeout: the ranks' default collective timeout (``AIOCOLL_TIMEOUT``).
        grace: seconds between SIGTERM and SIGKILL when stopping the ranks after a failure.

    Raises:
        RanksFailed: a rank failed; the others were stopped (the message says which failed
            first and why, then the ranks' output).
        ValueError: ``fn`` is not a module-level function, or an argument is out of range.
        asyncio.CancelledError: the caller was cancelled; every rank was killed.
    """
    from ..launch.launcher import launch

    path, qualname = _target(fn)
    out = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="aiocoll-ranks-") as results:
        # The caller's import path, so that the function's own imports (a tests folder that
        # pytest put on sys.path, say) resolve in the ranks too.
        env = dict(os.environ)
        paths = [os.path.dirname(path), *(p for p in sys.path if p and os.path.isdir(p))]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        result = await launch(
            ["-m", "aiocoll.testing._rank_main", path, qualname, results],
            world_size,
            transport=transport,
            timeout=timeout,
            env=env,
            grace=grace,
            handle_signals=False,
            stdout=out,
            stderr=out,
        )
        output = out.getvalue().decode("utf-8", "replace")
        if result.exit_code != 0:
            raise RanksFailed(
                f"{result.message or f'exit code {result.exit_code}'}\n--- output of the ranks ---\n{output}",
                exit_code=result.exit_code,
                output=output,
            )
        return [json.loads(Path(results, f"{r}.json").read_text()) for r in range(world_size)]


__all__ = ["RanksFailed", "run_processes"]
