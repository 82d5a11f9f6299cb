"""aiocoll.ray: collective groups among actors of a local Ray instance started here.

Marked ``ray``: one Ray instance for the module (about 15 s to start on 2 cores). Skipped with
the reason where Ray is not installed (``pip install '.[ray]'``).
"""

from __future__ import annotations

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install '.[ray]' (then these run)")

import aiocoll  # noqa: E402
import aiocoll.sync  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="aiocoll-tests")
    import aiocoll.ray as aioray

    try:
        yield aioray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def members(cluster):
    # Started once: an actor is a process, seconds each on 2 cores. Every test leaves its world.
    return [AsyncMember.remote() for _ in range(3)]


@ray.remote
class AsyncMember:
    async def join(self, rank=None, world_size=None, group_name="default", transport=None):
        import aiocoll.ray
        from aiocoll.core.world import current_world

        group = await aiocoll.ray.init(rank, world_size, group_name=group_name, transport=transport, timeout=60)
        w = current_world()
        self.tcp = [a for t in w.comm.transports if str(a := getattr(t, "address", "")).startswith("tcp://")]
        return group.rank, {str(k): v for k, v in w.transport_names.items()}

    def tcp_addresses(self):
        return self.tcp, ray.util.get_node_ip_address()

    async def reduce(self, seed):
        # Each call is its own task on the actor's loop: the world is found all the same.
        x = np.random.default_rng([seed, aiocoll.world().rank]).standard_normal(513)
        return await aiocoll.all_reduce(x)

    async def gather_then_broadcast(self, seed):
        r = aiocoll.world().rank
        g = await aiocoll.all_gather(np.full(3, r, np.int64))
        b = await aiocoll.broadcast(np.random.default_rng([seed, r]).integers(0, 99, 5), src=1)
        return g, b

    async def leave(self):
        await aiocoll.destroy()


@ray.remote
class ThreadedMember:
    def join(self, rank, world_size, group_name):
        import aiocoll.ray

        return aiocoll.ray.init_sync(rank, world_size, group_name=group_name, timeout=60).rank

    def reduce(self, seed):
        r = aiocoll.sync.world().rank
        return aiocoll.sync.all_reduce(np.random.default_rng([seed, r]).integers(-50, 50, 7), "max")

    def leave(self):
        aiocoll.sync.destroy()


def _seed() -> int:
    return int(np.random.default_rng().integers(1 << 30))


def test_async_actors_declared_by_the_driver_all_reduce_over_shared_memory(cluster, members) -> None:
    cluster.create_group(members, group_name="declared")
    joined = ray.get([m.join.remote(group_name="declared") for m in members], timeout=120)
    assert [rank for rank, _ in joined] == [0, 1, 2]
    for rank, transports in joined:
        assert transports == {str(p): "shm" for p in range(3) if p != rank}  # one node: shared memory
    for _ in range(3):
        seed = _seed()
        expected = sum(np.random.default_rng([seed, r]).standard_normal(513) for r in range(3))
        for result in ray.get([m.reduce.remote(seed) for m in members], timeout=60):
            np.testing.assert_allclose(result, expected)
    seed = _seed()
    for g, b in ray.get([m.gather_then_broadcast.remote(seed) for m in members], timeout=60):
        np.testing.assert_array_equal(g, np.repeat(np.arange(3), 3))
        np.testing.assert_array_equal(b, np.random.default_rng([seed, 1]).integers(0, 99, 5))
    ray.get([m.leave.remote() for m in members], timeout=60)
    cluster.destroy_group("declared")


def test_async_actors_with_explicit_ranks_over_tcp_on_the_node_address(cluster, members) -> None:
    members = members[:2]
    joined = ray.get([m.join.remote(r, 2, "tcp-group", "tcp") for r, m in enumerate(members)], timeout=120)
    assert sorted(rank for rank, _ in joined) == [0, 1]
    assert all(t == {str(1 - r): "tcp"} for r, t in joined)
    for addresses, node in ray.get([m.tcp_addresses.remote() for m in members]):
        assert addresses and all(a.startswith(f"tcp://{node}:") for a in addresses), (addresses, node)
    seed = _seed()
    expected = sum(np.random.default_rng([seed, r]).standard_normal(513) for r in range(2))
    for result in ray.get([m.reduce.remote(seed) for m in members], timeout=60):
        np.testing.assert_allclose(result, expected)
    ray.get([m.leave.remote() for m in members], timeout=60)
    cluster.destroy_group("tcp-group")


def test_threaded_actors_use_the_blocking_api(cluster) -> None:
    members = [ThreadedMember.remote() for _ in range(2)]
    assert sorted(ray.get([m.join.remote(r, 2, "threads") for r, m in enumerate(members)], timeout=120)) == [0, 1]
    seed = _seed()
    expected = np.maximum(*(np.random.default_rng([seed, r]).integers(-50, 50, 7) for r in range(2)))
    for result in ray.get([m.reduce.remote(seed) for m in members], timeout=60):
        np.testing.assert_array_equal(result, expected)
    ray.get([m.leave.remote() for m in members], timeout=60)
    cluster.destroy_group("threads")


def test_an_actor_outside_the_declared_group_is_told_how_to_join(cluster, members) -> None:
    member = members[2]
    with pytest.raises(ray.exceptions.RayTaskError, match="create_group"):
        ray.get(member.join.remote(group_name="never-declared"), timeout=120)
    cluster.destroy_group("never-declared")
