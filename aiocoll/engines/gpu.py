"""GPU-direct collectives: CUDA arrays reduced and moved without leaving device memory.

``direct(group, nbytes)`` says whether a collective on CUDA memory runs here; it does when

- every other member of the group is reached over a transport that moves device memory (ucx:
  ``transport="ucx"``, or ``"auto"`` with ucxx installed, which starts ucx beside shm/tcp for
  device payloads; see ``device_transport``), and
- the payload is at least ``AIOCOLL_GPU_DIRECT_MIN_BYTES`` per member (default 256 KiB; 0:
  always). Smaller payloads are staged through pinned host memory instead, on purpose: a
  device-to-device rendezvous costs more than two small copies and a host round trip.

The choice depends only on the group, the size and that setting, so it comes out the same on
every member (set the variable alike everywhere).

What runs: the schedules below, driven by ``aiocoll.engines.messages.run_schedule`` like any
other (matching, timeouts, failures and mismatches are the same), with device memory in every
Send and Recv. The transport reads and writes that memory itself (cuda_ipc between processes
of one host: the receiver copies from the sender's memory, GPU to GPU). Reductions run as torch
kernels on the caller's stream, in rank order, by the one member that owns each chunk, so every
member gets bit-identical results. Data handed to the transport must be ready: the input waits
for the caller's stream once, each reduced chunk for its kernels, both off the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ..algorithms import Recv, Schedule, Send, chunk_bounds
from ..arrays.dtypes import WireDtype
from ..arrays.ops import ReduceOp
from ..core.wire import Call, Kind

if TYPE_CHECKING:
    import torch

    from ..core.settings import Settings

    from ..groups.group import ProcessGroup

#: Payloads from this many bytes per member on go device to device (AIOCOLL_GPU_DIRECT_MIN_BYTES).
DEFAULT_MIN_BYTES = 256 << 10
#: Schedules whose steps wait for GPU work run those steps on a worker thread from this size on.
#: Below it they wait on the loop: what they wait for is only the reduction of one chunk, queued
#: by the step itself (the caller's earlier work was waited for off the loop, wait_stream), at
#: device-memory speed (about 0.1 ms for 128 MiB), less than the round trip to a thread.
OFFLOAD_BYTES = 2 << 30
#: A transfer to one peer may be cut into messages of at least SLICE_MIN bytes, at most SLICES of
#: them, all in flight at once (UCX then runs several copies in parallel: with ucxx alone, 4 in
#: flight moved 64 MiB 25% faster over cuda_ipc). One message per transfer is what was measured
#: at full speed here; the one run with 4 was slowed by another cause, so it is not the default.
SLICE_MIN = 16 << 20
SLICES = 1

def device_transport(transport: str, settings: Settings) -> str | None:
    """The transport ``init`` starts beside ``transport`` for device payloads, or None.

    ``Settings.gpu_transport`` (``AIOCOLL_GPU_TRANSPORT``): ``auto`` starts ucx for device
    payloads when the world's transport is ``auto``, ucxx is installed and this host has a CUDA
    driver; ``off`` stages CUDA arrays through host memory unless the world's transport is ucx.
    """
    if transport != "auto" or settings.gpu_transport == "off" or not _has_cuda_driver():
        return None
    try:
        from ..transports import get_transport

        get_transport("ucx")
    except Exception:  # ucxx not installed, or libucx does not load: stage through host memory
        return None
    return "ucx"


def _has_cuda_driver() -> bool:
    """Whether this host has a CUDA driver at all (no driver: no device memory to move, and
    starting UCX for it would only cost time at every init)."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return True
    return False


def direct(group: ProcessGroup, nbytes: int) -> bool:
    """Whether a collective of ``nbytes`` per member of CUDA memory runs device to device.

    ``Settings.gpu_direct_min_bytes`` (``AIOCOLL_GPU_DIRECT_MIN_BYTES``): smaller payloads are
    staged through host memory, where they are faster.
    """
    if group.size < 2:
        return False
    if nbytes < group.world.settings.gpu_direct_min_bytes:
        return False
    comm = group.world.comm
    return all(comm.has_device_path(p) for p in group.ranks if p != group.world.rank)


