"""Torch tensors as collective payloads: the numpy face of a tensor, and back.

Imported by ``aiocoll.arrays.adapt`` only when a tensor is seen, so torch stays optional.

- CPU tensors are read without a copy: the payload array is a numpy view of the tensor's memory
  (a contiguous copy first when the tensor is strided, conjugated or negated).
- bfloat16 has no numpy dtype: its 16-bit words travel as uint16 tagged ``WireDtype.BFLOAT16``,
  which the reduction kernels widen to float32. float16, bool and complex are numpy-native.
- Tensors on another device (CUDA, ...) are staged through host memory (pinned for CUDA above a
  small size, so the copies run at full DMA speed; the pinned buffers come from
  ``aiocoll.arrays.cuda.pinned_pool`` and are reused across calls); results are copied back to
  the same device. CUDA tensors that a GPU-direct transport reaches never get here: see
  ``aiocoll.engines.gpu``.
  Copies run on the caller's CUDA stream when one is recorded in :data:`cuda_streams` (the sync
  API and ``aiocoll.torch`` record it, since they run the collective on another thread), else on
  the current stream of the thread that runs the collective.

A device-to-host copy waits for the work queued before it on its stream, so a collective on a
CUDA tensor sees every earlier write to it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from .cuda import cuda_streams
from .payload import Array, Payload
from .dtypes import WireDtype, wire_dtype


#: Device tensors at least this large are staged through pinned host memory.
PIN_THRESHOLD = 1 << 16

_NUMPY_NATIVE = {
    torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16,
    torch.uint32, torch.uint64, torch.float16, torch.float32, torch.float64, torch.complex64,
    torch.complex128,
}
_SUPPORTED = "bool, int8-64, uint8-64, float16, bfloat16, float32, float64, complex64, complex128"

_NUMPY_TO_TORCH: dict[np.dtype[Any], torch.dtype] = {
    np.dtype(d): t
    for d, t in [
        (np.bool_, torch.bool), (np.int8, torch.int8), (np.int16, torch.int16), (np.int32, torch.int32),
        (np.int64, torch.int64), (np.uint8, torch.uint8), (np.uint16, torch.uint16),
        (np.uint32, torch.uint32), (np.uint64, torch.uint64), (np.float16, torch.float16),
        (np.float32, torch.float32), (np.float64, torch.float64), (np.complex64, torch.complex64),
        (np.complex128, torch.complex128),
    ]
}


def _stream_for(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type != "cuda":
        return contextlib.nullcontext()
    streams = cuda_streams.get()
    index = device.index if device.index is not None else torch.cuda.current_device()
    if streams is None or index not in streams:
        return contextlib.nullcontext()
    return torch.cuda.stream(streams[index])


@contextlib.contextmanager
def recorded_streams(tensors: Iterator[Any] | list[Any]) -> Iterator[None]:
    """Record the calling thread's current CUDA stream of every CUDA tensor among ``tensors``
    in :data:`cuda_streams` for the duration (for code that runs the collective elsewhere and
    copies this context)."""
    streams: dict[int, Any] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
            if idx not in streams:
                streams[idx] = torch.cuda.current_stream(idx)
    if not streams:
        yield
        return
    token = cuda_streams.set(streams)
    try:
        yield
    finally:
        cuda_streams.reset(token)


def plain_tensor(x: Any, what: str = "x") -> torch.Tensor:
    """``x`` as a plain tensor: lazy collective results are waited for; other subclasses refused.

    Raises:
        TypeError: not a tensor, or a tensor subclass aiocoll cannot read (fake, DTensor, ...).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor here, got {type(x).__module__}.{type(x).__name__}")
    if type(x) is torch.Tensor or type(x) is torch.nn.Parameter:
        return x
    wait = getattr(x, "trigger_wait", None)  # aiocoll.torch's and torch's AsyncCollectiveTensor
    if callable(wait):
        waited = wait()
        if isinstance(waited, torch.Tensor) and type(waited) in (torch.Tensor, torch.nn.Parameter):
            return waited
    raise TypeError(
        f"{what}: tensor subclass {type(x).__name__} is not supported by the collectives; pass a plain "
        "tensor (for a DTensor, its .to_local())"
    )


def check_tensor(t: torch.Tensor, what: str) -> None:
    if t.layout != torch.strided:
        raise TypeError(f"{what}: {t.layout} tensors are not supported; pass a dense (strided) tensor")
    if t.is_quantized:
        raise TypeError(f"{what}: quantized tensors are not supported; dequantize() first")
    if t.device.type == "meta":
        raise TypeError(f"{what}: a meta tensor holds no data to communicate")
    if t.dtype not in _NUMPY_NATIVE and t.dtype != torch.bfloat16:
        raise TypeError(f"{what}: dtype {t.dtype} is not supported; supported: {_SUPPORTED}")


