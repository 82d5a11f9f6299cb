"""The shm transport and fast path with real processes: results, crashes, and what is left behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import aiocoll
from aiocoll.sharedmem import segment as _shm_segment

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="shm needs Linux")

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(aiocoll.__file__)))


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("AIOCOLL_SECRET", None)
    parts = [p for p in (ROOT, str(TESTS), env.get("PYTHONPATH", "")) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.update(extra)
    return env


def _ours(job: str | None = None) -> list[str]:
    return list(_shm_segment.named_segments(job))


def aiocoll_run(n: int, script: Path, *args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiocoll", "run", "-n", str(n), "--transport", "shm", "--timeout", "60", str(script), *args],
        capture_output=True, text=True, timeout=timeout, env=_env(**env), cwd=REPO,
    )


FASTPATH_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, threading
    import numpy as np
    import aiocoll
    from aiocoll.engines import select as _fastpath
    from aiocoll.engines.shm.engine import ShmEngine
    from _reference import assert_reduced, data, reduce_ref

    def fds():
        # fd -> what it is; /dev/null is libuv's spare descriptor (uvloop keeps it for EMFILE)
        found = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                found[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue  # listdir's own descriptor, closed by now
        return {fd: what for fd, what in found.items() if what != "/dev/null"}

    async def main():
        before = fds()
        async with aiocoll.init() as world:
            rank, size = world.rank, world.size
            assert isinstance(_fastpath.engine_for(world, "all_reduce", 1 << 20), ShmEngine), "no shm engine"
            checks = 0
            # direct (small), one pipelined round, many rounds (default 256/128 KiB parts), uneven
            for dtype, op in [(np.float32, "sum"), (np.int64, "max"), (np.float64, "avg"), (np.uint8, "bxor"),
                              (np.bool_, "sum"), (np.complex64, "product"), (np.int8, "min")]:
                for count in (1, 13, 4099, 300_007, 1_000_003):
                    inputs = [data(r, (count,), dtype, op) for r in range(size)]
                    y = await aiocoll.all_reduce(inputs[rank], op)
                    assert_reduced(y, reduce_ref(op, inputs), size)
                    checks += 1
            for shape in [(1,), (7, 3), (400_001,)]:
                xs = [data(r, shape, np.float64) for r in range(size)]
                np.testing.assert_array_equal(await aiocoll.all_gather(xs[rank]), np.concatenate(xs))
                for root in range(size):
                    np.testing.assert_array_equal(await aiocoll.broadcast(xs[rank], root), xs[root])
                rs = [data(r, (size * shape[0],) + shape[1:], np.int32) for r in range(size)]
                n = shape[0]
                np.testing.assert_array_equal(await aiocoll.reduce_scatter(rs[rank]),
                                              reduce_ref("sum", rs)[rank * n:(rank + 1) * n])
                checks += 2 + size
            threads = [t.name for t in threading.enumerate() if t.name.startswith("aiocoll-shm")]
        after = fds()
        assert after == before, f"descriptors left open: { {k: v for k, v in after.items() if k not in before} }"
        assert not [t for t in threading.enumerate() if t.name.startswith("aiocoll-shm")]
        print(f"rank {rank} ok {checks} job {os.environ['AIOCOLL_JOB_ID']}", flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("n", [2, 3])
def test_every_fast_path_collective_against_numpy_in_real_processes(tmp_path, n):
    script = tmp_path / "fastpath.py"
    script.write_text(FASTPATH_SCRIPT)
    proc = aiocoll_run(n, script)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in range(n):
        assert f"[{r}] rank {r} ok" in proc.stdout
    job = proc.stdout.split(" job ")[1].split()[0]
    assert _ours(job) == []  # the group's segment name lived only while the members attached


@pytest.mark.parametrize("n", [2, 4])
def test_every_collective_over_shm_processes(n):
    proc = aiocoll_run(n, TESTS / "scripts" / "check_collectives.py")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in range(n):
        assert f"[{r}] rank {r} ok" in proc.stdout


def test_auto_uses_shm_between_ranks_of_one_host(tmp_path):
    script = tmp_path / "auto.py"
    script.write_text(textwrap.dedent(
        """
        import asyncio, aiocoll
        from aiocoll.core.world import current_world
        async def main():
            async with aiocoll.init() as world:
                print("links", sorted(set(current_world().transport_names.values())), flush=True)
        asyncio.run(main())
        """
    ))
    proc = subprocess.run(
        [sys.executable, "-m", "aiocoll", "run", "-n", "3", "--transport", "auto", str(script)],
        capture_output=True, text=True, timeout=120, env=_env(), cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("links ['shm']") == 3, proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KILL_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, signal, sys, time
    import numpy as np
    import aiocoll

    async def main():
        rank, size, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
        await aiocoll.init(rank=rank, world_size=size, store=f"tcp://127.0.0.1:{port}", transport="shm",
                           timeout=60, secret="kill-test")
        x = np.ones(8 << 20, np.float32)
        for i in range(1000):
            if rank == 1 and i == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            try:
                await aiocoll.all_reduce(x)
            except aiocoll.CollectiveError as exc:
                print(f"rank {rank} failed after {i} calls: {type(exc).__name__} ranks {list(exc.ranks)}", flush=True)
                await asyncio.sleep(0.5)  # let the other survivor hear of rank 1 before we leave too
                await aiocoll.destroy(abort=True)
                return
        raise SystemExit("rank 1 never died")

    asyncio.run(main())
    """
)


