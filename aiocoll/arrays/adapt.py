"""The front door of ``arrays``: adapt whatever a caller passes (numpy arrays, torch tensors,
buffers, ``__array_interface__`` or DLPack objects) to a :class:`Payload`, and check ``out=``.

numpy payloads are made in ``payload.py``, torch tensors in ``tensors.py`` (imported only when a
tensor is seen, so torch stays optional); both are leaves under this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .payload import Array, Payload, contiguous, numpy_payload


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
        return numpy_payload(contiguous(x))
    if _is_torch(x):
        from .tensors import tensor_payload  # only now: torch stays optional

        payload: Payload = tensor_payload(x)
        return payload
    if isinstance(x, (bytes, bytearray, memoryview)) or hasattr(x, "__array_interface__"):
        return numpy_payload(contiguous(np.asarray(x)))
    if hasattr(x, "__dlpack__"):
        try:
            arr = contiguous(np.from_dlpack(x))
        except (RuntimeError, BufferError, TypeError) as exc:
            raise TypeError(
                f"{what}: cannot read {type(x).__name__} through DLPack on the host ({exc}); "
                "device arrays other than torch tensors are not supported yet"
            ) from exc
        return numpy_payload(arr)
    try:
        view = memoryview(x)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{what} must be a numpy array, a torch tensor, or support the buffer protocol, "
            f"__array_interface__ or DLPack; got {type(x).__name__}"
        ) from None
    return numpy_payload(contiguous(np.asarray(view)))


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
