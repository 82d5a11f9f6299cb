"""CUDA tensors through aiocoll.torch and aiocoll.sync: results on the input's device, copies
ordered on the caller's stream, gradients. Runs on the device machine (pytest -m gpu); every
rank shares the one GPU there."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is an optional extra; the [test] set-up (.ci/run) installs the CPU build")

import aiocoll  # noqa: E402
import aiocoll.sync as coll  # noqa: E402
import aiocoll.torch as ft  # noqa: E402
from aiocoll.testing import run_ranks  # noqa: E402

from _torch_reference import (  # noqa: E402
    TORCH_DTYPES,
    assert_tensor_close,
    blocking_ranks,
    dname,
    gpu,
    needs_cuda,
    reduce_torch_ref,
    tdata,
    to_numpy,
)

pytestmark = [gpu, needs_cuda]


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=dname)
async def test_every_functional_collective_on_cuda_tensors(world_size, dtype):
    w = world_size
    op = "max" if not dtype.is_complex else "sum"
    xs = [tdata(r, (2 * w, 300), dtype, op) for r in range(w)]  # above the pinned-staging size

    async def body(rank):
        x = xs[rank].cuda()
        outs = [
            ft.all_reduce(x, op, None),
            ft.all_gather_tensor(x, 1, None),
            ft.reduce_scatter_tensor(x, op, 0, None),
            ft.all_to_all_single(x, None, None, None),
            ft.broadcast(x, 0, None),
            *ft.all_reduce_coalesced([x, x[:1]], op, None),
        ]
        return [await ft.wait_async(t) for t in outs]

    full = reduce_torch_ref(op, xs)
    ref = [to_numpy(x) for x in xs]
    for rank, outs in enumerate(await run_ranks(body, w)):
        for t in outs:
            assert t.device.type == "cuda"
        ar, ag, rs, a2a, b, c0, c1 = outs
        assert_tensor_close(ar, full, dtype, w, device="cuda")
        assert_tensor_close(ag, np.concatenate(ref, axis=1), dtype, w, device="cuda")
        assert_tensor_close(rs, np.split(full, w)[rank], dtype, w, device="cuda")
        assert_tensor_close(a2a, np.concatenate([x[2 * rank : 2 * rank + 2] for x in ref]), dtype, w, device="cuda")
        assert_tensor_close(b, ref[0], dtype, w, device="cuda")
        assert_tensor_close(c0, full, dtype, w, device="cuda")
        assert_tensor_close(c1, full[:1], dtype, w, device="cuda")


async def test_inputs_and_outputs_follow_the_callers_side_stream():
    """The input is written late on a side stream; the call and the use of the result are on that
    stream: the collective must see the write, and the use must see the result."""
    w = 2

    def rank_fn(rank):
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            x = torch.full((1 << 20,), float(rank + 1), device="cuda")
            torch.cuda._sleep(50_000_000)  # keep the stream busy: the next write lands late
            x.mul_(2)
            y = ft.all_reduce(x, "sum", None)
            x.fill_(-1)  # the input may change at once: the collective took a snapshot
            z = y * 10  # waits, then runs on s after the result's copy
            blocking = coll.all_reduce(x, "sum")  # the blocking API stages on this stream too
        torch.cuda.synchronize()
        return z.cpu(), blocking.cpu()

    for z, blocking in await blocking_ranks(rank_fn, w):
        assert torch.equal(z, torch.full((1 << 20,), 60.0))
        assert torch.equal(blocking, torch.full((1 << 20,), -2.0))


async def test_wait_orders_another_stream_after_the_result():
    w = 2

    def rank_fn(rank):
        y = ft.all_reduce(torch.full((1 << 18,), float(rank), device="cuda"), "sum", None)
        done = ft.wait_tensor(y)
        other = torch.cuda.Stream()
        other.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(other):
            out = done + 1
        torch.cuda.synchronize()
        return out.cpu()

    for out in await blocking_ranks(rank_fn, w):
        assert torch.equal(out, torch.full((1 << 18,), 2.0))


GRADIENTS = """
import torch
import aiocoll.sync as coll
import aiocoll.torch as ft

pg = coll.init()
r, w = pg.rank, pg.size
xs = [torch.randn(2 * w, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(p)) for p in range(w)]
x = xs[r].cuda().requires_grad_()
y = ft.all_gather_tensor(x, 1, None)
z = ft.reduce_scatter_tensor(y * (r + 1), "sum", 0, None)
(z * z).sum().backward()              # CUDA backward: on autograd's device thread

ref = [t.clone().requires_grad_() for t in xs]
full = sum(torch.cat(ref, dim=1) * (p + 1) for p in range(w))
zs = torch.chunk(full, w, dim=0)
sum((t * t).sum() for t in zs).backward()
torch.testing.assert_close(z.detach().cpu(), zs[r].detach(), rtol=1e-12, atol=1e-12)
torch.testing.assert_close(x.grad.cpu(), ref[r].grad, rtol=1e-12, atol=1e-12)
assert x.grad.device.type == "cuda"
coll.destroy()
print(f"rank {r} cuda grads ok", flush=True)
"""


@pytest.mark.parametrize("world_size", [2, 4])
def test_gradients_on_cuda_in_processes(world_size, tmp_path):
    # Real processes: in one process, ranks sharing a GPU would share autograd's one thread for
    # that device, and one rank's backward would wait there for the others' forever.
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    script = tmp_path / "cuda_grads.py"
    script.write_text(GRADIENTS)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "aiocoll", "run", "-n", str(world_size), "--transport", "tcp", str(script)],
        capture_output=True, text=True, timeout=240, env=env, cwd=repo,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in range(world_size):
        assert f"rank {r} cuda grads ok" in proc.stdout


async def test_core_async_api_on_cuda_keeps_the_device():
    async def body(rank):
        x = torch.full((3,), float(rank), device="cuda", dtype=torch.bfloat16)
        y = await aiocoll.all_reduce(x)
        out = torch.empty_like(x)
        await aiocoll.all_reduce(x, out=out)
        return y, out

    for y, out in await run_ranks(body, 2):
        assert y.device.type == "cuda" and out.device.type == "cuda" and y.dtype == torch.bfloat16
        assert y.tolist() == [1.0] * 3 and out.tolist() == [1.0] * 3
