"""Payloads: the numpy face of one input (C-contiguous, native byte order), and back.

``aiocoll.arrays.adapt`` turns what a caller passed into one (numpy arrays, buffers, DLPack
or ``__array_interface__`` objects here; torch tensors in ``aiocoll.arrays.tensors``). The
algorithms only ever see the numpy side. Results come back as a new array of the input's kind
and device.

Byte order: the wire and the reductions work in this host's byte order. An array of the other
one (``>f4`` on a little-endian host) is converted on the way in, and results come back in the
input's own dtype, so members may mix byte orders freely.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .dtypes import WireDtype, wire_dtype

Array = np.ndarray[Any, Any]


@dataclass
class Payload:
    """The numpy face of one input.

    array: C-contiguous host array with the input's shape; a view of the input when possible
        (never written to), else a copy.
    code: element type on the wire.
    wrap: turns a numpy result (any shape) into the caller's kind, on the caller's device.
    """

    array: Array
    code: WireDtype
    wrap: Callable[[Array], Any]

    def empty(self, shape: tuple[int, ...]) -> Array:
        return np.empty(shape, dtype=self.array.dtype)


def _identity(a: Array) -> Any:
    return a


def contiguous(a: Array) -> Array:
    """``a`` itself if C-contiguous, else a C-contiguous copy (0-d stays 0-d, unlike
    np.ascontiguousarray)."""
    return a if a.flags.c_contiguous else np.array(a, order="C", copy=True)


def numpy_payload(arr: Array) -> Payload:
    """A payload of a C-contiguous numpy array, in native byte order."""
    if arr.dtype.isnative:
        return Payload(arr, wire_dtype(arr.dtype), _identity)
    given = arr.dtype
    native = arr.astype(given.newbyteorder("="))

    def back(a: Array) -> Any:
        return a.astype(given)

    return Payload(native, wire_dtype(native.dtype), back)
