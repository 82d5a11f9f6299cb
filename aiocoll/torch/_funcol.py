"""The functional collectives, with the signatures of ``torch.distributed._functional_collectives``.

Each call starts the collective and returns at once; the result waits on first real use (see
``AsyncCollectiveTensor``). Inputs are never modified and may be changed as soon as the call
returns. Under tracing (``make_fx``, ``torch.compile``, fake tensors) the result is the op's
output followed by an explicit ``aiocoll::wait_tensor``.

``group`` takes every form of ``aiocoll``'s ``group=`` (None, a ProcessGroup, a group name, a
list of ranks, a 2-d list, a DeviceMesh, ``(mesh, dim)``); ``tag`` picks the group a rank list
means, as in torch. Ranks given as ``src`` and in ``src_dst`` are group ranks.

A torch.distributed group (a ``torch.distributed.ProcessGroup``, its group name, a 1-d torch
``DeviceMesh`` or ``(torch DeviceMesh, dim)``) is torch's to run: the call goes to torch's own
functional collectives on that group, so code written for them behaves exactly as it did (on
the "aiocoll" backend, those run over aiocoll). Their results are torch's
``AsyncCollectiveTensor``; ``wait_tensor`` and ``wait_async`` here accept them too.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import torch

from ._async_tensor import AsyncCollectiveTensor, lazy
from ._groups import TORCH_GROUP, UNKNOWN_SIZE, group_key
from ._work import wait_for

RANK_TYPES: TypeAlias = Any
"""Any accepted group form (see the module docstring)."""


def _ops() -> Any:
    return torch.ops.aiocoll


def _tracing() -> bool:
    """Whether a tracer (dynamo, make_fx, fake tensors) is recording rather than running."""
    if torch.compiler.is_compiling():
        return True
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        return True
    if torch._C._dispatch_tls_is_dispatch_key_included(torch._C.DispatchKey.PythonDispatcher):
        return True
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return get_proxy_mode() is not None


def _result(t: torch.Tensor) -> torch.Tensor:
    if _tracing():
        return _ops().wait_tensor(t)  # type: ignore[no-any-return]
    return lazy(t)


def _torch_ft() -> Any:
    import torch.distributed._functional_collectives as ft

    return ft


def _is_torch_act(t: Any) -> bool:
    if not torch.distributed.is_available():
        return False
    return isinstance(t, _torch_ft().AsyncCollectiveTensor)


def _sized(group: RANK_TYPES, tag: str, what: str) -> tuple[str, int]:
    """``group_key``, for an op whose output shape depends on the group size.

    Raises:
        NotInitializedError: a group name before any world exists (its size is unknown).
    """
    name, size = group_key(group, tag)
    if size == UNKNOWN_SIZE:
        from aiocoll.core.errors import NotInitializedError

        raise NotInitializedError(
            f"{what}: the output shape depends on the size of group {name!r}, which is unknown before "
            "aiocoll.init (pass a rank list to get shapes on meta and fake tensors before init)"
        )
    return name, size


def _op_name(reduce_op: Any) -> str:
    if isinstance(reduce_op, str):
        return reduce_op.lower()
    from aiocoll.arrays.ops import parse_op

    return parse_op(reduce_op).name.lower()


def _expand_group(group: RANK_TYPES, tag: str = "") -> tuple[str, list[int], int]:
    """``(tag, rankset, group_size)`` by torch's ``_expand_group`` rules (``aiocoll.expand_group``),
    for code that calls the private torch helper.

    Raises:
        ValueError / TypeError: as ``aiocoll.expand_group``.
    """
    from aiocoll import expand_group

    return expand_group(group, tag)


def wait_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Wait for the collective that produces ``tensor``; returns the filled tensor.

    Idempotent: a tensor with nothing in flight is returned as it is.

    Raises:
        CollectiveError (and others): what the collective raised.
        RuntimeError: not finished, and called on the event loop that runs it (``await`` there).
    """
    if isinstance(tensor, AsyncCollectiveTensor):
        return tensor.trigger_wait()
    if _is_torch_act(tensor):
        return tensor.wait()  # type: ignore[no-any-return, attr-defined]
    if _tracing():
        return _ops().wait_tensor(tensor)  # type: ignore[no-any-return]
    wait_for(tensor)
    return tensor


async def wait_async(tensor: torch.Tensor) -> torch.Tensor:
    """Await the collective that produces ``tensor`` without blocking the event loop.

    Raises:
        CollectiveError (and others): what the collective raised.
    """
    if isinstance(tensor, AsyncCollectiveTensor):
        return await tensor
    if _is_torch_act(tensor):
        import asyncio

        # torch's Work completes on the world's loop (the "aiocoll" backend) or on torch's threads.
        return await asyncio.to_thread(tensor.wait)  # type: ignore[attr-defined, no-any-return, unused-ignore]
    from ._work import work_of

    work = work_of(tensor)
    if work is not None:
        await work.wait_async()
    return wait_tensor(tensor)


