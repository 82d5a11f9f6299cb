"""The shm engine's pipelines, run for W members over one bytearray (aiocoll.testing.simulate_shm):
no process, no thread, no doorbell. Results are compared bit for bit with numpy folding the inputs
in rank order (what every member computes), across many interleavings of the members."""

from __future__ import annotations

import numpy as np
import pytest

from aiocoll.arrays.dtypes import wire_dtype
from aiocoll.arrays.ops import ReduceOp, parse_op
from aiocoll.engines.shm import pipelines as pl
from aiocoll.testing.simulate import Deadlock
from aiocoll.testing.simulate_shm import ShmSim

from _reference import data, op_valid

WORLDS = [2, 3, 4, 5, 7, 8, 16]
PART = 4096  # one page: small, so that modest sizes take many rounds and reuse every slot


def _fold(op: str, xs: list[np.ndarray]) -> np.ndarray:
    """The reduction in rank order, as the pipelines compute it (same bits)."""
    rop = parse_op(op)
    code = wire_dtype(xs[0].dtype)
    acc = np.empty_like(xs[0])
    pl.fold(rop, code, xs, acc)
    return acc


def _sizes(world: int, itemsize: int) -> list[int]:
    per_round = world * PART // itemsize
    return [0, 1, world - 1, per_round - 1, per_round + 1, 3 * per_round + world + 1]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("depth", [3, 4, 8])
@pytest.mark.parametrize(("dtype", "op"), [(np.float32, "sum"), (np.float64, "max"), (np.int64, "product"),
                                           (np.uint8, "bxor"), (np.int16, "min"), (np.complex64, "sum")])
def test_all_reduce_pipelined_is_exact_in_every_interleaving(world: int, depth: int, dtype: type, op: str) -> None:
    assert op_valid(op, dtype)
    sim = ShmSim(world, PART, depth, seed=world * 31 + depth)
    rop, code = parse_op(op), wire_dtype(np.dtype(dtype))
    for n in _sizes(world, np.dtype(dtype).itemsize):
        xs = [data(r, (n,), dtype, op, seed=n) for r in range(world)]
        outs = [np.full(n, 7, dtype) for _ in range(world)]
        rounds = sim.run(lambda ctx: pl.all_reduce_pipelined(ctx, rop, code, xs[ctx.rank], outs[ctx.rank]))
        want = _fold(op, xs)
        for r in range(world):
            np.testing.assert_array_equal(outs[r], want, err_msg=f"member {r}, n={n}")
        assert rounds == max(1, -(-n // (world * PART // np.dtype(dtype).itemsize)))


@pytest.mark.parametrize("world", WORLDS)
def test_all_reduce_direct_and_in_place(world: int) -> None:
    sim = ShmSim(world, PART, 3, seed=world)
    code = wire_dtype(np.dtype(np.float64))
    for n in (0, 1, 37, PART // 8):
        xs = [data(r, (n,), np.float64, seed=n) for r in range(world)]
        want = _fold("sum", xs)
        ins = [x.copy() for x in xs]
        sim.run(lambda ctx: pl.all_reduce_direct(ctx, ReduceOp.SUM, code, ins[ctx.rank], ins[ctx.rank]))  # out=x
        for r in range(world):
            np.testing.assert_array_equal(ins[r], want)
        ins = [x.copy() for x in xs]
        sim.run(lambda ctx: pl.all_reduce_pipelined(ctx, ReduceOp.SUM, code, ins[ctx.rank], ins[ctx.rank]))
        for r in range(world):
            np.testing.assert_array_equal(ins[r], want)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("depth", [3, 5])
def test_reduce_scatter_and_all_gather_pipelined(world: int, depth: int) -> None:
    sim = ShmSim(world, PART, depth, seed=world + depth)
    code = wire_dtype(np.dtype(np.float32))
    for block in (0, 1, 5, PART // 4 + 3, 3 * PART // 4):
        xs = [data(r, (world * block,), np.float32, seed=block) for r in range(world)]
        outs = [np.empty(block, np.float32) for _ in range(world)]
        sim.run(lambda ctx: pl.reduce_scatter_pipelined(ctx, ReduceOp.SUM, code, xs[ctx.rank], outs[ctx.rank]))
        want = _fold("sum", xs)
        for r in range(world):
            np.testing.assert_array_equal(outs[r], want[r * block : (r + 1) * block])
        gathered = [np.empty(world * block, np.float32) for _ in range(world)]
        sim.run(lambda ctx: pl.all_gather_pipelined(ctx, outs[ctx.rank], gathered[ctx.rank]))
        for r in range(world):
            np.testing.assert_array_equal(gathered[r], want)


@pytest.mark.parametrize("world", WORLDS)
def test_broadcast_pipelined_from_every_root(world: int) -> None:
    sim = ShmSim(world, PART, 3, seed=world)
    n = 2 * world * PART // 8 + 3
    for root in range(world):
        want = data(root, (n,), np.float64, seed=root)
        bufs = [want.copy() if r == root else np.zeros(n) for r in range(world)]
        sim.run(lambda ctx: pl.broadcast_pipelined(ctx, root, bufs[ctx.rank]))
        for r in range(world):
            np.testing.assert_array_equal(bufs[r], want)


def test_a_member_that_never_publishes_is_reported_as_no_progress() -> None:
    world = 3
    sim = ShmSim(world, PART, 3)
    code = wire_dtype(np.dtype(np.float32))
    xs = [np.ones(10, np.float32) for _ in range(world)]

    def build(ctx: pl.Context) -> pl.Algorithm:
        if ctx.rank == 2:
            yield pl.Wait(0, 10**6, (0,))  # waits for a round nobody will reach
            return 1
        return (yield from pl.all_reduce_pipelined(ctx, ReduceOp.SUM, code, xs[ctx.rank], xs[ctx.rank]))

    with pytest.raises(Deadlock, match="no progress at step"):
        sim.run(build)


def test_fewer_slots_than_three_deadlock_so_settings_refuse_them() -> None:
    """Why MIN_DEPTH is 3: with two slots the all_reduce pipeline waits for itself. Found by
    this simulator (AIOCOLL_SHM_DEPTH=2 used to hang until the timeout); now refused."""
    import aiocoll
    from aiocoll.engines.shm.layout import MIN_DEPTH

    world, n = 3, 3 * PART + 7
    xs = [np.ones(n, np.float32) for _ in range(world)]
    code = wire_dtype(np.dtype(np.float32))
    with pytest.raises(ValueError, match="depth"):
        ShmSim(world, PART, MIN_DEPTH - 1)
    with pytest.raises(ValueError, match="from 3 to 8"):
        aiocoll.Settings(shm_depth=2)
    sim = ShmSim(world, PART, MIN_DEPTH)
    outs = [np.empty(n, np.float32) for _ in range(world)]
    sim.run(lambda ctx: pl.all_reduce_pipelined(ctx, ReduceOp.SUM, code, xs[ctx.rank], outs[ctx.rank]))
    for r in range(world):
        np.testing.assert_array_equal(outs[r], np.full(n, 3.0, np.float32))