def _dense(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t.contiguous()


def _host_view(t: torch.Tensor) -> Array:
    """Numpy view of a dense contiguous CPU tensor (bfloat16 as uint16 words)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _to_host(t: torch.Tensor) -> tuple[torch.Tensor, Callable[[Array], None] | None]:
    """A CPU copy of a device tensor, after the work queued before it on its stream, and what
    to call with the numpy array made of it to give its pinned buffer back once that array is
    gone (None when the copy is not from the pool)."""
    nbytes = t.numel() * t.element_size()
    with _stream_for(t.device):
        if t.device.type == "cuda" and nbytes >= PIN_THRESHOLD:
            from .cuda import pinned_pool

            pool = pinned_pool()
            buf = pool.take(nbytes)
            host = buf[:nbytes].view(t.dtype).view(t.shape)
            host.copy_(t, non_blocking=True)
            torch.cuda.current_stream(t.device).synchronize()

            def lease(arr: Array) -> None:
                # Views of a numpy array keep its base alive, not the array itself: watch the
                # base every view shares.
                root = arr
                while isinstance(root.base, np.ndarray):
                    root = root.base
                weakref.finalize(root, pool.give, buf, nbytes)

            return host, lease
        return t.to("cpu"), None


def _from_host(a: Array, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of ``dtype`` on ``device`` holding ``a`` (shares ``a``'s memory on the CPU)."""
    if not a.flags.c_contiguous or not a.flags.writeable:
        a = np.array(a, order="C", copy=True)
    if dtype == torch.bfloat16:
        host = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    else:
        host = torch.from_numpy(a)
        if host.dtype != dtype:  # pragma: no cover - a core result always keeps its dtype
            host = host.to(dtype)
    if device.type == "cpu":
        return host
    nbytes = host.numel() * host.element_size()
    with _stream_for(device):
        if device.type == "cuda" and nbytes >= PIN_THRESHOLD:
            from .cuda import pinned_pool

            pool = pinned_pool()
            buf = pool.take(nbytes)
            pinned = buf[:nbytes].view(dtype).view(host.shape)
            pinned.copy_(host)
            result: torch.Tensor = pinned.to(device, non_blocking=True)
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record(torch.cuda.current_stream(device))
            # Handed out again only once the copy reading it has run.
            pool.give(buf, nbytes, done.query)
            return result
        return host.to(device)


def _into_device(a: Array, t: torch.Tensor) -> None:
    """Copy host result ``a`` straight into the dense CUDA tensor ``t`` (one copy to the device,
    not one into a new tensor and another into ``t``: on a GPU that processes share, each
    operation may wait for its time slice)."""
    if not a.flags.c_contiguous:
        a = np.array(a, order="C", copy=True)
    host = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if t.dtype == torch.bfloat16 else torch.from_numpy(a)
    host = host.reshape(t.shape)
    nbytes = host.numel() * host.element_size()
    with _stream_for(t.device):
        if nbytes < PIN_THRESHOLD:
            t.copy_(host)
            return
        from .cuda import pinned_pool

        pool = pinned_pool()
        buf = pool.take(nbytes)
        pinned = buf[:nbytes].view(t.dtype).view(t.shape)
        pinned.copy_(host)
        t.copy_(pinned, non_blocking=True)
        done = torch.cuda.Event()  # type: ignore[no-untyped-call]
        done.record(torch.cuda.current_stream(t.device))
        pool.give(buf, nbytes, done.query)


def tensor_payload(x: Any, what: str = "x") -> Payload:
    """The numpy face of a torch tensor.

    Raises:
        TypeError: not a tensor, an unsupported subclass, layout, device (meta) or dtype.
    """
    t = plain_tensor(x, what)
    check_tensor(t, what)
    dtype, device = t.dtype, t.device
    dense = _dense(t)
    host, lease = (dense, None) if device.type == "cpu" else _to_host(dense)
    arr = _host_view(host)
    if lease is not None:
        lease(arr)
    code = WireDtype.BFLOAT16 if dtype == torch.bfloat16 else wire_dtype(arr.dtype)

    def wrap(a: Array) -> torch.Tensor:
        return _from_host(a, dtype, device)

    return Payload(arr, code, wrap)


_TORCH_TO_NUMPY = {t: d for d, t in _NUMPY_TO_TORCH.items()}


def code_of(t: torch.Tensor) -> WireDtype:
    if t.dtype == torch.bfloat16:
        return WireDtype.BFLOAT16
    return wire_dtype(_TORCH_TO_NUMPY[t.dtype])


def torch_dtype_of(p: Payload) -> torch.dtype:
    """The torch dtype of a payload's elements."""
    if p.code == WireDtype.BFLOAT16:
        return torch.bfloat16
    try:
        return _NUMPY_TO_TORCH[p.array.dtype]
    except KeyError:
        raise TypeError(f"dtype {p.array.dtype} has no torch equivalent") from None


def tensor_output(out: Any, like: Payload, shape: tuple[int, ...]) -> tuple[Array, Callable[[Array], Any]]:
    """Validate a tensor ``out=`` and return (array to compute into, function to finish the write).

    A dense contiguous CPU ``out`` is computed into directly; any other (strided, CUDA) gets a
    host buffer that is copied into it at the end.

    Raises:
        TypeError: ``out`` is not a plain tensor or has another element type than the result.
        ValueError: ``out`` has another shape than the result.
    """
    t = plain_tensor(out, "out")
    check_tensor(t, "out")
    if code_of(t) != like.code:
        raise TypeError(f"out has dtype {t.dtype}, the result has dtype {torch_dtype_of(like)}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"out has shape {tuple(t.shape)}, the result has shape {tuple(shape)}")
    if t.device.type == "cpu" and t.is_contiguous() and not t.is_conj() and not t.is_neg():
        return _host_view(t.detach()), lambda a: out
    tmp = np.empty(shape, dtype=like.array.dtype)

    def finish(a: Array) -> Any:
        with torch.no_grad():
            if t.device.type == "cuda" and t.is_contiguous() and not t.is_conj() and not t.is_neg():
                _into_device(a, t)
            else:
                t.copy_(_from_host(a, t.dtype, t.device))
        return out

    return tmp, finish
