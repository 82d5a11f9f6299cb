"""One matrix for every collective: array kind x transport x engine, results from numpy.

Kinds: numpy, torch CPU, torch CUDA (where a GPU is present; skipped here with the reason).
Transports: inproc, tcp, shm. Engines: message passing, and on shm the same-host engine too
(Settings.shm_engine). Every rank's input is random (seeded by rank), the world has 3 members,
and sizes do not divide by it; the expected value is computed with numpy alone.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest

import aiocoll
from aiocoll.testing import run_ranks

from _reference import data, reduce_ref

N = 3
ROWS = 7  # divides by no group size used here


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


KINDS = [
    "numpy",
    pytest.param("torch", marks=pytest.mark.skipif(
        "torch" not in sys.modules and __import__("importlib").util.find_spec("torch") is None,
        reason="torch is an optional extra; .ci/run installs the CPU build")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not _cuda(), reason="needs a CUDA GPU: runs on the GPU machine (scripts/device_gpu_tests.sh)")]),
]
SETUPS = [
    ("inproc", True),
    ("tcp", True),
    pytest.param("shm", False, id="shm-messages", marks=pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="shm needs Linux; runs on CI")),
    pytest.param("shm", True, id="shm-engine", marks=pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="shm needs Linux; runs on CI")),
]


def _to(kind: str, a: np.ndarray) -> Any:
    if kind == "numpy":
        return a
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.cuda() if kind == "cuda" else t


def _np(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return x.detach().cpu().numpy()


def _kind_of(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return "numpy"
    return "cuda" if x.is_cuda else "torch"


async def _run(body: Any, transport: str, engine: bool) -> list[Any]:
    return await run_ranks(body, N, transport=transport, settings=aiocoll.Settings(shm_engine=engine))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("transport", "engine"), SETUPS)
async def test_every_collective(kind: str, transport: str, engine: bool) -> None:
    xs = [data(r, (ROWS * N, 2), np.float32, seed=11) for r in range(N)]
    ints = [data(r, (ROWS,), np.int64, "max", seed=12) for r in range(N)]
    total, largest = reduce_ref("sum", xs), reduce_ref("max", ints)

    async def body(rank: int) -> dict[str, Any]:
        x, i = _to(kind, xs[rank]), _to(kind, ints[rank])
        got = {
            "all_reduce": await aiocoll.all_reduce(x),
            "all_reduce_max": await aiocoll.all_reduce(i, "max"),
            "all_gather": await aiocoll.all_gather(x),
            "reduce_scatter": await aiocoll.reduce_scatter(x),
            "broadcast": await aiocoll.broadcast(x, 1),
            "reduce": await aiocoll.reduce(x, 2),
            "gather": await aiocoll.gather(i, 0),
            "scatter": await aiocoll.scatter(x, 2),
            "all_to_all": await aiocoll.all_to_all(x),
        }
        nxt = (rank + 1) % N
        got["permute"] = await aiocoll.permute(i, [nxt if r == rank else (r + 1) % N for r in range(N)])
        return got

    results = await _run(body, transport, engine)
    chunk = ROWS * N // N
    for rank, got in enumerate(results):
        for name, value in got.items():
            if value is not None:
                assert _kind_of(value) == kind, f"{name} returned {type(value).__name__}"
        np.testing.assert_allclose(_np(got["all_reduce"]), total, rtol=1e-6)
        np.testing.assert_array_equal(_np(got["all_reduce_max"]), largest)
        np.testing.assert_array_equal(_np(got["all_gather"]), np.concatenate(xs))
        np.testing.assert_allclose(_np(got["reduce_scatter"]), total[rank * chunk : (rank + 1) * chunk], rtol=1e-6)
        np.testing.assert_array_equal(_np(got["broadcast"]), xs[1])
        if rank == 2:
            np.testing.assert_allclose(_np(got["reduce"]), total, rtol=1e-6)
        if rank == 0:
            np.testing.assert_array_equal(_np(got["gather"]), np.concatenate(ints))
        else:
            assert got["gather"] is None
        np.testing.assert_array_equal(_np(got["scatter"]), xs[2][rank * chunk : (rank + 1) * chunk])
        want_a2a = np.concatenate([xs[src][rank * chunk : (rank + 1) * chunk] for src in range(N)])
        np.testing.assert_array_equal(_np(got["all_to_all"]), want_a2a)
        np.testing.assert_array_equal(_np(got["permute"]), ints[(rank - 1) % N])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("transport", "engine"), SETUPS)
async def test_objects_and_point_to_point(kind: str, transport: str, engine: bool) -> None:
    xs = [data(r, (ROWS,), np.float64, seed=13) for r in range(N)]

    async def body(rank: int) -> tuple[Any, ...]:
        objs = await aiocoll.all_gather_object({"rank": rank, "sum": float(xs[rank].sum())})
        b = await aiocoll.broadcast_object(["from", rank], src=1)
        if rank == 0:
            await aiocoll.send(_to(kind, xs[0]), 1)
            got = None
        elif rank == 1:
            got = await aiocoll.recv(_to(kind, np.zeros(ROWS)), 0)
        else:
            got = None
        await aiocoll.barrier()
        return objs, b, got

    results = await _run(body, transport, engine)
    for rank, (objs, b, got) in enumerate(results):
        assert objs == [{"rank": r, "sum": float(xs[r].sum())} for r in range(N)]
        assert b == ["from", 1]
        if rank == 1:
            assert _kind_of(got) == kind
            np.testing.assert_array_equal(_np(got), xs[0])
