"""A rank as a launcher starts it: ``aiocoll.init()`` with nothing but the launcher's variables,
then an all_reduce of seeded random data; prints one JSON line for the test to check.

    python launch_allreduce.py SEED [--hide-mpi4py] [--out DIR]

With ``--out``, each rank writes its line to DIR/rank<r>.json instead (ranks sharing one pipe
may interleave long lines).
"""

from __future__ import annotations

import asyncio
import json
import sys

if "--hide-mpi4py" in sys.argv:
    sys.modules["mpi4py"] = None  # type: ignore[assignment]  # as if it were not installed

import numpy as np

import aiocoll
from aiocoll.core.world import current_world


async def main() -> None:
    seed = int(sys.argv[1])
    async with aiocoll.init() as world:
        data = np.random.default_rng([seed, world.rank]).standard_normal(1000)
        total = await aiocoll.all_reduce(data)
        w = current_world()
        line = json.dumps({
            "rank": world.rank,
            "size": world.size,
            "sum": total.tolist(),
            "store": type(w.store).__name__,
            "transports": {str(k): v for k, v in w.transport_names.items()},
            "tcp": [a for t in w.comm.transports if str(a := getattr(t, "address", "")).startswith("tcp://")],
        })
        if "--out" in sys.argv:
            out = sys.argv[sys.argv.index("--out") + 1]
            with open(f"{out}/rank{world.rank}.json", "w") as f:
                f.write(line)
        else:
            print(line, flush=True)


asyncio.run(main())
