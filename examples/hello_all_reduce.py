"""The shortest honest aiocoll program: every rank adds its rank number, without blocking the loop.

    aiocoll run -n 4 examples/hello_all_reduce.py
"""

import asyncio

import numpy as np

import aiocoll


async def main() -> None:
    async with aiocoll.init() as world:  # rank, size and rendezvous come from `aiocoll run`
        total = await aiocoll.all_reduce(np.array([world.rank], dtype=np.int64))
        print(f"rank {world.rank} of {world.size}: sum of ranks = {total[0]}")


asyncio.run(main())
