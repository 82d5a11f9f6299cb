"""The core collectives on torch tensors: every dtype (float16, bfloat16, bool, complex included),
results of the input's dtype and device, CPU tensors read without a copy."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is an optional extra; the [test] set-up (.ci/run) installs the CPU build")

import aiocoll  # noqa: E402
from aiocoll.arrays.adapt import as_payload  # noqa: E402
from aiocoll.arrays.dtypes import WireDtype, wire_dtype  # noqa: E402
from aiocoll.testing import run_ranks  # noqa: E402

from _torch_reference import (  # noqa: E402
    OPS,
    TORCH_DTYPES,
    assert_tensor_close,
    dname,
    gpu,
    needs_cuda,
    op_valid,
    reduce_torch_ref,
    tdata,
    to_numpy,
)

SHAPE = (5, 3)
VALID = [(d, op) for d in TORCH_DTYPES for op in OPS if op_valid(op, d)]


# --------------------------------------------------------------------------- the payload
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=dname)
def test_cpu_tensor_is_read_without_a_copy(dtype):
    t = tdata(0, SHAPE, dtype)
    p = as_payload(t)
    assert p.array.shape == SHAPE
    assert p.array.ctypes.data == t.data_ptr()  # a view of the tensor's memory
    if dtype == torch.bfloat16:
        assert p.code == WireDtype.BFLOAT16
    else:
        assert p.code == wire_dtype(t.numpy().dtype)
    back = p.wrap(p.array.copy())
    assert back.dtype == dtype and back.device.type == "cpu"
    assert torch.equal(back, t)


def test_bfloat16_travels_as_its_16_bit_words():
    t = torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16)
    p = as_payload(t)
    assert p.code == WireDtype.BFLOAT16
    assert p.array.dtype == np.uint16
    np.testing.assert_array_equal(p.array, t.view(torch.int16).numpy().view(np.uint16))


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(24.0).reshape(4, 6)[:, ::2],  # strided
        lambda: torch.arange(12.0).reshape(3, 4).t(),  # transposed
        lambda: torch.complex(torch.arange(4.0), torch.ones(4)).conj(),  # conjugate bit
        lambda: torch.complex(torch.arange(4.0), torch.ones(4)).conj().imag,  # negative bit
        lambda: torch.arange(6.0, requires_grad=True) * 2,  # part of an autograd graph
        lambda: torch.nn.Parameter(torch.arange(3.0)),
    ],
    ids=["strided", "transposed", "conj", "neg", "requires_grad", "parameter"],
)
def test_any_dense_tensor_reads_its_logical_values(make):
    t = make()
    p = as_payload(t)
    np.testing.assert_array_equal(p.array, t.detach().resolve_conj().resolve_neg().numpy())
    assert p.array.flags.c_contiguous


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: torch.empty(3, device="meta"), "meta tensor"),
        (lambda: torch.zeros(3, 3).to_sparse(), "sparse"),
        (lambda: torch.zeros(3, dtype=torch.complex32), "complex32"),
        (lambda: torch.quantize_per_tensor(torch.zeros(3), 0.1, 0, torch.qint8), "quantized"),
        (lambda: torch.Size([3]), "must be a torch.Tensor"),
    ],
    ids=["meta", "sparse", "complex32", "quantized", "size"],
)
def test_unsupported_tensors_raise_type_error(make, match):
    with pytest.raises(TypeError, match=match):
        as_payload(make())


def test_tensor_subclass_is_refused_with_a_hint():
    class Sub(torch.Tensor):
        pass

    with pytest.raises(TypeError, match="subclass Sub"):
        as_payload(torch.zeros(2).as_subclass(Sub))


# --------------------------------------------------------------------------- every collective
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("dtype_op", VALID, ids=[f"{dname(d)}-{op}" for d, op in VALID])
async def test_all_reduce_tensors_every_dtype_and_op(world_size, dtype_op):
    dtype, op = dtype_op
    inputs = [tdata(r, SHAPE, dtype, op) for r in range(world_size)]

    async def body(rank):
        x = inputs[rank]
        before = x.clone()
        y = await aiocoll.all_reduce(x, op)
        assert torch.equal(x, before)  # input untouched
        return y

    results = await run_ranks(body, world_size)
    want = reduce_torch_ref(op, inputs)
    for y in results:
        assert_tensor_close(y, want, dtype, world_size)
        assert torch.equal(y, results[0])  # bit-identical on every rank


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=dname)
async def test_all_gather_reduce_scatter_broadcast_keep_dtype(dtype):
    w = 3
    xs = [tdata(r, (3, 2), dtype) for r in range(w)]

    async def body(rank):
        g = await aiocoll.all_gather(xs[rank], dim=1)
        rs = await aiocoll.reduce_scatter(xs[rank], "max" if not dtype.is_complex else "sum")
        b = await aiocoll.broadcast(xs[rank], src=2)
        return g, rs, b

    results = await run_ranks(body, w)
    want_g = np.concatenate([to_numpy(x) for x in xs], axis=1)
    want_rs = reduce_torch_ref("max" if not dtype.is_complex else "sum", xs)
    for rank, (g, rs, b) in enumerate(results):
        assert_tensor_close(g, want_g, dtype, w)
        assert_tensor_close(rs, want_rs[rank : rank + 1], dtype, w)
        assert_tensor_close(b, to_numpy(xs[2]), dtype, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.bool, torch.complex128, torch.int64],
                         ids=dname)
async def test_point_to_point_gather_scatter_all_to_all_permute_keep_dtype(dtype):
    w = 3
    xs = [tdata(r, (6, 2), dtype) for r in range(w)]

    async def body(rank):
        out = {}
        out["gather"] = await aiocoll.gather(xs[rank], dst=1)
        out["scatter"] = await aiocoll.scatter(xs[rank], src=0)
        out["a2a"] = await aiocoll.all_to_all(
            xs[rank], output_split_sizes=[rank + 1] * 3, input_split_sizes=[1, 2, 3]
        )
        out["perm"] = await aiocoll.permute(xs[rank], [1, 2, 0])
        out["reduce"] = await aiocoll.reduce(xs[rank], dst=0, op="max" if not dtype.is_complex else "sum")
        if rank == 0:
            await aiocoll.send(xs[0], dst=1, tag=7)
        elif rank == 1:
            out["recv"] = await aiocoll.recv(torch.empty_like(xs[0]), src=0, tag=7)
        return out

    results = await run_ranks(body, w)
    ref = [to_numpy(x) for x in xs]
    for rank, out in enumerate(results):
        if rank == 1:
            assert_tensor_close(out["gather"], np.concatenate(ref), dtype, w)
            assert_tensor_close(out["recv"], ref[0], dtype, w)
        else:
            assert out["gather"] is None
        assert_tensor_close(out["scatter"], ref[0][2 * rank : 2 * rank + 2], dtype, w)
        starts = [0, 1, 3]
        want_a2a = np.concatenate([ref[p][starts[rank] : starts[rank] + rank + 1] for p in range(w)])
        assert_tensor_close(out["a2a"], want_a2a, dtype, w)
        assert_tensor_close(out["perm"], ref[(rank - 1) % w], dtype, w)
        if rank == 0:
            want = reduce_torch_ref("max" if not dtype.is_complex else "sum", xs)
            assert_tensor_close(out["reduce"], want, dtype, w)
        else:
            assert_tensor_close(out["reduce"], ref[rank], dtype, w)


async def test_coalesced_with_mixed_dtypes_returns_each_dtype():
    w = 2
    dtypes = [torch.bfloat16, torch.float16, torch.int32, torch.bfloat16, torch.complex64]
    xs = [[tdata(r, (4, i + 1), d, seed=i) for i, d in enumerate(dtypes)] for r in range(w)]

    async def body(rank):
        ar = await aiocoll.all_reduce_coalesced(xs[rank], "sum")
        ag = await aiocoll.all_gather_coalesced(xs[rank])
        rs = await aiocoll.reduce_scatter_coalesced(xs[rank], "sum", dims=[0, 0, 0, 1, 0])
        return ar, ag, rs

    results = await run_ranks(body, w)
    for rank, (ar, ag, rs) in enumerate(results):
        for i, d in enumerate(dtypes):
            column = [xs[r][i] for r in range(w)]
            full = reduce_torch_ref("sum", column)
            assert_tensor_close(ar[i], full, d, w)
            assert_tensor_close(ag[i], np.concatenate([to_numpy(t) for t in column]), d, w)
            want = np.split(full, w, axis=1 if i == 3 else 0)[rank]
            assert_tensor_close(rs[i], want, d, w)


async def test_tensor_result_does_not_alias_the_input():
    async def body(rank):
        x = torch.full((3,), float(rank))
        y = await aiocoll.broadcast(x, src=0)  # on rank 0: src's own copy
        y += 1
        return x, y

    for rank, (x, y) in enumerate(await run_ranks(body, 2)):
        assert torch.equal(x, torch.full((3,), float(rank)))
        assert torch.equal(y, torch.full((3,), 1.0))


# --------------------------------------------------------------------------- out=
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.complex64], ids=dname)
async def test_all_reduce_into_contiguous_out_writes_in_place(dtype):
    xs = [tdata(r, SHAPE, dtype) for r in range(3)]

    async def body(rank):
        out = torch.zeros(SHAPE, dtype=dtype)
        ptr = out.data_ptr()
        got = await aiocoll.all_reduce(xs[rank], "sum", out=out)
        assert got is out and out.data_ptr() == ptr
        return out

    for out in await run_ranks(body, 3):
        assert_tensor_close(out, reduce_torch_ref("sum", xs), dtype, 3)


async def test_all_reduce_into_strided_out_and_numpy_into_tensor():
    xs = [tdata(r, (4, 3), torch.float64) for r in range(2)]

    async def body(rank):
        out = torch.zeros(3, 4, dtype=torch.float64).t()  # non-contiguous view
        got = await aiocoll.all_reduce(xs[rank], out=out)
        assert got is out
        out2 = torch.zeros(4, 3, dtype=torch.float64)
        got2 = await aiocoll.all_reduce(xs[rank].numpy(), out=out2)
        assert got2 is out2
        return out, out2

    want = reduce_torch_ref("sum", xs)
    for out, out2 in await run_ranks(body, 2):
        assert_tensor_close(out, want, torch.float64, 2)
        assert_tensor_close(out2, want, torch.float64, 2)


async def test_recv_into_out_tensor():
    async def body(rank):
        if rank == 0:
            await aiocoll.send(torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), dst=1)
            return None
        out = torch.zeros(2, 3, dtype=torch.bfloat16)
        got = await aiocoll.recv(out, src=0, out=out)
        assert got is out
        return out

    _, out = await run_ranks(body, 2)
    assert torch.equal(out, torch.arange(6, dtype=torch.bfloat16).reshape(2, 3))


@pytest.mark.parametrize(
    "x_dtype, out, exc, match",
    [
        (torch.float32, lambda: torch.zeros(SHAPE, dtype=torch.float64), TypeError, "dtype torch.float64"),
        (torch.bfloat16, lambda: torch.zeros(SHAPE, dtype=torch.int16), TypeError, "int16"),  # same width
        (torch.float32, lambda: torch.zeros(3, 5), ValueError, "shape"),
    ],
    ids=["other-dtype", "bf16-vs-int16", "other-shape"],
)
async def test_bad_out_tensor_raises_before_anything_is_sent(x_dtype, out, exc, match):
    x = torch.zeros(SHAPE, dtype=x_dtype)

    async def body(rank):
        with pytest.raises(exc, match=match):
            await aiocoll.all_reduce(x, out=out())
        return await aiocoll.all_reduce(torch.tensor([rank]))  # the group is still usable

    assert [int(r) for r in await run_ranks(body, 2)] == [1, 1]


# --------------------------------------------------------------------------- CUDA (device machine)
@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=dname)
async def test_cuda_tensors_are_staged_and_come_back_on_their_device(dtype):
    w = 2
    xs = [tdata(r, (64, 33), dtype) for r in range(w)]  # 2112 elements: pinned path for wide dtypes
    op = "max" if not dtype.is_complex else "sum"

    async def body(rank):
        x = xs[rank].cuda()
        y = await aiocoll.all_reduce(x, op)
        g = await aiocoll.all_gather(x, dim=1)
        out = torch.empty_like(x)
        z = await aiocoll.all_reduce(x, op, out=out)
        assert z is out
        return y, g, out

    for y, g, out in await run_ranks(body, w):
        want = reduce_torch_ref(op, xs)
        assert_tensor_close(y, want, dtype, w, device="cuda")
        assert_tensor_close(out, want, dtype, w, device="cuda")
        assert_tensor_close(g, np.concatenate([to_numpy(x) for x in xs], axis=1), dtype, w, device="cuda")


@gpu
@needs_cuda
async def test_cuda_input_written_on_a_side_stream_is_seen():
    w = 2

    async def body(rank):
        from aiocoll.arrays.tensors import recorded_streams

        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            x = torch.full((1 << 20,), float(rank + 1), device="cuda")
            torch.cuda._sleep(10_000_000)  # keep the stream busy: the write lands late
            x.mul_(2)
            with recorded_streams([x]):
                y = await aiocoll.all_reduce(x)
            return y.cpu()

    for y in await run_ranks(body, w):
        assert torch.equal(y, torch.full((1 << 20,), 6.0))
