"""CUDA arrays device to device over ucx (aiocoll.engines.gpu), and the staged path without it.

The process tests need a CUDA GPU and ucxx: they are marked ``gpu`` and run on the device machine
(``scripts/device_gpu_tests.sh``, every rank sharing its one GPU); elsewhere they skip saying so.
The rest (the pinned pool's reuse logic, the engine's choice, the transport's device flag) runs
everywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is an optional extra; the [test] set-up installs the CPU build")

REPO = Path(__file__).resolve().parents[2]


def _has_ucxx() -> bool:
    try:
        import aiocoll.transports.ucx  # noqa: F401
    except ImportError:
        return False
    return True


needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or not _has_ucxx(),
    reason="needs a CUDA GPU and ucxx: runs on the device machine (scripts/device_gpu_tests.sh, pytest -m gpu)",
)


# --------------------------------------------------------------------------- everywhere
def test_pinned_pool_reuses_buffers_once_their_copy_has_run() -> None:
    from aiocoll.arrays.cuda import POOL_MIN, PinnedPool, size_class

    made: list[bytearray] = []

    def alloc(n: int) -> bytearray:
        made.append(bytearray(n))
        return made[-1]

    pool = PinnedPool(alloc, limit=1 << 30)
    assert size_class(1) == POOL_MIN and size_class(POOL_MIN + 1) == 2 * POOL_MIN
    a = pool.take(100_000)
    assert len(a) == 1 << 17 and pool.allocations == 1
    busy = [True]
    pool.give(a, 100_000, lambda: not busy[0])
    b = pool.take(100_000)  # a's copy has not run: a fresh buffer
    assert b is not a and pool.allocations == 2
    busy[0] = False
    c = pool.take(70_000)  # same size class, copy done: a again
    assert c is a and pool.allocations == 2
    pool.give(b, 100_000)
    pool.give(c, 100_000)
    for _ in range(100):  # steady state: no allocation per call
        x = pool.take(100_000)
        pool.give(x, 100_000)
    assert pool.allocations == 2


def test_pinned_pool_keeps_no_more_idle_bytes_than_its_limit() -> None:
    from aiocoll.arrays.cuda import PinnedPool

    pool = PinnedPool(lambda n: bytearray(n), limit=1 << 20)
    bufs = [pool.take(1 << 19) for _ in range(4)]
    for b in bufs:
        pool.give(b, 1 << 19)
    assert pool.idle_bytes == 1 << 20


def test_pool_limit_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiocoll.arrays.cuda import pool_limit

    monkeypatch.setenv("AIOCOLL_PINNED_POOL_BYTES", "123")
    assert pool_limit() == 123
    monkeypatch.setenv("AIOCOLL_PINNED_POOL_BYTES", "lots")
    with pytest.raises(ValueError, match="AIOCOLL_PINNED_POOL_BYTES"):
        pool_limit()


def test_gpu_settings_are_checked() -> None:
    import aiocoll
    from aiocoll.engines import gpu

    with pytest.raises(ValueError, match="AIOCOLL_GPU_TRANSPORT"):
        aiocoll.Settings.from_env({"AIOCOLL_GPU_TRANSPORT": "sometimes"})
    with pytest.raises(ValueError, match="AIOCOLL_GPU_DIRECT_MIN_BYTES"):
        aiocoll.Settings.from_env({"AIOCOLL_GPU_DIRECT_MIN_BYTES": "x"})
    off = aiocoll.Settings.from_env({"AIOCOLL_GPU_TRANSPORT": "off", "AIOCOLL_GPU_DIRECT_MIN_BYTES": "0"})
    assert (off.gpu_transport, off.gpu_direct_min_bytes) == ("off", 0)
    assert gpu.device_transport("auto", off) is None
    assert gpu.device_transport("tcp", aiocoll.Settings()) is None  # only beside "auto"


def test_cpu_arrays_never_take_the_gpu_path() -> None:
    from aiocoll.engines.gpu import is_cuda_array

    assert not is_cuda_array(np.zeros(3))
    assert not is_cuda_array(torch.zeros(3))
    assert not is_cuda_array(memoryview(b"abc"))


async def test_communicator_gives_early_device_frames_device_scratch() -> None:
    # A frame the sender gave in device memory, arriving before its receive is posted, waits in
    # what device_scratch makes (device memory on a GPU machine), and the receive posted later
    # into device memory gets it copied in. Here the "device" is host memory labelled as CUDA.
    from aiocoll.core import comm as comm_mod
    from aiocoll.core.wire import FrameKey, Kind

    class Labelled:
        def __init__(self, n: int) -> None:
            self.array = np.zeros(n, np.uint8)
            self.nbytes = n
            self.__cuda_array_interface__ = {"shape": (n,), "typestr": "|u1", "data": (self.array.ctypes.data, False),
                                             "version": 3}

    made: list[Labelled] = []

    def scratch(n: int) -> Labelled:
        made.append(Labelled(n))
        return made[-1]

    copies: list[tuple[Any, Any]] = []

    def fake_copy(dst: Any, src: Any) -> None:
        copies.append((dst, src))
        dst.array[:] = src.array

    c = comm_mod.Communicator(0, 2)
    c.device_scratch = scratch
    key = FrameKey(7, 1, 0, Kind.ALL_REDUCE, 1, 0, 0, 4)
    raw = key.pack()
    buf = c.frame_buffer_from_device(1, raw, 16)
    assert buf is made[0]
    buf.array[:] = np.arange(16, dtype=np.uint8)
    c.frame_received(1, raw, buf)
    import aiocoll.arrays.cuda as cuda_mod

    orig = cuda_mod.copy_bytes
    cuda_mod.copy_bytes = fake_copy
    try:
        dst = Labelled(16)
        fut = c.post_recv(1, key, dst, None)
        await fut
    finally:
        cuda_mod.copy_bytes = orig
    assert copies and copies[0][0] is dst
    assert dst.array.tolist() == list(range(16))
    # Without a device_scratch, an early device frame waits in host memory, as before.
    c.device_scratch = None
    key2 = FrameKey(7, 2, 0, Kind.ALL_REDUCE, 1, 0, 0, 4)
    assert isinstance(c.frame_buffer_from_device(1, key2.pack(), 16), memoryview)


# --------------------------------------------------------------------------- on the GPU machine
SCRIPT = textwrap.dedent(
    """
    import asyncio, os, sys, time
    import numpy as np
    import torch
    import aiocoll
    import aiocoll.arrays.tensors as staging
    from aiocoll.engines import gpu

    staged = [0]
    _orig = staging._to_host
    def counting(t):
        staged[0] += 1
        return _orig(t)
    staging._to_host = counting

    def data(rank, shape, dtype, seed):
        rng = np.random.default_rng(1000 * seed + rank)
        if dtype == "bool":
            return rng.random(shape) < 0.5
        if dtype.startswith("int"):
            return rng.integers(-50, 50, shape).astype(dtype)
        return rng.standard_normal(shape).astype(np.float32)

    def reference(op, arrays):
        a = np.stack([x.astype(np.float64) if x.dtype != bool else x for x in arrays])
        if op == "sum":
            return a.any(0) if a.dtype == bool else a.sum(0)
        if op == "max":
            return a.any(0) if a.dtype == bool else a.max(0)
        if op == "min":
            return a.all(0) if a.dtype == bool else a.min(0)
        if op == "avg":
            s = a.sum(0)
            return s / len(arrays)
        raise ValueError(op)

    def tensor(a, dtype):
        t = torch.from_numpy(np.ascontiguousarray(a))
        if dtype == "bfloat16":
            t = t.to(torch.bfloat16)
        return t.cuda()

    async def main():
        pg = await aiocoll.init()
        r, w = pg.rank, pg.size
        comm = pg.world.comm
        assert all(comm.has_device_path(p) for p in range(w) if p != r), "no ucx device connections"
        transports = list(comm.transports)
        n = 1 << 18  # elements: 1 MiB of float32, above the GPU-direct minimum
        seed = 0
        for dtype in ("float32", "bfloat16", "int32", "bool"):
            for op in ("sum", "max", "avg", "min"):
                if dtype == "bool" and op == "avg":
                    continue
                seed += 1
                xs = [data(p, (n,), "float32" if dtype == "bfloat16" else dtype, seed) for p in range(w)]
                if dtype == "bfloat16":
                    xs = [torch.from_numpy(x).to(torch.bfloat16).float().numpy() for x in xs]
                x = tensor(xs[r], dtype)
                torch.cuda.current_stream().synchronize()
                y = await aiocoll.all_reduce(x, op)
                assert y.device == x.device and y.dtype == x.dtype and y.shape == x.shape
                want = reference(op, xs)
                got = y.float().cpu().numpy() if dtype == "bfloat16" else y.cpu().numpy()
                if dtype == "int32" and op == "avg":
                    want = np.trunc(want)
                tol = 2e-2 if dtype == "bfloat16" else 1e-5
                assert np.allclose(got.astype(np.float64), want.astype(np.float64), rtol=tol, atol=tol), (dtype, op)
        # bit-identical everywhere, in place (out=x), a side stream, all_gather along dims,
        # reduce_scatter with avg
        x = torch.from_numpy(data(r, (n,), "float32", 99)).cuda()
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            x.mul_(3.0)
            y = await aiocoll.all_reduce(x, out=x)
        side.synchronize()
        everyone = await aiocoll.all_gather(y.reshape(1, -1))
        assert all(torch.equal(everyone[0], everyone[p]) for p in range(w))
        want = sum(data(p, (n,), "float32", 99) * np.float32(3.0) for p in range(w))
        assert np.allclose(y.cpu().numpy(), want, rtol=1e-5, atol=1e-4)
        g = torch.from_numpy(data(r, (64, 4096), "float32", 5)).cuda()
        for dim in (0, 1, -1):
            got = await aiocoll.all_gather(g, dim=dim)
            ref = np.concatenate([data(p, (64, 4096), "float32", 5) for p in range(w)], axis=dim)
            assert np.array_equal(got.cpu().numpy(), ref), dim
        s = torch.from_numpy(data(r, (w * 64, 2048), "float32", 6)).cuda()
        for dim, op in ((0, "sum"), (1, "avg")):
            sc = s if dim == 0 else s.t().contiguous().t().contiguous()
            got = await aiocoll.reduce_scatter(sc, op, dim=dim)
            full = reference(op, [data(p, (w * 64, 2048), "float32", 6) for p in range(w)])
            ref = np.split(full, w, axis=dim)[r]
            assert np.allclose(got.cpu().numpy(), ref, rtol=1e-5, atol=1e-4), (dim, op)
        try:
            import cupy
        except ImportError:
            cupy = None
        if cupy is not None:
            c = cupy.full((1 << 18,), r + 1, dtype=cupy.float32)
            cupy.cuda.runtime.deviceSynchronize()
            got = await aiocoll.all_reduce(c)
            assert isinstance(got, cupy.ndarray) and float(got[0]) == w * (w + 1) / 2
        assert staged[0] == 0, f"{staged[0]} CUDA tensors were staged through host memory"
        # Small ones are staged on purpose (faster than a device rendezvous), and right.
        tiny = torch.full((1,), float(r + 1), device="cuda")
        assert float(await aiocoll.all_reduce(tiny)) == w * (w + 1) / 2
        # A mismatch still raises on every member, also device to device.
        bad = torch.zeros(n + (r == 0) * 1024, device="cuda")
        try:
            await aiocoll.all_reduce(bad, timeout=20)
        except aiocoll.MismatchError as exc:
            print(f"rank {r} mismatch raised: {exc}", flush=True)
        else:
            raise AssertionError("a mismatch went unnoticed")
        await aiocoll.destroy()
        # Idle costs no CPU: measure a fresh world doing nothing for 10 s.
        pg = await aiocoll.init()
        t0 = time.process_time()
        await asyncio.sleep(10)
        idle = time.process_time() - t0
        print(f"rank {r} idle cpu {idle:.3f} s in 10 s", flush=True)
        assert idle < 0.5, idle
        ucx = [t for t in pg.world.comm.transports if t.name == "ucx"]
        await aiocoll.destroy()
        for t in transports + ucx:
            engine = getattr(t, "_engine", None)
            if engine is not None:
                assert engine.closed and not engine._endpoints and not engine._ops, "UCX left endpoints or requests"
        print(f"rank {r} gpu direct ok", flush=True)

    aiocoll.run(main())
    """
)

STAGED = textwrap.dedent(
    """
    import numpy as np
    import torch
    import aiocoll
    from aiocoll.arrays.cuda import pinned_pool

    async def main():
        pg = await aiocoll.init()
        r, w = pg.rank, pg.size
        assert not any(pg.world.comm.has_device_path(p) for p in range(w) if p != r)
        for n in (1, 1 << 14, 1 << 18, 1 << 22):
            x = torch.arange(n, dtype=torch.float32, device="cuda") * (r + 1)
            for _ in range(3):
                y = await aiocoll.all_reduce(x)
            assert torch.equal(y, torch.arange(n, dtype=torch.float32, device="cuda") * (w * (w + 1) / 2)), n
            g = await aiocoll.all_gather(x)
            base = torch.arange(n, dtype=torch.float32, device="cuda")
            assert torch.equal(g, torch.cat([base * (p + 1) for p in range(w)])), n
        before = pinned_pool().allocations
        for _ in range(20):
            await aiocoll.all_reduce(x)
        assert pinned_pool().allocations == before, "the staged path allocated pinned memory per call"
        await aiocoll.destroy()
        print(f"rank {r} staged ok", flush=True)

    aiocoll.run(main())
    """
)

DDP = textwrap.dedent(
    """
    import torch
    import torch.distributed as dist
    import aiocoll.torch  # noqa: F401
    import aiocoll.arrays.tensors as staging

    staged = [0]
    _orig = staging._to_host
    def counting(t):
        staged[0] += 1
        return _orig(t)
    staging._to_host = counting

    dist.init_process_group("aiocoll")
    r, w = dist.get_rank(), dist.get_world_size()

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 1)).cuda()

    model = make()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    staged[0] = 0  # DDP's start-up broadcast is not a GPU-direct collective; its gradients are
    xs = torch.randn(4 * w, 64, generator=torch.Generator().manual_seed(1)).cuda()
    ddp(xs[4 * r : 4 * r + 4]).pow(2).mean().backward()
    ref = make()
    ref(xs).pow(2).mean().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    x = torch.full((1 << 20,), float(r), device="cuda")
    y = aiocoll.torch.all_reduce(x, "sum", dist.group.WORLD)
    assert float(aiocoll.torch.wait_tensor(y)[5]) == float(sum(range(w)))
    dist.destroy_process_group()
    assert staged[0] == 0, f"{staged[0]} tensors staged through host memory"
    print(f"rank {r} ddp cuda ok", flush=True)
    """
)


def _launch(script: str, n: int, tmp_path: Path, **env_extra: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "gpu_script.py"
    path.write_text(script)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-m", "aiocoll", "run", "-n", str(n), "--transport", "auto", "--timeout", "60", str(path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
    )


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("n", [2, 4])
def test_cuda_collectives_go_device_to_device_over_cuda_ipc(n: int, tmp_path: Path) -> None:
    proc = _launch(SCRIPT, n, tmp_path, UCX_PROTO_INFO="y")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for r in range(n):
        assert f"rank {r} gpu direct ok" in proc.stdout, out[-4000:]
    # UCX's own account of the protocol it chose for device memory: zero-copy over cuda_ipc.
    lanes = [line for line in out.splitlines() if "cuda" in line and ("ipc" in line or "copy" in line)]
    assert any("cuda_ipc" in line for line in lanes), out[-4000:]


@pytest.mark.gpu
@needs_gpu
def test_cuda_tensors_staged_without_ucx_reuse_pinned_buffers(tmp_path: Path) -> None:
    proc = _launch(STAGED, 2, tmp_path, AIOCOLL_GPU_TRANSPORT="off")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "rank 0 staged ok" in proc.stdout and "rank 1 staged ok" in proc.stdout


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("n", [2, 4])
def test_ddp_on_cuda_over_the_aiocoll_backend_goes_device_to_device(n: int, tmp_path: Path) -> None:
    proc = _launch(DDP, n, tmp_path, AIOCOLL_GPU_DIRECT_MIN_BYTES="0")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for r in range(n):
        assert f"rank {r} ddp cuda ok" in proc.stdout


def test_launched_ranks_and_bench_workers_get_no_package_folder_on_their_path(monkeypatch) -> None:
    # Once, "two levels up" from aiocoll/launch/ was put on the ranks' PYTHONPATH: the package
    # folder itself, whose aiocoll/torch shadowed torch ("No module named torch.fx" in every torch
    # script under `aiocoll run` or `aiocoll bench`). Ranks now inherit the path untouched.
    from aiocoll.launch import bench, launcher

    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    envs = launcher._rank_environments(dict(os.environ), 2, port=1, job_id="j", transport=None, timeout=None)
    for env in [*envs, bench._env("job")]:
        assert env["PYTHONPATH"] == "/somewhere/else"


def _simulate(schedules: list[Any]) -> None:
    """Run the ranks' schedules in lockstep, delivering the k-th Send from p to q into q's k-th
    Recv from p (as run_schedule's step numbering does), byte for byte."""
    from aiocoll.algorithms import Recv, Send

    sent: dict[tuple[int, int], list[Any]] = {}
    recvs: dict[tuple[int, int], list[Any]] = {}
    live = list(range(len(schedules)))
    while live:
        batches = {}
        for r in list(live):
            try:
                batches[r] = next(schedules[r])
            except StopIteration:
                live.remove(r)
        for r, batch in batches.items():
            for item in batch:
                if isinstance(item, Send):
                    sent.setdefault((r, item.peer), []).append(item.data)
                elif isinstance(item, Recv):
                    recvs.setdefault((item.peer, r), []).append(item.into)
        for pair, datas in sent.items():
            intos = recvs.get(pair, [])
            for d, i in zip(datas, intos):
                assert d.numel() == i.numel(), "a slice landed in a receive of another size"
                i.copy_(d)
            del intos[:len(datas)]
            datas.clear()
        assert not any(recvs.values()), "a receive was never matched"


@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 7, 1000, 4099])
def test_device_schedules_compute_the_collectives(size: int, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # The GPU engine's schedules, sliced into several messages per transfer, on CPU tensors.
    from aiocoll.arrays.ops import ReduceOp
    from aiocoll.arrays.dtypes import WireDtype
    from aiocoll.engines import gpu

    monkeypatch.setattr(gpu, "SLICE_MIN", 64)  # bytes: several slices even for small tensors
    monkeypatch.setattr(gpu, "SLICES", 4)
    rng = np.random.default_rng(n + size)
    xs = [torch.from_numpy(rng.standard_normal(n * size).astype(np.float32)) for _ in range(size)]
    reduce = gpu._reducer(ReduceOp.SUM, WireDtype.FLOAT32)
    want = sum(x.double() for x in xs)

    outs = [torch.full((n * size,), float("nan")) for _ in range(size)]
    _simulate([gpu.all_reduce(r, size, xs[r], outs[r], reduce, lambda: None) for r in range(size)])
    for o in outs:
        assert torch.equal(o, outs[0]) and torch.allclose(o.double(), want, atol=1e-4)

    inplace = [x.clone() for x in xs]
    _simulate([gpu.all_reduce(r, size, inplace[r], inplace[r], reduce, lambda: None) for r in range(size)])
    assert all(torch.equal(o, outs[0]) for o in inplace)

    chunks = [torch.full((n,), float("nan")) for _ in range(size)]
    _simulate([gpu.reduce_scatter(r, size, xs[r], chunks[r], reduce, lambda: None) for r in range(size)])
    for r, c in enumerate(chunks):
        assert torch.allclose(c.double(), want[r * n:(r + 1) * n], atol=1e-4)

    gathered = [torch.full((n * size * size,), float("nan")) for _ in range(size)]
    _simulate([gpu.all_gather(r, size, xs[r], gathered[r], lambda: None) for r in range(size)])
    for g in gathered:
        assert torch.equal(g, torch.cat(xs))
