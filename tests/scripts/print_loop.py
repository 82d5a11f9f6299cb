import asyncio

import aiocoll


async def main() -> None:
    async with aiocoll.init() as world:
        await aiocoll.barrier()
        print(f"rank {world.rank} loop {type(asyncio.get_running_loop()).__module__.split('.')[0]}")


asyncio.run(main())
