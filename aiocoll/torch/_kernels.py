"""The eager kernels of the ``aiocoll::*`` ops: check, allocate the outputs, start the collective.

Each kernel returns its outputs at once; they are filled in the background (``_work``), and
``wait_tensor`` on an output waits for its collective. Arguments are checked here, on the
calling rank, so bad input raises at the call and nothing is sent.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aiocoll.collectives import tensors as core
from aiocoll.groups.group import ProcessGroup
from aiocoll.arrays.ops import check_op_dtype, parse_op
from aiocoll.arrays.tensors import check_tensor, code_of

from ._groups import group_named
from ._work import launch, wait_for


# --------------------------------------------------------------------------- checks and shapes
def check_reduce(t: torch.Tensor, reduce_op: str, what: str = "input") -> None:
    """Raise ValueError/TypeError if ``reduce_op`` is unknown or undefined for ``t``'s dtype."""
    check_tensor(t, what)
    check_op_dtype(parse_op(reduce_op), code_of(t))


def norm_dim(dim: int, ndim: int, what: str) -> int:
    """``dim`` in [0, ndim) (0-d tensors: 0).

    Raises:
        TypeError: not an int. ValueError: out of range.
    """
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{what} must be an int, got {type(dim).__name__}")
    nd = max(ndim, 1)
    if not -nd <= dim < nd:
        raise ValueError(f"{what}={dim} is out of range for a tensor of {ndim} dimensions")
    return dim % nd


def gathered_shape(shape: Sequence[int], dim: int, size: int) -> list[int]:
    if not shape:
        return [size]
    out = list(shape)
    out[dim] = out[dim] * size
    return out


def scattered_shape(shape: Sequence[int], dim: int, size: int, what: str = "input") -> list[int]:
    """The shape of one chunk of ``shape`` along ``dim``.

    Raises:
        ValueError: 0-d, or ``shape[dim]`` not divisible by ``size``.
    """
    if not shape:
        raise ValueError(f"reduce_scatter: {what} is 0-d; it needs a dimension to scatter along")
    if shape[dim] % size:
        raise ValueError(
            f"reduce_scatter: {what}.shape[{dim}] = {shape[dim]} is not divisible by the group size {size}"
        )
    out = list(shape)
    out[dim] = out[dim] // size
    return out


def a2a_shape(shape: Sequence[int], output_split_sizes: Sequence[int]) -> list[int]:
    return [sum(output_split_sizes), *shape[1:]]


def _group(name: str, size: int | None = None) -> ProcessGroup:
    g = group_named(name)
    if size is not None and g.size != size:
        raise ValueError(f"group_size {size} does not match {g.name}, which has {g.size} members")
    return g


