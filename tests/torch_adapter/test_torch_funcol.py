"""aiocoll.torch: the functional collectives' results at 2 and 4 ranks (every dtype and op), every
group form and tag, lazy waiting (views do not wait; printing, tolist and arithmetic do; a
dropped result still completes). The behaviours PyTorch's test_functional_api.py checks, as
our own tests. Ranks run as tasks of one event loop, so results are awaited."""

from __future__ import annotations

import asyncio
import gc
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is an optional extra; the [test] set-up (.ci/run) installs the CPU build")

import aiocoll  # noqa: E402
import aiocoll.torch as ft  # noqa: E402
from aiocoll.testing import run_ranks  # noqa: E402
from aiocoll.torch import _work  # noqa: E402

from _torch_reference import (  # noqa: E402
    OPS,
    TORCH_DTYPES,
    assert_tensor_close,
    dname,
    op_valid,
    reduce_torch_ref,
    tdata,
    to_numpy,
)

VALID = [(d, op) for d in TORCH_DTYPES for op in OPS if op_valid(op, d)]
WS = [2, 4]


async def done(t):
    """The waited value of a lazy result, as a plain tensor."""
    out = await ft.wait_async(t)
    assert type(out) is torch.Tensor
    return out


# --------------------------------------------------------------------------- results
@pytest.mark.parametrize("world_size", WS)
@pytest.mark.parametrize("dtype_op", VALID, ids=[f"{dname(d)}-{op}" for d, op in VALID])
async def test_all_reduce_every_dtype_and_op(world_size, dtype_op):
    dtype, op = dtype_op
    xs = [tdata(r, (3, 5), dtype, op) for r in range(world_size)]

    async def body(rank):
        x = xs[rank]
        before = x.clone()
        y = ft.all_reduce(x, op.upper(), list(range(world_size)))  # reduceOp in any case
        x.zero_() if dtype != torch.bool else x.logical_not_()  # the input may change at once
        assert isinstance(y, ft.AsyncCollectiveTensor)
        assert y.dtype == dtype and y.shape == x.shape
        x.copy_(before)
        return await done(y)

    want = reduce_torch_ref(op, xs)
    for y in await run_ranks(body, world_size):
        assert_tensor_close(y, want, dtype, world_size)


@pytest.mark.parametrize("world_size", WS)
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=dname)
async def test_all_gather_tensor_any_dim(world_size, dtype):
    xs = [tdata(r, (2, 3, 4), dtype) for r in range(world_size)]

    async def body(rank):
        return [await done(ft.all_gather_tensor(xs[rank], d, None)) for d in (0, 1, 2, -1)]

    ref = [to_numpy(x) for x in xs]
    for outs in await run_ranks(body, world_size):
        for d, y in zip((0, 1, 2, -1), outs):
            assert_tensor_close(y, np.concatenate(ref, axis=d), dtype, world_size)


@pytest.mark.parametrize("world_size", WS)
@pytest.mark.parametrize("dtype_op", [v for v in VALID if v[1] in ("sum", "max", "bxor")],
                         ids=lambda v: f"{dname(v[0])}-{v[1]}")
async def test_reduce_scatter_tensor_any_dim(world_size, dtype_op):
    dtype, op = dtype_op
    xs = [tdata(r, (world_size, 2 * world_size, 3), dtype, op) for r in range(world_size)]

    async def body(rank):
        return [await done(ft.reduce_scatter_tensor(xs[rank], op, d, None)) for d in (0, 1)]

    full = reduce_torch_ref(op, xs)
    for rank, outs in enumerate(await run_ranks(body, world_size)):
        for d, y in zip((0, 1), outs):
            assert_tensor_close(y, np.split(full, world_size, axis=d)[rank], dtype, world_size)


