"""``torch.distributed.init_process_group("aiocoll", ...)``: a torch.distributed backend on aiocoll.

Registered when ``aiocoll.torch`` is imported. The default group starts aiocoll's world (through
``aiocoll.sync``, on its background loop) using torch's rendezvous store, so torchrun and
``init_method`` work as for gloo; every later ``torch.distributed.new_group`` maps to an aiocoll
group of the same ranks. Collectives return at once with a Work whose future completes when the
collective has written its results into the caller's tensors (in place, as c10d requires), so
DDP and other torch.distributed code run over aiocoll's transports.

Environment: ``AIOCOLL_TRANSPORT`` picks the transport (default ``auto``). The world's shared
secret is ``AIOCOLL_SECRET`` if set; otherwise rank 0 draws one per world and passes it through
torch's store. Whoever can read that store can join torch.distributed's own process group too,
so this is no weaker than torch.distributed itself, and ``init`` needs no opt-in here.

State: CPU and CUDA tensors (CUDA staged through host memory, the caller's stream recorded);
allreduce(_coalesced), broadcast, allgather (lists, into one tensor, and coalesced), reduce_scatter
(lists, from one tensor, and coalesced: what torch's functional reduce_scatter uses), alltoall
(lists and single tensor), reduce, gather, scatter, send, recv, barrier, ``monitored_barrier``
(on the group object: ``torch.distributed.monitored_barrier`` itself accepts only gloo) and the
coalescing managers (``_coalescing_manager``, ``batch_isend_irecv``): the collectives inside one
start as they are issued, in order, and the manager's Work completes when all of them have.
Not supported: receiving from any source (``recv`` without ``src``): aiocoll matches every
message to its sender, so it raises a ValueError that says to name the source.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Callable, Coroutine, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future  # type: ignore[attr-defined]

from aiocoll.collectives import tensors as core
from aiocoll.store.c10d import C10dStore  # the adapter lives with the stores (torchrun uses it too)
from aiocoll import sync as _sync
from aiocoll.groups.group import ProcessGroup as AioGroup
from aiocoll.arrays.ops import parse_op

BACKEND = "aiocoll"


# --------------------------------------------------------------------------- the process group
def _work(fut: torch.futures.Future[Any]) -> Any:
    return _create_work_from_future(fut)


def _tensors_of(args: Sequence[Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(_tensors_of(a))
    return out


def _op(op: Any) -> Any:
    """aiocoll's ReduceOp for a c10d ReduceOp (whose kind is ``op.op``, a RedOpType).

    Raises:
        ValueError: PREMUL_SUM and other ops aiocoll does not have.
    """
    return parse_op(getattr(op, "op", op))


def _flat(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _into(dst: torch.Tensor, src: torch.Tensor) -> None:
    with torch.no_grad():
        dst.copy_(src.reshape(dst.shape))


class AiocollProcessGroup(dist.ProcessGroup):
    """A torch.distributed ProcessGroup whose collectives run on an aiocoll group."""

    def __init__(self, group: AioGroup, timeout: float, name: str = "", desc: str = "") -> None:
        super().__init__(group.rank, group.size)  # type: ignore[call-arg]
        self._group = group
        self._timeout = timeout
        self._name = name  # torch's group name (functional collectives look groups up by it)
        self._desc = desc
        # Futures of the Works started since _start_coalescing, for _end_coalescing's Work.
        self._coalesced: list[torch.futures.Future[Any]] | None = None

    @property
    def aiocoll_group(self) -> AioGroup:
        """The aiocoll group this torch.distributed group runs on (accepted as ``group=``)."""
        return self._group

    # ------------------------------------------------------------------ plumbing
    def _start(self, result: Any, make: Callable[[], Coroutine[Any, Any, None]], *tensors: Any) -> Any:
        """Run ``make()`` on the world's loop; the Work completes with ``result`` after it."""
        fut: torch.futures.Future[Any] = torch.futures.Future()
        found = _tensors_of(tensors)
        with _sync._streams_of(tuple(found), {}):

            async def run() -> None:
                # make() claims its collectives' places in its first step, in the order of the
                # calls of this thread, also relative to its blocking and funcol calls.
                await _sync._in_order(self._group.world, make)
                if any(t.device.type == "cuda" for t in found):
                    torch.cuda.current_stream().synchronize()  # results are in the tensors now

            cf = _sync.submit(run(), self._group.world)

        def done(f: Any) -> None:
            exc = f.exception()
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        cf.add_done_callback(done)
        if self._coalesced is not None:
            self._coalesced.append(fut)
        return _work(fut)

    def getBackendName(self) -> str:
        return BACKEND

    def setGroupName(self, name: str) -> None:
        self._name = name

    def getGroupName(self) -> str:
        return self._name

    def setGroupDesc(self, desc: str) -> None:
        self._desc = desc

    def getGroupDesc(self) -> str:
        return self._desc

    def __repr__(self) -> str:
        return f"<AiocollProcessGroup {self._group.name} rank {self._group.rank} of {self._group.size}>"

    # ------------------------------------------------------------------ reductions
    def allreduce(self, tensors: list[torch.Tensor], opts: Any) -> Any:  # type: ignore[override]
        op = _op(opts.reduceOp)
        g = self._group

        async def go() -> None:
            results = await core.all_reduce_coalesced(tensors, op, g) if len(tensors) > 1 else [
                await core.all_reduce(tensors[0], op, g)
            ]
            for t, r in zip(tensors, results):
                _into(t, r)

        return self._start(tensors, go, tensors)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any) -> Any:  # type: ignore[override]
        op = _op(opts.reduceOp)
        g = self._group

        async def go() -> None:
            for t, r in zip(tensors, await core.all_reduce_coalesced(tensors, op, g)):
                _into(t, r)

        return self._start(tensors, go, tensors)

    def reduce(self, tensors: list[torch.Tensor], opts: Any) -> Any:  # type: ignore[override]
        op, root, g = _op(opts.reduceOp), opts.rootRank, self._group

        async def go() -> None:
            _into(tensors[0], await core.reduce(tensors[0], root, op, g))

        return self._start(tensors, go, tensors)

    def reduce_scatter(self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any) -> Any:  # type: ignore[override]
        op, g = _op(opts.reduceOp), self._group

        async def go() -> None:
            full = torch.cat([t.reshape(1, -1) for t in inputs[0]])
            _into(outputs[0], await core.reduce_scatter(full, op, g))

        return self._start(outputs, go, outputs, inputs)

    def _reduce_scatter_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any) -> Any:
        op, g = _op(opts.reduceOp), self._group

        async def go() -> None:
            _into(output, await core.reduce_scatter(input, op, g))

        return self._start(output, go, output, input)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> Any:
        return self._reduce_scatter_base(output, input, opts or dist.ReduceScatterOptions())

    def reduce_scatter_single_coalesced(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None) -> Any:
        """Each ``inputs[i]`` reduced and scattered (along dim 0) into ``outputs[i]``, as one operation per dtype.

        torch's functional ``reduce_scatter_tensor`` (and its backward of all_gather) comes here.
        """
        op, g = _op((opts or dist.ReduceScatterOptions()).reduceOp), self._group

        async def go() -> None:
            for o, r in zip(outputs, await core.reduce_scatter_coalesced([t.reshape(g.size, -1) for t in inputs], op, g)):
                _into(o, r)

        return self._start(outputs, go, outputs, inputs)

    # The name torch's Python-side bindings used before ``reduce_scatter_single_coalesced``.
    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced  # type: ignore[assignment]

    # ------------------------------------------------------------------ moving data
    def broadcast(self, tensors: list[torch.Tensor], opts: Any) -> Any:  # type: ignore[override]
        root, g = opts.rootRank, self._group

        async def go() -> None:
            # Every broadcast claimed before the first await.
            for t, r in zip(tensors, await core.together([core.start("broadcast", t, root, g) for t in tensors])):
                _into(t, r)

        return self._start(tensors, go, tensors)

    def allgather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any) -> Any:  # type: ignore[override]
        g = self._group

        async def go() -> None:
            got = await core.all_gather(inputs[0].unsqueeze(0), g)
            for o, piece in zip(outputs[0], got.unbind(0)):
                _into(o, piece)

        return self._start(outputs, go, outputs, inputs)

    def _allgather_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any) -> Any:  # type: ignore[override]
        g = self._group

        async def go() -> None:
            _into(output, await core.all_gather(input.reshape(1, -1), g))

        return self._start(output, go, output, input)

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> Any:
        return self._allgather_base(output, input, opts)

    def allgather_into_tensor_coalesced(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any) -> Any:  # type: ignore[override]
        g = self._group

        async def go() -> None:
            got = await core.all_gather_coalesced([t.reshape(1, -1) for t in inputs], g)
            for o, r in zip(outputs, got):
                _into(o, r)

        return self._start(outputs, go, outputs, inputs)

    def alltoall_base(  # type: ignore[override]
        self, output: torch.Tensor, input: torch.Tensor, output_split_sizes: list[int],
        input_split_sizes: list[int], opts: Any,
    ) -> Any:
        g = self._group

        async def go() -> None:
            r = await core.all_to_all(input, g, output_split_sizes=output_split_sizes or None,
                                      input_split_sizes=input_split_sizes or None)
            _into(output, r)

        return self._start(output, go, output, input)

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor, output_split_sizes: list[int],
                          input_split_sizes: list[int], opts: Any = None) -> Any:
        return self.alltoall_base(output, input, output_split_sizes, input_split_sizes, opts)

    def alltoall(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any) -> Any:  # type: ignore[override]
        g = self._group

        async def go() -> None:
            flat = torch.cat([t.reshape(-1) for t in inputs])
            got = await core.all_to_all(flat, g, output_split_sizes=[t.numel() for t in outputs],
                                        input_split_sizes=[t.numel() for t in inputs])
            for o, piece in zip(outputs, torch.split(got, [t.numel() for t in outputs])):
                _into(o, piece)

        return self._start(outputs, go, outputs, inputs)

    def gather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any) -> Any:  # type: ignore[override]
        root, g = opts.rootRank, self._group

        async def go() -> None:
            got = await core.gather(inputs[0].unsqueeze(0), root, g)
            if got is not None:
                for o, piece in zip(outputs[0], got.unbind(0)):
                    _into(o, piece)

        return self._start(outputs, go, outputs, inputs)

    def scatter(self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any) -> Any:  # type: ignore[override]
        root, g = opts.rootRank, self._group

        async def go() -> None:
            if g.rank == root:
                full = torch.stack(list(inputs[0]))
            else:
                full = torch.empty((g.size, *outputs[0].shape), dtype=outputs[0].dtype, device=outputs[0].device)
            got = await core.scatter(full, root, g)
            _into(outputs[0], got[0])

        return self._start(outputs, go, outputs, inputs)

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> Any:
        g = self._group

        async def go() -> None:
            await core.send(tensors[0], dst, g, tag=tag)

        return self._start(tensors, go, tensors)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> Any:
        g = self._group

        async def go() -> None:
            await core.recv(tensors[0], src, g, tag=tag, out=tensors[0])

        return self._start(tensors, go, tensors)

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int) -> Any:
        """Receiving from any source: not available (raises at once, on the caller).

        Raises:
            ValueError: always; every aiocoll message is matched to the sender it names.
        """
        raise ValueError(
            "the aiocoll backend cannot receive from any source: every aiocoll message is matched to the "
            "sender it names; pass src= to torch.distributed.recv/irecv"
        )

    def barrier(self, opts: Any = None) -> Any:
        g = self._group

        async def go() -> None:
            await core.barrier(g)

        return self._start([], go)

    def monitored_barrier(self, timeout: timedelta | None = None, wait_all_ranks: bool = False) -> None:
        """A barrier that fails, on every member, when some member has not entered it within ``timeout``.

        The error names the ranks this member knows to be late (``CollectiveError.ranks``); aiocoll
        reports what it knows whether or not ``wait_all_ranks`` is set. As after any aiocoll
        timeout, the group is broken afterwards (later collectives on it raise GroupBrokenError).

        Raises:
            CollectiveTimeoutError: a member did not arrive in time. CollectiveError: a dead peer.
        """
        g = self._group
        seconds = timeout.total_seconds() if timeout is not None else self._timeout

        async def go() -> None:
            await core.barrier(g, timeout=seconds)

        self._start([], go).wait()

    # ------------------------------------------------------------------ coalescing managers
    def _start_coalescing(self, device: Any = None) -> None:
        if self._coalesced is not None:
            raise RuntimeError("the aiocoll backend is already coalescing on this group (managers do not nest)")
        self._coalesced = []

    def _end_coalescing(self, device: Any = None) -> Any:
        """A Work that completes when every collective started since ``_start_coalescing`` has.

        The collectives already run in the order they were issued; coalescing is what torch uses
        to wait for them together (``batch_isend_irecv`` among others).
        """
        futures, self._coalesced = self._coalesced or [], None
        return _work(torch.futures.collect_all(futures).then(lambda f: [t for r in f.value() for t in _flat(r.value())]))

    # ------------------------------------------------------------------ lifetime
    def shutdown(self) -> None:
        if self._group is self._group.world.group:
            _sync.destroy()

    def abort(self) -> None:
        if self._group is self._group.world.group:
            _sync.destroy(abort=True)


