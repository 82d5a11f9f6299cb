"""One rank in its own network namespace; the test degrades and then cuts the links between phases.

    ip netns exec NS python reliability_netns.py SYNC_DIR     (RANK, WORLD_SIZE, MASTER_*, AIOCOLL_HOST set)

Phase "clean": all-reduces of mixed sizes, checked. Prints ``CLEAN {...}``, then waits for
SYNC_DIR/degraded. Phase "degraded": the same while the test has slowed and lossy links; prints
``DEGRADED {...}`` and waits for SYNC_DIR/cut. Phase "cut": small all-reduces with
``timeout=CUT_TIMEOUT`` until one fails; prints ``RESULT {...}`` (error, ranks named, time).
Any wrong result raises.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import numpy as np

import aiocoll

SYNC = sys.argv[1]
CUT_TIMEOUT = float(os.environ.get("CUT_TIMEOUT", "3"))
SIZES = [1, 100, 4096, 65_536, 262_144]  # float32 elements


def emit(tag: str, **info: object) -> None:
    print(tag, json.dumps(info), flush=True)


async def wait_file(name: str) -> None:
    while not os.path.exists(os.path.join(SYNC, name)):
        await asyncio.sleep(0.02)


async def rounds(rank: int, size: int, n: int) -> dict[str, float]:
    started = time.monotonic()
    checked = 0
    for i in range(n):
        count = SIZES[i % len(SIZES)]
        xs = [np.random.default_rng([r, i]).integers(-1000, 1000, count).astype(np.float32) for r in range(size)]
        y = await aiocoll.all_reduce(xs[rank])
        if not np.array_equal(y, sum(xs)):
            raise AssertionError(f"round {i}: wrong all_reduce of {count} elements")
        checked += 1
    return {"rounds": checked, "seconds": time.monotonic() - started}


async def main() -> None:
    world = await aiocoll.init()
    rank, size = world.rank, world.size
    emit("CLEAN", rank=rank, **await rounds(rank, size, 10))
    await wait_file("degraded")
    emit("DEGRADED", rank=rank, **await rounds(rank, size, int(os.environ.get("DEGRADED_ROUNDS", "15"))))
    await aiocoll.barrier()
    emit("READY_TO_CUT", rank=rank)
    await wait_file("cut")
    while True:
        started = time.time()
        try:
            y = await aiocoll.all_reduce(np.ones(16, np.float32), timeout=CUT_TIMEOUT)
        except aiocoll.CollectiveError as exc:
            emit("RESULT", rank=rank, type=type(exc).__name__, ranks=list(exc.ranks), msg=str(exc)[:400],
                 t=time.time(), elapsed=time.time() - started)
            break
        assert (y == size).all()
        await asyncio.sleep(0.01)
    await aiocoll.destroy(abort=True)


asyncio.run(main())