@pytest.mark.parametrize("world_size", WS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.complex64, torch.int64], ids=dname)
async def test_all_to_all_single_uneven_and_none_splits(world_size, dtype):
    w = world_size
    # rank r sends (p + 1) * (r + 1) rows to p; p receives (p + 1) * (r + 1) from each r
    rows = [sum((p + 1) * (r + 1) for p in range(w)) for r in range(w)]
    xs = [tdata(r, (rows[r], 3), dtype) for r in range(w)]
    eq = [tdata(r, (2 * w, 3), dtype, seed=1) for r in range(w)]

    async def body(rank):
        ins = [(p + 1) * (rank + 1) for p in range(w)]
        outs = [(rank + 1) * (r + 1) for r in range(w)]
        uneven = await done(ft.all_to_all_single(xs[rank], outs, ins, None))
        both_none = await done(ft.all_to_all_single(eq[rank], None, None, None))
        out_none = await done(ft.all_to_all_single(eq[rank], None, [2] * w, None))
        in_none = await done(ft.all_to_all_single(eq[rank], [2] * w, None, None))
        one_d = await done(ft.all_to_all_single(eq[rank].reshape(-1)[: 3 * w], None, None, None))
        return uneven, both_none, out_none, in_none, one_d

    for rank, (uneven, both_none, out_none, in_none, one_d) in enumerate(await run_ranks(body, w)):
        want = []
        for r in range(w):
            start = sum((p + 1) * (r + 1) for p in range(rank))
            want.append(to_numpy(xs[r])[start : start + (rank + 1) * (r + 1)])
        assert_tensor_close(uneven, np.concatenate(want), dtype, w)
        want_eq = np.concatenate([to_numpy(e)[2 * rank : 2 * rank + 2] for e in eq])
        for y in (both_none, out_none, in_none):
            assert_tensor_close(y, want_eq, dtype, w)
        assert_tensor_close(one_d, np.concatenate([to_numpy(e).reshape(-1)[3 * rank : 3 * rank + 3] for e in eq]), dtype, w)


@pytest.mark.parametrize("world_size", WS)
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=dname)
async def test_broadcast_and_permute_tensor(world_size, dtype):
    w = world_size
    xs = [tdata(r, (4,), dtype) for r in range(w)]
    perm = [(m + 1) % w for m in range(w)]

    async def body(rank):
        b = await done(ft.broadcast(xs[rank], w - 1, None))
        p = await done(ft.permute_tensor(xs[rank], perm, None))
        return b, p

    for rank, (b, p) in enumerate(await run_ranks(body, w)):
        assert_tensor_close(b, to_numpy(xs[w - 1]), dtype, w)
        assert_tensor_close(p, to_numpy(xs[perm.index(rank)]), dtype, w)


@pytest.mark.parametrize("world_size", WS)
async def test_coalesced_ops_mixed_dtypes_and_dims(world_size):
    w = world_size
    dtypes = [torch.float32, torch.bfloat16, torch.int64, torch.float32, torch.complex128]
    shapes = [(w, 3), (2 * w,), (w, w), (3, 2 * w), (w, 1)]
    xs = [[tdata(r, s, d, seed=i) for i, (s, d) in enumerate(zip(shapes, dtypes))] for r in range(w)]
    dims = [0, 0, 1, 1, 0]

    async def body(rank):
        ar = [await done(t) for t in ft.all_reduce_coalesced(xs[rank], "sum", None)]
        ag = [await done(t) for t in ft.all_gather_into_tensor_coalesced(xs[rank], None)]
        rs = [await done(t) for t in ft.reduce_scatter_tensor_coalesced(xs[rank], "sum", dims, None)]
        return ar, ag, rs

    for rank, (ar, ag, rs) in enumerate(await run_ranks(body, w)):
        for i, d in enumerate(dtypes):
            column = [xs[r][i] for r in range(w)]
            full = reduce_torch_ref("sum", column)
            assert_tensor_close(ar[i], full, d, w)
            assert_tensor_close(ag[i], np.concatenate([to_numpy(t) for t in column]), d, w)
            assert_tensor_close(rs[i], np.split(full, w, axis=dims[i])[rank], d, w)


async def test_results_of_0d_and_empty_tensors():
    async def body(rank):
        s = await done(ft.all_reduce(torch.tensor(float(rank + 1)), "product", None))
        g = await done(ft.all_gather_tensor(torch.tensor(rank), 0, None))
        e = await done(ft.all_reduce(torch.empty(0, 3), "sum", None))
        return s, g, e

    for s, g, e in await run_ranks(body, 3):
        assert s.shape == () and float(s) == 6.0
        assert g.tolist() == [0, 1, 2]
        assert e.shape == (0, 3)


