"""How long one large collective keeps the event loop from running anything else, and what it costs.

    aiocoll run -n 2 --transport tcp scripts/loop_stall.py --mib 1024
    aiocoll run -n 2 --transport shm scripts/loop_stall.py --mib 1024 --late 1

Every rank runs a heartbeat task (sleep 1 ms, note the time, repeat) beside one all_reduce of
``--mib`` MiB of float32, and prints one JSON line:

    wall_gap_ms  the longest wall-clock gap between two heartbeats: what a user's other tasks see
    cpu_gap_ms   the CPU time the loop thread spent between two heartbeats (the longest): the
                 stall caused by this process alone, without the time the OS ran others (robust
                 on a loaded machine, which is why the test asserts on it)
    extra_mib    peak resident memory during the collective minus the memory before it, which
                 holds the input and the result (passed as ``out=``, written once beforehand so
                 that its pages are resident; ``--out fresh``: not written, so that the result's
                 pages count as they are touched): what the collective itself held
    extra_x      extra_mib as a multiple of the payload

One rank (``--late-rank``, default the last) enters the collective ``--late`` seconds after the
others, so that its peers' frames arrive before its receives are posted (the unexpected-frame
path). ``--op recv``: instead of an all_reduce, rank 0 sends the payload to the late rank (the
unexpected-frame path alone, with no temporary buffer of the algorithm's own). The result is
checked against numpy.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time

import numpy as np

import aiocoll


def _status(field: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux 4.0+)


def _payload(n: int, rank: int) -> np.ndarray:
    # Small integers: every partial sum is exact in float32, whatever the order of the reduction.
    # Made in pieces: a 1 GiB payload through one int64 arange would need 2 GiB more.
    x = np.empty(n, np.float32)
    step = 1 << 24
    for i in range(0, n, step):
        x[i : i + step] = (np.arange(i, min(i + step, n)) % 1024).astype(np.float32) * (rank + 1)
    return x


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=1024, help="payload per rank in MiB")
    parser.add_argument("--late", type=float, default=1.0, help="seconds the late rank waits before its call")
    parser.add_argument("--late-rank", type=int, default=-1, help="which rank is late (default: the last)")
    parser.add_argument("--op", choices=("all_reduce", "recv"), default="all_reduce")
    parser.add_argument("--out", choices=("touched", "fresh"), default="touched")
    args = parser.parse_args()

    async with aiocoll.init() as world:
        rank, size = world.rank, world.size
        late_rank = args.late_rank % size
        n = args.mib * (1 << 20) // 4
        x = _payload(n, rank)
        out = np.empty_like(x)
        if args.out == "touched":
            out.fill(0)
        await aiocoll.all_reduce(np.ones(1 << 18, np.float32))  # warm up connections and segments
        gc.collect()
        await aiocoll.barrier()

        wall_gaps: list[float] = []
        cpu_gaps: list[float] = []
        stop = asyncio.Event()

        async def heartbeat() -> None:
            wall, cpu = time.perf_counter(), time.thread_time()
            while not stop.is_set():
                await asyncio.sleep(0.001)
                w, c = time.perf_counter(), time.thread_time()
                wall_gaps.append(w - wall)
                cpu_gaps.append(c - cpu)
                wall, cpu = w, c

        base = _status("VmRSS")
        _reset_peak()
        beat = asyncio.create_task(heartbeat())
        await asyncio.sleep(0.01)
        if rank == late_rank:
            await asyncio.sleep(args.late)
        t0 = time.perf_counter()
        if args.op == "all_reduce":
            y = await aiocoll.all_reduce(x, out=out)
            factor = np.float32(sum(r + 1 for r in range(size)))
        elif rank == 0:
            await aiocoll.send(x, late_rank)
            y, factor = x, np.float32(1)
        elif rank == late_rank:
            y = await aiocoll.recv(out, 0, out=out)
            factor = np.float32(1)
        else:
            y, factor = x, np.float32(rank + 1)
        seconds = time.perf_counter() - t0
        await asyncio.sleep(0.01)
        stop.set()
        await beat
        peak = _status("VmHWM")

        step = 1 << 24
        ok = all(
            np.array_equal(y[i : i + step], (np.arange(i, min(i + step, n)) % 1024).astype(np.float32) * factor)
            for i in range(0, n, step)
        )
        extra = peak - base
        print(
            json.dumps(
                {
                    "rank": rank,
                    "late": rank == late_rank,
                    "transport": world.world.transport_names.get((rank + 1) % size, "self"),
                    "mib": args.mib,
                    "seconds": round(seconds, 3),
                    "wall_gap_ms": round(max(wall_gaps) * 1e3, 1),
                    "cpu_gap_ms": round(max(cpu_gaps) * 1e3, 1),
                    "beats": len(wall_gaps),
                    "extra_mib": round(extra / 2**20, 1),
                    "extra_x": round(extra / x.nbytes, 3),
                    "base_mib": round(base / 2**20, 1),
                    "peak_mib": round(peak / 2**20, 1),
                    "ok": ok,
                }
            ),
            flush=True,
        )
        await aiocoll.barrier()


if __name__ == "__main__":
    asyncio.run(main())
