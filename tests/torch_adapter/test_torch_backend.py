"""torch.distributed.init_process_group("aiocoll") after `import aiocoll.torch`: torch.distributed's
collectives, new_group, async work, DDP (gradients equal to one process on the full batch), and
both kinds of functional collectives over its groups, in real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="torch is an optional extra; the [test] set-up (.ci/run) installs the CPU build")
if not torch.distributed.is_available():  # pragma: no cover - builds without distributed
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import warnings
    import torch
    import torch.distributed as dist
    import torch.distributed._functional_collectives as torch_funcol
    import aiocoll.torch as ft           # registers the "aiocoll" backend

    warnings.simplefilter("ignore", FutureWarning)
    dist.init_process_group("aiocoll")   # env:// from the launcher (torchrun's variables)
    r, w = dist.get_rank(), dist.get_world_size()
    assert dist.get_backend() == "aiocoll"

    t = torch.full((3,), float(r)); dist.all_reduce(t)
    assert t.tolist() == [float(sum(range(w)))] * 3, t
    m = torch.tensor([r, -r]); dist.all_reduce(m, op=dist.ReduceOp.MAX)
    assert m.tolist() == [w - 1, 0], m
    b = torch.tensor([r]); dist.broadcast(b, src=w - 1)
    assert int(b) == w - 1
    outs = [torch.zeros(2) for _ in range(w)]; dist.all_gather(outs, torch.full((2,), float(r)))
    assert [o.tolist() for o in outs] == [[float(p)] * 2 for p in range(w)]
    o = torch.zeros(2 * w); dist.all_gather_into_tensor(o, torch.full((2,), float(r)))
    assert o.tolist() == [float(p) for p in range(w) for _ in range(2)]
    rs = torch.zeros(2); dist.reduce_scatter_tensor(rs, torch.arange(2.0 * w))
    assert rs.tolist() == [w * 2.0 * r, w * (2.0 * r + 1)], rs
    rl = torch.zeros(2); dist.reduce_scatter(rl, [torch.full((2,), float(p + r)) for p in range(w)])
    assert rl.tolist() == [float(w * r + sum(range(w)))] * 2, rl
    a = torch.zeros(w); dist.all_to_all_single(a, torch.arange(w, dtype=torch.float32) + 10 * r)
    assert a.tolist() == [10.0 * p + r for p in range(w)], a
    lists = [torch.zeros(1) for _ in range(w)]
    dist.all_to_all(lists, [torch.tensor([100.0 * r + p]) for p in range(w)])
    assert [float(x) for x in lists] == [100.0 * p + r for p in range(w)]
    red = torch.tensor([r + 1.0]); dist.reduce(red, dst=0)
    assert r != 0 or float(red) == sum(range(1, w + 1))
    gl = [torch.zeros(1) for _ in range(w)] if r == 1 else None
    dist.gather(torch.tensor([float(r)]), gl, dst=1)
    assert r != 1 or [float(x) for x in gl] == [float(p) for p in range(w)]
    sc = torch.zeros(1)
    dist.scatter(sc, [torch.tensor([float(p * p)]) for p in range(w)] if r == 0 else None, src=0)
    assert float(sc) == float(r * r)
    if r == 0:
        dist.send(torch.arange(3.0), dst=1, tag=5)
    elif r == 1:
        got = torch.zeros(3); dist.recv(got, src=0, tag=5); assert got.tolist() == [0.0, 1.0, 2.0]
    dist.barrier()
    work = dist.all_reduce(torch.ones(2), async_op=True)
    work.wait()
    assert dist.all_reduce(torch.ones(1), async_op=True).get_future().wait()[0].tolist() == [float(w)]

    pair = dist.new_group([0, 1])
    if r < 2:
        x = torch.ones(1); dist.all_reduce(x, group=pair); assert float(x) == 2.0

    # functional collectives, torch's and aiocoll's, over the backend's groups
    y = torch_funcol.all_reduce(torch.ones(2) * r, "sum", dist.group.WORLD)
    assert y.tolist() == [float(sum(range(w)))] * 2, y
    z = ft.all_gather_tensor(torch.tensor([r]), 0, dist.group.WORLD)
    assert z.tolist() == list(range(w))

    # DDP: one step on a slice of the batch per rank == one process on the whole batch
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    model = make()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    xs = torch.randn(2 * w, 4, generator=torch.Generator().manual_seed(1))
    ddp(xs[2 * r : 2 * r + 2]).pow(2).mean().backward()
    ref = make()
    ref(xs).pow(2).mean().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)

    dist.destroy_process_group()
    print(f"rank {r} backend ok", flush=True)
    """
)


@pytest.mark.parametrize("transport, n", [("tcp", 2), ("tcp", 4), ("shm", 2)])
def test_torch_distributed_runs_on_the_aiocoll_backend(transport, n, tmp_path):
    script = tmp_path / "backend_script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    env.pop("AIOCOLL_SECRET", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "aiocoll", "run", "-n", str(n), "--transport", transport, "--timeout", "60", str(script)],
        capture_output=True, text=True, timeout=240, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in range(n):
        assert f"rank {r} backend ok" in proc.stdout


def test_importing_aiocoll_torch_registers_the_backend():
    import torch.distributed as dist

    import aiocoll.torch  # noqa: F401

    assert "AIOCOLL" in dist.Backend._plugins


CUDA_SCRIPT = textwrap.dedent(
    """
    import torch
    import torch.distributed as dist
    import aiocoll.torch  # noqa: F401

    dist.init_process_group("aiocoll")
    r, w = dist.get_rank(), dist.get_world_size()
    t = torch.full((1 << 16,), float(r), device="cuda"); dist.all_reduce(t)
    assert t.device.type == "cuda" and float(t[0]) == float(sum(range(w)))
    o = torch.zeros(2 * w, device="cuda"); dist.all_gather_into_tensor(o, torch.full((2,), float(r), device="cuda"))
    assert o.tolist() == [float(p) for p in range(w) for _ in range(2)]

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).cuda()

    model = make()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    xs = torch.randn(2 * w, 4, generator=torch.Generator().manual_seed(1)).cuda()
    ddp(xs[2 * r : 2 * r + 2]).pow(2).mean().backward()
    ref = make()
    ref(xs).pow(2).mean().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    dist.destroy_process_group()
    print(f"rank {r} cuda backend ok", flush=True)
    """
)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: runs on the device machine (pytest -m gpu)")
def test_torch_distributed_on_cuda_tensors_with_ddp(tmp_path):
    script = tmp_path / "backend_cuda.py"
    script.write_text(CUDA_SCRIPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "aiocoll", "run", "-n", "2", "--transport", "tcp", str(script)],
        capture_output=True, text=True, timeout=240, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in range(2):
        assert f"rank {r} cuda backend ok" in proc.stdout