# --------------------------------------------------------------------------- single tensors
def all_reduce(self: torch.Tensor, reduceOp: str, group: RANK_TYPES, tag: str = "") -> torch.Tensor:
    """Reduce ``self`` over the group; every member gets the result (a new tensor).

    Args:
        reduceOp: "sum", "avg", "product", "min", "max", "band", "bor", "bxor" (any case).
        group: any group form; tag: the tag for a rank list.

    Raises:
        ValueError / TypeError: unknown op, op undefined for the dtype, bad group.
        CollectiveError: on first use of the result, as the collective failed.
    """
    name, _ = group_key(group, tag)
    if name == TORCH_GROUP:
        return _torch_ft().all_reduce(self, reduceOp, group, tag)  # type: ignore[no-any-return]
    return _result(_ops().all_reduce(self, _op_name(reduceOp), name))


def all_gather_tensor(self: torch.Tensor, gather_dim: int, group: RANK_TYPES, tag: str = "") -> torch.Tensor:
    """Every member's ``self`` concatenated along ``gather_dim`` (any dim), in group-rank order.

    Raises:
        ValueError / TypeError: ``gather_dim`` out of range, bad group.
    """
    name, size = _sized(group, tag, "all_gather_tensor")
    if name == TORCH_GROUP:
        return _torch_ft().all_gather_tensor(self, gather_dim, group, tag)  # type: ignore[no-any-return]
    return _result(_ops().all_gather_into_tensor(self, gather_dim, size, name))


def reduce_scatter_tensor(
    self: torch.Tensor, reduceOp: str, scatter_dim: int, group: RANK_TYPES, tag: str = ""
) -> torch.Tensor:
    """Chunk ``group rank`` (along ``scatter_dim``, any dim) of the reduction of every member's ``self``.

    Raises:
        ValueError: ``self.shape[scatter_dim]`` not divisible by the group size; bad op or dim.
    """
    name, size = _sized(group, tag, "reduce_scatter_tensor")
    if name == TORCH_GROUP:
        return _torch_ft().reduce_scatter_tensor(self, reduceOp, scatter_dim, group, tag)  # type: ignore[no-any-return]
    return _result(_ops().reduce_scatter_tensor(self, _op_name(reduceOp), scatter_dim, size, name))


