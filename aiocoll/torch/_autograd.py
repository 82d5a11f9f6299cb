"""The backward of every ``aiocoll::*`` op, as collectives on the gradients.

- all_reduce(sum)            -> all_reduce(sum) of the gradient
- all_gather along d         -> reduce_scatter(sum) along d
- reduce_scatter(sum) along d -> all_gather along d
- all_to_all_single          -> all_to_all_single with the splits swapped
- broadcast from src         -> the sum of every member's gradient on src, zeros elsewhere
- permute by src_dst         -> permute by the inverse permutation
- the coalesced ops          -> the same rules, coalesced

Only sums are differentiable here: any other reduceOp (avg, product, min, max, bitwise) raises
RuntimeError when backward reaches it (not in forward, so a forward-only use stays fine). Every
member must run the backward, as it ran the forward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from ._groups import using_world, world_or_none


def _ops() -> Any:
    return torch.ops.aiocoll


def _wait(t: torch.Tensor) -> torch.Tensor:
    from ._funcol import wait_tensor

    return wait_tensor(t)


def _only_sum(op: str, name: str) -> None:
    if op != "sum":
        raise RuntimeError(
            f"aiocoll.torch.{name}: backward is defined for reduceOp 'sum' only, got {op!r} "
            "(avg, product, min, max and the bitwise ops have no gradient here); reduce with 'sum' "
            "and scale, or detach the input"
        )


def _c(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous()


def _remember(setup: Callable[[Any, tuple[Any, ...], Any], None]) -> Callable[[Any, tuple[Any, ...], Any], None]:
    """Record the forward's world with the saved context (see ``_groups.using_world``)."""

    @functools.wraps(setup)
    def wrapped(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.world = world_or_none()
        setup(ctx, inputs, output)

    return wrapped


def _in_world(backward: Callable[..., tuple[Any, ...]]) -> Callable[..., tuple[Any, ...]]:
    """Run a backward in the forward's world, whichever thread autograd runs it on."""

    @functools.wraps(backward)
    def wrapped(ctx: Any, *grads: Any) -> tuple[Any, ...]:
        with using_world(getattr(ctx, "world", None)):
            return backward(ctx, *grads)

    return wrapped


# --------------------------------------------------------------------------- single tensors
@_remember
def all_reduce_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    _, ctx.reduce_op, ctx.group_name = inputs
    ctx.reduce_op = ctx.reduce_op.lower()


@_in_world
def all_reduce_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    _only_sum(ctx.reduce_op, "all_reduce")
    return _wait(_ops().all_reduce(_c(grad), "sum", ctx.group_name)), None, None


@_remember
def all_gather_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, ctx.dim, ctx.group_size, ctx.group_name = inputs
    ctx.shape = tuple(x.shape)


@_in_world
def all_gather_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    back = _wait(_ops().reduce_scatter_tensor(_c(grad), "sum", ctx.dim, ctx.group_size, ctx.group_name))
    return back.reshape(ctx.shape), None, None, None  # a 0-d input was gathered as one element


@_remember
def reduce_scatter_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    _, op, ctx.dim, ctx.group_size, ctx.group_name = inputs
    ctx.reduce_op = op.lower()


@_in_world
def reduce_scatter_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    _only_sum(ctx.reduce_op, "reduce_scatter_tensor")
    return _wait(_ops().all_gather_into_tensor(_c(grad), ctx.dim, ctx.group_size, ctx.group_name)), None, None, None, None


@_remember
def all_to_all_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    _, ctx.output_split_sizes, ctx.input_split_sizes, ctx.group_name = inputs


@_in_world
def all_to_all_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    back = _ops().all_to_all_single(_c(grad), ctx.input_split_sizes, ctx.output_split_sizes, ctx.group_name)
    return _wait(back), None, None, None


@_remember
def broadcast_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    from ._groups import group_named

    _, ctx.src, ctx.group_name = inputs
    ctx.is_src = group_named(ctx.group_name).rank == ctx.src


@_in_world
def broadcast_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    total = _wait(_ops().all_reduce(_c(grad), "sum", ctx.group_name))
    return (total if ctx.is_src else torch.zeros_like(total)), None, None


@_remember
def permute_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    _, src_dst, ctx.group_name = inputs
    inverse = [0] * len(src_dst)
    for m, n in enumerate(src_dst):
        inverse[n] = m
    ctx.inverse = inverse


@_in_world
def permute_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    return _wait(_ops().permute_tensor(_c(grad), ctx.inverse, ctx.group_name)), None, None


def wait_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    return None


def wait_backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    return grad


# --------------------------------------------------------------------------- coalesced
@_remember
def all_reduce_coalesced_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    _, op, ctx.group_name = inputs
    ctx.reduce_op = op.lower()


@_in_world
def all_reduce_coalesced_backward(ctx: Any, grads: list[torch.Tensor]) -> tuple[Any, ...]:
    _only_sum(ctx.reduce_op, "all_reduce_coalesced")
    back = _ops().all_reduce_coalesced([_c(g) for g in grads], "sum", ctx.group_name)
    return [_wait(t) for t in back], None, None


@_remember
def all_gather_coalesced_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    xs, ctx.dims, ctx.group_size, ctx.group_name = inputs
    ctx.shapes = [tuple(x.shape) for x in xs]


@_in_world
def all_gather_coalesced_backward(ctx: Any, grads: list[torch.Tensor]) -> tuple[Any, ...]:
    back = _ops().reduce_scatter_tensor_coalesced(
        [_c(g) for g in grads], "sum", ctx.dims, ctx.group_size, ctx.group_name
    )
    return [_wait(t).reshape(s) for t, s in zip(back, ctx.shapes)], None, None, None


@_remember
def reduce_scatter_coalesced_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    _, op, ctx.dims, ctx.group_size, ctx.group_name = inputs
    ctx.reduce_op = op.lower()


@_in_world
def reduce_scatter_coalesced_backward(ctx: Any, grads: list[torch.Tensor]) -> tuple[Any, ...]:
    _only_sum(ctx.reduce_op, "reduce_scatter_tensor_coalesced")
    back = _ops().all_gather_into_tensor_coalesced([_c(g) for g in grads], ctx.dims, ctx.group_size, ctx.group_name)
    return [_wait(t) for t in back], None, None, None, None