# --------------------------------------------------------------------------- the test_functional_api behaviours
async def test_traceable_collectives_over_meshes_at_4_ranks():
    """broadcast, all_reduce (1-d mesh and (mesh, 1)), coalesced, all_gather over dims 0-2 and
    reduce_scatter over dims 0-1 with 1-d and 2-d meshes, reduce_scatter coalesced on int64."""
    w = 4

    async def body(rank):
        out = {}
        mesh = aiocoll.DeviceMesh(np.arange(4))
        t = torch.ones(4) if rank == 0 else torch.zeros(4)
        out["broadcast"] = await done(ft.broadcast(t, 0, mesh))
        out["ar"] = await done(ft.all_reduce(torch.ones(4), "sum", mesh))
        mesh2 = aiocoll.DeviceMesh(np.arange(4).reshape(2, 2))
        out["ar2"] = await done(ft.all_reduce(torch.ones(4), "sum", (mesh2, 1)))
        t0, t1 = torch.ones(4), torch.ones(6) + 2
        out["arc"] = [await done(x) for x in ft.all_reduce_coalesced([t0, t1], "sum", mesh)]
        out["ag"] = []
        for m in (mesh, mesh2):
            for dim in (0, 1, 2):
                out["ag"].append(await done(ft.all_gather_tensor(torch.ones(3, 3, 3), dim, (m, 0))))
        out["rs"] = []
        for m in (mesh, mesh2):
            for dim in (0, 1):
                size = [3, 3]
                size[dim] *= m.size(0)
                out["rs"].append(await done(ft.reduce_scatter_tensor(torch.ones(size) * (rank + 1), "sum", dim, (m, 0))))
        ints = [torch.ones(4, dtype=torch.int64), torch.ones(4, dtype=torch.int64) + 1]
        out["rsc"] = [await done(x) for x in ft.reduce_scatter_tensor_coalesced(ints, "sum", [0, 0], mesh)]
        out["agc"] = [await done(x) for x in ft.all_gather_into_tensor_coalesced([t0, t0 + 1], mesh)]
        return out

    for rank, out in enumerate(await run_ranks(body, w)):
        assert torch.equal(out["broadcast"], torch.ones(4))
        assert torch.equal(out["ar"], torch.full((4,), 4.0))
        assert torch.equal(out["ar2"], torch.full((4,), 2.0))
        assert torch.equal(out["arc"][0], torch.full((4,), 4.0)) and torch.equal(out["arc"][1], torch.full((6,), 12.0))
        sizes = [4, 2]
        for k, g in enumerate(out["ag"]):
            m, dim = divmod(k, 3)
            want = [3, 3, 3]
            want[dim] *= sizes[m]
            assert torch.equal(g, torch.ones(want))
        for k, y in enumerate(out["rs"]):
            m = k // 2
            peers = range(4) if m == 0 else ([0, 2] if rank % 2 == 0 else [1, 3])
            assert torch.equal(y, torch.full((3, 3), float(sum(p + 1 for p in peers))))
        assert out["rsc"][0].tolist() == [4] and out["rsc"][1].tolist() == [8]
        assert torch.equal(out["agc"][0], torch.ones(16)) and torch.equal(out["agc"][1], torch.full((16,), 2.0))


async def test_permute_tensor_within_each_dim_of_a_2d_mesh():
    async def body(rank):
        mesh = aiocoll.init_device_mesh((2, 2), ("dp", "tp"))
        got = {}
        for name in ("dp", "tp"):
            sub = mesh[name]
            local = sub.get_local_rank()
            send = torch.arange(2, dtype=torch.float32) + 2 * local
            got[name] = (local, await done(ft.permute_tensor(send, [1, 0], sub)))
        return got

    for got in await run_ranks(body, 4):
        for local, recv in got.values():
            assert torch.equal(recv, torch.arange(2, dtype=torch.float32) + 2 * (1 - local))


