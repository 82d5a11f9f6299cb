"""all_reduce over the tcp transport through the message engine: in place, the pipelined rsag
with several segments, and small frames (written at once) mixed with large ones (written by a
connection's I/O thread) on the same connections, against numpy references."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import aiocoll
from aiocoll import Settings
from aiocoll.algorithms import direct
from aiocoll.testing import run_ranks

# 2 segments of the pipelined rsag, and one element over so that nothing divides evenly.
SEGMENTED = direct.SEGMENT * 2 // 8 + 1


def _data(rank: int, count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed * 100 + rank).integers(-1000, 1000, count).astype(np.float64)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("algorithm", ["direct", "rsag", "ring"])
@pytest.mark.parametrize("count", [5, 20001, SEGMENTED])
async def test_all_reduce_in_place_over_tcp(world_size: int, algorithm: str, count: int) -> None:
    inputs = [_data(r, count, count) for r in range(world_size)]
    want = np.sum(inputs, axis=0)

    async def body(rank: int) -> np.ndarray:
        x = inputs[rank].copy()
        got = await aiocoll.all_reduce(x, out=x)
        assert got is x
        return x

    settings = Settings(algorithms={"all_reduce": algorithm})
    for got in await run_ranks(body, world_size, transport="tcp", settings=settings, timeout=120):
        np.testing.assert_array_equal(got, want)


async def test_small_and_large_frames_keep_their_order_on_each_connection() -> None:
    # Collectives started together: 4 B frames go out at once (send_now), 2 MiB ones through the
    # connection's thread, which must wait for what the event loop still holds unsent.
    counts = [1, SEGMENTED, 3, 1 << 18, 2, SEGMENTED, 1]
    world_size = 3
    inputs = [[_data(r, c, i) for i, c in enumerate(counts)] for r in range(world_size)]

    async def body(rank: int) -> list[np.ndarray]:
        return list(await asyncio.gather(*(aiocoll.all_reduce(x) for x in inputs[rank])))

    for got in await run_ranks(body, world_size, transport="tcp", timeout=120):
        for i, y in enumerate(got):
            np.testing.assert_array_equal(y, np.sum([inputs[r][i] for r in range(world_size)], axis=0))
