"""One rank of the soak: COUNT mixed collectives of random sizes, every result checked.

    python reliability_soak.py COUNT SEED        (RANK, WORLD_SIZE, MASTER_* etc. set)

Every rank draws the same sequence from SEED (so all issue the same collectives in the same
order); inputs are integers derived from (rank, step), so each rank checks its results alone.
Now and then several collectives run at once on different groups. After a warm-up of
COUNT // 10 collectives the rank records its RSS and open descriptors; at the end it prints
``SOAK {...}`` with both measurements, the elapsed time, the count per kind, and a trace of
RSS, descriptors and the communicator's tables every COUNT // 10 collectives.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import time
from collections import Counter
from typing import Any

import numpy as np

import aiocoll
from aiocoll.core.world import current_world

COUNT, SEED = int(sys.argv[1]), int(sys.argv[2])
KINDS = ["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "reduce", "gather",
         "scatter", "barrier", "permute", "send_recv", "all_reduce_coalesced", "all_gather_object"]


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def x(r: int, step: int, n: int, dtype: Any) -> np.ndarray:
    return ((np.arange(n, dtype=np.int64) * 7 + r * 13 + step) % 1000).astype(dtype)


async def one(kind: str, g: Any, rank: int, size: int, step: int, n: int, dtype: Any) -> None:
    def same(got: Any, want: Any) -> None:
        if not np.array_equal(np.asarray(got), np.asarray(want)):
            raise AssertionError(f"step {step}: wrong {kind} of {n} x {np.dtype(dtype)}")

    if kind == "all_reduce":
        same(await aiocoll.all_reduce(x(rank, step, n, dtype), group=g), sum(x(p, step, n, dtype) for p in range(size)))
    elif kind == "all_gather":
        same(await aiocoll.all_gather(x(rank, step, n, dtype), g), np.concatenate([x(p, step, n, dtype) for p in range(size)]))
    elif kind == "reduce_scatter":
        full = sum(x(p, step, n * size, dtype) for p in range(size))
        same(await aiocoll.reduce_scatter(x(rank, step, n * size, dtype), group=g), full[rank * n : (rank + 1) * n])
    elif kind == "all_to_all":
        same(await aiocoll.all_to_all(x(rank, step, n * size, dtype), g),
             np.concatenate([x(p, step, n * size, dtype)[rank * n : (rank + 1) * n] for p in range(size)]))
    elif kind == "broadcast":
        src = step % size
        same(await aiocoll.broadcast(x(rank, step, n, dtype), src, g), x(src, step, n, dtype))
    elif kind == "reduce":
        dst = step % size
        got = await aiocoll.reduce(x(rank, step, n, dtype), dst, group=g)
        same(got, sum(x(p, step, n, dtype) for p in range(size)) if rank == dst else x(rank, step, n, dtype))
    elif kind == "gather":
        got = await aiocoll.gather(x(rank, step, n, dtype), 0, g)
        if rank == 0:
            same(got, np.concatenate([x(p, step, n, dtype) for p in range(size)]))
    elif kind == "scatter":
        src = (step + 1) % size
        same(await aiocoll.scatter(x(rank, step, n * size, dtype), src, g), x(src, step, n * size, dtype)[rank * n : (rank + 1) * n])
    elif kind == "barrier":
        await aiocoll.barrier(g)
    elif kind == "permute":
        shift = 1 + step % (size - 1)
        same(await aiocoll.permute(x(rank, step, n, dtype), [(m + shift) % size for m in range(size)], g),
             x((rank - shift) % size, step, n, dtype))
    elif kind == "send_recv":
        nxt, prv = (rank + 1) % size, (rank - 1) % size
        sending = asyncio.ensure_future(aiocoll.send(x(rank, step, n, dtype), nxt, g, tag=step % 5))
        got = await aiocoll.recv(np.empty(n, dtype), prv, g, tag=step % 5)
        await sending
        same(got, x(prv, step, n, dtype))
    elif kind == "all_reduce_coalesced":
        got = await aiocoll.all_reduce_coalesced([x(rank, step, n, dtype), x(rank, step, 3, np.int32)], "max", g)
        same(got[0], np.max([x(p, step, n, dtype) for p in range(size)], axis=0))
        same(got[1], np.max([x(p, step, 3, np.int32) for p in range(size)], axis=0))
    elif kind == "all_gather_object":
        got = await aiocoll.all_gather_object({"r": rank, "s": step, "pad": "x" * (n % 300)}, g)
        if got != [{"r": p, "s": step, "pad": "x" * (n % 300)} for p in range(size)]:
            raise AssertionError(f"step {step}: wrong all_gather_object")
    else:
        raise AssertionError(kind)


async def main() -> None:
    world = await aiocoll.init()
    rank, size = world.rank, world.size
    rng = np.random.default_rng(SEED)
    lanes = [aiocoll.new_group(list(range(size)), tag=f"soak-{i}") for i in range(4)]
    pairs = aiocoll.new_group([0, 1], tag="soak-pair")
    done = Counter()
    baseline: dict[str, float] = {}
    trace: list[dict[str, Any]] = []
    started = time.monotonic()
    step = 0
    while step < COUNT:
        if step >= COUNT // 10 and not baseline:
            gc.collect()
            baseline = {"rss_kib": rss_kib(), "fds": fds(), "at": step}
        if step >= len(trace) * (COUNT // 10):
            comm = current_world().comm
            trace.append({"step": step, "rss_kib": rss_kib(), "fds": fds(), "tables": {
                "posted": len(comm._posted), "unexpected": len(comm._unexpected), "landing": len(comm._landing),
                "active": len(comm._active), "background": len(comm._background), "heard": len(comm._heard),
                "tasks": len(asyncio.all_tasks())}})
        width = 1 if rng.random() < 0.8 else int(rng.integers(2, 5))  # sometimes several at once
        calls = []
        for lane in range(width):
            kind = KINDS[int(rng.integers(len(KINDS)))]
            # mostly small, sometimes up to 1 Mi elements
            n = int(rng.integers(1, 64)) if rng.random() < 0.5 else int(2 ** rng.uniform(6, 20 if rng.random() < 0.1 else 15))
            dtype = [np.float32, np.int64, np.float64, np.int32][int(rng.integers(4))]
            calls.append(one(kind, lanes[lane], rank, size, step + lane, n, dtype))
            done[kind] += 1
        if rng.random() < 0.02:
            kind = "all_reduce"  # a group of two: its members only
            if rank in (0, 1):
                calls.append(one(kind, pairs, pairs.rank, 2, step, 100, np.int64))
        await asyncio.gather(*calls)
        step += width
    elapsed = time.monotonic() - started
    await aiocoll.barrier()
    gc.collect()
    end = {"rss_kib": rss_kib(), "fds": fds()}
    print("SOAK", json.dumps({"rank": rank, "count": step, "seconds": elapsed, "baseline": baseline, "end": end,
                              "kinds": dict(done), "trace": trace}), flush=True)
    await aiocoll.destroy()


asyncio.run(main())