async def test_every_group_form_and_tag_reaches_the_same_members():
    async def body(rank):
        x = torch.tensor([1 << rank])
        world = aiocoll.world()
        pair = [rank - rank % 2, rank - rank % 2 + 1]
        mesh = aiocoll.init_device_mesh((2, 2), ("dp", "tp"))
        forms = {  # name: (group, tag)
            "none": (None, ""),
            "group": (world, ""),
            "name": (world.name, ""),
            "list": ([0, 1, 2, 3], ""),
            "2d": ([[0, 1], [2, 3]], ""),
            "2d-tag": ([[0, 1], [2, 3]], "pairs"),
            "tuple-ranks": ((0, 1, 2, 3), "all"),
            "mesh-dim-name": ((mesh, "tp"), ""),
            "mesh-dim-index": ((mesh, 0), ""),
            "1d-mesh": (mesh["tp"], ""),
            "numpy": (np.array([[0, 1], [2, 3]]), ""),
        }
        out = {}
        for key, (group, tag) in forms.items():
            out[key] = int((await done(ft.all_reduce(x, "sum", group, tag)))[0])
        # a tag picks one group for a rank list; the same ranks and tag give the same group
        g = aiocoll.find_group(pair, tag="pairs")
        assert g is not None and g is aiocoll.find_or_create_group(list(reversed(pair)), "pairs")
        return out, pair

    for rank, (out, pair) in enumerate(await run_ranks(body, 4)):
        whole = 1 + 2 + 4 + 8
        part = sum(1 << p for p in pair)
        column = sum(1 << p for p in range(4) if p % 2 == rank % 2)  # dp groups: {0, 2}, {1, 3}
        assert out == {"none": whole, "group": whole, "name": whole, "list": whole, "2d": part,
                       "2d-tag": part, "tuple-ranks": whole, "mesh-dim-name": part, "numpy": part,
                       "mesh-dim-index": column, "1d-mesh": part}


async def test_bad_arguments_raise_at_the_call_and_send_nothing():
    async def body(rank):
        x = torch.zeros(3, 2)
        with pytest.raises(ValueError, match="unknown reduce op"):
            ft.all_reduce(x, "mean-ish", None)
        with pytest.raises(ValueError, match="bitwise"):
            ft.all_reduce(x, "bxor", None)
        with pytest.raises(ValueError, match="not divisible"):
            ft.reduce_scatter_tensor(x, "sum", 0, None)
        with pytest.raises(ValueError, match="out of range"):
            ft.all_gather_tensor(x, 2, None)
        with pytest.raises(ValueError, match="add up"):
            ft.all_to_all_single(x, [1, 2], [1, 1], None)
        with pytest.raises(ValueError, match="not divisible"):
            ft.all_to_all_single(x, None, None, None)
        with pytest.raises(ValueError, match="permutation"):
            ft.permute_tensor(x, [0, 0], None)
        with pytest.raises(ValueError, match="src=5"):
            ft.broadcast(x, 5, None)
        with pytest.raises(ValueError, match="group sizes must be identical"):
            ft.all_reduce(x, "sum", [[0], [1, 2]])
        with pytest.raises(ValueError, match="cannot use"):
            ft.all_reduce(x, "sum", 3.5)
        with pytest.raises(TypeError, match="dtype"):
            ft.all_reduce(torch.zeros(2, dtype=torch.complex32), "sum", None)
        # nothing was issued: the next collective is still step 0 on every member
        assert aiocoll.world()._seq == 0
        return await done(ft.all_reduce(torch.tensor([rank]), "sum", None))

    assert [int(y) for y in await run_ranks(body, 2)] == [1, 1]


# --------------------------------------------------------------------------- waiting
async def test_views_do_not_wait_and_real_use_does():
    late = asyncio.Event()  # rank 1 issues its collective only when rank 0 says so

    async def body(rank):
        if rank == 1:
            await late.wait()
            return await done(ft.all_reduce(torch.ones(4), "sum", None))
        y = ft.all_reduce(torch.ones(4), "sum", None)
        v = y.view(2, 2)
        s = v[1]
        d = y.detach()
        r = y.reshape(4, 1)
        for lazy in (v, s, d, r):
            assert isinstance(lazy, ft.AsyncCollectiveTensor) and not lazy.completed
        assert not y.work.done()
        with pytest.raises(RuntimeError, match=r"await aiocoll\.torch\.wait_async"):
            y + 1  # a real use, which here would block the loop that runs the collective
        late.set()
        got = await v
        assert got.shape == (2, 2) and torch.equal(got, torch.full((2, 2), 2.0))
        z = y + 1  # done now: waits at once, and the result is a plain tensor
        assert type(z) is torch.Tensor and torch.equal(z, torch.full((4,), 3.0))
        assert y.tolist() == [2.0] * 4 and "2." in repr(y) and "2." in str(s)
        assert float(y.sum()) == 8.0 and y.numpy().tolist() == [2.0] * 4
        return torch.full((4,), 2.0)

    for y in await run_ranks(body, 2):
        assert torch.equal(y, torch.full((4,), 2.0))


