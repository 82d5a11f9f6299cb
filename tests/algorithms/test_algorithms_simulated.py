"""Every message-passing algorithm, run without sockets by aiocoll.testing.simulate.

Results are exact (integer data, references from numpy), at every group size 1-16 and at 64 and
256; the bandwidth algorithms move at most 1.1x the optimal bytes per rank, the latency ones
finish in ceil(log2 n) rounds (or a fixed number). Each schedule also runs with rendezvous sends,
so none depends on the receiver buffering a frame it has not asked for yet.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from aiocoll.algorithms import composed
from aiocoll.algorithms import Finish, Recv, Send, Start, chunk_bounds, direct, dissemination, ring, tree
from aiocoll.testing.simulate import Deadlock, ScheduleError, simulate

# 256 ranks take seconds per case on a 2-core machine: under -m stress (CI time), 1-16 and 64 always.
BIG = pytest.param(256, marks=pytest.mark.stress, id="256")
RANKS = [*range(1, 17), 64, 256]
SIZES = [*range(1, 17), 64, BIG]


def _stress_at_256(case: tuple) -> object:
    return pytest.param(*case, marks=pytest.mark.stress) if 256 in case else case
Array = np.ndarray[Any, Any]

OPS: dict[str, tuple[Callable[[Array, Array], None], Callable[[Array], Array]]] = {
    "sum": (lambda a, b: np.add(a, b, out=a), lambda s: s.sum(0)),
    "max": (lambda a, b: np.maximum(a, b, out=a), lambda s: s.max(0)),
    "bxor": (lambda a, b: np.bitwise_xor(a, b, out=a), lambda s: np.bitwise_xor.reduce(s, 0)),
}


def _inputs(n: int, count: int, seed: int) -> list[Array]:
    rng = np.random.default_rng(seed)
    return [rng.integers(-(2**40), 2**40, count, dtype=np.int64) for _ in range(n)]


def _count(n: int) -> int:
    """An element count that does not divide by n (except n = 1), and is not tiny."""
    return 3 * n + 1 if n > 1 else 5


def _optimal_all_reduce(n: int, nbytes: int) -> float:
    return 2 * (n - 1) / n * nbytes


def _check_rounds_log(sim_rounds: int, n: int, factor: int = 1) -> None:
    assert sim_rounds <= factor * max(1, math.ceil(math.log2(n))), (sim_rounds, n)


# --------------------------------------------------------------------------- all_reduce
ALL_REDUCE = {
    "ring": ring.ring_all_reduce,
    "rsag": direct.rsag_all_reduce,
    "direct": direct.direct_all_reduce,
}


# The direct algorithm is for small groups and payloads (every rank sends its whole input to
# every other): it is run up to 64 ranks, the others at every size.
# Every op up to 64 ranks, the sum at 256.
@pytest.mark.parametrize(
    ("algo", "n", "op"),
    [
        _stress_at_256((a, n, op))
        for a in sorted(ALL_REDUCE)
        for n in RANKS
        for op in sorted(OPS)
        if not (a == "direct" and n > 64) and (n <= 64 or op == "sum")
    ],
)
def test_all_reduce_exact(n: int, algo: str, op: str) -> None:
    reduce, ref = OPS[op]
    count = _count(n)
    xs = _inputs(n, count, seed=n)
    outs = [np.full(count, -1, np.int64) for _ in range(n)]
    sim = simulate([ALL_REDUCE[algo](r, n, xs[r].copy(), outs[r], reduce) for r in range(n)])
    want = ref(np.stack(xs))
    for r in range(n):
        np.testing.assert_array_equal(outs[r], want, err_msg=f"rank {r} of {n}")
    if algo == "direct":
        assert sim.rounds <= 1


@pytest.mark.parametrize("n", [2, 3, 5, 8, 16, 64, BIG])
@pytest.mark.parametrize("algo", ["ring", "rsag"])
def test_all_reduce_bandwidth_algorithms_send_near_optimal_bytes(n: int, algo: str) -> None:
    count = 64 * n + 3  # uneven chunks: the largest rank sends a few elements over the optimum
    xs = _inputs(n, count, seed=7)
    outs = [np.empty(count, np.int64) for _ in range(n)]
    sim = simulate([ALL_REDUCE[algo](r, n, xs[r], outs[r], OPS["sum"][0]) for r in range(n)])
    optimum = _optimal_all_reduce(n, count * 8)
    assert sim.max_bytes_sent <= 1.1 * optimum, (sim.max_bytes_sent, optimum)
    assert sim.max_bytes_sent >= optimum * 0.99  # and not a silently partial exchange
    np.testing.assert_array_equal(outs[-1], np.stack(xs).sum(0))


def _segmented(segment_elems: int) -> Callable[..., Any]:
    def make(rank: int, n: int, x: Array, out: Array, reduce: Any) -> Any:
        return direct.rsag_all_reduce(rank, n, x, out, reduce, segment_bytes=segment_elems * x.itemsize)

    return make


# The pipelined rsag: segments of 1 element per rank (as many as the cap allows), of a few, and
# uneven ones (the count does not divide by the segments, nor each segment by n).
@pytest.mark.parametrize("segment_elems", [1, 7, 64])
@pytest.mark.parametrize("n", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("op", sorted(OPS))
def test_pipelined_rsag_exact_optimal_and_rendezvous_safe(n: int, op: str, segment_elems: int) -> None:
    reduce, ref = OPS[op]
    count = 64 * n + 3
    xs = _inputs(n, count, seed=11 * n)
    make = _segmented(segment_elems)
    assert direct.segments(xs[0], n, segment_elems * 8) > 1
    for rendezvous in (False, True):
        outs = [np.full(count, -1, np.int64) for _ in range(n)]
        sim = simulate([make(r, n, xs[r].copy(), outs[r], reduce) for r in range(n)], rendezvous=rendezvous)
        want = ref(np.stack(xs))
        for r in range(n):
            np.testing.assert_array_equal(outs[r], want, err_msg=f"rank {r} of {n}")
        optimum = _optimal_all_reduce(n, count * 8)
        assert optimum * 0.99 <= sim.max_bytes_sent <= 1.1 * optimum, (sim.max_bytes_sent, optimum)


# In place (out is x: `all_reduce(x, out=x)`): every algorithm, with segments for rsag.
@pytest.mark.parametrize("n", [2, 3, 4, 7, 8])
@pytest.mark.parametrize("algo", [*sorted(ALL_REDUCE), "rsag-segmented"])
def test_all_reduce_in_place_exact(n: int, algo: str) -> None:
    make = _segmented(5) if algo == "rsag-segmented" else ALL_REDUCE[algo]
    count = 40 * n + 1
    xs = _inputs(n, count, seed=5 * n)
    bufs = [x.copy() for x in xs]
    simulate([make(r, n, bufs[r], bufs[r], OPS["sum"][0]) for r in range(n)])
    want = np.stack(xs).sum(0)
    for r in range(n):
        np.testing.assert_array_equal(bufs[r], want, err_msg=f"rank {r} of {n}")


def test_ring_rounds_are_two_n_minus_two() -> None:
    n = 16
    xs = _inputs(n, 100, 1)
    outs = [np.empty(100, np.int64) for _ in range(n)]
    sim = simulate([ring.ring_all_reduce(r, n, xs[r], outs[r], OPS["sum"][0]) for r in range(n)])
    assert sim.rounds == 2 * (n - 1)
    assert sim.max_steps == 2 * (n - 1)


# --------------------------------------------------------------------------- reduce_scatter / all_gather
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("algo", ["ring", "direct"])
def test_reduce_scatter_exact_and_optimal(n: int, algo: str) -> None:
    block = 5
    xs = _inputs(n, block * n, seed=n + 100)
    outs = [np.full(block, -1, np.int64) for _ in range(n)]
    fn = ring.ring_reduce_scatter if algo == "ring" else direct.direct_reduce_scatter
    sim = simulate([fn(r, n, xs[r], outs[r], OPS["sum"][0]) for r in range(n)])
    total = np.stack(xs).sum(0)
    for r in range(n):
        np.testing.assert_array_equal(outs[r], total[r * block : (r + 1) * block])
    assert sim.max_bytes_sent <= 1.1 * (n - 1) / n * block * n * 8 + 1


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("algo", ["ring", "direct"])
def test_all_gather_exact_and_optimal(n: int, algo: str) -> None:
    count = 7
    xs = _inputs(n, count, seed=n + 200)
    outs = [np.full(count * n, -1, np.int64) for _ in range(n)]
    fn = ring.ring_all_gather if algo == "ring" else direct.direct_all_gather
    sim = simulate([fn(r, n, xs[r], outs[r]) for r in range(n)])
    for r in range(n):
        np.testing.assert_array_equal(outs[r], np.concatenate(xs))
    assert sim.max_bytes_sent == (n - 1) * count * 8
    if algo == "direct":
        assert sim.rounds <= 1


# --------------------------------------------------------------------------- rooted collectives
@pytest.mark.parametrize("n", SIZES)
def test_binomial_broadcast_exact_in_log_rounds(n: int) -> None:
    for root in sorted({0, n - 1, n // 2}):
        data = _inputs(1, 11, seed=n)[0]
        bufs = [data.copy() if r == root else np.zeros(11, np.int64) for r in range(n)]
        sim = simulate([tree.binomial_broadcast(r, n, root, bufs[r]) for r in range(n)])
        for r in range(n):
            np.testing.assert_array_equal(bufs[r], data, err_msg=f"rank {r}, root {root}")
        _check_rounds_log(sim.rounds, n)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("op", sorted(OPS))
def test_binomial_reduce_exact_in_log_rounds(n: int, op: str) -> None:
    reduce, ref = OPS[op]
    root = n // 2
    xs = _inputs(n, 9, seed=n + 300)
    accs = [x.copy() for x in xs]
    sim = simulate([tree.binomial_reduce(r, n, root, accs[r], reduce) for r in range(n)])
    np.testing.assert_array_equal(accs[root], ref(np.stack(xs)))
    _check_rounds_log(sim.rounds, n)


@pytest.mark.parametrize("n", SIZES)
def test_scatter_allgather_broadcast_exact(n: int) -> None:
    root = n - 1
    count = _count(n)
    data = _inputs(1, count, seed=n)[0]
    bufs = [data.copy() if r == root else np.zeros(count, np.int64) for r in range(n)]
    sim = simulate([composed.scatter_allgather_broadcast(r, n, root, bufs[r]) for r in range(n)])
    for r in range(n):
        np.testing.assert_array_equal(bufs[r], data)
    # the root sends each chunk once and joins the all-gather: about 2(n-1)/n of the payload
    assert sim.max_bytes_sent <= 1.1 * _optimal_all_reduce(n, count * 8) + 8 * n


@pytest.mark.parametrize("n", SIZES)
def test_rs_gather_reduce_exact(n: int) -> None:
    root = 0
    count = _count(n)
    xs = _inputs(n, count, seed=n + 400)
    outs = [x.copy() for x in xs]
    simulate([composed.reduce_scatter_gather_reduce(r, n, root, xs[r], outs[r], OPS["sum"][0]) for r in range(n)])
    np.testing.assert_array_equal(outs[root], np.stack(xs).sum(0))


@pytest.mark.parametrize("n", SIZES)
def test_gather_and_scatter_exact(n: int) -> None:
    root = n // 3
    count = 4
    xs = _inputs(n, count, seed=n + 500)
    out = np.full(count * n, -1, np.int64)
    simulate([direct.gather(r, n, root, xs[r], out if r == root else None) for r in range(n)])
    np.testing.assert_array_equal(out, np.concatenate(xs))
    full = _inputs(1, count * n, seed=n)[0]
    chunks = [np.full(count, -1, np.int64) for _ in range(n)]
    simulate([direct.scatter(r, n, root, full if r == root else None, chunks[r]) for r in range(n)])
    for r in range(n):
        np.testing.assert_array_equal(chunks[r], full[r * count : (r + 1) * count])


@pytest.mark.parametrize("n", SIZES)
def test_all_to_all_uneven_exact(n: int) -> None:
    rng = np.random.default_rng(n)
    splits = rng.integers(0, 4, (n, n))  # splits[src][dst] elements from src to dst
    ins = [np.arange(splits[s].sum(), dtype=np.int64) + 1000 * s for s in range(n)]
    outs = [np.full(splits[:, d].sum(), -1, np.int64) for d in range(n)]

    def blocks(a: Array, sizes: Any) -> list[Array]:
        edges = np.cumsum([0, *sizes])
        return [a[edges[i] : edges[i + 1]] for i in range(len(sizes))]

    sent = [blocks(ins[s], splits[s]) for s in range(n)]
    simulate([direct.all_to_all(r, n, sent[r], blocks(outs[r], splits[:, r])) for r in range(n)])
    for d in range(n):
        np.testing.assert_array_equal(outs[d], np.concatenate([sent[s][d] for s in range(n)]))


@pytest.mark.parametrize("n", SIZES)
def test_permute_exact(n: int) -> None:
    perm = [(m + 3) % n for m in range(n)]
    xs = _inputs(n, 6, seed=n + 600)
    outs = [np.full(6, -1, np.int64) for _ in range(n)]
    simulate([direct.permute(r, perm[r], perm.index(r), xs[r], outs[r]) for r in range(n)])
    for m in range(n):
        np.testing.assert_array_equal(outs[perm[m]], xs[m])


@pytest.mark.parametrize("n", SIZES)
def test_dissemination_barrier_in_log_rounds(n: int) -> None:
    sim = simulate([dissemination.dissemination_barrier(r, n) for r in range(n)])
    assert sim.rounds == (math.ceil(math.log2(n)) if n > 1 else 0)


# --------------------------------------------------------------------------- the simulator itself
def test_every_schedule_survives_rendezvous_sends() -> None:
    n = 5
    xs = _inputs(n, 23, seed=3)
    for make in ALL_REDUCE.values():
        outs = [np.empty(23, np.int64) for _ in range(n)]
        simulate([make(r, n, xs[r], outs[r], OPS["sum"][0]) for r in range(n)], rendezvous=True)
        np.testing.assert_array_equal(outs[0], np.stack(xs).sum(0))


def test_deadlock_is_reported_with_the_step_and_the_waits() -> None:
    def receive_first(rank: int) -> Any:
        yield [Recv(1 - rank, np.empty(1))]
        yield [Send(1 - rank, np.empty(1))]

    with pytest.raises(Deadlock, match=r"no progress at step 2: rank 0 waits for a message from ranks \[1\]"):
        simulate([receive_first(0), receive_first(1)])


def test_a_schedule_that_relies_on_buffering_deadlocks_under_rendezvous() -> None:
    def send_then_receive(rank: int) -> Any:
        yield [Send(1 - rank, np.zeros(1))]
        yield [Recv(1 - rank, np.empty(1))]

    simulate([send_then_receive(0), send_then_receive(1)])  # eager: fine
    with pytest.raises(Deadlock, match="to post their receives"):
        simulate([send_then_receive(0), send_then_receive(1)], rendezvous=True)


def test_size_mismatch_and_unreceived_messages_are_errors() -> None:
    def sender(big: bool) -> Any:
        yield [Send(1, np.zeros(2 if big else 1))]

    def receiver() -> Any:
        yield [Recv(0, np.empty(1))]

    with pytest.raises(ScheduleError, match="sent 16 bytes to rank 1, which received into 8"):
        simulate([sender(True), receiver()])

    def lonely() -> Any:
        yield [Send(1, np.zeros(1))]

    def idle() -> Any:
        return
        yield

    with pytest.raises(ScheduleError, match="never received"):
        simulate([lonely(), idle()])


def test_started_operations_finish_in_any_order_and_at_the_end() -> None:
    def pair(rank: int, out: list[Array]) -> Any:
        peer = 1 - rank
        first, second = np.full(2, rank + 1), np.full(3, rank + 10)
        a, b = Recv(peer, out[0]), Recv(peer, out[1])
        sa, sb = Send(peer, first), Send(peer, second)
        yield Start([a, sa, b, sb])
        yield Finish([b, sb])  # the later one first
        # the first receive is not finished: the simulator has not written it yet
        assert (out[0] == -1).all()
        # `a` and `sa` are still started: the end of the schedule waits for them

    outs = [[np.full(2, -1), np.full(3, -1)] for _ in range(2)]
    simulate([pair(0, outs[0]), pair(1, outs[1])])
    for r in range(2):
        np.testing.assert_array_equal(outs[r][0], np.full(2, 2 - r))
        np.testing.assert_array_equal(outs[r][1], np.full(3, 11 - r))


def test_changing_a_started_send_or_finishing_what_was_not_started_is_an_error() -> None:
    def changes(rank: int) -> Any:
        data = np.zeros(1)
        op: Any = Send(1, data) if rank == 0 else Recv(0, data)
        yield Start([op])
        data[0] = 5  # a started send's data must stay as it was
        yield Finish([op])

    with pytest.raises(ScheduleError, match="changed the data of its send 0 to rank 1"):
        simulate([changes(0), changes(1)])

    def stray(rank: int) -> Any:
        yield Finish([Send(1 - rank, np.zeros(1))])

    with pytest.raises(ScheduleError, match="had not started"):
        simulate([stray(0), stray(1)])


def test_chunk_bounds_cover_exactly() -> None:
    for n in range(1, 40):
        for parts in range(1, 20):
            b = chunk_bounds(n, parts)
            assert b[0][0] == 0 and b[-1][1] == n and len(b) == parts
            sizes = [hi - lo for lo, hi in b]
            assert max(sizes) - min(sizes) <= 1