def prepare(group: ProcessGroup, t: torch.Tensor) -> None:
    """Make ``t``'s device current on this thread when another is, and let frames that arrive
    before their receive is posted wait in device memory of that device
    (``Communicator.device_scratch``)."""
    import torch

    if t.device.index is not None and torch.cuda.current_device() != t.device.index:
        # UCX works in the CUDA context current on the thread that drives it (this one, the
        # world's loop): make it the tensor's device's, as torch.cuda.set_device would.
        torch.cuda.set_device(t.device)
    comm = group.world.comm
    if comm.device_scratch is None:
        device = t.device

        def scratch(n: int) -> Any:
            return torch.empty(n, dtype=torch.uint8, device=device)

        comm.device_scratch = scratch


# --------------------------------------------------------------------------- schedules
#: reduce(acc, b, a=None): acc = op(acc, b), or acc = op(a, b) when ``a`` is given.
Reduce = Callable[..., None]


def _slices(t: torch.Tensor) -> list[Any]:
    """``t`` (flat) cut into the messages one transfer is sent as (the same cut on both sides:
    it depends only on the size)."""
    from ..arrays.cuda import byte_view

    nbytes = t.numel() * t.element_size()
    k = max(1, min(SLICES, nbytes // SLICE_MIN))
    if k == 1:
        return [_nd(byte_view(t))]
    return [_nd(byte_view(t[lo:hi])) for lo, hi in chunk_bounds(t.shape[0], k)]


def _exchange(peer: int, send: torch.Tensor, recv: torch.Tensor) -> list[Any]:
    """Send ``send`` to ``peer`` and receive ``recv`` from it, each as its slices (the peer cuts
    what it sends and receives the same way; sends and receives are numbered apart)."""
    ops: list[Any] = [Send(peer, a) for a in _slices(send)]
    return ops + [Recv(peer, b) for b in _slices(recv)]


def all_reduce(
    rank: int, size: int, x: torch.Tensor, out: torch.Tensor, reduce: Reduce, ready: Callable[[], None]
) -> Schedule:
    """Reduce-scatter (member r reduces chunk r, in rank order) then all-gather, on flat
    tensors. ``ready()`` waits for the kernels queued so far (before reduced data is sent)."""
    bounds = chunk_bounds(x.shape[0], size)
    lo, hi = bounds[rank]
    yield from _reduce_chunks(rank, size, x, out[lo:hi], bounds, reduce, ready)
    yield [op for p in range(size) if p != rank for op in _exchange(p, out[lo:hi], out[bounds[p][0]:bounds[p][1]])]


def reduce_scatter(
    rank: int, size: int, x: torch.Tensor, out: torch.Tensor, reduce: Reduce, ready: Callable[[], None]
) -> Schedule:
    """``out`` = chunk ``rank`` of the reduction of every member's ``x`` (``size`` equal chunks)."""
    n = x.shape[0] // size
    yield from _reduce_chunks(rank, size, x, out, [(p * n, (p + 1) * n) for p in range(size)], reduce, ready)


def _reduce_chunks(
    rank: int, size: int, x: torch.Tensor, mine: torch.Tensor, bounds: list[tuple[int, int]], reduce: Reduce,
    ready: Callable[[], None],
) -> Schedule:
    import torch

    lo, hi = bounds[rank]
    own = x[lo:hi]
    if own.numel() and own.data_ptr() == mine.data_ptr():
        own = own.clone()  # in place (out=x): the reduction below overwrites this chunk first
    parts: list[torch.Tensor] = [own] * size
    ops: list[Any] = []
    for p in range(size):
        if p != rank:
            parts[p] = torch.empty(hi - lo, dtype=x.dtype, device=x.device)
            ops += _exchange(p, x[bounds[p][0]:bounds[p][1]], parts[p])
    yield ops
    # In rank order, so that every member computes the same bits; the first step writes
    # ``mine`` from the first two parts (no separate copy pass over the chunk).
    if size == 1:
        mine.copy_(parts[0])
    else:
        reduce(mine, parts[1], parts[0])
    for p in range(2, size):
        reduce(mine, parts[p])
    ready()


def all_gather(rank: int, size: int, x: torch.Tensor, out: torch.Tensor, ready: Callable[[], None]) -> Schedule:
    """``out`` = every member's ``x`` in rank order (flat tensors of equal length)."""
    n = x.shape[0]
    out[rank * n:(rank + 1) * n].copy_(x)
    yield [op for p in range(size) if p != rank for op in _exchange(p, x, out[p * n:(p + 1) * n])]
    ready()


def _nd(t: Any) -> Any:
    """A device tensor where a schedule's Send/Recv take numpy arrays: run_schedule hands any
    memory with a CUDA Array Interface to the transport as it is."""
    return t


def on_stream(stream: Any, schedule: Schedule) -> Schedule:
    """``schedule`` with each of its steps run on ``stream`` (whatever thread runs the step)."""
    import torch

    while True:
        with torch.cuda.stream(stream):
            try:
                batch = next(schedule)
            except StopIteration:
                return
        yield batch


# --------------------------------------------------------------------------- the collectives
#: How the GPU engine runs one collective: called with its sequence number and timeout.
DeviceRun = Callable[[int, float], Coroutine[Any, Any, Any]]


def is_cuda_array(x: object) -> bool:
    """Whether ``x`` is a CUDA array (cheap, and imports torch only for torch tensors)."""
    if any(c.__module__.split(".", 1)[0] == "torch" for c in type(x).__mro__):
        return bool(getattr(x, "is_cuda", False))
    if isinstance(x, (bytes, bytearray, memoryview)) or type(x).__module__.split(".", 1)[0] == "numpy":
        return False
    from ..arrays.cuda import is_cuda

    return is_cuda(x)


def _tensor(x: Any) -> torch.Tensor | None:
    """The plain CUDA tensor of ``x`` if the GPU path can take it (else None: the host path
    decides, and raises what is wrong)."""
    import torch

    from ..arrays.cuda import device_tensor
    from ..arrays.tensors import plain_tensor

    try:
        t = plain_tensor(x) if isinstance(x, torch.Tensor) else device_tensor(x)
    except TypeError:
        return None
    if t.device.type != "cuda" or t.layout != torch.strided or t.is_quantized or t.dtype not in _DTYPES:
        return None
    t = t.detach()
    if t.is_conj() or t.is_neg():
        return None
    return t


def _reducer(op: ReduceOp, code: WireDtype) -> Reduce:
    from ..arrays.cuda import reduce_into

    def reduce(acc: torch.Tensor, other: torch.Tensor, first: torch.Tensor | None = None) -> None:
        reduce_into(op, code, acc, other, first)

    return reduce


def plan_all_reduce(group: ProcessGroup, x: Any, op: ReduceOp, out: Any) -> DeviceRun | None:
    """How to run all_reduce of CUDA array ``x`` device to device, or None (the host path then
    runs it, or raises what is wrong with the arguments)."""
    from ..arrays.cuda import finish_avg, stream_of, wait_stream, wrap_like
    from ..arrays.ops import check_op_dtype
    from ..arrays.tensors import code_of

    t = _tensor(x)
    if t is None:
        return None
    code = code_of(t)
    try:
        check_op_dtype(op, code)
    except ValueError:
        return None
    if out is not None and not _usable_out(out, t):
        return None
    nbytes = t.numel() * t.element_size()
    if not direct(group, nbytes):
        return None
    shape = tuple(int(n) for n in t.shape)

    async def run(seq: int, timeout: float) -> Any:
        import torch

        stream = stream_of(t)
        with torch.cuda.stream(stream):
            src = t.contiguous().reshape(-1)
            res = out if out is not None else torch.empty(shape, dtype=t.dtype, device=t.device)
        await wait_stream(stream)
        prepare(group, t)
        sync = stream.synchronize
        sched = on_stream(stream, all_reduce(group.rank, group.size, src, res.reshape(-1), _reducer(op, code), sync))
        await _run(group, "all_reduce", Kind.ALL_REDUCE, sched, seq, op, code, t.numel(), Call(("shape", shape)),
                   timeout, nbytes)
        if op == ReduceOp.AVG:
            with torch.cuda.stream(stream):
                finish_avg(res, group.size)
        return out if out is not None else wrap_like(x, res)

    return run


def plan_all_gather(group: ProcessGroup, x: Any, dim: int) -> DeviceRun | None:
    """As plan_all_reduce, for all_gather along ``dim`` (already checked to be in range)."""
    from ..arrays.cuda import stream_of, wait_stream, wrap_like
    from ..arrays.tensors import code_of

    t = _tensor(x)
    if t is None:
        return None
    nbytes = t.numel() * t.element_size()
    if not direct(group, nbytes):
        return None
    code = code_of(t)
    shape = tuple(int(n) for n in t.shape)

    async def run(seq: int, timeout: float) -> Any:
        import torch

        stream = stream_of(t)
        with torch.cuda.stream(stream):
            src = (t.reshape(1) if t.dim() == 0 else t.movedim(dim, 0)).contiguous()
            gathered = torch.empty((group.size * src.shape[0], *src.shape[1:]), dtype=t.dtype, device=t.device)
        await wait_stream(stream)
        prepare(group, t)
        flat = src.reshape(-1)
        sched = on_stream(stream, all_gather(group.rank, group.size, flat, gathered.reshape(-1), stream.synchronize))
        await _run(group, "all_gather", Kind.ALL_GATHER, sched, seq, 0, code, flat.numel(),
                   Call(("shape", shape), ("dim", dim)), timeout, nbytes)
        if dim and t.dim():
            with torch.cuda.stream(stream):
                gathered = gathered.movedim(0, dim).contiguous()
        return wrap_like(x, gathered)

    return run


def plan_reduce_scatter(group: ProcessGroup, x: Any, op: ReduceOp, dim: int) -> DeviceRun | None:
    """As plan_all_reduce, for reduce_scatter along ``dim`` (checked: in range, divisible)."""
    from ..arrays.cuda import finish_avg, stream_of, wait_stream, wrap_like
    from ..arrays.ops import check_op_dtype
    from ..arrays.tensors import code_of

    t = _tensor(x)
    if t is None or t.dim() == 0:
        return None
    code = code_of(t)
    try:
        check_op_dtype(op, code)
    except ValueError:
        return None
    nbytes = t.numel() * t.element_size()
    if not direct(group, nbytes):
        return None
    shape = tuple(int(n) for n in t.shape)

    async def run(seq: int, timeout: float) -> Any:
        import torch

        stream = stream_of(t)
        with torch.cuda.stream(stream):
            src = t.movedim(dim, 0).contiguous() if dim else t.contiguous()
            chunk = torch.empty((src.shape[0] // group.size, *src.shape[1:]), dtype=t.dtype, device=t.device)
        await wait_stream(stream)
        prepare(group, t)
        flat = src.reshape(-1)
        sched = on_stream(stream, reduce_scatter(group.rank, group.size, flat, chunk.reshape(-1), _reducer(op, code),
                                                 stream.synchronize))
        await _run(group, "reduce_scatter", Kind.REDUCE_SCATTER, sched, seq, op, code, flat.numel(),
                   Call(("shape", shape), ("dim", dim)), timeout, nbytes)
        with torch.cuda.stream(stream):
            if op == ReduceOp.AVG:
                finish_avg(chunk, group.size)
            if dim:
                chunk = chunk.movedim(0, dim).contiguous()
        return wrap_like(x, chunk)

    return run


def _usable_out(out: Any, t: torch.Tensor) -> bool:
    import torch

    return (type(out) in (torch.Tensor, torch.nn.Parameter) and out.device == t.device and out.dtype == t.dtype
            and tuple(out.shape) == tuple(t.shape) and out.is_contiguous() and not out.is_conj()
            and not out.is_neg())


async def _run(
    group: ProcessGroup, name: str, kind: Kind, sched: Schedule, seq: int, op: int, code: WireDtype, count: int,
    call: Call, timeout: float, nbytes: int,
) -> None:
    from .messages import run_schedule
    from .plan import Plan as SchedulePlan

    plan = SchedulePlan(name, kind, seq, timeout, call, code, count, int(op), offload=nbytes >= OFFLOAD_BYTES)
    await run_schedule(group, plan, sched)


def _dtypes() -> frozenset[Any]:
    try:
        import torch
    except ImportError:  # pragma: no cover - no torch, no CUDA arrays to take
        return frozenset()
    # Not the unsigned 16-64-bit types: torch has few CUDA kernels for them (staged instead).
    return frozenset({
        torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.float16, torch.bfloat16,
        torch.float32, torch.float64, torch.complex64, torch.complex128,
    })


class _LazyDtypes:
    _value: frozenset[Any] | None = None

    def __contains__(self, item: object) -> bool:
        if self._value is None:
            self._value = _dtypes()
        return item in self._value


_DTYPES = _LazyDtypes()


__all__ = ["DEFAULT_MIN_BYTES", "all_gather", "all_reduce", "device_transport", "direct", "is_cuda_array",
           "plan_all_gather", "plan_all_reduce", "plan_reduce_scatter", "prepare", "reduce_scatter"]
