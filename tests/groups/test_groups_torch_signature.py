"""init_device_mesh with torch's signature, and the n-d mesh error that torch's callers catch
(issue 13 item 8). Ranks run as tasks of one event loop."""

from __future__ import annotations

import numpy as np
import pytest

import aiocoll
from aiocoll.testing import run_ranks


def data(rank: int) -> np.ndarray:
    return np.random.default_rng(rank).integers(-100, 100, size=(3, 5)).astype(np.int64)


async def test_init_device_mesh_torch_signature() -> None:
    async def body(rank: int) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
        mesh = aiocoll.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        same = aiocoll.init_device_mesh("cpu", mesh_shape=(2, 2), mesh_dim_names=("dp", "tp"))
        assert same.get_group("dp") is mesh.get_group("dp")
        dp = await aiocoll.all_reduce(data(rank), group=(mesh, "dp"))
        tp = await aiocoll.all_reduce(data(rank), "max", group=mesh["tp"])
        return dp, tp, mesh.shape

    for rank, (dp, tp, shape) in enumerate(await run_ranks(body, 4)):
        assert shape == (2, 2)
        col = [p for p in range(4) if p % 2 == rank % 2]
        row = [p for p in range(4) if p // 2 == rank // 2]
        np.testing.assert_array_equal(dp, sum(data(p) for p in col))
        np.testing.assert_array_equal(tp, np.maximum(*[data(p) for p in row]))


async def test_torch_form_needs_a_shape_and_nd_mesh_error() -> None:
    async def body(rank: int) -> None:
        with pytest.raises(TypeError, match="pass the mesh shape after the device type"):
            aiocoll.init_device_mesh("cpu")
        mesh = aiocoll.init_device_mesh("cpu", (2, 1))
        for kind in (ValueError, AssertionError):  # AssertionError: what torch's _expand_group raises
            with pytest.raises(kind, match="Only 1D mesh.*pass \\(mesh, dim\\)"):
                aiocoll.expand_group(mesh)

    await run_ranks(body, 2)
