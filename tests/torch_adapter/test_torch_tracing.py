"""aiocoll.torch under tracing: output shapes on meta and fake tensors with no group initialised;
make_fx graphs that hold each collective followed by a wait that dead-code elimination keeps;
torch.compile (fullgraph) running the ops."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch is an optional extra; the [test] set-up (.ci/run) installs the CPU build")

from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

import aiocoll  # noqa: E402
import aiocoll.sync  # noqa: E402
import aiocoll.torch as ft  # noqa: E402

from _torch_reference import blocking_ranks  # noqa: E402

PAIRS = [[0, 1], [2, 3]]  # a 2-d rank list: groups of 2


def shapes_of(make):
    """(op, group) -> expected shape, for tensors made by ``make``."""
    x = make(4, 6)
    v = make(6)
    return [
        (lambda: ft.all_reduce(x, "sum", [0, 1, 2]), (4, 6)),
        (lambda: ft.all_gather_tensor(x, 0, [0, 1, 2]), (12, 6)),
        (lambda: ft.all_gather_tensor(x, 1, PAIRS), (4, 12)),
        (lambda: ft.all_gather_tensor(x, -1, [3]), (4, 6)),
        (lambda: ft.all_gather_tensor(make(), 0, [0, 1]), (2,)),
        (lambda: ft.reduce_scatter_tensor(x, "sum", 0, PAIRS), (2, 6)),
        (lambda: ft.reduce_scatter_tensor(x, "avg", 1, [0, 1, 2]), (4, 2)),
        (lambda: ft.all_to_all_single(x, [1, 2, 4], [2, 1, 1], [0, 1, 2]), (7, 6)),
        (lambda: ft.all_to_all_single(x, None, None, PAIRS), (4, 6)),
        (lambda: ft.broadcast(x, 1, [0, 1]), (4, 6)),
        (lambda: ft.permute_tensor(v, [1, 0], [0, 1]), (6,)),
        (lambda: [t.shape for t in ft.all_reduce_coalesced([x, v], "sum", [0, 1])], [(4, 6), (6,)]),
        (lambda: [t.shape for t in ft.all_gather_into_tensor_coalesced([x, v], [0, 1, 2])], [(12, 6), (18,)]),
        (lambda: [t.shape for t in ft.reduce_scatter_tensor_coalesced([x, v], "sum", [1, 0], PAIRS)],
         [(4, 3), (3,)]),
    ]


@pytest.fixture(autouse=True)
def _no_world():
    with pytest.raises(aiocoll.NotInitializedError):
        aiocoll.world()
    yield


def _shape(r):
    return [tuple(s) for s in r] if isinstance(r, list) else tuple(r.shape)


@pytest.mark.parametrize("case", range(14))
def test_meta_tensors_give_output_shapes_without_a_group(case):
    call, want = shapes_of(lambda *s: torch.empty(s, device="meta", dtype=torch.bfloat16))[case]
    got = call()
    assert _shape(got) == (want if not isinstance(want, list) else [tuple(w) for w in want])
    if isinstance(got, torch.Tensor):
        assert got.device.type == "meta" and got.dtype == torch.bfloat16


@pytest.mark.parametrize("case", range(14))
def test_fake_tensors_give_output_shapes_without_a_group(case):
    with FakeTensorMode():
        call, want = shapes_of(lambda *s: torch.empty(s, dtype=torch.float16))[case]
        got = call()
        assert _shape(got) == (want if not isinstance(want, list) else [tuple(w) for w in want])
        if isinstance(got, torch.Tensor):
            assert isinstance(got, FakeTensor) and got.dtype == torch.float16


def test_forms_other_than_rank_lists_need_a_world():
    x = torch.empty(3, device="meta")
    with pytest.raises(aiocoll.NotInitializedError, match="only rank lists, group names and torch.distributed groups"):
        ft.all_reduce(x, "sum", None)
    # A group name works before init where the shape does not depend on the group's size...
    assert ft.all_reduce(x, "sum", "world").shape == (3,)
    # ...and names what is missing where it does.
    with pytest.raises(aiocoll.NotInitializedError):
        ft.all_gather_tensor(x, 0, "world")


def test_fake_tensors_are_checked_like_real_ones():
    with FakeTensorMode():
        x = torch.empty(3, 5)
        with pytest.raises(ValueError, match="not divisible"):
            ft.reduce_scatter_tensor(x, "sum", 0, [0, 1])
        with pytest.raises(ValueError, match="group sizes must be identical"):
            ft.all_gather_tensor(x, 0, [[0], [1, 2]])


def _targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_make_fx_records_each_collective_then_its_wait():
    def f(x):
        a = ft.all_reduce(x, "sum", [0, 1])
        b = ft.all_gather_tensor(x, 1, [0, 1])
        return a + 1, b

    gm = make_fx(f, tracing_mode="fake")(torch.rand(4, 2))
    t = _targets(gm)
    assert t.index("aiocoll.all_reduce.default") < t.index("aiocoll.wait_tensor.default")
    assert t.count("aiocoll.wait_tensor.default") == 2
    assert "aiocoll.all_gather_into_tensor.default" in t


def test_dead_code_elimination_keeps_collectives_and_waits():
    def f(x):
        ft.all_reduce(x, "sum", [0, 1])  # result unused: every member still issues it
        ft.reduce_scatter_tensor_coalesced([x, x], "sum", [0, 0], [0, 1])
        return x * 2

    gm = make_fx(f, tracing_mode="symbolic")(torch.rand(4))
    gm.graph.eliminate_dead_code()
    t = _targets(gm)
    assert "aiocoll.all_reduce.default" in t and "aiocoll.reduce_scatter_tensor_coalesced.default" in t
    assert t.count("aiocoll.wait_tensor.default") == 3


def test_make_fx_traces_the_backward_collectives():
    def grad_of(x):
        y = ft.all_gather_tensor(x, 0, [0, 1])
        return torch.autograd.grad((y * y).sum(), x)[0]

    gm = make_fx(grad_of, tracing_mode="fake")(torch.rand(3, requires_grad=True))
    t = _targets(gm)
    assert "aiocoll.all_gather_into_tensor.default" in t
    assert "aiocoll.reduce_scatter_tensor.default" in t  # the backward of the gather
    assert t.count("aiocoll.wait_tensor.default") == 2


async def test_traced_graphs_run_the_collectives_at_2_ranks():
    import threading

    lock = threading.Lock()  # fx tracing is not thread-safe; the ranks here are threads of one process

    def f(x):
        return ft.all_reduce(x, "sum", [0, 1]) * 2 + ft.all_gather_tensor(x, 0, [0, 1])[:4]

    def rank_fn(rank):
        x = torch.arange(4.0) + rank
        eager = ft.wait_tensor(f(x))
        with lock:
            traced = make_fx(f, tracing_mode="fake")(x)
        return eager, traced(x), traced(x + 1), _targets(traced)

    for eager, again, shifted, targets in await blocking_ranks(rank_fn, 2):
        want = (torch.arange(4.0) * 2 + 1) * 2 + torch.arange(4.0)
        assert torch.equal(eager, want) and torch.equal(again, want)
        assert torch.equal(shifted, want + 5)  # each all_reduce element +2, doubled; the gathered block +1
        assert "aiocoll.wait_tensor.default" in targets


def test_torch_compile_fullgraph_runs_the_ops():
    aiocoll.sync.init()  # a world of one, in this process
    try:
        def f(x):
            return ft.all_reduce(x, "sum", None) + ft.all_gather_tensor(x, 0, [0]) * 2

        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        x = torch.arange(3.0)
        assert torch.equal(compiled(x), x * 3)
        y = torch.arange(3.0, requires_grad=True)
        compiled(y).sum().backward()
        assert torch.equal(y.grad, torch.full((3,), 3.0))
    finally:
        aiocoll.sync.destroy()
