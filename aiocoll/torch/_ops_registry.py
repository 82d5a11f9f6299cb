"""``torch.ops.aiocoll.*``: each op defined once with its eager kernel, its fake (meta) kernel and
its autograd formula, so eager code, ``make_fx`` and ``torch.compile`` see the same op.

Every collective returns fresh tensors at once; ``aiocoll::wait_tensor`` waits for the collective
that fills its argument. Both are marked side-effectful: a graph keeps every collective (all
members must issue it, used or not) and every wait, even when their results look unused.

Ops (the group is a string: see ``_groups``; sizes are explicit where shapes depend on them)::

    all_reduce(Tensor input, str reduce_op, str group_name) -> Tensor
    all_gather_into_tensor(Tensor input, int gather_dim, int group_size, str group_name) -> Tensor
    reduce_scatter_tensor(Tensor input, str reduce_op, int scatter_dim, int group_size, str group_name) -> Tensor
    all_to_all_single(Tensor input, SymInt[] output_split_sizes, SymInt[] input_split_sizes, str group_name) -> Tensor
    broadcast(Tensor input, int src, str group_name) -> Tensor
    permute_tensor(Tensor input, int[] src_dst, str group_name) -> Tensor
    all_reduce_coalesced(Tensor[] inputs, str reduce_op, str group_name) -> Tensor[]
    all_gather_into_tensor_coalesced(Tensor[] inputs, int[] gather_dims, int group_size, str group_name) -> Tensor[]
    reduce_scatter_tensor_coalesced(Tensor[] inputs, str reduce_op, int[] scatter_dims, int group_size, str group_name) -> Tensor[]
    wait_tensor(Tensor tensor) -> Tensor
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx.node

from . import _autograd as ag
from . import _kernels as k

NAMESPACE = "aiocoll"

# Kept alive for the life of the process: the definitions go when the Library object does.
_lib = torch.library.Library(NAMESPACE, "DEF")  # type: ignore[no-untyped-call]


def _norm(dim: int, ndim: int) -> int:
    nd = max(ndim, 1)
    return dim % nd if -nd <= dim < nd else dim


# --------------------------------------------------------------------------- fake kernels (shapes)
def _fake_same(input: torch.Tensor, *args: Any) -> torch.Tensor:
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _fake_all_gather(input: torch.Tensor, gather_dim: int, group_size: int, group_name: str) -> torch.Tensor:
    return input.new_empty(k.gathered_shape(input.shape, _norm(gather_dim, input.dim()), group_size))


def _fake_reduce_scatter(
    input: torch.Tensor, reduce_op: str, scatter_dim: int, group_size: int, group_name: str
) -> torch.Tensor:
    return input.new_empty(k.scattered_shape(input.shape, _norm(scatter_dim, input.dim()), group_size))


def _fake_all_to_all(
    input: torch.Tensor, output_split_sizes: Sequence[Any], input_split_sizes: Sequence[Any], group_name: str
) -> torch.Tensor:
    for s in output_split_sizes:
        torch._check(s >= 0)  # type: ignore[no-untyped-call]
    return input.new_empty(k.a2a_shape(input.shape, output_split_sizes))


def _fake_all_reduce_coalesced(inputs: list[torch.Tensor], reduce_op: str, group_name: str) -> list[torch.Tensor]:
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in inputs]


def _fake_all_gather_coalesced(
    inputs: list[torch.Tensor], gather_dims: Sequence[int], group_size: int, group_name: str
) -> list[torch.Tensor]:
    return [_fake_all_gather(t, d, group_size, group_name) for t, d in zip(inputs, gather_dims)]


def _fake_reduce_scatter_coalesced(
    inputs: list[torch.Tensor], reduce_op: str, scatter_dims: Sequence[int], group_size: int, group_name: str
) -> list[torch.Tensor]:
    return [_fake_reduce_scatter(t, reduce_op, d, group_size, group_name) for t, d in zip(inputs, scatter_dims)]


# --------------------------------------------------------------------------- the table
_OPS: list[tuple[str, str, Callable[..., Any], Callable[..., Any], Callable[..., Any] | None, Callable[..., Any] | None]] = [
    # name, schema arguments -> returns, eager kernel, fake kernel, backward, setup_context
    ("all_reduce", "(Tensor input, str reduce_op, str group_name) -> Tensor",
     k.all_reduce, _fake_same, ag.all_reduce_backward, ag.all_reduce_setup),
    ("all_gather_into_tensor", "(Tensor input, int gather_dim, int group_size, str group_name) -> Tensor",
     k.all_gather, _fake_all_gather, ag.all_gather_backward, ag.all_gather_setup),
    ("reduce_scatter_tensor",
     "(Tensor input, str reduce_op, int scatter_dim, int group_size, str group_name) -> Tensor",
     k.reduce_scatter, _fake_reduce_scatter, ag.reduce_scatter_backward, ag.reduce_scatter_setup),
    ("all_to_all_single",
     "(Tensor input, SymInt[] output_split_sizes, SymInt[] input_split_sizes, str group_name) -> Tensor",
     k.all_to_all, _fake_all_to_all, ag.all_to_all_backward, ag.all_to_all_setup),
    ("broadcast", "(Tensor input, int src, str group_name) -> Tensor",
     k.broadcast, _fake_same, ag.broadcast_backward, ag.broadcast_setup),
    ("permute_tensor", "(Tensor input, int[] src_dst, str group_name) -> Tensor",
     k.permute, _fake_same, ag.permute_backward, ag.permute_setup),
    ("all_reduce_coalesced", "(Tensor[] inputs, str reduce_op, str group_name) -> Tensor[]",
     k.all_reduce_coalesced, _fake_all_reduce_coalesced, ag.all_reduce_coalesced_backward,
     ag.all_reduce_coalesced_setup),
    ("all_gather_into_tensor_coalesced",
     "(Tensor[] inputs, int[] gather_dims, int group_size, str group_name) -> Tensor[]",
     k.all_gather_coalesced, _fake_all_gather_coalesced, ag.all_gather_coalesced_backward,
     ag.all_gather_coalesced_setup),
    ("reduce_scatter_tensor_coalesced",
     "(Tensor[] inputs, str reduce_op, int[] scatter_dims, int group_size, str group_name) -> Tensor[]",
     k.reduce_scatter_coalesced, _fake_reduce_scatter_coalesced, ag.reduce_scatter_coalesced_backward,
     ag.reduce_scatter_coalesced_setup),
    ("wait_tensor", "(Tensor tensor) -> Tensor", k.wait_tensor, _fake_same, ag.wait_backward, ag.wait_setup),
]


def _register() -> None:
    for name, schema, kernel, fake, backward, setup in _OPS:
        _lib.define(name + schema, tags=(torch.Tag.pt2_compliant_tag,))  # type: ignore[no-untyped-call]
        # One eager kernel for every device: it stages through host memory where needed.
        _lib.impl(name, kernel, "CompositeExplicitAutograd")  # type: ignore[no-untyped-call]
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_lib)
        if backward is not None:
            torch.library.register_autograd(f"{NAMESPACE}::{name}", backward, setup_context=setup, lib=_lib)
        op = getattr(getattr(torch.ops, NAMESPACE), name).default
        torch.fx.node.has_side_effect(op)


_register()
