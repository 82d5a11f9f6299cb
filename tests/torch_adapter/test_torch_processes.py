"""aiocoll.torch and aiocoll.sync in real processes (`aiocoll run`): the functional collectives from
a plain training thread, their gradients, real-mode tracing, and examples/train_sync.py matching a
single-process run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="torch is an optional extra; the [test] set-up (.ci/run) installs the CPU build")

REPO = Path(__file__).resolve().parents[2]
# Each process imports torch: a few seconds apiece, so a few combinations only.
FUNCOL_RUNS = [("tcp", 2), ("tcp", 4), ("shm", 2)]
EXAMPLE_RUNS = [("tcp", 2, False), ("tcp", 4, True), ("shm", 2, True)]


def launch(n: int, script: Path, *args: str, transport: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("AIOCOLL_SECRET", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "aiocoll", "run", "-n", str(n), "--transport", transport, "--timeout", "60",
         str(script), *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO,
    )


FUNCOL = textwrap.dedent(
    """
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx
    import aiocoll.sync as coll
    import aiocoll.torch as ft

    pg = coll.init()
    r, w = pg.rank, pg.size
    x = torch.arange(6, dtype=torch.float64).reshape(2, 3) + 10 * r

    y = ft.all_reduce(x, "sum", None)
    assert isinstance(y, ft.AsyncCollectiveTensor)
    v = y.view(3, 2)                       # a view: no wait
    want = sum(torch.arange(6, dtype=torch.float64).reshape(2, 3) + 10 * p for p in range(w))
    assert torch.equal(y + 0, want)        # first real use waits, blocking this thread
    assert v.tolist() == want.view(3, 2).tolist()

    g = ft.all_gather_tensor(x, 1, list(range(w)))
    assert torch.equal(g, torch.cat([torch.arange(6, dtype=torch.float64).reshape(2, 3) + 10 * p for p in range(w)], 1))
    rs = ft.reduce_scatter_tensor(torch.ones(w, 2) * (r + 1), "max", 0, None)
    assert torch.equal(rs, torch.full((1, 2), float(w)))
    a2a = ft.all_to_all_single(torch.arange(w) + 100 * r, None, None, None)
    assert a2a.tolist() == [100 * p + r for p in range(w)]
    pairs = [[p, p + 1] for p in range(0, w, 2)]
    b = ft.broadcast(torch.tensor([r]), 1, pairs)
    assert int(b) == r - r % 2 + 1
    c = ft.all_reduce_coalesced([torch.ones(2), torch.ones(3, dtype=torch.bfloat16)], "sum", None)
    assert c[0].tolist() == [w] * 2 and c[1].dtype == torch.bfloat16 and c[1].tolist() == [w] * 3

    # many results in flight at once, waited in reverse order
    many = [ft.all_reduce(torch.full((4,), float(i + r)), "sum", None) for i in range(50)]
    for i in reversed(range(50)):
        assert many[i].tolist() == [float(w * i + w * (w - 1) // 2)] * 4

    # gradients: d(sum over ranks of loss_r)/dx_r
    xg = torch.full((3,), float(r + 1), dtype=torch.float64, requires_grad=True)
    out = ft.all_gather_tensor(xg, 0, None)
    (out * torch.arange(3 * w, dtype=torch.float64)).sum().backward()
    assert xg.grad.tolist() == [float(w * (3 * r + i)) for i in range(3)], xg.grad

    # real-mode tracing runs the collectives while recording them
    gm = make_fx(lambda t: ft.all_reduce(t, "sum", None) * 2)(torch.ones(2))
    assert "aiocoll.wait_tensor" in str(gm.graph)
    assert gm(torch.ones(2)).tolist() == [2.0 * w] * 2

    dropped = ft.all_reduce(torch.ones(1000), "sum", None)
    del dropped                              # never used: still completes, destroy() waits for it
    coll.destroy()
    print(f"rank {r} funcol ok", flush=True)
    """
)


@pytest.mark.parametrize("transport, n", FUNCOL_RUNS)
def test_functional_collectives_from_a_plain_thread(transport, n, tmp_path):
    script = tmp_path / "funcol_script.py"
    script.write_text(FUNCOL)
    proc = launch(n, script, transport=transport)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in range(n):
        assert f"rank {r} funcol ok" in proc.stdout


@pytest.mark.parametrize("transport, n, funcol", EXAMPLE_RUNS, ids=["tcp-2-sync", "tcp-4-funcol", "shm-2-funcol"])
def test_train_sync_example_matches_one_process(transport, n, funcol):
    args = ["--check", "--steps", "10"] + (["--funcol"] if funcol else [])
    proc = launch(n, REPO / "examples" / "train_sync.py", *args, transport=transport)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"on {n} ranks" in proc.stdout
    assert "data-parallel loss matches the single-process run" in proc.stdout
