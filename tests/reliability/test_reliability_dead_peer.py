"""A rank dies (SIGKILL) or hangs (SIGSTOP) during or before a collective, with real processes.

Every survivor must raise a CollectiveError naming the dead rank — within 2 s when the death
is visible as a closed connection, within the collective's timeout when it is not — for every
collective kind, over tcp and shm, with 3 and 4 ranks; then its next call fails at once; and
nothing is left behind (tasks, descriptors). The ranks are started directly, not through
``aiocoll run``, which would stop the survivors as soon as the victim died; the last test checks
that the launcher exits non-zero naming the dead rank.

Set ``AIOCOLL_RELIABILITY_LOG=path`` to append each measured detection time to that file as
JSON lines (RELIABILITY.md was written from them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
from _reliability_harness import ROOT, Job  # noqa: E402
from _reliability_ops import OPS  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process and signal tests run on Linux")

#: Detection budget when the kernel shows the death (closed socket): the issue's 2 s.
VISIBLE_S = 2.0
HANG_TIMEOUT = 2.0


def _record(scenario: str, transport: str, size: int, victim: int, rank: int, rec: dict) -> None:
    path = os.environ.get("AIOCOLL_RELIABILITY_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(dict(rec, scenario=scenario, transport=transport, size=size, victim=victim, rank=rank)) + "\n")


def _check_survivors(job: Job, victim: int, died_at: float, *, scenario: str, transport: str,
                     budget: float, kinds: list[str]) -> None:
    for r in job.ranks:
        if r.rank == victim:
            continue
        results = {rec["kind"]: rec for rec in r.records("RESULT")}
        assert sorted(results) == sorted(kinds), f"rank {r.rank} reported {sorted(results)}:\n{r.tail()}"
        failed = 0
        for kind, rec in results.items():
            _record(scenario, transport, job.size, victim, r.rank, dict(rec, detect=rec["t"] - died_at))
            assert rec["outcome"] != "WRONG", f"rank {r.rank} got a wrong {kind}: {rec['why']}"
            if rec["outcome"] == "ok":
                continue  # this member's part needed nothing more from the victim: a right result
            failed += 1
            assert rec["type"] in ("PeerFailureError", "RemoteAbortError", "GroupBrokenError", "CollectiveTimeoutError"), rec
            assert rec["ranks"] == [victim], f"rank {r.rank}, {kind}: named {rec['ranks']}, not {victim}: {rec['msg']}"
            assert rec["group"] and rec["seq"] >= 0 and rec["op"], rec
            detect = rec["t"] - died_at
            assert detect < budget, f"rank {r.rank}, {kind}: {detect:.2f} s to notice, budget {budget} s"
        assert failed, f"rank {r.rank}: nothing failed although rank {victim} died"
        after = r.wait_for("AFTER", 5)
        assert after["outcome"] == "error" and victim in after["ranks"], after
        assert after["elapsed"] < 0.5, f"rank {r.rank}: the call after the failure took {after['elapsed']:.2f} s"
        leaks = r.wait_for("LEAKS", 10)
        assert leaks["tasks"] == [] and leaks["fds"] == {}, f"rank {r.rank} left behind {leaks}"


@pytest.mark.parametrize(
    "transport, size, victim, loop",
    [("tcp", 3, 1, "asyncio"), ("tcp", 4, 2, "uvloop"), ("shm", 3, 2, "uvloop"), ("shm", 4, 1, "asyncio")],
)
def test_every_collective_in_flight_fails_naming_the_killed_rank(transport, size, victim, loop):
    """Survivors have every collective kind in flight (each on its own group) when the victim
    SIGKILLs itself; each either completes with the right result (its part needed nothing more
    from the victim) or raises naming the victim within 2 s."""
    with Job(size, "reliability_dead_peer.py", "during", str(victim), transport=transport,
             AIOCOLL_LOOP=loop) as job:
        died = job.ranks[victim].wait_for("DIED", 90)
        codes = job.finish(60)
        assert codes[victim] == -signal.SIGKILL
        assert all(c == 0 for r, c in enumerate(codes) if r != victim), job.output()
        _check_survivors(job, victim, died["t"], scenario="killed during", transport=transport,
                         budget=VISIBLE_S, kinds=list(OPS))


@pytest.mark.parametrize("transport, size, victim", [("tcp", 4, 3), ("shm", 3, 0)])
def test_every_collective_after_the_death_fails_at_once(transport, size, victim):
    """The victim (rank 0 serves the store: its death must not matter after init) is dead
    before the survivors call anything; every kind then raises at once, naming it."""
    with Job(size, "reliability_dead_peer.py", "before", str(victim), transport=transport) as job:
        job.ranks[victim].wait_for("DIED", 90)
        codes = job.finish(60)
        assert all(c == 0 for r, c in enumerate(codes) if r != victim), job.output()
        for r in job.ranks:
            if r.rank == victim:
                continue
            for rec in r.records("RESULT"):
                if rec["kind"] == "send_recv" and victim not in ((r.rank - 1) % size, (r.rank + 1) % size):
                    assert rec["outcome"] == "ok", rec  # point to point between two live ranks
                    continue
                assert rec["outcome"] == "error" and rec["ranks"] == [victim], rec
                assert rec["type"] == "PeerFailureError", rec
                assert rec["elapsed"] < 0.5, f"{rec['kind']} took {rec['elapsed']:.2f} s to refuse"
                _record("dead before the call", transport, size, victim, r.rank, dict(rec, detect=rec["elapsed"]))
            assert len(r.records("RESULT")) == len(OPS)


@pytest.mark.parametrize("transport, size", [("tcp", 3), ("shm", 4)])
def test_a_rank_killed_in_the_middle_of_32_mib_frames_is_named(transport, size):
    victim = 1
    with Job(size, "reliability_dead_peer.py", "midframe", str(victim), transport=transport) as job:
        for r in job.ranks:
            r.wait_for("LOOPING", 90)
        time.sleep(0.13)  # some way into a round
        killed = time.time()
        job.ranks[victim].kill(signal.SIGKILL)
        codes = job.finish(60)
        assert all(c == 0 for r, c in enumerate(codes) if r != victim), job.output()
        _check_survivors(job, victim, killed, scenario="killed mid-frame", transport=transport,
                         budget=VISIBLE_S, kinds=["all_reduce"])


@pytest.mark.parametrize(
    "transport, size, algo",
    [("tcp", 4, "ring"), ("shm", 3, "")],
)
def test_a_hung_rank_is_named_by_every_member_at_the_timeout(transport, size, algo):
    """SIGSTOP: no connection breaks, only the timeout can tell. In a ring every survivor waits
    for its neighbour, so naming "the rank I wait for" would blame survivors; each must name
    the stopped rank, and no later than the timeout (plus scheduling slack)."""
    victim = 1
    extra = {"HANG_TIMEOUT": str(HANG_TIMEOUT), "HANG_COUNT": str(1 << 20)}
    if algo:
        extra["AIOCOLL_ALGO_ALL_REDUCE"] = algo
    with Job(size, "reliability_dead_peer.py", "hang", str(victim), transport=transport, **extra) as job:
        for r in job.ranks:
            r.wait_for("LOOPING", 90)
        time.sleep(0.05)
        stopped = time.time()
        job.ranks[victim].kill(signal.SIGSTOP)
        for r in job.ranks:
            if r.rank != victim:
                assert r.finish(30) == 0, r.tail()
        job.ranks[victim].kill(signal.SIGKILL)
        _check_survivors(job, victim, stopped, scenario="hung (SIGSTOP)", transport=transport,
                         budget=HANG_TIMEOUT + 1.0, kinds=["all_reduce"])
        for r in job.ranks:
            if r.rank != victim:
                (rec,) = r.records("RESULT")
                assert rec["type"] == "CollectiveTimeoutError" or "aborted" in rec["msg"], rec


def _churn(transport: str, victim: int, after: float, loop: str = "uvloop") -> None:
    """One run of the churn mode: the victim dies ``after`` s into the loop; every survivor
    must name it, and only it, in its error and in the call after, however the survivors'
    own departures interleave with the death."""
    with Job(4, "reliability_dead_peer.py", "churn", str(victim), transport=transport,
             CHURN_AFTER=str(after), AIOCOLL_LOOP=loop) as job:
        died = job.ranks[victim].wait_for("DIED", 90)
        codes = job.finish(60)
        assert codes[victim] == -signal.SIGKILL, job.output()
        assert all(c == 0 for r, c in enumerate(codes) if r != victim), job.output()
        for r in job.ranks:
            if r.rank == victim:
                continue
            (rec,) = r.records("RESULT")
            assert rec["outcome"] == "error", f"rank {r.rank}: {rec}"
            assert rec["type"] in ("PeerFailureError", "RemoteAbortError", "GroupBrokenError"), rec
            assert rec["ranks"] == [victim], f"rank {r.rank} named {rec['ranks']}, not {victim}: {rec['msg']}"
            assert rec["t"] - died["t"] < VISIBLE_S, f"rank {r.rank}: {rec['t'] - died['t']:.2f} s to notice"
            after = r.wait_for("AFTER", 5)
            assert after["outcome"] == "error" and after["ranks"] == [victim], f"rank {r.rank} after: {after}"
            leaks = r.wait_for("LEAKS", 10)
            assert leaks["tasks"] == [] and leaks["fds"] == {}, f"rank {r.rank} left behind {leaks}"


#: Where in the loop the victim dies, spread over a round or so of three small collectives.
CHURN_AFTER = [0.0, 0.013, 0.029, 0.047, 0.071, 0.11, 0.17, 0.23]


@pytest.mark.parametrize("transport, victim, after", [("tcp", 0, 0.0), ("shm", 0, 0.029), ("shm", 2, 0.071)])
def test_survivors_that_leave_at_once_name_only_the_killed_rank(transport, victim, after):
    """Survivors of a SIGKILL leave as soon as they have their error: each sees the others go
    (gracefully, after their aborts and notices) while it still handles the death, and must not
    take a leaving survivor for the culprit. ``-m stress`` repeats this many times."""
    _churn(transport, victim, after)


@pytest.mark.stress
@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_survivors_that_leave_at_once_name_only_the_killed_rank_repeated(transport):
    """24 runs per transport (victim rank 0 on tcp, every rank in turn on shm; the moment of
    death spread over a round): enough to see a 1-in-9 misnaming with 99% probability."""
    for i in range(24):
        victim = 0 if transport == "tcp" else i % 4
        _churn(transport, victim, CHURN_AFTER[i % len(CHURN_AFTER)], loop="asyncio" if i % 2 else "uvloop")


def test_the_launcher_exits_non_zero_naming_the_killed_rank():
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOCOLL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(SCRIPTS.parent)])
    proc = subprocess.run(
        [sys.executable, "-m", "aiocoll", "run", "-n", "3", "--transport", "tcp", "--timeout", "30",
         str(SCRIPTS / "reliability_dead_peer.py"), "during", "1"],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )
    assert proc.returncode == 128 + signal.SIGKILL, proc.stderr[-2000:]
    assert "aiocoll run: rank 1 failed with signal 9 (SIGKILL)" in proc.stderr
