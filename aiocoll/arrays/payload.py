"""From what the caller passed to a C-contiguous numpy array, and back to the caller's kind.

Collectives accept numpy arrays, anything with the buffer protocol, objects exporting DLPack or
``__array_interface__``, and torch tensors (through the adapter in ``aiocoll.arrays.tensors``,
imported only when a tensor is seen, so torch stays optional). The algorithms only ever see
the numpy side. Results come back as a new array of the input's kind and device.

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


def _numpy_payload(arr: Array) -> Payload:
    """A payload of a C-contiguous numpy array, in native byte order."""
    if arr.dtype.isnative:
        return Payload(arr, wire_dtype(arr.dtype), _identity)
    given = arr.dtype
    native = arr.astype(given.newbyteorder("="))

    def back(a: Array) -> Any:
        return a.astype(given)

    return Payload(native, wire_dtype(native.dtype), back)


def _is_torch(x: object) -> bool:
    # Tensor subclasses defined outside torch (aiocoll.torch's lazy results, user subclasses)
    # are tensors too: look through the type's bases.
    return any(c.__module__.split(".", 1)[0] == "torch" for c in type(x).__mro__)


def as_payload(x: object, what: str = "x") -> Payload:
    """Adapt ``x``.

    Raises:
        TypeError: ``x`` is not an array-like aiocoll understands, or its dtype is not numeric.
    """
    if isinstance(x, np.ndarray):
        return _numpy_payload(contiguous(x))
    if _is_torch(x):
        from .tensors import tensor_payload

        payload: Payload = tensor_payload(x)
        return payload
    if isinstance(x, (bytes, bytearray, memoryview)) or hasattr(x, "__array_interface__"):
        return _numpy_payload(contiguous(np.asarray(x)))
    if hasattr(x, "__dlpack__"):
        try:
            arr = contiguous(np.from_dlpack(x))
        except (RuntimeError, BufferError, TypeError) as exc:
            raise TypeError(
                f"{what}: cannot read {type(x).__name__} through DLPack on the host ({exc}); "
                "device arrays other than torch tensors are not supported yet"
            ) from exc
        return _numpy_payload(arr)
    try:
        view = memoryview(x)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{what} must be a numpy array, a torch tensor, or support the buffer protocol, "
            f"__array_interface__ or DLPack; got {type(x).__name__}"
        ) from None
    return _numpy_payload(contiguous(np.asarray(view)))


def as_output(out: object, like: Payload, shape: tuple[int, ...]) -> tuple[Array, Callable[[Array], Any]]:
    """Validate ``out=`` and return (array to compute into, function to finish the write).

    Raises:
        TypeError / ValueError: ``out`` has the wrong kind, dtype or shape.
    """
    if _is_torch(out):
        from .tensors import tensor_output

        made: tuple[Array, Callable[[Array], Any]] = tensor_output(out, like, shape)
        return made
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array here, got {type(out).__name__}")
    # Either byte order will do: numpy converts when the result is written (below).
    if out.dtype.newbyteorder("=") != like.array.dtype:
        raise TypeError(f"out has dtype {out.dtype}, the result has dtype {like.array.dtype}")
    if out.shape != shape:
        raise ValueError(f"out has shape {out.shape}, the result has shape {shape}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    if out.flags.c_contiguous and out.dtype.isnative:
        return out, lambda a: out
    tmp = np.empty(shape, dtype=out.dtype)

    def finish(a: Array) -> Any:
        out[...] = a
        return out

    return tmp, finish
