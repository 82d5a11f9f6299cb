"""Object collectives and the safe codec: values round-trip, hostile bytes are refused."""

from __future__ import annotations

import os

import numpy as np
import pytest

import aiocoll
from aiocoll.collectives.codec import CodecError, decode, encode
from aiocoll.testing import run_ranks

VALUES = [
    None, True, False, 0, -1, 2**200, -(2**70), 1.5, float("inf"), 1 + 2j, "héllo", b"\x00\xff",
    [1, [2, [3]]], (1, "a"), {"a": 1, 2: [None], (1, 2): b"x"},
    np.arange(6, dtype=np.float32).reshape(2, 3), np.array([True, False]), np.int16(-3), np.float16(0.5),
    np.zeros((0, 3), np.complex128),
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_codec_round_trip(value):
    got = decode(encode(value))
    if isinstance(value, (np.ndarray, np.generic)):
        assert type(got) is type(value) and got.dtype == value.dtype
        np.testing.assert_array_equal(got, value)
    else:
        assert got == value and type(got) is type(value)


def test_codec_refuses_unsafe_types():
    with pytest.raises(CodecError, match="allow_pickle"):
        encode(object())
    with pytest.raises(CodecError, match="not supported"):
        encode(np.array(["text"]))


def test_codec_rejects_hostile_bytes_without_big_allocations():
    with pytest.raises(CodecError, match="truncated"):
        decode(bytes([8]) + b"\xff\xff\xff\xff\x0f")  # bytes claiming 4 GiB
    with pytest.raises(CodecError):
        decode(bytes([9]) + b"\xff\xff\xff\xff\x0f")  # a list claiming 4 billion items
    with pytest.raises(CodecError, match="deeper"):
        decode(bytes([9, 1]) * 200 + bytes([0]))
    with pytest.raises(CodecError, match="trailing"):
        decode(encode(1) + b"x")
    with pytest.raises(CodecError, match="dtype"):
        decode(bytes([12, 2]) + b"|O" + bytes([0]))  # object dtype
    rng = np.random.default_rng(0)
    for _ in range(2000):
        junk = rng.integers(0, 256, size=int(rng.integers(0, 40)), dtype=np.uint8).tobytes()
        try:
            decode(junk)
        except CodecError:
            pass


@pytest.mark.parametrize("world_size", [1, 3, 5])
async def test_all_gather_object(world_size):
    async def body(rank):
        return await aiocoll.all_gather_object({"rank": rank, "data": np.full(rank, rank), "s": "x" * rank})

    results = await run_ranks(body, world_size)
    for got in results:
        assert [g["rank"] for g in got] == list(range(world_size))
        for r, g in enumerate(got):
            np.testing.assert_array_equal(g["data"], np.full(r, r))
            assert g["s"] == "x" * r


@pytest.mark.parametrize("world_size", [1, 2, 5])
async def test_broadcast_object(world_size):
    async def body(rank):
        return await aiocoll.broadcast_object({"from": rank, "v": [1.5, None]} if rank == 1 % world_size else None,
                                              src=1 % world_size)

    for got in await run_ranks(body, world_size):
        assert got == {"from": 1 % world_size, "v": [1.5, None]}


class _Custom:
    def __init__(self, v):
        self.v = v


async def test_pickle_only_with_explicit_opt_in():
    async def body(rank):
        with pytest.raises(ValueError, match="allow_pickle"):
            await aiocoll.all_gather_object(_Custom(rank))
        got = await aiocoll.all_gather_object(_Custom(rank), allow_pickle=True)
        return [c.v for c in got]

    assert await run_ranks(body, 2) == [[0, 1], [0, 1]]


async def test_a_rank_without_opt_in_refuses_pickled_bytes():
    marker = f"/tmp/aiocoll-pickle-ran-{os.getpid()}"

    class Evil:
        def __reduce__(self):
            return (open, (marker, "w"))

    async def body(rank):
        if rank == 0:
            return await aiocoll.broadcast_object(Evil(), src=0, allow_pickle=True)
        return await aiocoll.broadcast_object(None, src=0)  # did not opt in

    results = await run_ranks(body, 2, return_exceptions=True)
    assert isinstance(results[1], ValueError) and "refusing to unpickle" in str(results[1])
    assert not os.path.exists(marker) or (os.unlink(marker) and False)
