"""Arrays of either byte order, mixed between members, through every collective: right values,
each result in its input's dtype (``>f4`` stays ``>f4``), on inproc, tcp and shm (ranks as tasks
of one process; on shm the fast path runs what it can).

Before, a big-endian array's bytes were reduced and gathered as if little-endian: silently
wrong sums on the members, and gathers that mixed both readings.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import aiocoll
from aiocoll.testing import run_ranks

from _reference import data

ODD = 1
TIMEOUT = 20.0
TRANSPORTS = ["inproc", "tcp", "shm"]


@pytest.fixture(autouse=True)
def _fastpath_on(monkeypatch):
    # Settings are read at init: with the variable unset, every world here has the engine on.
    monkeypatch.delenv("AIOCOLL_SHM_FASTPATH", raising=False)


def _order(rank: int) -> str:
    return ">" if rank % 2 else "<"


def _mixed(rank: int, shape: tuple[int, ...], seed: int = 0, dtype: str = "f4") -> np.ndarray:
    """This rank's data in big-endian on odd ranks, little-endian on even ones."""
    return data(rank, shape, np.dtype(dtype), seed=seed).astype(_order(rank) + dtype)


def _native(a: np.ndarray) -> np.ndarray:
    return a.astype(a.dtype.newbyteorder("="))


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_collective_takes_arrays_of_either_byte_order(transport, world_size):
    w = world_size
    shape = (2 * w, 3)
    inputs = [_mixed(r, shape) for r in range(w)]
    ints = [_mixed(r, (5,), dtype="i8") for r in range(w)]
    total = np.sum([_native(x).astype(np.float64) for x in inputs], axis=0)

    async def body(rank):
        x, i = inputs[rank], ints[rank]
        out = np.empty(shape, dtype=">f4" if rank % 2 == 0 else "<f4")  # the other order
        got = {
            "all_reduce": await aiocoll.all_reduce(x),
            "all_reduce out": await aiocoll.all_reduce(x, out=out),
            "all_reduce int": await aiocoll.all_reduce(i, "bxor"),
            "all_gather": await aiocoll.all_gather(x),
            "all_gather dim 1": await aiocoll.all_gather(x, dim=1),
            "reduce_scatter": await aiocoll.reduce_scatter(x),
            "all_to_all": await aiocoll.all_to_all(x),
            "broadcast": await aiocoll.broadcast(x, w - 1),
            "reduce": await aiocoll.reduce(x, 0),
            "gather": await aiocoll.gather(x, 0),
            "scatter": await aiocoll.scatter(x, w - 1),
            "permute": await aiocoll.permute(x, [(m + 1) % w for m in range(w)]),
            "all_reduce_coalesced": await aiocoll.all_reduce_coalesced([x, i]),
            "all_gather_coalesced": await aiocoll.all_gather_coalesced([x, i]),
            "reduce_scatter_coalesced": await aiocoll.reduce_scatter_coalesced([x]),
        }
        if rank != ODD:
            await aiocoll.send(x, ODD, tag=3)
            got["recv"] = None
        else:
            got["recv"] = await aiocoll.recv(np.empty(shape, ">f4"), 0, tag=3)
        return got

    results = await run_ranks(body, w, transport=transport, secret="s", timeout=TIMEOUT)
    xor = np.bitwise_xor.reduce([_native(i) for i in ints])
    for rank, got in enumerate(results):
        x = inputs[rank]

        def same(a: Any, want: np.ndarray, dtype: Any = x.dtype) -> None:
            assert a.dtype == dtype, (rank, a.dtype, dtype)
            np.testing.assert_allclose(_native(a).astype(np.float64), want, rtol=1e-5, atol=1e-4)

        same(got["all_reduce"], total)
        same(got["all_reduce out"], total, got["all_reduce out"].dtype)
        assert got["all_reduce out"].dtype != x.dtype
        np.testing.assert_array_equal(got["all_reduce int"], xor)
        assert got["all_reduce int"].dtype == ints[rank].dtype
        same(got["all_gather"], np.concatenate([_native(y) for y in inputs]))
        same(got["all_gather dim 1"], np.concatenate([_native(y) for y in inputs], axis=1))
        same(got["reduce_scatter"], total[2 * rank : 2 * rank + 2])
        same(got["all_to_all"], np.concatenate([_native(y)[2 * rank : 2 * rank + 2] for y in inputs]))
        same(got["broadcast"], _native(inputs[w - 1]))
        same(got["reduce"], total if rank == 0 else _native(x))
        if rank == 0:
            same(got["gather"], np.concatenate([_native(y) for y in inputs]))
        else:
            assert got["gather"] is None
        same(got["scatter"], _native(inputs[w - 1])[2 * rank : 2 * rank + 2])
        same(got["permute"], _native(inputs[(rank - 1) % w]))
        co_x, co_i = got["all_reduce_coalesced"]
        same(co_x, total)
        np.testing.assert_array_equal(co_i, np.sum([_native(i) for i in ints], axis=0))
        assert co_i.dtype == ints[rank].dtype
        ga_x, ga_i = got["all_gather_coalesced"]
        same(ga_x, np.concatenate([_native(y) for y in inputs]))
        np.testing.assert_array_equal(ga_i, np.concatenate([_native(i) for i in ints]))
        (rs_x,) = got["reduce_scatter_coalesced"]
        same(rs_x, total[2 * rank : 2 * rank + 2])
        if rank == ODD:
            same(got["recv"], _native(inputs[0]), np.dtype(">f4"))
