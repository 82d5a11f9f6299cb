"""numpy references and test data shared by the collective tests."""

from __future__ import annotations

from typing import Any

import numpy as np

DTYPES = [
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.longdouble, np.complex64, np.complex128, np.clongdouble,
]
OPS = ["sum", "avg", "product", "min", "max", "band", "bor", "bxor"]
WORLD_SIZES = [1, 2, 3, 5, 8]


def op_valid(op: str, dtype: Any) -> bool:
    kind = np.dtype(dtype).kind
    if op in ("band", "bor", "bxor"):
        return kind in "biu"
    if op in ("min", "max"):
        return kind != "c"
    if op == "avg":
        return kind != "b"
    return True


def data(rank: int, shape: tuple[int, ...], dtype: Any, op: str = "sum", seed: int = 0) -> np.ndarray:
    """Random data for ``rank``, in a range where ``op`` over 8 ranks stays meaningful."""
    rng = np.random.default_rng([seed, rank, len(shape), int(np.prod(shape))])
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return rng.random(shape) < 0.5
    if dt.kind in "iu":
        info = np.iinfo(dt)
        lo, hi = (max(info.min, -1000), min(info.max, 1000)) if op != "product" else (max(info.min, -3), 4)
        if op in ("band", "bor", "bxor"):
            lo, hi = info.min, info.max
        return rng.integers(lo, hi, size=shape, endpoint=True, dtype=dt)
    if op == "product":
        real = rng.uniform(0.5, 1.5, size=shape)
    else:
        real = rng.standard_normal(shape) * 10
    if dt.kind == "c":
        imag = rng.uniform(0.5, 1.5, size=shape) if op == "product" else rng.standard_normal(shape)
        return (real + 1j * imag).astype(dt)
    return real.astype(dt)


def reduce_ref(op: str, arrays: list[np.ndarray]) -> np.ndarray:
    stack = np.stack(arrays)
    dt = stack.dtype
    if dt.kind == "b":
        if op in ("sum", "max", "bor"):
            return np.logical_or.reduce(stack, axis=0)
        if op in ("product", "min", "band"):
            return np.logical_and.reduce(stack, axis=0)
        if op == "bxor":
            return np.logical_xor.reduce(stack, axis=0)
    if op in ("sum", "avg"):
        if dt.kind in "iu":
            s = np.add.reduce(stack, axis=0, dtype=dt)
        else:
            s = np.add.reduce(stack.astype(np.clongdouble if dt.kind == "c" else np.longdouble), axis=0)
        if op == "sum":
            return s.astype(dt)
        if dt.kind in "iu":
            q = np.floor_divide(s, len(arrays))
            fix = (s < 0) & (q * len(arrays) != s)
            q[fix] += 1
            return q.astype(dt)
        return (s / len(arrays)).astype(dt)
    if op == "product":
        if dt.kind in "iu":
            return np.multiply.reduce(stack, axis=0, dtype=dt)
        return np.multiply.reduce(stack.astype(np.clongdouble if dt.kind == "c" else np.longdouble), axis=0).astype(dt)
    fn = {"min": np.minimum, "max": np.maximum, "band": np.bitwise_and, "bor": np.bitwise_or, "bxor": np.bitwise_xor}[op]
    return fn.reduce(stack, axis=0)


def assert_reduced(got: np.ndarray, want: np.ndarray, world_size: int) -> None:
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    if got.dtype.kind in "fc":
        eps = float(np.finfo(got.dtype).eps)
        np.testing.assert_allclose(
            got.astype(np.clongdouble if got.dtype.kind == "c" else np.longdouble),
            want,
            rtol=eps * 4 * world_size,
            atol=eps * 40 * world_size,
        )
    else:
        np.testing.assert_array_equal(got, want)


# Moved to aiocoll.testing so that users can test their own blocking code the same way.
from aiocoll.testing import in_thread  # noqa: E402,F401