# --------------------------------------------------------------------------- creating groups
def _create(opts: Any, backend_options: Any = None) -> AiocollProcessGroup:
    """The creator torch calls for ``init_process_group`` and each ``new_group`` (extended API)."""
    timeout = float(opts.timeout.total_seconds()) if opts.timeout else 60.0
    ranks = list(opts.global_ranks_in_group) or list(range(opts.group_size))
    world = _sync._world_or_none()
    if world is None:
        # The default group: start aiocoll's world through torch's store.
        store = C10dStore(opts.store)
        secret = os.environ.get("AIOCOLL_SECRET")
        if not secret:
            # A key per world: torch's store may outlive one (torchrun's), and a rank starting
            # again must not read the last world's secret before rank 0 has set the new one.
            # Each rank counts its own starts, so the ranks agree without waiting on each other.
            started = int(opts.store.add(f"aiocoll/torch-backend/starts/{opts.group_rank}", 1))
            key = f"aiocoll/torch-backend/{started}/secret"
            if opts.group_rank == 0:
                opts.store.set(key, secrets.token_hex(32))
            secret = bytes(opts.store.get(key)).decode()
        _sync.init(opts.group_rank, opts.group_size, store=store, timeout=timeout, secret=secret)
        world = _sync._world_or_none()
        assert world is not None
    if len(ranks) == world.world_size and opts.group_rank == world.rank:
        group = world.group
    else:
        group = _sync.find_or_create_group(ranks, f"c10d:{opts.group_id}")
    if group.rank != opts.group_rank:  # pragma: no cover - torch and aiocoll order ranks alike
        raise RuntimeError(f"aiocoll group {group.name} puts this rank at {group.rank}, torch at {opts.group_rank}")
    return AiocollProcessGroup(group, timeout, name=str(opts.group_id))


def register() -> None:
    """Make ``"aiocoll"`` a torch.distributed backend (idempotent)."""
    if BACKEND.upper() in dist.Backend._plugins:
        return
    dist.Backend.register_backend(BACKEND, _create, extended_api=True, devices=["cpu", "cuda"])


__all__ = ["AiocollProcessGroup", "C10dStore", "register"]