def test_sigkill_of_a_rank_fails_the_others_fast_and_leaves_nothing(tmp_path):
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    job = "killjob" + os.urandom(4).hex()
    env = _env(AIOCOLL_JOB_ID=job)
    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), "3", str(port)], env=env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(3)
    ]
    try:
        outs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode == -signal.SIGKILL
    for r in (0, 2):
        assert procs[r].returncode == 0, outs[r][1][-3000:]
        assert f"rank {r} failed after" in outs[r][0]
    assert any("PeerFailureError ranks [1]" in outs[r][0] for r in (0, 2)), outs
    assert _ours(job) == []


SETUP_KILL_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    import numpy as np
    import aiocoll
    from aiocoll.engines.shm import engine as _shm_engine
    from aiocoll.core.world import current_world

    def fds():
        found = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                found[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue  # listdir's own descriptor, closed by now
        return {fd: what for fd, what in found.items() if what != "/dev/null"}

    def shared_maps():
        with open("/proc/self/maps") as f:
            return sorted(line.split(None, 5)[-1].strip() for line in f if "memfd:" in line or "/dev/shm/" in line)

    def die(*_):
        os.kill(os.getpid(), signal.SIGKILL)

    def kill_after(owner, name, calls=1):
        # Rank 0 dies right after the n-th call of owner.name returns: a fixed point of setup.
        real = getattr(owner, name)
        seen = [0]
        if asyncio.iscoroutinefunction(real):
            async def wrapped(*args, **kwargs):
                out = await real(*args, **kwargs)
                seen[0] += 1
                if seen[0] == calls:
                    die()
                return out
        else:
            def wrapped(*args, **kwargs):
                out = real(*args, **kwargs)
                seen[0] += 1
                if seen[0] == calls:
                    die()
                return out
        setattr(owner, name, wrapped)

    async def main():
        rank, size, port, stage, members = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
        before = fds(), shared_maps()
        await aiocoll.init(rank=rank, world_size=size, store=f"tcp://127.0.0.1:{port}", transport="shm",
                           timeout=30, secret="setup-kill-test")
        await aiocoll.all_reduce(np.ones(4, np.float32))  # the world's own segment, set up before the kill
        g = aiocoll.new_group(range(size))
        if rank == 0:
            print("pid", os.getpid(), flush=True)
            if stage == "created":  # the segment exists, nothing was passed yet
                if hasattr(_shm_engine, "create_named"):  # (the code before segments were passed by descriptor)
                    kill_after(_shm_engine, "create_named")
                else:
                    kill_after(_shm_engine, "create_anonymous")
            elif stage == "passed-one":  # rank 1 holds the descriptor, rank 2 does not
                from aiocoll.transports.shm import ShmTransport
                kill_after(ShmTransport, "send_fd")
            elif stage.startswith("announced"):  # every member was told; rank 0 waits for them
                kill_after(_shm_engine.ShmEngine, "_wait_messages")
        elif members == "late":  # join only once rank 0 is dead: what it passed waits unclaimed
            while not current_world().comm.is_dead(0):
                await asyncio.sleep(0.01)
        n = (4 << 20) if stage.endswith("big") else 1000  # pipelined rounds, or the one-round path
        try:
            await aiocoll.all_reduce(np.ones(n, np.float32), group=g)
            print(f"rank {rank} completed", flush=True)
        except aiocoll.CollectiveError as exc:
            print(f"rank {rank} failed: {type(exc).__name__} ranks {list(exc.ranks)}", flush=True)
            await aiocoll.destroy()  # inside the except block: the error is still alive
        after = fds(), shared_maps()
        extra_fds = {k: v for k, v in after[0].items() if before[0].get(k) != v}
        print(f"rank {rank} left fds {extra_fds} maps {[m for m in after[1] if m not in before[1]]}", flush=True)

    asyncio.run(main())
    """
)


def _dev_shm() -> set[str]:
    return set(os.listdir("/dev/shm"))


def _kill_rank0_during_setup(script: Path, stage: str, members: str) -> None:
    job = "setupkill" + os.urandom(4).hex()
    env = _env(AIOCOLL_JOB_ID=job)
    port = _free_port()
    shm_before = _dev_shm()
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), "3", str(port), stage, members], env=env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(3)
    ]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == -signal.SIGKILL, outs[0]
    pid = outs[0][0].split("pid ")[1].split()[0]
    litter = [n for n in _dev_shm() - shm_before if job in n or f"-{pid}-" in n]
    assert litter == [], f"rank 0 (pid {pid}) left {litter} in /dev/shm"
    for r in (1, 2):
        out, err = outs[r]
        assert procs[r].returncode == 0, err[-3000:]
        assert f"rank {r} failed: PeerFailureError ranks [0]" in out, out + err[-2000:]
        assert f"rank {r} left fds {{}} maps []" in out, out


@pytest.mark.parametrize("members", ["waiting", "late"])
@pytest.mark.parametrize("stage", ["created", "passed-one", "announced", "announced-big"])
def test_sigkill_of_rank_0_during_group_setup_leaves_nothing_anywhere(tmp_path, stage, members):
    """Ranks started without the launcher: nothing named is ever made, and the survivors hold
    no descriptor or mapping of the dead rank's segment once destroy() returns."""
    script = tmp_path / "setup_kill.py"
    script.write_text(SETUP_KILL_SCRIPT)
    for _ in range(2):
        _kill_rank0_during_setup(script, stage, members)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, resource, sys, tracemalloc
    import numpy as np
    import aiocoll

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    async def main():
        nbytes = int(sys.argv[1])
        async with aiocoll.init() as world:
            base = rss()
            x = np.full(nbytes // 4, world.rank + 1, np.float32)
            out = np.empty_like(x)
            await aiocoll.all_reduce(x, out=out)  # the segment is made once
            tracemalloc.start()
            for _ in range(3):
                await aiocoll.all_reduce(x, out=out)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert out[0] == world.size * (world.size + 1) / 2
            peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            print(f"rank {world.rank} peak_alloc {peak} peak_rss {peak_rss} base_rss {base} payload {nbytes}", flush=True)

    asyncio.run(main())
    """
)


def _check_memory(tmp_path: Path, nbytes: int, *, absolute: bool) -> None:
    script = tmp_path / "memory.py"
    script.write_text(MEMORY_SCRIPT)
    proc = aiocoll_run(2, script, str(nbytes))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "peak_alloc" in line]
    assert len(lines) == 2, proc.stdout
    for line in lines:
        words = line[line.index("peak_alloc"):].split()
        fields = dict(zip(words[0::2], map(int, words[1::2])))
        # Steady state: no payload-sized buffer per call (staging lives in the segment).
        assert fields["peak_alloc"] < nbytes // 16, line
        if absolute:  # the promise: the whole process under 3x the payload
            assert fields["peak_rss"] < 3 * nbytes, line
        else:  # small payloads: the interpreter's own ~60 MB would dominate; count what the call adds
            assert fields["peak_rss"] - fields["base_rss"] < 2.5 * nbytes, line


def test_steady_state_all_reduce_allocates_nothing_payload_sized(tmp_path):
    _check_memory(tmp_path, 64 << 20, absolute=False)


@pytest.mark.stress
def test_peak_rss_of_a_256_mib_all_reduce_stays_under_three_payloads(tmp_path):
    _check_memory(tmp_path, 256 << 20, absolute=True)

