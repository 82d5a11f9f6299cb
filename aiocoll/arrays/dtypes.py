"""Element types on the wire: a one-byte code per dtype, carried in every frame key.

numpy covers every numeric dtype and bool. bfloat16 has no numpy dtype: tensors of it travel as
their raw 16-bit words (numpy uint16 arrays) tagged BFLOAT16, and reductions widen to float32.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class WireDtype(IntEnum):
    BOOL = 1
    INT8 = 2
    INT16 = 3
    INT32 = 4
    INT64 = 5
    UINT8 = 6
    UINT16 = 7
    UINT32 = 8
    UINT64 = 9
    FLOAT16 = 10
    FLOAT32 = 11
    FLOAT64 = 12
    LONGDOUBLE = 13
    COMPLEX64 = 14
    COMPLEX128 = 15
    CLONGDOUBLE = 16
    BFLOAT16 = 17
    BYTES = 18  # opaque bytes (coalesced packing, object payloads): never reduced


_FROM_NUMPY: dict[np.dtype[np.generic], WireDtype] = {
    np.dtype(np.bool_): WireDtype.BOOL,
    np.dtype(np.int8): WireDtype.INT8,
    np.dtype(np.int16): WireDtype.INT16,
    np.dtype(np.int32): WireDtype.INT32,
    np.dtype(np.int64): WireDtype.INT64,
    np.dtype(np.uint8): WireDtype.UINT8,
    np.dtype(np.uint16): WireDtype.UINT16,
    np.dtype(np.uint32): WireDtype.UINT32,
    np.dtype(np.uint64): WireDtype.UINT64,
    np.dtype(np.float16): WireDtype.FLOAT16,
    np.dtype(np.float32): WireDtype.FLOAT32,
    np.dtype(np.float64): WireDtype.FLOAT64,
    np.dtype(np.longdouble): WireDtype.LONGDOUBLE,
    np.dtype(np.complex64): WireDtype.COMPLEX64,
    np.dtype(np.complex128): WireDtype.COMPLEX128,
    np.dtype(np.clongdouble): WireDtype.CLONGDOUBLE,
}
# On platforms where longdouble is float64, the dict above maps it to FLOAT64's slot: keep the
# plain names winning.
_FROM_NUMPY[np.dtype(np.float64)] = WireDtype.FLOAT64
_FROM_NUMPY[np.dtype(np.complex128)] = WireDtype.COMPLEX128


def wire_dtype(dtype: np.dtype[np.generic]) -> WireDtype:
    """The wire code of a numpy dtype.

    Raises:
        TypeError: the dtype is not numeric or bool (object, strings, datetimes, structured).
    """
    dtype = np.dtype(dtype)
    if not dtype.isnative:
        dtype = dtype.newbyteorder("=")
    try:
        return _FROM_NUMPY[dtype]
    except KeyError:
        raise TypeError(
            f"dtype {dtype} is not supported: collectives take numeric and bool arrays "
            "(use the *_object collectives for other data)"
        ) from None


def is_integer(code: WireDtype) -> bool:
    return WireDtype.INT8 <= code <= WireDtype.UINT64


def is_float(code: WireDtype) -> bool:
    return code in (
        WireDtype.FLOAT16,
        WireDtype.FLOAT32,
        WireDtype.FLOAT64,
        WireDtype.LONGDOUBLE,
        WireDtype.BFLOAT16,
    )


def is_complex(code: WireDtype) -> bool:
    return code in (WireDtype.COMPLEX64, WireDtype.COMPLEX128, WireDtype.CLONGDOUBLE)
