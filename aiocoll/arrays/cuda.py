"""Device memory for the collectives: CUDA tensors as they are, reductions on the GPU, and the
pinned host buffers that the staged path (no GPU-direct transport) copies through.

Imported only when a CUDA array is seen (or by the GPU engine), so torch stays optional.

- :func:`device_tensor` gives the torch face of a CUDA array without a copy: torch tensors
  themselves, and anything with ``__cuda_array_interface__`` or a DLPack CUDA device (CuPy,
  Numba, JAX...). Results go back to the caller's kind through :func:`wrap_like`.
- :func:`reduce_into` / :func:`finish_avg` are ``aiocoll.arrays.ops``' kernels on the GPU, with the
  same semantics (bool as or/and, avg truncating integers toward zero, bfloat16 computed in
  float32 and rounded to nearest even by torch itself).
- :class:`PinnedPool` keeps page-locked host buffers for the staged path, reused across calls
  (a buffer goes back once the copy that reads it has run), so no call allocates pinned memory
  once the pool is warm.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils.dlpack

from .dtypes import WireDtype
from .ops import ReduceOp

#: CUDA streams to stage copies on, by device index: set (in a task's context) by callers that
#: run a collective on another thread than the one whose stream ordered the tensor's producers.
cuda_streams: contextvars.ContextVar[Mapping[int, Any] | None] = contextvars.ContextVar(
    "aiocoll_cuda_streams", default=None
)

_KCUDA = 2  # DLPack's device type of CUDA memory


def is_cuda(x: object) -> bool:
    """Whether ``x`` is an array in CUDA device memory (torch, CUDA Array Interface, DLPack)."""
    if isinstance(x, torch.Tensor):
        return x.device.type == "cuda"
    try:
        if hasattr(x, "__cuda_array_interface__"):
            return True
    except Exception:  # a property that raises: not usable as device memory
        return False
    dev = getattr(x, "__dlpack_device__", None)
    if callable(dev):
        try:
            return int(dev()[0]) == _KCUDA
        except Exception:
            return False
    return False


def device_tensor(x: Any, what: str = "x") -> torch.Tensor:
    """The torch tensor of CUDA array ``x``, sharing its memory.

    Raises:
        TypeError: ``x`` cannot be read as a CUDA tensor.
    """
    if isinstance(x, torch.Tensor):
        return x
    try:
        if hasattr(x, "__dlpack__"):
            return torch.utils.dlpack.from_dlpack(x)
        return torch.as_tensor(x, device="cuda")
    except Exception as exc:
        raise TypeError(f"{what}: cannot read {type(x).__name__} as CUDA memory ({exc})") from exc


def wrap_like(x: Any, result: torch.Tensor) -> Any:
    """``result`` as an array of ``x``'s kind (torch tensors stay tensors; CuPy arrays and other
    DLPack producers get their library's ``from_dlpack`` when it has one)."""
    if isinstance(x, torch.Tensor):
        return result
    import sys

    lib = sys.modules.get(type(x).__module__.split(".", 1)[0])
    make = getattr(lib, "from_dlpack", None)
    if callable(make):
        return make(result)
    return result


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a flat uint8 tensor (what transports are handed: every
    dtype, bfloat16 included, has a CUDA Array Interface this way)."""
    return t.reshape(-1).view(torch.uint8)


def stream_of(t: torch.Tensor) -> Any:
    """The stream a collective on ``t`` runs its kernels on: the caller's, as recorded by
    ``aiocoll.arrays.tensors.recorded_streams`` (sync API, aiocoll.torch), else the current one."""

    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    streams = cuda_streams.get()
    if streams is not None and index in streams:
        return streams[index]
    return torch.cuda.current_stream(index)


async def wait_stream(stream: Any) -> None:
    """Return once the work queued on ``stream`` so far has run, without blocking the loop
    (the wait runs on a worker thread when the work is not done yet)."""
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(stream)
    if not event.query():  # type: ignore[no-untyped-call]
        await asyncio.get_running_loop().run_in_executor(None, event.synchronize)


def copy_bytes(dst: Any, src: Any) -> None:
    """Copy ``src`` into ``dst`` (same size in bytes; host or device memory, either side), and
    wait for the copy."""
    d, s = _bytes_tensor(dst), _bytes_tensor(src)
    d.copy_(s)
    if d.is_cuda or s.is_cuda:
        torch.cuda.current_stream(d.device if d.is_cuda else s.device).synchronize()


def _bytes_tensor(buf: Any) -> torch.Tensor:
    if isinstance(buf, torch.Tensor):
        return buf.reshape(-1).view(torch.uint8)
    if hasattr(buf, "__cuda_array_interface__"):
        return torch.as_tensor(buf, device="cuda").reshape(-1).view(torch.uint8)
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    if view.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(view.cast("B") if view.format != "B" or view.ndim != 1 else view, dtype=torch.uint8)


# --------------------------------------------------------------------------- reductions
def reduce_into(
    op: ReduceOp, code: WireDtype, acc: torch.Tensor, other: torch.Tensor, first: torch.Tensor | None = None
) -> None:
    """acc = op(acc, other) elementwise, in place, on the current stream; with ``first``,
    acc = op(first, other) (one pass instead of a copy and a reduction)."""
    a = acc if first is None else first
    if acc.dtype == torch.bool:
        if op in (ReduceOp.SUM, ReduceOp.MAX, ReduceOp.BOR):
            torch.logical_or(a, other, out=acc)
        elif op in (ReduceOp.PRODUCT, ReduceOp.MIN, ReduceOp.BAND):
            torch.logical_and(a, other, out=acc)
        else:  # BXOR
            torch.logical_xor(a, other, out=acc)
        return
    if op in (ReduceOp.SUM, ReduceOp.AVG):
        torch.add(a, other, out=acc)
    elif op == ReduceOp.PRODUCT:
        torch.mul(a, other, out=acc)
    elif op == ReduceOp.MIN:
        torch.minimum(a, other, out=acc)
    elif op == ReduceOp.MAX:
        torch.maximum(a, other, out=acc)
    elif op == ReduceOp.BAND:
        torch.bitwise_and(a, other, out=acc)
    elif op == ReduceOp.BOR:
        torch.bitwise_or(a, other, out=acc)
    else:
        torch.bitwise_xor(a, other, out=acc)


def finish_avg(acc: torch.Tensor, count: int) -> None:
    """Turn a sum into an average over ``count`` members, in place (integers truncate toward
    zero, as ``aiocoll.arrays.ops.finish_avg`` and NCCL do)."""
    if acc.is_floating_point() or acc.is_complex():
        acc.div_(count)
    else:
        acc.copy_(torch.div(acc, count, rounding_mode="trunc"))


# --------------------------------------------------------------------------- pinned pool
#: Smallest pinned buffer the pool hands out (smaller requests share this class).
POOL_MIN = 1 << 16


def pool_limit() -> int:
    """``AIOCOLL_PINNED_POOL_BYTES``: most pinned bytes the staging pool keeps idle (default
    2 GiB; 0 keeps none).

    Raises:
        ValueError: not a non-negative integer.
    """
    raw = os.environ.get("AIOCOLL_PINNED_POOL_BYTES", "").strip()
    if not raw:
        return 2 << 30
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"AIOCOLL_PINNED_POOL_BYTES={raw!r} is not an integer") from None
    if value < 0:
        raise ValueError(f"AIOCOLL_PINNED_POOL_BYTES={raw!r} is negative")
    return value


def size_class(nbytes: int) -> int:
    """The buffer size the pool uses for ``nbytes``: the next power of two, at least POOL_MIN."""
    return max(POOL_MIN, 1 << max(0, (nbytes - 1).bit_length()))


class PinnedPool:
    """Page-locked host buffers, reused: ``take`` one, ``give`` it back with a test of whether the
    copy that still reads or writes it has run; it is handed out again only once that says so.

    Thread-safe (the sync API and aiocoll.torch stage from other threads than the loop's).
    """

    def __init__(self, alloc: Callable[[int], Any], limit: int) -> None:
        self._alloc = alloc
        self._limit = limit
        self._free: dict[int, list[tuple[Any, Callable[[], bool] | None]]] = {}
        self._idle = 0
        self._lock = threading.Lock()
        self.allocations = 0  # how many buffers were ever allocated (tests, the benchmark)

    @property
    def idle_bytes(self) -> int:
        return self._idle

    def take(self, nbytes: int) -> Any:
        """A buffer of at least ``nbytes`` bytes (its size class), for the caller alone."""
        size = size_class(nbytes)
        with self._lock:
            free = self._free.get(size, [])
            for i, (buf, ready) in enumerate(free):
                if ready is None or ready():
                    del free[i]
                    self._idle -= size
                    return buf
        self.allocations += 1
        return self._alloc(size)

    def give(self, buf: Any, nbytes: int, ready: Callable[[], bool] | None = None) -> None:
        """Return ``buf`` (taken for ``nbytes``); ``ready()`` says when it may be reused."""
        size = size_class(nbytes)
        with self._lock:
            if self._idle + size > self._limit:
                return  # dropped: freed when its last reference goes
            self._free.setdefault(size, []).append((buf, ready))
            self._idle += size

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._idle = 0


_pool: PinnedPool | None = None
_pool_lock = threading.Lock()


def pinned_pool() -> PinnedPool:
    """The process's staging pool (made on first use)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = PinnedPool(lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True), pool_limit())
        return _pool


__all__ = [
    "POOL_MIN", "PinnedPool", "byte_view", "copy_bytes", "device_tensor", "finish_avg", "is_cuda", "pinned_pool",
    "pool_limit", "reduce_into", "size_class", "stream_of", "wait_stream", "wrap_like",
]
