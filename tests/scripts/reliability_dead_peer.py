"""One rank of a job in which rank VICTIM dies; the others report what they saw, as JSON lines.

    python reliability_dead_peer.py MODE VICTIM      (RANK, WORLD_SIZE, MASTER_* etc. set)

Every rank first runs every collective kind once and checks the results (so connections, and
on shm the fast-path segments, exist). Then, by MODE:

  during    survivors start every collective kind at once, each on its own group; the victim
            waits until they are all blocked on it, prints ``DIED <time>`` and SIGKILLs itself.
  before    the victim prints ``DIED`` and SIGKILLs itself; the survivors wait, then call every
            kind one after another (each must fail at once).
  midframe  everyone loops on a 32 MiB all_reduce; the test SIGKILLs the victim from outside at
            a moment it chooses (frames are then cut in the middle).
  hang      everyone loops on a small all_reduce with ``timeout=HANG_TIMEOUT``; the test
            SIGSTOPs the victim (no connection reset: only the timeout can tell).
  churn     everyone loops on three collectives in flight at once (all_reduce, broadcast from a
            root that moves, all_gather); the victim SIGKILLs itself CHURN_AFTER seconds after
            printing LOOPING. Survivors do not wait for each other: each leaves (one more call,
            then destroy()) as soon as it has its error, so survivors see each other leave while
            they still look at the death, and must still name the victim and only it.

A survivor prints ``RESULT {...}`` per collective (outcome, error type, ranks at fault, group,
step, wall time), waits for the other survivors (files in RELIABILITY_SYNC_DIR; not in churn
mode), and prints ``AFTER {...}`` for one more call on the world, which must fail at once.
It prints ``LEAKS {...}`` after destroy(): tasks still alive and descriptors not closed.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _reliability_ops import OPS, groups  # noqa: E402

import aiocoll  # noqa: E402

MODE, VICTIM = sys.argv[1], int(sys.argv[2])
HANG_TIMEOUT = float(os.environ.get("HANG_TIMEOUT", "2.0"))


def emit(tag: str, **info: object) -> None:
    print(tag, json.dumps(info), flush=True)


def describe(name: str, outcome: object, rank: int, size: int, started: float) -> dict[str, object]:
    now = time.time()
    if isinstance(outcome, BaseException):
        info: dict[str, object] = {"kind": name, "outcome": "error", "type": type(outcome).__name__, "msg": str(outcome)[:400]}
        if isinstance(outcome, aiocoll.CollectiveError):
            info.update(ranks=list(outcome.ranks), group=outcome.group, seq=outcome.seq, op=outcome.op)
    else:
        wrong = OPS[name][1](outcome, rank, size)
        info = {"kind": name, "outcome": "ok" if wrong is None else "WRONG", "why": wrong}
    info.update(t=now, elapsed=now - started)
    return info


async def survivors_done(rank: int, size: int) -> None:
    """Wait (through files: the group is broken) until every survivor has its results, so that
    none sees another leave before it has looked: a survivor that is gone is lost too."""
    sync = os.environ.get("RELIABILITY_SYNC_DIR")
    if not sync:
        return
    open(os.path.join(sync, f"done.{rank}"), "w").close()
    deadline = time.monotonic() + 30
    while len([n for n in os.listdir(sync) if n.startswith("done.")]) < size - 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def x_root(root: int, rank: int) -> np.ndarray:
    return np.arange(64.0) + 1000 * root if rank == root else np.zeros(64)


def churn_wrong(outs: list[np.ndarray], rounds: int, size: int) -> str | None:
    want = [np.full(257, size * (size + 1) / 2), x_root(rounds % size, rounds % size), np.repeat(np.arange(size), 3)]
    for name, got, w in zip(("all_reduce", "broadcast", "all_gather"), outs, want):
        if got.shape != w.shape or not np.array_equal(got, w):
            return f"{name}: got {got.ravel()[:4]}, want {w.ravel()[:4]}"
    return None


def die() -> None:
    emit("DIED", t=time.time())
    os.kill(os.getpid(), signal.SIGKILL)


async def main() -> None:
    fds_before = set(os.listdir("/proc/self/fd"))
    world = await aiocoll.init()
    rank, size = world.rank, world.size
    gs = groups(size)
    for name, (call, check) in OPS.items():
        wrong = check(await call(gs[name], rank, size), rank, size)
        assert wrong is None, f"warm-up {name}: {wrong}"
    await aiocoll.barrier()
    emit("READY", rank=rank, pid=os.getpid())

    if MODE == "during":
        if rank == VICTIM:
            await asyncio.sleep(0.5)  # the others are now blocked in every kind, waiting for us
            die()
        started = time.time()
        tasks = {name: asyncio.ensure_future(call(gs[name], rank, size)) for name, (call, _) in OPS.items()}
        for name, task in tasks.items():
            try:
                outcome: object = await task
            except Exception as exc:
                outcome = exc
            emit("RESULT", rank=rank, **describe(name, outcome, rank, size, started))
        del tasks, outcome  # errors hold tracebacks, tracebacks hold frames and buffers
    elif MODE == "before":
        if rank == VICTIM:
            die()
        await asyncio.sleep(1.0)
        for name, (call, _) in OPS.items():
            started = time.time()
            try:
                outcome = await call(gs[name], rank, size)
            except Exception as exc:
                outcome = exc
            emit("RESULT", rank=rank, **describe(name, outcome, rank, size, started))
            del outcome
    elif MODE == "churn":
        at = None
        rounds = 0
        while True:
            if rank == VICTIM and at is not None and time.monotonic() >= at:
                die()
            started = time.time()
            ins = [np.full(257, rank + 1.0), x_root(rounds % size, rank), np.full(3, rank, np.int64)]
            try:
                outs = await asyncio.gather(
                    aiocoll.all_reduce(ins[0]), aiocoll.broadcast(ins[1], rounds % size), aiocoll.all_gather(ins[2])
                )
            except Exception as exc:
                emit("RESULT", rank=rank, rounds=rounds, **describe("churn", exc, rank, size, started))
                break
            wrong = churn_wrong(outs, rounds, size)
            if wrong:
                emit("RESULT", rank=rank, kind="churn", outcome="WRONG", why=f"round {rounds}: {wrong}")
                break
            rounds += 1
            if rounds == 3:
                emit("LOOPING", rank=rank)
                at = time.monotonic() + float(os.environ.get("CHURN_AFTER", "0.1"))
    elif MODE in ("midframe", "hang"):
        n = (8 << 20) if MODE == "midframe" else int(os.environ.get("HANG_COUNT", "1024"))
        timeout = None if MODE == "midframe" else HANG_TIMEOUT
        xs = np.full(n, rank + 1, np.float32)
        want = np.float32(size * (size + 1) // 2)
        rounds = 0
        while True:
            started = time.time()
            try:
                y = await aiocoll.all_reduce(xs, timeout=timeout)
            except Exception as exc:
                emit("RESULT", rank=rank, rounds=rounds, **describe("all_reduce", exc, rank, size, started))
                break
            if not (y == want).all():
                emit("RESULT", rank=rank, kind="all_reduce", outcome="WRONG", why=f"round {rounds}: {y[:4]}")
                break
            rounds += 1
            if rounds == 3:
                emit("LOOPING", rank=rank)
    else:
        raise SystemExit(f"unknown mode {MODE!r}")

    if MODE != "churn":
        await survivors_done(rank, size)
    started = time.time()
    try:
        await aiocoll.barrier()
        emit("AFTER", rank=rank, outcome="ok", elapsed=time.time() - started)
    except Exception as exc:
        emit("AFTER", rank=rank, **describe("barrier", exc, rank, size, started))
    await aiocoll.destroy()
    await asyncio.sleep(0.05)  # let transports' close callbacks run
    del world, gs
    gc.collect()  # exceptions and their frames form cycles; what they hold goes with them
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    fds_after = set(os.listdir("/proc/self/fd"))
    leaked = {}
    for fd in sorted(fds_after - fds_before):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the descriptor listdir itself used
        if target != "/dev/null":  # libuv keeps one in reserve once it has listened (EMFILE trick)
            leaked[fd] = target
    emit("LEAKS", rank=rank, tasks=[repr(t)[:200] for t in others], fds=leaked)


if __name__ == "__main__":
    aiocoll.run(main()) if os.environ.get("AIOCOLL_LOOP") != "asyncio" else asyncio.run(main())
