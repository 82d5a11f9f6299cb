"""init, all_reduce, destroy, again: ``aiocoll run -n N init_rounds.py ROUNDS``."""

from __future__ import annotations

import asyncio
import sys

import numpy as np

import aiocoll


async def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    for i in range(rounds):
        async with aiocoll.init() as world:
            y = await aiocoll.all_reduce(np.full(4, world.rank + i, np.float64))
            expected = sum(r + i for r in range(world.size))
            assert (y == expected).all(), (i, y.tolist(), expected)
            print(f"rank {world.rank} round {i} ok", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
