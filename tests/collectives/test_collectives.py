"""Every collective against numpy references, many ranks in one process over inproc."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import aiocoll
from aiocoll import Settings
from aiocoll.testing import run_ranks

from _reference import DTYPES, OPS, WORLD_SIZES, assert_reduced, data, op_valid, reduce_ref

SHAPE = (7, 3)  # 21 elements: divides evenly by none of 2, 5, 8


VALID = [(d, op) for d in DTYPES for op in OPS if op_valid(op, d)]
INVALID = [(d, op) for d in DTYPES for op in OPS if not op_valid(op, d)]


def _ids(pair):
    return f"{np.dtype(pair[0]).name}-{pair[1]}"


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("dtype_op", VALID, ids=[_ids(v) for v in VALID])
async def test_all_reduce_every_dtype_and_op(world_size, dtype_op):
    dtype, op = dtype_op
    inputs = [data(r, SHAPE, dtype, op) for r in range(world_size)]

    async def body(rank):
        x = inputs[rank]
        before = x.copy()
        y = await aiocoll.all_reduce(x, op)
        np.testing.assert_array_equal(x, before)  # input untouched
        return y

    results = await run_ranks(body, world_size)
    want = reduce_ref(op, inputs)
    for y in results:
        assert_reduced(y, want, world_size)
        np.testing.assert_array_equal(y, results[0])  # bit-identical on every rank


@pytest.mark.parametrize("dtype_op", INVALID, ids=[_ids(v) for v in INVALID])
async def test_all_reduce_rejects_op_for_dtype(dtype_op):
    dtype, op = dtype_op

    async def body(rank):
        with pytest.raises(ValueError, match=op if op != "avg" else "avg"):
            await aiocoll.all_reduce(data(rank, (3,), dtype), op)
        # nothing was sent: the group is still usable
        return await aiocoll.all_reduce(np.array([rank]))

    results = await run_ranks(body, 2)
    assert [int(r[0]) for r in results] == [1, 1]


@pytest.mark.parametrize("world_size", [2, 3, 5, 8])
@pytest.mark.parametrize("algorithm", ["direct", "rsag", "ring"])
@pytest.mark.parametrize("count", [0, 1, 5, 1001, 70001])
async def test_all_reduce_algorithms_any_size(world_size, algorithm, count):
    settings = Settings(algorithms={"all_reduce": algorithm})
    inputs = [data(r, (count,), np.float64) for r in range(world_size)]
    results = await run_ranks(lambda r: aiocoll.all_reduce(inputs[r]), world_size, settings=settings)
    want = reduce_ref("sum", inputs)
    for y in results:
        assert_reduced(y, want, world_size)
        np.testing.assert_array_equal(y, results[0])


@pytest.mark.parametrize("shape", [(), (0,), (1,), (4, 0, 2), (3, 1, 5)])
async def test_all_reduce_shapes(shape):
    inputs = [data(r, shape, np.int32) for r in range(3)]
    results = await run_ranks(lambda r: aiocoll.all_reduce(inputs[r], "max"), 3)
    for y in results:
        assert y.shape == shape
        np.testing.assert_array_equal(y, reduce_ref("max", inputs))


async def test_all_reduce_non_contiguous_input_and_out():
    base = [data(r, (6, 8), np.float32) for r in range(3)]

    async def body(rank):
        x = base[rank][:, ::2]  # a strided view
        assert not x.flags.c_contiguous
        out = np.zeros((8, 6), np.float32).T[:, :4]  # a non-contiguous out
        got = await aiocoll.all_reduce(x, "sum", out=out)
        assert got is out
        return out.copy()

    results = await run_ranks(body, 3)
    for y in results:
        assert_reduced(y, reduce_ref("sum", [b[:, ::2] for b in base]), 3)


async def test_all_reduce_accepts_buffer_protocol_and_reduceop():
    async def body(rank):
        return await aiocoll.all_reduce(bytearray([rank, 1, 2]), aiocoll.ReduceOp.MAX)

    results = await run_ranks(body, 3)
    for y in results:
        np.testing.assert_array_equal(y, np.array([2, 1, 2], dtype=np.uint8))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
async def test_all_gather_every_dtype(world_size, dtype):
    inputs = [data(r, (3, 2), dtype) for r in range(world_size)]
    results = await run_ranks(lambda r: aiocoll.all_gather(inputs[r]), world_size)
    for y in results:
        np.testing.assert_array_equal(y, np.concatenate(inputs, axis=0))


@pytest.mark.parametrize("world_size", [1, 3, 5])
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
@pytest.mark.parametrize("algorithm", ["direct", "ring"])
async def test_all_gather_along_dim(world_size, dim, algorithm):
    settings = Settings(algorithms={"all_gather": algorithm})
    inputs = [data(r, (2, 3, 4), np.int16) for r in range(world_size)]
    results = await run_ranks(lambda r: aiocoll.all_gather(inputs[r], dim=dim), world_size, settings=settings)
    for y in results:
        np.testing.assert_array_equal(y, np.concatenate(inputs, axis=dim))


async def test_all_gather_scalars():
    results = await run_ranks(lambda r: aiocoll.all_gather(np.float64(r * 1.5)), 3)
    for y in results:
        np.testing.assert_array_equal(y, [0.0, 1.5, 3.0])


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("algorithm", ["direct", "ring"])
async def test_reduce_scatter(world_size, op, algorithm):
    settings = Settings(algorithms={"reduce_scatter": algorithm})
    dtype = np.int32 if op in ("band", "bor", "bxor") else np.float64
    shape = (world_size * 3, 2)
    inputs = [data(r, shape, dtype, op) for r in range(world_size)]
    results = await run_ranks(lambda r: aiocoll.reduce_scatter(inputs[r], op), world_size, settings=settings)
    full = reduce_ref(op, inputs)
    for rank, y in enumerate(results):
        assert_reduced(y, full[rank * 3 : (rank + 1) * 3], world_size)


@pytest.mark.parametrize("dim", [1, -1])
async def test_reduce_scatter_along_dim(dim):
    inputs = [data(r, (2, 6, 3), np.int64) for r in range(3)]
    results = await run_ranks(lambda r: aiocoll.reduce_scatter(inputs[r], "sum", dim=dim), 3)
    full = reduce_ref("sum", inputs)
    for rank, y in enumerate(results):
        want = np.split(full, 3, axis=1 if dim == 1 else -1)[rank] if dim == 1 else np.split(full, 3, axis=-1)[rank]
        np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
async def test_all_to_all_uneven(world_size):
    def split(src, dst):
        return (src + 2 * dst) % 3  # some blocks empty, none equal-sized overall

    inputs = [
        data(r, (sum(split(r, p) for p in range(world_size)), 2), np.float32) for r in range(world_size)
    ]

    async def body(rank):
        ins = [split(rank, p) for p in range(world_size)]
        outs = [split(p, rank) for p in range(world_size)]
        return await aiocoll.all_to_all(inputs[rank], output_split_sizes=outs, input_split_sizes=ins)

    results = await run_ranks(body, world_size)
    for rank, y in enumerate(results):
        blocks = []
        for p in range(world_size):
            start = sum(split(p, q) for q in range(rank))
            blocks.append(inputs[p][start : start + split(p, rank)])
        np.testing.assert_array_equal(y, np.concatenate(blocks))


@pytest.mark.parametrize("world_size", [1, 2, 5])
async def test_all_to_all_equal_splits(world_size):
    inputs = [data(r, (world_size * 2,), np.uint8) for r in range(world_size)]
    results = await run_ranks(lambda r: aiocoll.all_to_all(inputs[r]), world_size)
    for rank, y in enumerate(results):
        np.testing.assert_array_equal(y, np.concatenate([inputs[p][rank * 2 : rank * 2 + 2] for p in range(world_size)]))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("algorithm", ["tree", "scatter_allgather"])
async def test_broadcast_from_every_root(world_size, algorithm):
    settings = Settings(algorithms={"broadcast": algorithm})
    for src in range(world_size):
        inputs = [data(r, (5, 3), np.complex64, seed=src) for r in range(world_size)]
        results = await run_ranks(lambda r: aiocoll.broadcast(inputs[r], src), world_size, settings=settings)
        for y in results:
            np.testing.assert_array_equal(y, inputs[src])


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("op", ["sum", "avg", "max", "bxor"])
@pytest.mark.parametrize("algorithm", ["tree", "rs_gather"])
async def test_reduce_to_every_root(world_size, op, algorithm):
    settings = Settings(algorithms={"reduce": algorithm})
    dtype = np.int64 if op == "bxor" else np.float32
    for dst in range(world_size):
        inputs = [data(r, (11,), dtype, op) for r in range(world_size)]
        results = await run_ranks(lambda r: aiocoll.reduce(inputs[r], dst, op), world_size, settings=settings)
        for rank, y in enumerate(results):
            if rank == dst:
                assert_reduced(y, reduce_ref(op, inputs), world_size)
            else:
                np.testing.assert_array_equal(y, inputs[rank])


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("dim", [0, 1])
async def test_gather(world_size, dim):
    inputs = [data(r, (2, 3), np.int8) for r in range(world_size)]
    dst = world_size - 1
    results = await run_ranks(lambda r: aiocoll.gather(inputs[r], dst, dim=dim), world_size)
    for rank, y in enumerate(results):
        if rank == dst:
            np.testing.assert_array_equal(y, np.concatenate(inputs, axis=dim))
        else:
            assert y is None


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("dim", [0, 1])
async def test_scatter(world_size, dim):
    shape = (world_size * 2, 3) if dim == 0 else (3, world_size * 2)
    inputs = [data(r, shape, np.uint32) for r in range(world_size)]
    src = world_size // 2
    results = await run_ranks(lambda r: aiocoll.scatter(inputs[r], src, dim=dim), world_size)
    for rank, y in enumerate(results):
        np.testing.assert_array_equal(y, np.split(inputs[src], world_size, axis=dim)[rank])


@pytest.mark.parametrize("world_size", WORLD_SIZES)
async def test_barrier_waits_for_every_member(world_size):
    arrived: list[int] = []

    async def body(rank):
        await asyncio.sleep(0.01 * rank)
        arrived.append(rank)
        await aiocoll.barrier()
        return len(arrived)

    results = await run_ranks(body, world_size)
    assert results == [world_size] * world_size


@pytest.mark.parametrize("world_size", [2, 3, 5])
async def test_send_recv_ring_with_tags_in_order(world_size):
    async def body(rank):
        nxt, prv = (rank + 1) % world_size, (rank - 1) % world_size
        sends = [
            asyncio.create_task(aiocoll.send(np.full(4, rank * 100 + i, np.int64), nxt, tag=i % 2))
            for i in range(4)
        ]
        like = np.empty(4, np.int64)
        # receive tag 1 before tag 0: tags are independent streams
        r1 = [await aiocoll.recv(like, prv, tag=1) for _ in range(2)]
        r0 = [await aiocoll.recv(like, prv, tag=0) for _ in range(2)]
        await asyncio.gather(*sends)
        return r0, r1

    results = await run_ranks(body, world_size)
    for rank, (r0, r1) in enumerate(results):
        prv = (rank - 1) % world_size
        assert [a[0] for a in r0] == [prv * 100, prv * 100 + 2]
        assert [a[0] for a in r1] == [prv * 100 + 1, prv * 100 + 3]


async def test_recv_into_out():
    async def body(rank):
        if rank == 0:
            await aiocoll.send(np.arange(5, dtype=np.float32), 1)
            return None
        buf = np.zeros(5, np.float32)
        got = await aiocoll.recv(buf, 0, out=buf)
        assert got is buf
        return buf

    results = await run_ranks(body, 2)
    np.testing.assert_array_equal(results[1], np.arange(5, dtype=np.float32))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
async def test_permute(world_size):
    perm = list(np.random.default_rng(world_size).permutation(world_size))
    inputs = [data(r, (3,), np.float64) for r in range(world_size)]
    results = await run_ranks(lambda r: aiocoll.permute(inputs[r], perm), world_size)
    for m in range(world_size):
        np.testing.assert_array_equal(results[perm[m]], inputs[m])


@pytest.mark.parametrize("world_size", [1, 3, 5])
async def test_all_reduce_coalesced_mixed_dtypes(world_size):
    specs = [((3,), np.float32), ((2, 2), np.int64), ((), np.float32), ((5,), np.uint8)]
    inputs = [[data(r, s, d) for s, d in specs] for r in range(world_size)]
    results = await run_ranks(lambda r: aiocoll.all_reduce_coalesced(inputs[r], "sum"), world_size)
    for ys in results:
        for i, y in enumerate(ys):
            assert_reduced(y, reduce_ref("sum", [inputs[r][i] for r in range(world_size)]), world_size)


@pytest.mark.parametrize("world_size", [1, 2, 5])
async def test_all_gather_coalesced(world_size):
    specs = [((3,), np.float16), ((2, 2), np.int64), ((), np.bool_)]
    inputs = [[data(r, s, d) for s, d in specs] for r in range(world_size)]
    results = await run_ranks(lambda r: aiocoll.all_gather_coalesced(inputs[r]), world_size)
    for ys in results:
        for i, y in enumerate(ys):
            parts = [np.atleast_1d(inputs[r][i]) for r in range(world_size)]
            np.testing.assert_array_equal(y, np.concatenate(parts))
            assert y.dtype == parts[0].dtype


@pytest.mark.parametrize("world_size", [2, 3])
async def test_reduce_scatter_coalesced(world_size):
    inputs = [[data(r, (world_size, 2), np.float32), data(r, (3, world_size * 2), np.int32)] for r in range(world_size)]
    results = await run_ranks(
        lambda r: aiocoll.reduce_scatter_coalesced(inputs[r], "sum", None, [0, 1]), world_size
    )
    for rank, (a, b) in enumerate(results):
        full_a = reduce_ref("sum", [i[0] for i in inputs])
        full_b = reduce_ref("sum", [i[1] for i in inputs])
        assert_reduced(a, full_a[rank : rank + 1], world_size)
        np.testing.assert_array_equal(b, np.split(full_b, world_size, axis=1)[rank])


async def test_world_of_one_needs_no_store():
    async with aiocoll.init(rank=0, world_size=1) as pg:
        assert pg.size == 1 and pg.rank == 0
        y = await aiocoll.all_reduce(np.array([1.5, 2.5]))
        np.testing.assert_array_equal(y, [1.5, 2.5])
        assert aiocoll.world() is pg
    with pytest.raises(aiocoll.NotInitializedError):
        aiocoll.world()


@pytest.mark.parametrize("algorithm", ["direct", "rsag", "ring"])
async def test_large_payload_local_work_runs_off_the_loop(algorithm):
    from aiocoll.engines.messages import OFFLOAD_BYTES

    settings = Settings(algorithms={"all_reduce": algorithm})
    count = OFFLOAD_BYTES // 8 * 2 + 3
    inputs = [data(r, (count,), np.float64) for r in range(3)]
    ticks = 0

    async def heartbeat():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    beat = asyncio.create_task(heartbeat())
    try:
        results = await run_ranks(lambda r: aiocoll.all_reduce(inputs[r]), 3, settings=settings)
    finally:
        beat.cancel()
    want = reduce_ref("sum", inputs)
    for y in results:
        assert_reduced(y, want, 3)
    assert ticks > 0


async def test_coalesced_calls_claim_their_order_before_other_collectives_interleave():
    async def body(rank):
        # the coalesced calls and the plain ones run concurrently; on rank 1 the plain
        # collective is started first, on rank 0 last: the issue order per group is what counts
        xs = [np.full(2, rank, np.float32), np.full(3, rank, np.int64)]
        rs = [np.full((2, 2), rank, np.float64), np.full((2, 4), rank, np.int32)]
        calls = [
            aiocoll.all_reduce_coalesced(xs),
            aiocoll.reduce_scatter_coalesced(rs, "sum", None, [0, 1]),
        ]
        plain = aiocoll.all_reduce(np.array([rank]))
        out = await asyncio.gather(*calls, plain)
        return out

    results = await run_ranks(body, 2)
    for rank, (ar, rsc, plain) in enumerate(results):
        np.testing.assert_array_equal(ar[0], [1, 1])
        np.testing.assert_array_equal(ar[1], [1, 1, 1])
        np.testing.assert_array_equal(rsc[0], np.full((1, 2), 1.0))
        np.testing.assert_array_equal(rsc[1], np.full((2, 2), 1))
        assert int(plain[0]) == 1


def test_parse_op_accepts_torch_reduce_ops():
    torch = pytest.importorskip("torch", reason="torch is an optional extra; the [test] set-up installs it")
    from aiocoll.arrays.ops import ReduceOp, parse_op

    assert parse_op(torch.distributed.ReduceOp.SUM) is ReduceOp.SUM
    assert parse_op(torch.distributed.ReduceOp(torch.distributed.ReduceOp.MAX)) is ReduceOp.MAX
    assert parse_op(torch.distributed.ReduceOp.BXOR) is ReduceOp.BXOR
