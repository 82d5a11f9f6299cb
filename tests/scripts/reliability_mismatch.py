"""One rank of a job in which rank ODD calls something else than the others, case after case.

    python reliability_mismatch.py ODD CASE[,CASE...]     (RANK, WORLD_SIZE, MASTER_* etc. set)

Each case runs on a group of its own (a mismatch breaks only its group): every rank but ODD
calls ``all_reduce`` of N float32 with op sum; ODD calls the variant the case names. Each rank
prints ``RESULT {...}`` (error type, ranks named, message, seconds taken), then ``AFTER {...}``
for one more call on that group, which must fail at once. Last, an all_reduce on the world
checks that the other groups were not harmed (``WORLD ok``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import numpy as np

import aiocoll

ODD = int(sys.argv[1])
CASES = sys.argv[2].split(",")
N = 4099
TIMEOUT = float(os.environ.get("MISMATCH_TIMEOUT", "6"))


def variant(case: str, rank: int, g: object) -> object:
    x = np.full(N, rank + 1, np.float32)
    if rank != ODD:
        return aiocoll.all_reduce(x, "sum", g, timeout=TIMEOUT)
    if case == "op":
        return aiocoll.all_reduce(x, "max", g, timeout=TIMEOUT)
    if case == "dtype":
        return aiocoll.all_reduce(x.astype(np.float64), "sum", g, timeout=TIMEOUT)
    if case == "count":
        return aiocoll.all_reduce(np.full(N + 1, rank + 1, np.float32), "sum", g, timeout=TIMEOUT)
    if case == "all_gather":
        return aiocoll.all_gather(x, g, timeout=TIMEOUT)
    if case == "broadcast":
        return aiocoll.broadcast(x, 0, g, timeout=TIMEOUT)
    if case == "gather":
        return aiocoll.gather(x, 0, g, timeout=TIMEOUT)
    if case == "barrier":
        return aiocoll.barrier(g, timeout=TIMEOUT)
    raise SystemExit(f"unknown case {case!r}")


def emit(tag: str, **info: object) -> None:
    print(tag, json.dumps(info), flush=True)


def outcome(exc: BaseException | None, result: object, started: float) -> dict[str, object]:
    info: dict[str, object] = {"elapsed": time.monotonic() - started}
    if exc is None:
        info.update(outcome="ok", value=repr(np.asarray(result).ravel()[:3]) if result is not None else None)
    else:
        info.update(outcome="error", type=type(exc).__name__, msg=str(exc)[:500])
        if isinstance(exc, aiocoll.CollectiveError):
            info.update(ranks=list(exc.ranks), group=exc.group, seq=exc.seq)
    return info


async def main() -> None:
    world = await aiocoll.init()
    rank, size = world.rank, world.size
    for case in CASES:
        g = aiocoll.new_group(list(range(size)), tag=f"mismatch-{case}")
        y = await aiocoll.all_reduce(np.ones(3, np.float32), group=g)  # the group works, paths are set up
        assert (y == size).all()
        started = time.monotonic()
        exc: BaseException | None = None
        result: object = None
        try:
            result = await variant(case, rank, g)
        except Exception as e:
            exc = e
        emit("RESULT", rank=rank, case=case, **outcome(exc, result, started))
        started = time.monotonic()
        exc, result = None, None
        try:
            result = await aiocoll.all_reduce(np.ones(3, np.float32), group=g, timeout=TIMEOUT)
        except Exception as e:
            exc = e
        emit("AFTER", rank=rank, case=case, **outcome(exc, result, started))
        del exc, result
    y = await aiocoll.all_reduce(np.array([rank], np.int64))
    if int(y[0]) == size * (size - 1) // 2:
        emit("WORLD", rank=rank, outcome="ok")
    await aiocoll.destroy()


if __name__ == "__main__":
    asyncio.run(main())
