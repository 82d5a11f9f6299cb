"""Data-parallel steps among Ray actors: async actors that ``await aiocoll.all_reduce``.

    pip install 'aiocoll[ray]'
    python examples/ray_actors.py            # starts a local Ray instance (or joins RAY_ADDRESS)

The driver declares the group; each actor joins it and then averages its "gradients" with the
others' on every step, over shared memory on one node and TCP between nodes. The result is
checked against the same average computed here.
"""

from __future__ import annotations

import numpy as np
import ray

import aiocoll
import aiocoll.ray

WORLD = 4
STEPS = 3


@ray.remote
class Trainer:
    async def join(self) -> int:
        group = await aiocoll.ray.init(group_name="trainers")  # rank: position in create_group
        return group.rank

    async def step(self, step: int) -> np.ndarray:
        rank = aiocoll.world().rank
        grads = np.random.default_rng([step, rank]).standard_normal(100_000).astype(np.float32)
        return await aiocoll.all_reduce(grads, "avg")  # other tasks of this actor keep running

    async def leave(self) -> None:
        await aiocoll.destroy()


def main() -> None:
    ray.init()
    trainers = [Trainer.remote() for _ in range(WORLD)]
    aiocoll.ray.create_group(trainers, group_name="trainers")
    print("ranks:", ray.get([t.join.remote() for t in trainers]))
    for step in range(STEPS):
        results = ray.get([t.step.remote(step) for t in trainers])
        expected = np.mean(
            [np.random.default_rng([step, r]).standard_normal(100_000).astype(np.float32) for r in range(WORLD)],
            axis=0,
        )
        assert all(np.allclose(r, expected, atol=1e-6) for r in results)
        print(f"step {step}: {WORLD} actors agree, |avg| = {float(np.abs(expected).mean()):.4f}")
    ray.get([t.leave.remote() for t in trainers])
    aiocoll.ray.destroy_group("trainers")
    ray.shutdown()


if __name__ == "__main__":
    main()
