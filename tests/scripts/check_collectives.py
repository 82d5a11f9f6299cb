"""Run by each rank under `aiocoll run`: every collective against numpy, on real processes.

Each rank computes every rank's inputs itself (seeded by rank), so it can check its results
without trusting any other rank. Prints "rank R ok N" at the end; any failure raises.
"""

from __future__ import annotations

import asyncio
import os
import sys

import numpy as np

import aiocoll

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _reference import assert_reduced, data, reduce_ref  # noqa: E402


async def main() -> None:
    async with aiocoll.init() as world:
        rank, size = world.rank, world.size
        checks = 0
        for dtype, op in [(np.float32, "sum"), (np.int64, "max"), (np.float64, "avg"), (np.uint8, "bxor"),
                          (np.bool_, "sum"), (np.complex64, "product"), (np.float16, "min")]:
            for count in (1, 13, 4099, 300_007):
                inputs = [data(r, (count,), dtype, op) for r in range(size)]
                y = await aiocoll.all_reduce(inputs[rank], op)
                assert_reduced(y, reduce_ref(op, inputs), size)
                checks += 1
        inputs = [data(r, (5, 3), np.int32) for r in range(size)]
        np.testing.assert_array_equal(await aiocoll.all_gather(inputs[rank], dim=1), np.concatenate(inputs, axis=1))
        rs_in = [data(r, (size * 1000 + 0, 3), np.float64) for r in range(size)]
        rs = await aiocoll.reduce_scatter(rs_in[rank])
        assert_reduced(rs, reduce_ref("sum", rs_in)[rank * 1000 : (rank + 1) * 1000], size)
        ins = [(rank + p) % 3 for p in range(size)]
        outs = [(p + rank) % 3 for p in range(size)]
        a2a_in = [data(r, (sum((r + p) % 3 for p in range(size)), 2), np.float32) for r in range(size)]
        got = await aiocoll.all_to_all(a2a_in[rank], output_split_sizes=outs, input_split_sizes=ins)
        blocks = []
        for p in range(size):
            start = sum((p + q) % 3 for q in range(rank))
            blocks.append(a2a_in[p][start : start + (p + rank) % 3])
        np.testing.assert_array_equal(got, np.concatenate(blocks))
        for src in range(size):
            b_in = [data(r, (70_000,), np.float32, seed=src) for r in range(size)]
            np.testing.assert_array_equal(await aiocoll.broadcast(b_in[rank], src), b_in[src])
        red = await aiocoll.reduce(inputs[rank], size - 1, "sum")
        if rank == size - 1:
            assert_reduced(red, reduce_ref("sum", inputs), size)
        g = await aiocoll.gather(inputs[rank], 0)
        if rank == 0:
            np.testing.assert_array_equal(g, np.concatenate(inputs))
        sc_in = [data(r, (size * 2, 2), np.int16) for r in range(size)]
        np.testing.assert_array_equal(await aiocoll.scatter(sc_in[rank], 0), sc_in[0][rank * 2 : rank * 2 + 2])
        perm = [(m + 1) % size for m in range(size)]
        np.testing.assert_array_equal(await aiocoll.permute(inputs[rank], perm), inputs[(rank - 1) % size])
        if size > 1:
            nxt, prv = (rank + 1) % size, (rank - 1) % size
            s = asyncio.create_task(aiocoll.send(inputs[rank], nxt, tag=7))
            np.testing.assert_array_equal(await aiocoll.recv(inputs[rank], prv, tag=7), inputs[prv])
            await s
        sub = aiocoll.new_group(list(range(0, size, 2)))
        if rank % 2 == 0:
            y = await aiocoll.all_reduce(np.array([rank]), group=sub)
            assert int(y[0]) == sum(range(0, size, 2))
        objs = await aiocoll.all_gather_object({"rank": rank})
        assert [o["rank"] for o in objs] == list(range(size))
        await aiocoll.barrier()
        print(f"rank {rank} ok {checks}", flush=True)


asyncio.run(main())
