"""Four ranks in two pairs, [0, 2] and [1, 3]; whoever is done leaves while its partner is not.

1. Each pair all_reduces (the partner that finishes first may leave before the other's call
   has returned).
2. Ranks 2 and 3 broadcast to their partners twice: the first time together, the second time
   ranks 0 and 1 come a second late. A root waits for nobody, so 2 and 3 finish at once.
3. A world all_reduce fails on 2 and 3 (rank 2 passes another length; over shared memory,
   where members compare calls only once all have arrived, it times out first); they leave
   with destroy(), whose barrier fails on the broken world.
4. Ranks 0 and 1 then call the second broadcast: what the departed roots sent must be there.

Each rank prints ``rank R pair sum S broadcast B ok`` once it has both results. Run by
tests/core/test_shutdown.py through ``aiocoll run -n 4``.
"""

from __future__ import annotations

import asyncio

import numpy as np

import aiocoll


async def main() -> None:
    world = await aiocoll.init()
    rank = world.rank
    partner = rank ^ 2
    root = max(rank, partner)
    pair = aiocoll.new_group([rank, partner], tag="pair")
    got = await aiocoll.all_reduce(np.full(8, rank, np.int64), group=pair)
    assert (got == rank + partner).all(), f"rank {rank}: pair sum {got}, want {rank + partner}"
    g_rank = pair.group_rank(root)
    warm = await aiocoll.broadcast(np.full(4, root, np.int64), g_rank, pair)
    assert (warm == root).all(), f"rank {rank}: first broadcast {warm}"
    want = np.arange(1000, dtype=np.float64) * (root + 1)
    if rank != root:
        await asyncio.sleep(1.0)  # the root finishes, fails the world all_reduce and leaves
    late = await aiocoll.broadcast(want if rank == root else np.zeros_like(want), g_rank, pair)
    assert np.array_equal(late, want), f"rank {rank}: second broadcast {late[:4]}"
    try:
        # 0.2 s: ranks 0 and 1 are asleep for 1 s when the roots get here.
        await aiocoll.all_reduce(np.ones(5 if rank == 2 else 6, np.float32), timeout=0.2 if rank == root else 30)
    except (aiocoll.MismatchError, aiocoll.CollectiveTimeoutError):
        pass
    else:
        raise AssertionError("the world all_reduce with two lengths did not fail")
    await aiocoll.destroy()
    print(f"rank {rank} pair sum {rank + partner} broadcast {root + 1} ok", flush=True)


asyncio.run(main())
