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

from typing import Any

import torch


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


# --------------------------------------------------------------------------- single tensors
def all_reduce_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    _, ctx.reduce_op, ctx.group_name = inputs
    ctx.reduce_op = ctx.reduce_op.lower()


def all_reduce_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    _only_sum(ctx.reduce_op, "all_reduce")
    return _wait(_ops().all_reduce(_c(grad), "sum", ctx.group_name)), None, None


def all_gather_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, ctx.dim, ctx.group_size, ctx.group_name = inputs
    ctx.shape = tuple(x.shape)


def all_gather_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    back = _wait(_ops().reduce_scatter_tensor(_c(grad), "sum", ctx.dim, ctx.group_size, ctx.group_name))
    return back.reshape(ctx.shape), None, None, None  # a 0-d input was gathered as one element


def reduce_scatter_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    _, op, ctx.dim, ctx.group_size, ctx.group_name = inputs
    ctx.reduce_op = op.lower()


def reduce_scatter_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    _only_sum(ctx.reduce_op, "reduce_scatter_tensor")
    return _wait(_ops().all_gather_into_tensor(_c(grad), ctx.dim, ctx.group_size, ctx.group_name)), None, None, None, None


def all_to_all_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    _, ctx.output_split_sizes, ctx.input_split_sizes, ctx.group_name = inputs


def all_to_all_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    back = _ops().all_to_all_single(_c(grad), ctx.input_split_sizes, ctx.output_split_sizes, ctx.group_name)
    return _wait(back), None, None, None


def broadcast_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    from ._groups import group_named

    _, ctx.src, ctx.group_name = inputs
    ctx.is_src = group_named(ctx.group_name).rank == ctx.src


def broadcast_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    total = _wait(_ops().all_reduce(_c(grad), "sum", ctx.group_name))
    return (total if ctx.is_src else torch.zeros_like(total)), None, None


def permute_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    _, src_dst, ctx.group_name = inputs
    inverse = [0] * len(src_dst)
    for m, n in enumerate(src_dst):
        inverse[n] = m
    ctx.inverse = inverse


def permute_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    return _wait(_ops().permute_tensor(_c(grad), ctx.inverse, ctx.group_name)), None, None


def wait_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    return None


def wait_backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    return grad


# --------------------------------------------------------------------------- coalesced
def all_reduce_coalesced_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    _, op, ctx.group_name = inputs
    ctx.reduce_op = op.lower()


def all_reduce_coalesced_backward(ctx: Any, grads: list[torch.Tensor]) -> tuple[Any, ...]:
    _only_sum(ctx.reduce_op, "all_reduce_coalesced")
    back = _ops().all_reduce_coalesced([_c(g) for g in grads], "sum", ctx.group_name)
    return [_wait(t) for t in back], None, None


def all_gather_coalesced_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    xs, ctx.dims, ctx.group_size, ctx.group_name = inputs
    ctx.shapes = [tuple(x.shape) for x in xs]


def all_gather_coalesced_backward(ctx: Any, grads: list[torch.Tensor]) -> tuple[Any, ...]:
    back = _ops().reduce_scatter_tensor_coalesced(
        [_c(g) for g in grads], "sum", ctx.dims, ctx.group_size, ctx.group_name
    )
    return [_wait(t).reshape(s) for t, s in zip(back, ctx.shapes)], None, None, None


def reduce_scatter_coalesced_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    _, op, ctx.dims, ctx.group_size, ctx.group_name = inputs
    ctx.reduce_op = op.lower()


def reduce_scatter_coalesced_backward(ctx: Any, grads: list[torch.Tensor]) -> tuple[Any, ...]:
    _only_sum(ctx.reduce_op, "reduce_scatter_tensor_coalesced")
    back = _ops().all_gather_into_tensor_coalesced([_c(g) for g in grads], ctx.dims, ctx.group_size, ctx.group_name)
    return [_wait(t) for t in back], None, None, None, None
