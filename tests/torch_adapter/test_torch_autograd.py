"""Gradients through aiocoll.torch, in float64, at 2 and 4 ranks.

Every rank computes loss_r = sum(weights_r * output_r) and runs backward; the gradient each rank
gets for its input must be d(sum over r of loss_r)/d(its input). The reference computes that in
one process with plain torch ops, and it is checked twice: against autograd on the reference,
and against central finite differences of the distributed forward itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="torch is an optional extra; the [test] set-up (.ci/run) installs the CPU build")

import aiocoll.sync  # noqa: E402
import aiocoll.torch as ft  # noqa: E402

from _torch_reference import blocking_ranks  # noqa: E402

WS = [2, 4]
EPS = 1e-6

Dist = Callable[[list[torch.Tensor], int, int], list[torch.Tensor]]
Ref = Callable[[list[list[torch.Tensor]], int], list[list[torch.Tensor]]]


def _inputs(rank: int, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(s, dtype=torch.float64, generator=g) for s in shapes]


def _weights(rank: int, outs: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(200 + rank)
    return [torch.randn(o.shape, dtype=torch.float64, generator=g) for o in outs]


def _loss(outs: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
    return sum(((o * w).sum() for o, w in zip(outs, weights)), torch.zeros((), dtype=torch.float64))


def prepare(world_size: int, shapes: Callable[[int], list[tuple[int, ...]]], dist: Dist, ref: Ref,
            numeric: bool) -> tuple[Callable[[int], Any], list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """The reference outputs and gradients (one process), and the function each rank runs."""
    w = world_size
    xs = [_inputs(r, shapes(r)) for r in range(w)]
    leaves = [[x.clone().requires_grad_() for x in row] for row in xs]
    ref_outs = ref(leaves, w)
    total = sum((_loss(ref_outs[r], _weights(r, ref_outs[r])) for r in range(w)), torch.zeros((), dtype=torch.float64))
    total.backward()
    ref_grads = [[x.grad if x.grad is not None else torch.zeros_like(x) for x in row] for row in leaves]

    def total_loss(inputs: list[torch.Tensor], rank: int) -> float:
        """sum over ranks of loss_r, through the distributed forward."""
        outs = [ft.wait_tensor(o) for o in dist(inputs, rank, w)]
        loss = _loss(outs, _weights(rank, outs))
        return float(aiocoll.sync.all_reduce(loss.reshape(1))[0])

    def rank_fn(rank: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[float]]]:
        mine = [x.clone().requires_grad_() for x in xs[rank]]
        outs = dist(mine, rank, w)
        _loss(outs, _weights(rank, outs)).backward()
        grads = [x.grad.clone() for x in mine]
        values = [ft.wait_tensor(o).detach().clone() for o in outs]
        fd: list[list[float]] = [[] for _ in xs[rank]]
        if numeric:
            # Central differences: every rank runs every perturbed forward (they are collectives);
            # only the owner of the element perturbs it.
            with torch.no_grad():
                for owner in range(w):
                    for j, x in enumerate(xs[owner]):
                        for i in range(x.numel()):
                            f = []
                            for sign in (1.0, -1.0):
                                pert = [t.clone() for t in xs[rank]]
                                if owner == rank:
                                    pert[j].view(-1)[i] += sign * EPS
                                f.append(total_loss(pert, rank))
                            if owner == rank:
                                fd[j].append((f[0] - f[1]) / (2 * EPS))
        return grads, values, fd

    return rank_fn, ref_outs, ref_grads


async def run_check(world_size: int, shapes: Callable[[int], list[tuple[int, ...]]], dist: Dist, ref: Ref,
                    numeric: bool = True) -> None:
    rank_fn, ref_outs, ref_grads = prepare(world_size, shapes, dist, ref, numeric)
    results = await blocking_ranks(rank_fn, world_size)
    for r, (grads, values, fd) in enumerate(results):
        for got, want in zip(values, ref_outs[r]):
            torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
        for j, (got, want) in enumerate(zip(grads, ref_grads[r])):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            if numeric:
                num = torch.tensor(fd[j], dtype=torch.float64).reshape(got.shape)
                torch.testing.assert_close(got, num, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- the references
def _split(t: torch.Tensor, w: int, dim: int) -> list[torch.Tensor]:
    return list(torch.chunk(t, w, dim=dim))


def _sum(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(ts).sum(0)


@pytest.mark.parametrize("world_size", WS)
@pytest.mark.parametrize("variant", ["all_reduce", "all_reduce_autograd"])
async def test_all_reduce_sum_backward_is_all_reduce_sum(world_size, variant):
    fn = getattr(ft, variant)
    await run_check(
        world_size,
        lambda r: [(2, 3)],
        lambda x, r, w: [fn(x[0], "sum", None)],
        lambda xs, w: [[_sum([row[0] for row in xs])] for _ in range(w)],
    )


@pytest.mark.parametrize("world_size", WS)
@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("variant", ["all_gather_tensor", "all_gather_tensor_autograd", "all_gather_single"])
async def test_all_gather_backward_is_reduce_scatter(world_size, dim, variant):
    fn = getattr(ft, variant)
    await run_check(
        world_size,
        lambda r: [(2, 3)],
        lambda x, r, w: [fn(x[0], dim, None)],
        lambda xs, w: [[torch.cat([row[0] for row in xs], dim=dim)] for _ in range(w)],
        numeric=dim == 0,
    )


@pytest.mark.parametrize("world_size", WS)
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("variant", ["reduce_scatter_tensor", "reduce_scatter_tensor_autograd"])
async def test_reduce_scatter_backward_is_all_gather(world_size, dim, variant):
    fn = getattr(ft, variant)
    await run_check(
        world_size,
        lambda r: [(world_size, 2 * world_size) if dim else (2 * world_size, 2)],
        lambda x, r, w: [fn(x[0], "sum", dim, None)],
        lambda xs, w: [[_split(_sum([row[0] for row in xs]), w, dim)[r]] for r in range(w)],
        numeric=dim == 0,
    )


@pytest.mark.parametrize("world_size", WS)
@pytest.mark.parametrize("variant", ["all_to_all_single", "all_to_all_single_autograd"])
async def test_all_to_all_backward_swaps_the_splits(world_size, variant):
    fn = getattr(ft, variant)
    w = world_size

    def ins(r: int) -> list[int]:
        return [(p + r) % 3 + 1 for p in range(w)]  # uneven, different on every rank

    def outs(r: int) -> list[int]:
        return [ins(s)[r] for s in range(w)]

    await run_check(
        w,
        lambda r: [(sum(ins(r)), 2)],
        lambda x, r, w: [fn(x[0], outs(r), ins(r), None)],
        lambda xs, w: [[torch.cat([torch.split(xs[s][0], ins(s))[r] for s in range(w)])] for r in range(w)],
    )


@pytest.mark.parametrize("world_size", WS)
async def test_broadcast_and_permute_backward(world_size):
    w = world_size
    perm = [(m + 1) % w for m in range(w)]
    await run_check(
        w,
        lambda r: [(3,), (2, 2)],
        lambda x, r, w: [ft.broadcast(x[0], 1, None), ft.permute_tensor(x[1], perm, None)],
        lambda xs, w: [[xs[1][0], xs[perm.index(r)][1]] for r in range(w)],
    )


@pytest.mark.parametrize("world_size", WS)
async def test_coalesced_backward(world_size):
    w = world_size
    dims = [0, 1]
    await run_check(
        w,
        lambda r: [(w, 2), (3, w)],
        lambda x, r, w: [
            *ft.all_reduce_coalesced(x, "sum", None),
            *ft.all_gather_into_tensor_coalesced(x, None),
            *ft.reduce_scatter_tensor_coalesced(x, "sum", dims, None),
        ],
        lambda xs, w: [
            [
                _sum([row[0] for row in xs]),
                _sum([row[1] for row in xs]),
                torch.cat([row[0] for row in xs]),
                torch.cat([row[1] for row in xs]),
                _split(_sum([row[0] for row in xs]), w, 0)[r],
                _split(_sum([row[1] for row in xs]), w, 1)[r],
            ]
            for r in range(w)
        ],
        numeric=False,
    )


async def test_gradients_through_subgroups_and_chained_collectives():
    """all_gather within pairs ([[0, 1], [2, 3]]), then all_reduce over the world, then a view."""
    w = 4

    def dist(x: list[torch.Tensor], r: int, w: int) -> list[torch.Tensor]:
        g = ft.all_gather_tensor(x[0] * 2, 0, [[0, 1], [2, 3]])
        return [ft.all_reduce(g.view(-1)[1:], "sum", None) ** 2]

    def ref(xs: list[list[torch.Tensor]], w: int) -> list[list[torch.Tensor]]:
        pairs = [torch.cat([xs[p][0] * 2 for p in (0, 1)]), torch.cat([xs[p][0] * 2 for p in (2, 3)])]
        total = _sum([pairs[r // 2].view(-1)[1:] for r in range(w)])
        return [[total**2] for _ in range(w)]

    await run_check(w, lambda r: [(2,)], dist, ref)


# --------------------------------------------------------------------------- unsupported backward
@pytest.mark.parametrize("op", ["avg", "max", "min", "product"])
async def test_backward_of_other_reductions_raises_at_backward(op):
    w = 2

    def rank_fn(rank: int) -> list[str]:
        msgs = []
        x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
        for call in (
            lambda: ft.all_reduce(x, op, None),
            lambda: ft.reduce_scatter_tensor(x, op, 1, None),
            lambda: ft.all_reduce_coalesced([x], op, None)[0],
            lambda: ft.reduce_scatter_tensor_coalesced([x], op, [0], None)[0],
        ):
            y = call()  # forward is fine
            ft.wait_tensor(y)
            with pytest.raises(RuntimeError, match=f"only, got '{op}'") as info:
                y.sum().backward()
            msgs.append(str(info.value))
        # the group is still in step: a sum after the failed backwards works
        z = ft.all_reduce(torch.ones(1), "sum", None)
        assert float(ft.wait_tensor(z)) == 2.0
        return msgs

    for msgs in await blocking_ranks(rank_fn, w):
        assert len(msgs) == 4 and all("reduceOp 'sum'" in m for m in msgs)


async def test_results_that_do_not_require_grad_are_not_in_a_graph():
    def rank_fn(rank: int) -> tuple[bool, bool]:
        x = torch.ones(2, requires_grad=True)
        y = torch.ones(2)
        out = ft.all_reduce(x, "sum", None)
        plain = ft.all_reduce(y, "sum", None)
        (out + y).sum().backward()
        return x.grad is not None and torch.equal(x.grad, torch.full((2,), 2.0)), plain.requires_grad

    for has_grad, plain_requires in await blocking_ranks(rank_fn, 2):
        assert has_grad and not plain_requires


async def test_backward_on_another_thread_finds_the_forwards_world():
    """Autograd runs CUDA backward on its own threads, which lack the forward's context (where each
    in-process rank keeps its world): the backward must still reach the right world."""
    import threading

    def rank_fn(rank: int) -> torch.Tensor:
        x = torch.full((2,), float(rank + 1), dtype=torch.float64, requires_grad=True)
        loss = (ft.all_gather_tensor(x, 0, None) * torch.arange(4.0, dtype=torch.float64)).sum()
        t = threading.Thread(target=loss.backward)  # a plain thread: a fresh, empty context
        t.start()
        t.join()
        return x.grad

    grads = await blocking_ranks(rank_fn, 2)
    assert grads[0].tolist() == [0.0, 2.0] and grads[1].tolist() == [4.0, 6.0]


# --------------------------------------------------------------------------- a result written before it is wrapped
@pytest.fixture
def results_written_before_they_are_wrapped(monkeypatch):
    """Each collective finishes, and its output is written, after the op has returned its output
    (with its autograd history) and before the output is wrapped as a lazy result: the window
    a loaded machine opens by preempting the calling thread there."""
    from aiocoll.torch import _funcol, _work

    real = _funcol.lazy

    def lazy_once_done(t):
        work = _work.work_of(t)
        if work is not None:
            work.future.result(timeout=30)
        return real(t)

    monkeypatch.setattr(_funcol, "lazy", lazy_once_done)


@pytest.mark.parametrize("world_size", WS)
async def test_gradients_when_the_output_is_written_before_it_is_wrapped(results_written_before_they_are_wrapped, world_size):
    """The write of a result into the op's output must not be recorded by autograd: recorded,
    it replaced the output's history with that of a copy, whose gradient for the overwritten
    output is zero, and every element of the input's gradient came out wrong."""
    w = world_size
    await run_check(
        w,
        lambda r: [(2, 3), (2 * w, 2)],
        lambda x, r, w: [
            ft.all_gather_tensor(x[0], -1, None),
            ft.all_reduce(x[0], "sum", None),
            ft.reduce_scatter_tensor(x[1], "sum", 0, None),
            ft.broadcast(x[0], 1, None),
        ],
        lambda xs, w: [
            [
                torch.cat([row[0] for row in xs], dim=-1),
                _sum([row[0] for row in xs]),
                _split(_sum([row[1] for row in xs]), w, 0)[r],
                xs[1][0],
            ]
            for r in range(w)
        ],
        numeric=False,
    )