def test_a_result_waits_from_another_thread_without_a_loop():
    """From a thread with no running loop, the first real use blocks until the collective is done."""
    import threading

    import aiocoll.sync as coll

    async def body(rank):
        coll.bind()
        loop = asyncio.get_running_loop()
        ctx = __import__("contextvars").copy_context()
        fut = loop.create_future()

        def work():
            y = ft.all_reduce(torch.full((3,), float(rank)), "sum", None)
            assert isinstance(y, ft.AsyncCollectiveTensor)
            z = y * 2  # blocks here until both ranks ran the collective
            loop.call_soon_threadsafe(fut.set_result, z)

        threading.Thread(target=ctx.run, args=(work,), daemon=True).start()
        return await fut

    for z in asyncio.run(run_ranks(body, 2)):
        assert torch.equal(z, torch.full((3,), 2.0))


async def test_dropped_results_complete_without_hang_or_leak():
    async def body(rank):
        refs = []
        for i in range(5):
            y = ft.all_reduce(torch.full((1000,), float(i)), "sum", None)
            refs.append(weakref.ref(y))
            refs.append(weakref.ref(y.elem))
            del y  # dropped, never used
        gc.collect()
        # the next collective on the group still matches: the dropped ones ran in order
        z = await done(ft.all_reduce(torch.tensor([rank + 1.0]), "sum", None))
        await asyncio.sleep(0.01)
        gc.collect()
        return z, [r() is None for r in refs]

    for z, dead in await run_ranks(body, 2):
        assert float(z) == 3.0
        assert all(dead), dead  # wrappers and their buffers were freed
    assert _work.outstanding() == 0
    assert not _work._by_output  # no registry entry left behind


async def test_wait_tensor_is_idempotent_and_plain_tensors_pass_through():
    async def body(rank):
        y = ft.all_reduce(torch.ones(2), "sum", None)
        a = await ft.wait_async(y)
        b = ft.wait_tensor(y)
        c = ft.wait_tensor(torch.zeros(2))
        return a, b, c

    for a, b, c in await run_ranks(body, 2):
        assert torch.equal(a, b) and torch.equal(a, torch.full((2,), 2.0)) and torch.equal(c, torch.zeros(2))


async def test_a_failed_collective_raises_at_first_use():
    async def body(rank):
        # ranks disagree on the dtype: a mismatch every member reports
        x = torch.ones(2, dtype=torch.float32 if rank == 0 else torch.float64)
        y = ft.all_reduce(x, "sum", None)
        with pytest.raises(aiocoll.CollectiveError):
            await ft.wait_async(y)
        return True

    assert await run_ranks(body, 2) == [True, True]


async def test_lazy_result_as_input_to_the_core_and_to_another_collective():
    async def body_awaiting(rank):
        y = ft.all_reduce(torch.ones(3), "sum", None)
        await y
        z = ft.all_reduce(y, "sum", None)
        c = await aiocoll.all_reduce(y)  # the core reads a waited lazy result as a tensor
        return await done(z), c

    for z, c in await run_ranks(body_awaiting, 2):
        assert torch.equal(z, torch.full((3,), 4.0)) and torch.equal(c, torch.full((3,), 4.0))
        assert type(c) is torch.Tensor


# --------------------------------------------------------------------------- the surface
FUNCOL_NAMES = [
    "all_reduce", "all_gather_tensor", "reduce_scatter_tensor", "all_to_all_single", "broadcast",
    "permute_tensor", "all_reduce_coalesced", "all_gather_into_tensor_coalesced",
    "reduce_scatter_tensor_coalesced", "all_gather_tensor_autograd", "reduce_scatter_tensor_autograd",
    "all_to_all_single_autograd", "wait_tensor",
]


@pytest.mark.parametrize("name", FUNCOL_NAMES)
def test_signatures_match_torch_functional_collectives(name):
    """Code written for torch.distributed._functional_collectives runs by changing the import."""
    import inspect

    import torch.distributed._functional_collectives as torch_funcol

    ours = inspect.signature(getattr(ft, name)).parameters
    theirs = inspect.signature(getattr(torch_funcol, name)).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == [
        (p.name, p.kind, p.default) for p in theirs.values()
    ]
    assert getattr(ft, name).__doc__


def test_all_lists_the_public_names():
    import types

    public = {n for n, o in vars(ft).items() if not n.startswith("_") and not isinstance(o, types.ModuleType)}
    assert set(ft.__all__) == public - {"annotations"}