def all_to_all_single(
    self: torch.Tensor,
    output_split_sizes: list[int] | None,
    input_split_sizes: list[int] | None,
    group: RANK_TYPES,
    tag: str = "",
) -> torch.Tensor:
    """Rows (dim 0) of ``self`` split by ``input_split_sizes``, block p to member p; the result is
    the blocks received, in group-rank order, sized by ``output_split_sizes``.

    Either split list may be None: equal splits of ``self.shape[0]``, which must then divide evenly.

    Raises:
        ValueError: splits of the wrong length, negative, not adding up, or None with a dim 0
            the group size does not divide.
    """
    name, size = _sized(group, tag, "all_to_all_single")
    if name == TORCH_GROUP:
        return _torch_ft().all_to_all_single(self, output_split_sizes, input_split_sizes, group, tag)  # type: ignore[no-any-return]
    if self.dim() == 0:
        raise ValueError("all_to_all_single needs a tensor with at least one dimension")
    rows = self.shape[0]
    if output_split_sizes is None or input_split_sizes is None:
        if rows % size:
            raise ValueError(
                f"all_to_all_single: a split list is None (equal splits), but dim 0 = {rows} is not "
                f"divisible by the group size {size}"
            )
        equal = [rows // size] * size
        output_split_sizes = equal if output_split_sizes is None else output_split_sizes
        input_split_sizes = equal if input_split_sizes is None else input_split_sizes
    return _result(_ops().all_to_all_single(self, list(output_split_sizes), list(input_split_sizes), name))


def broadcast(self: torch.Tensor, src: int, group: RANK_TYPES, tag: str = "") -> torch.Tensor:
    """Member ``src``'s ``self`` (``src`` is a group rank), on every member.

    Raises:
        ValueError: ``src`` out of range, bad group.
    """
    name, _ = group_key(group, tag)
    if name == TORCH_GROUP:
        return _torch_ft().broadcast(self, src, group, tag)  # type: ignore[no-any-return]
    return _result(_ops().broadcast(self, src, name))


def permute_tensor(self: torch.Tensor, src_dst: list[int], group: RANK_TYPES, tag: str = "") -> torch.Tensor:
    """``src_dst[m] = n``: group rank m's ``self`` goes to n; returns what this member received.

    Raises:
        ValueError: ``src_dst`` is not a permutation of the group ranks.
    """
    name, _ = group_key(group, tag)
    if name == TORCH_GROUP:
        return _torch_ft().permute_tensor(self, src_dst, group, tag)  # type: ignore[no-any-return]
    return _result(_ops().permute_tensor(self, list(src_dst), name))


# --------------------------------------------------------------------------- coalesced
def all_reduce_coalesced(
    self: list[torch.Tensor], reduceOp: str, group: RANK_TYPES, tag: str = ""
) -> list[torch.Tensor]:
    """all_reduce of each tensor (any shapes and dtypes), as one operation per dtype.

    Raises:
        as all_reduce, for any of the tensors.
    """
    name, _ = group_key(group, tag)
    if name == TORCH_GROUP:
        return _torch_ft().all_reduce_coalesced(self, reduceOp, group, tag)  # type: ignore[no-any-return]
    return [_result(t) for t in _ops().all_reduce_coalesced(list(self), _op_name(reduceOp), name)]


def all_gather_into_tensor_coalesced(self: list[torch.Tensor], group: RANK_TYPES, tag: str = "") -> list[torch.Tensor]:
    """all_gather (along dim 0) of each tensor, as one message.

    Raises:
        as all_gather_tensor, for any of the tensors.
    """
    name, size = _sized(group, tag, "all_gather_into_tensor_coalesced")
    if name == TORCH_GROUP:
        return _torch_ft().all_gather_into_tensor_coalesced(self, group, tag)  # type: ignore[no-any-return]
    return [_result(t) for t in _ops().all_gather_into_tensor_coalesced(list(self), [0] * len(self), size, name)]


def reduce_scatter_tensor_coalesced(
    inputs: list[torch.Tensor], reduceOp: str, scatter_dim: list[int], group: RANK_TYPES, tag: str = ""
) -> list[torch.Tensor]:
    """reduce_scatter of each tensor along its own dim (``scatter_dim[i]``), one operation per dtype.

    Raises:
        ValueError: ``scatter_dim`` of another length; as reduce_scatter_tensor for each tensor.
    """
    name, size = _sized(group, tag, "reduce_scatter_tensor_coalesced")
    if name == TORCH_GROUP:
        return _torch_ft().reduce_scatter_tensor_coalesced(inputs, reduceOp, scatter_dim, group, tag)  # type: ignore[no-any-return]
    out = _ops().reduce_scatter_tensor_coalesced(list(inputs), _op_name(reduceOp), list(scatter_dim), size, name)
    return [_result(t) for t in out]


# --------------------------------------------------------------------------- the *_autograd names
# Every op here is differentiable; torch keeps these names for code written against older funcol.
def all_gather_tensor_autograd(self: torch.Tensor, gather_dim: int, group: RANK_TYPES, tag: str = "") -> torch.Tensor:
    """Same as :func:`all_gather_tensor` (which is differentiable)."""
    if group_key(group, tag)[0] == TORCH_GROUP:  # torch's differentiable twin
        return _torch_ft().all_gather_tensor_autograd(self, gather_dim, group, tag)  # type: ignore[no-any-return]
    return all_gather_tensor(self, gather_dim, group, tag)


def reduce_scatter_tensor_autograd(
    self: torch.Tensor, reduceOp: str, scatter_dim: int, group: RANK_TYPES, tag: str = ""
) -> torch.Tensor:
    """Same as :func:`reduce_scatter_tensor` (differentiable for "sum")."""
    if group_key(group, tag)[0] == TORCH_GROUP:  # torch's differentiable twin
        return _torch_ft().reduce_scatter_tensor_autograd(self, reduceOp, scatter_dim, group, tag)  # type: ignore[no-any-return]
    return reduce_scatter_tensor(self, reduceOp, scatter_dim, group, tag)


def all_to_all_single_autograd(
    self: torch.Tensor,
    output_split_sizes: list[int] | None,
    input_split_sizes: list[int] | None,
    group: RANK_TYPES,
    tag: str = "",
) -> torch.Tensor:
    """Same as :func:`all_to_all_single` (which is differentiable)."""
    if group_key(group, tag)[0] == TORCH_GROUP:  # torch's differentiable twin
        return _torch_ft().all_to_all_single_autograd(self, output_split_sizes, input_split_sizes, group, tag)  # type: ignore[no-any-return]
    return all_to_all_single(self, output_split_sizes, input_split_sizes, group, tag)


def all_reduce_autograd(self: torch.Tensor, reduceOp: str, group: RANK_TYPES, tag: str = "") -> torch.Tensor:
    """Same as :func:`all_reduce` (differentiable for "sum")."""
    if group_key(group, tag)[0] == TORCH_GROUP:  # torch's differentiable twin
        return _torch_ft().all_reduce_autograd(self, reduceOp, group, tag)  # type: ignore[no-any-return]
    return all_reduce(self, reduceOp, group, tag)


# torch's newer spellings of the same functions.
all_gather_single = all_gather_tensor
all_gather_single_autograd = all_gather_tensor_autograd
reduce_scatter_single = reduce_scatter_tensor
reduce_scatter_single_autograd = reduce_scatter_tensor_autograd
all_gather_single_coalesced = all_gather_into_tensor_coalesced


def reduce_scatter_single_coalesced(
    inputs: list[torch.Tensor], reduceOp: str, scatter_dim: list[int], group: RANK_TYPES, tag: str = ""
) -> list[torch.Tensor]:
    """Same as :func:`reduce_scatter_tensor_coalesced`."""
    return reduce_scatter_tensor_coalesced(inputs, reduceOp, scatter_dim, group, tag)
