"""One rank of a job that keeps working while an intruder attacks it.

    python reliability_auth.py STOP_FILE       (under ``aiocoll run``: the secret is the job's)

Prints ``ADDR {...}`` (the store and this rank's listeners, which an attacker can find with a
port scan anyway), then all-reduces in a loop, checking every result, until STOP_FILE exists;
then ``DONE {"rank": r, "rounds": n}``. Any wrong result raises.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import numpy as np

import aiocoll
from aiocoll.core.world import current_world


async def main() -> None:
    stop = sys.argv[1]
    async with aiocoll.init() as world:
        rank, size = world.rank, world.size
        comm = current_world().comm
        listeners = {t.name: t.address for t in comm.transports}
        store = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        print("ADDR", json.dumps({"rank": rank, "store": store, **listeners}), flush=True)
        rounds = 0
        want = np.arange(1000, dtype=np.int64) * size + size * (size - 1) // 2
        while True:
            done = await aiocoll.all_reduce(np.array([os.path.exists(stop)], np.int64), "max")
            if done[0]:
                break
            y = await aiocoll.all_reduce(np.arange(1000, dtype=np.int64) + rank)
            if not np.array_equal(y, want):
                raise AssertionError(f"round {rounds}: wrong sum {y[:4]}")
            rounds += 1
            await asyncio.sleep(0.002)
        print("DONE", json.dumps({"rank": rank, "rounds": rounds}), flush=True)


asyncio.run(main())
