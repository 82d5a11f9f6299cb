"""torch test data and references for the tensor tests (numpy references live in _reference.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from _reference import data as np_data
from _reference import in_thread  # noqa: F401  (re-exported for the torch tests)
from _reference import reduce_ref

TORCH_DTYPES = [
    torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16,
    torch.uint32, torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.complex64, torch.complex128,
]
OPS = ["sum", "avg", "product", "min", "max", "band", "bor", "bxor"]

_NP = {
    torch.bool: np.bool_, torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32,
    torch.int64: np.int64, torch.uint8: np.uint8, torch.uint16: np.uint16, torch.uint32: np.uint32,
    torch.uint64: np.uint64, torch.float16: np.float16, torch.float32: np.float32,
    torch.float64: np.float64, torch.complex64: np.complex64, torch.complex128: np.complex128,
}

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: runs on the device machine (pytest -m gpu)",
)


def dname(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def op_valid(op: str, dtype: torch.dtype) -> bool:
    if op in ("band", "bor", "bxor"):
        return dtype == torch.bool or not (dtype.is_floating_point or dtype.is_complex)
    if op in ("min", "max"):
        return not dtype.is_complex
    if op == "avg":
        return dtype != torch.bool
    return True


def tdata(rank: int, shape: tuple[int, ...], dtype: torch.dtype, op: str = "sum", seed: int = 0) -> torch.Tensor:
    """Random data for ``rank`` as a tensor of ``dtype`` (bfloat16: float32 data rounded)."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(np_data(rank, shape, np.float32, op, seed)).to(torch.bfloat16)
    return torch.from_numpy(np_data(rank, shape, _NP[dtype], op, seed))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Exact numpy copy of ``t`` (bfloat16 widened to float32, exactly)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.to(torch.float32).numpy()
    return t.numpy().copy()


def reduce_torch_ref(op: str, tensors: list[torch.Tensor]) -> np.ndarray:
    """The numpy reference of reducing ``tensors`` with ``op`` (bfloat16: in float64, as float32)."""
    arrays = [to_numpy(t) for t in tensors]
    if tensors[0].dtype == torch.bfloat16:
        return reduce_ref(op, [a.astype(np.float64) for a in arrays]).astype(np.float32)
    return reduce_ref(op, arrays)


def assert_tensor_close(got: Any, want: np.ndarray, dtype: torch.dtype, world_size: int, device: str = "cpu") -> None:
    """``got`` is a tensor of ``dtype`` on ``device`` whose values match ``want`` to ``dtype``'s precision."""
    assert isinstance(got, torch.Tensor), type(got)
    assert got.dtype == dtype, (got.dtype, dtype)
    assert got.device.type == device, got.device
    g = to_numpy(got)
    assert g.shape == want.shape, (g.shape, want.shape)
    if dtype.is_floating_point or dtype.is_complex:
        eps = torch.finfo(dtype).eps
        np.testing.assert_allclose(g, want, rtol=eps * 4 * world_size, atol=eps * 40 * world_size)
    else:
        np.testing.assert_array_equal(g, want)




# Moved to aiocoll.testing so that users can test their own blocking code the same way.
from aiocoll.testing import run_blocking_ranks as blocking_ranks  # noqa: E402,F401
