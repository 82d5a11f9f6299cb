"""Reduction operators and the numpy kernels that apply them.

Semantics, per dtype:
- sum / product / min / max on bool are or / and / and / or (numpy's own meaning for bool).
- avg is the sum divided by the group size. Floating and complex dtypes divide exactly; integer
  dtypes truncate toward zero (as NCCL's ncclAvg does); bool has no average.
- band / bor / bxor take integer and bool dtypes only.
- min / max are not defined for complex numbers.
- Integer overflow wraps, as it does in numpy and in C.
- bfloat16 is reduced in float32 and rounded back to nearest-even after each step.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import numpy as np

from .dtypes import WireDtype, is_complex, is_float, is_integer


class ReduceOp(IntEnum):
    """Reduction operators. Strings such as ``"sum"`` (any case) are accepted wherever one goes."""

    SUM = 1
    AVG = 2
    PRODUCT = 3
    MIN = 4
    MAX = 5
    BAND = 6
    BOR = 7
    BXOR = 8


_NAMES = {
    "sum": ReduceOp.SUM,
    "avg": ReduceOp.AVG,
    "mean": ReduceOp.AVG,
    "product": ReduceOp.PRODUCT,
    "prod": ReduceOp.PRODUCT,
    "min": ReduceOp.MIN,
    "max": ReduceOp.MAX,
    "band": ReduceOp.BAND,
    "bor": ReduceOp.BOR,
    "bxor": ReduceOp.BXOR,
}


def parse_op(op: object) -> ReduceOp:
    """Turn ``"sum"``, ``"SUM"``, ``ReduceOp.SUM`` or torch's ``ReduceOp.SUM`` into a ReduceOp.

    Raises:
        ValueError: the name is not a known operator; the message lists the known ones.
    """
    if isinstance(op, ReduceOp):
        return op
    if isinstance(op, str):
        key = op.strip().lower()
    else:
        # torch.distributed.ReduceOp wraps a RedOpType in .op; both print as e.g. "RedOpType.SUM".
        inner = getattr(op, "op", op)
        key = str(getattr(inner, "name", inner)).rsplit(".", 1)[-1].lower()
    if key in _NAMES:
        return _NAMES[key]
    raise ValueError(
        f"unknown reduce op {op!r}; expected one of: sum, avg, product, min, max, band, bor, bxor"
    )


def check_op_dtype(op: ReduceOp, code: WireDtype) -> None:
    """Raise ValueError if ``op`` is not defined for elements of type ``code``."""
    if code == WireDtype.BYTES:
        raise ValueError("opaque byte payloads cannot be reduced")
    if op in (ReduceOp.BAND, ReduceOp.BOR, ReduceOp.BXOR) and not (
        is_integer(code) or code == WireDtype.BOOL
    ):
        raise ValueError(f"bitwise op {op.name.lower()} needs an integer or bool dtype, got {code.name.lower()}")
    if op in (ReduceOp.MIN, ReduceOp.MAX) and is_complex(code):
        raise ValueError(f"{op.name.lower()} is not defined for complex dtype {code.name.lower()}")
    if op == ReduceOp.AVG and code == WireDtype.BOOL:
        raise ValueError("avg is not defined for bool; use sum (logical or) or min/max")


#: The numpy function of each op (AVG sums: the caller divides afterwards).
UFUNCS: dict[ReduceOp, Any] = {
    ReduceOp.SUM: np.add,
    ReduceOp.AVG: np.add,
    ReduceOp.PRODUCT: np.multiply,
    ReduceOp.MIN: np.minimum,
    ReduceOp.MAX: np.maximum,
    ReduceOp.BAND: np.bitwise_and,
    ReduceOp.BOR: np.bitwise_or,
    ReduceOp.BXOR: np.bitwise_xor,
}


def _bf16_to_f32(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return (a.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _f32_to_bf16(f: np.ndarray[Any, Any], out: np.ndarray[Any, Any]) -> None:
    u = f.view(np.uint32)
    nan = np.isnan(f)
    # round to nearest even: add 0x7FFF plus the lowest kept bit, then truncate
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
    if nan.any():
        rounded[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    out[...] = rounded


def reduce_into(op: ReduceOp, code: WireDtype, acc: np.ndarray[Any, Any], other: np.ndarray[Any, Any]) -> None:
    """acc = op(acc, other), elementwise, in place. Both are arrays of the same shape."""
    if code == WireDtype.BFLOAT16:
        result = UFUNCS[op](_bf16_to_f32(acc), _bf16_to_f32(other))
        _f32_to_bf16(result, acc)
        return
    UFUNCS[op](acc, other, out=acc)


def finish_avg(code: WireDtype, acc: np.ndarray[Any, Any], count: int) -> None:
    """Turn a sum into an average over ``count`` members, in place."""
    if code == WireDtype.BFLOAT16:
        _f32_to_bf16(_bf16_to_f32(acc) / np.float32(count), acc)
    elif is_float(code) or is_complex(code):
        np.divide(acc, acc.dtype.type(count), out=acc)
    elif is_integer(code):
        q = np.floor_divide(acc, count)
        # floor division rounds toward -inf; C (and NCCL) truncate toward zero
        fix = (acc < 0) & (q * count != acc)
        q[fix] += 1
        acc[...] = q
    else:  # pragma: no cover - check_op_dtype rejects the rest first
        raise ValueError(f"avg is not defined for {code.name.lower()}")