def _empty(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    return torch.empty(list(shape), dtype=like.dtype, device=like.device)


# --------------------------------------------------------------------------- single tensors
def all_reduce(input: torch.Tensor, reduce_op: str, group_name: str) -> torch.Tensor:
    check_reduce(input, reduce_op)
    g = _group(group_name)
    out = _empty(input.shape, input)
    in_place = out.device.type == "cpu"

    async def body(host: list[torch.Tensor]) -> list[torch.Tensor | None]:
        if in_place:
            await core.all_reduce(host[0], reduce_op, g, out=out)
            return [None]
        return [await core.all_reduce(host[0], reduce_op, g)]

    launch([input], [out], body)
    return out


def all_gather(input: torch.Tensor, gather_dim: int, group_size: int, group_name: str) -> torch.Tensor:
    check_tensor(input, "input")
    d = norm_dim(gather_dim, input.dim(), "gather_dim")
    g = _group(group_name, group_size)
    out = _empty(gathered_shape(input.shape, d, g.size), input)

    async def body(host: list[torch.Tensor]) -> list[torch.Tensor | None]:
        return [await core.all_gather(host[0], g, dim=d)]

    launch([input], [out], body)
    return out


def reduce_scatter(
    input: torch.Tensor, reduce_op: str, scatter_dim: int, group_size: int, group_name: str
) -> torch.Tensor:
    check_reduce(input, reduce_op)
    d = norm_dim(scatter_dim, input.dim(), "scatter_dim")
    g = _group(group_name, group_size)
    out = _empty(scattered_shape(input.shape, d, g.size), input)

    async def body(host: list[torch.Tensor]) -> list[torch.Tensor | None]:
        return [await core.reduce_scatter(host[0], reduce_op, g, dim=d)]

    launch([input], [out], body)
    return out


def all_to_all(
    input: torch.Tensor, output_split_sizes: Sequence[int], input_split_sizes: Sequence[int], group_name: str
) -> torch.Tensor:
    check_tensor(input, "input")
    if input.dim() == 0:
        raise ValueError("all_to_all_single needs a tensor with at least one dimension")
    g = _group(group_name)
    outs_s, ins_s = [int(s) for s in output_split_sizes], [int(s) for s in input_split_sizes]
    for what, s in (("output", outs_s), ("input", ins_s)):
        if len(s) != g.size:
            raise ValueError(f"all_to_all_single: {what}_split_sizes has {len(s)} entries, {g.name} has {g.size} members")
        if any(v < 0 for v in s):
            raise ValueError(f"all_to_all_single: {what}_split_sizes has a negative entry: {s}")
    if sum(ins_s) != input.shape[0]:
        raise ValueError(f"all_to_all_single: input_split_sizes {ins_s} add up to {sum(ins_s)}, not input.shape[0] = {input.shape[0]}")
    out = _empty(a2a_shape(input.shape, outs_s), input)

    async def body(host: list[torch.Tensor]) -> list[torch.Tensor | None]:
        return [await core.all_to_all(host[0], g, output_split_sizes=outs_s, input_split_sizes=ins_s)]

    launch([input], [out], body)
    return out


def broadcast(input: torch.Tensor, src: int, group_name: str) -> torch.Tensor:
    check_tensor(input, "input")
    g = _group(group_name)
    if not 0 <= src < g.size:
        raise ValueError(f"broadcast: src={src} is out of range for {g.name} of size {g.size}")
    out = _empty(input.shape, input)

    async def body(host: list[torch.Tensor]) -> list[torch.Tensor | None]:
        return [await core.broadcast(host[0], src, g)]

    launch([input], [out], body)
    return out


def permute(input: torch.Tensor, src_dst: Sequence[int], group_name: str) -> torch.Tensor:
    check_tensor(input, "input")
    g = _group(group_name)
    perm = [int(v) for v in src_dst]
    if sorted(perm) != list(range(g.size)):
        raise ValueError(f"permute_tensor: src_dst must be a permutation of range({g.size}), got {perm}")
    out = _empty(input.shape, input)

    async def body(host: list[torch.Tensor]) -> list[torch.Tensor | None]:
        return [await core.permute(host[0], perm, g)]

    launch([input], [out], body)
    return out


# --------------------------------------------------------------------------- coalesced
def _by_dtype(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return list(groups.values())


def all_reduce_coalesced(inputs: list[torch.Tensor], reduce_op: str, group_name: str) -> list[torch.Tensor]:
    for i, t in enumerate(inputs):
        check_reduce(t, reduce_op, f"inputs[{i}]")
    g = _group(group_name)
    outs = [_empty(t.shape, t) for t in inputs]
    if not inputs:
        return outs

    async def body(host: list[torch.Tensor]) -> list[torch.Tensor | None]:
        # One all_reduce per dtype, all claimed before the first await (see _work.launch).
        return list(await core.all_reduce_coalesced(host, reduce_op, g))

    launch(inputs, outs, body)
    return outs


def all_gather_coalesced(
    inputs: list[torch.Tensor], gather_dims: Sequence[int], group_size: int, group_name: str
) -> list[torch.Tensor]:
    if len(gather_dims) != len(inputs):
        raise ValueError(f"all_gather coalesced: {len(inputs)} tensors but {len(gather_dims)} gather dims")
    dims = []
    for i, (t, d) in enumerate(zip(inputs, gather_dims)):
        check_tensor(t, f"inputs[{i}]")
        dims.append(norm_dim(d, t.dim(), f"gather_dims[{i}]"))
    g = _group(group_name, group_size)
    outs = [_empty(gathered_shape(t.shape, d, g.size), t) for t, d in zip(inputs, dims)]
    if not inputs:
        return outs

    async def body(host: list[torch.Tensor]) -> list[torch.Tensor | None]:
        # One message for all of them (any dtypes): each gathered along dim 0 after moving its
        # dim to the front, then moved back.
        fronts = [h.reshape(1) if h.dim() == 0 else h.movedim(d, 0) for h, d in zip(host, dims)]
        got = await core.all_gather_coalesced(fronts, g)
        return [r if h.dim() == 0 else r.movedim(0, d) for r, h, d in zip(got, host, dims)]

    launch(inputs, outs, body)
    return outs


def reduce_scatter_coalesced(
    inputs: list[torch.Tensor], reduce_op: str, scatter_dims: Sequence[int], group_size: int, group_name: str
) -> list[torch.Tensor]:
    if len(scatter_dims) != len(inputs):
        raise ValueError(f"reduce_scatter_tensor_coalesced: {len(inputs)} tensors but {len(scatter_dims)} scatter dims")
    g = _group(group_name, group_size)
    dims, shapes = [], []
    for i, (t, d) in enumerate(zip(inputs, scatter_dims)):
        check_reduce(t, reduce_op, f"inputs[{i}]")
        dd = norm_dim(d, t.dim(), f"scatter_dims[{i}]")
        shapes.append(scattered_shape(t.shape, dd, g.size, f"inputs[{i}]"))
        dims.append(dd)
    outs = [_empty(s, t) for s, t in zip(shapes, inputs)]
    if not inputs:
        return outs
    parts = _by_dtype(inputs)
    w = g.size

    async def body(host: list[torch.Tensor]) -> list[torch.Tensor | None]:
        # Per dtype, one reduce_scatter of a (W, n) matrix whose row r holds chunk r of every
        # tensor (each with its scatter dim moved to the front).
        def rows(i: int) -> torch.Tensor:
            return host[i].movedim(dims[i], 0).reshape(w, -1)

        # Every reduce_scatter claimed before the first await (see _work.launch).
        packed = await core.together(
            [core.start("reduce_scatter", torch.cat([rows(i) for i in idx], dim=1), reduce_op, g, dim=0) for idx in parts]
        )
        results: list[torch.Tensor | None] = [None] * len(host)
        for idx, row in zip(parts, packed):
            widths = [host[i].numel() // w for i in idx]
            for i, piece in zip(idx, torch.split(row.reshape(-1), widths)):
                moved = list(host[i].movedim(dims[i], 0).shape)
                moved[0] //= w
                results[i] = piece.reshape(moved).movedim(0, dims[i])
        return results

    launch(inputs, outs, body)
    return outs


# --------------------------------------------------------------------------- waiting
def wait_tensor(tensor: torch.Tensor) -> torch.Tensor:
    # The op runs in traced and compiled code; eager code waits without it (no copy). Custom ops
    # may not return their input, so the waited tensor is returned as a copy.
    wait_for(tensor)
    return tensor.clone()
