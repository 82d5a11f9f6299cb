"""``aiocoll bench``: time collectives nccl-tests style, next to gloo and MPI in the same run.

    aiocoll bench [--op all_reduce] [-n N] [--transport T] [--sizes 4:256M] [--compare gloo,mpi]
                  [--plot F.png] [--target-s S] [--device cpu|cuda]

The command starts N local ranks itself (``python -m aiocoll.launch.bench --worker ...``, meeting
through a TCP store on 127.0.0.1), and, with ``--compare``, the same sizes through
torch.distributed's gloo backend (CPU tensors, ``init_method=tcp://127.0.0.1``,
``GLOO_SOCKET_IFNAME=lo``) and through mpi4py under ``mpirun`` (Open MPI shared memory: ``--mca
pml ob1 --mca btl self,vader``), one after the other in the same invocation.

``--device cuda``: every library works on the same CUDA float32 tensors (rank r on GPU r mod the
number of GPUs: one rank per GPU when there are enough, else ranks share them); each timed call
ends when its results are on the device (the stream synchronized). ``--compare`` then takes gloo
(CUDA tensors, as torch.distributed stages them) and nccl (one GPU per rank only). Shown in the
header: which path aiocoll took (GPU-direct over ucx, or staged through pinned host memory).

Definitions (as nccl-tests and the project's CPU anchors):
- size: bytes of the array per rank; for all_gather the whole output, for reduce_scatter the
  whole input. count = size / 4 (float32).
- Per size: one checked call, 5 warm-up calls, then as many timed calls as fit in about
  ``--target-s`` seconds (at least 5, at most 2000; every rank runs the same number). Each call
  is timed on every rank; time_us is the median over calls of the slowest rank's time.
- algbw = size / time; busbw = algbw * 2(n-1)/n (all_reduce), (n-1)/n (all_gather,
  reduce_scatter), 1 (broadcast). 1 GB = 1e9 B.
- The ratio columns are the other library's time divided by ours: above 1, aiocoll is faster.

aiocoll's all_reduce is timed with ``out=`` a second preallocated array, as MPI's ``Allreduce(x,
out)``; gloo always reduces in place. ``--in-place`` times aiocoll with ``out=x`` and MPI with
``MPI_IN_PLACE`` instead (one buffer: less memory traffic). all_gather, reduce_scatter and
broadcast return a new array per call, as their API does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

OPS = ("all_reduce", "all_gather", "broadcast", "reduce_scatter")
BUSBW: dict[str, Callable[[int], float]] = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
}
DEFAULT_SIZES = "4:256M"
DEFAULT_MPIRUN = (
    "mpirun --allow-run-as-root --oversubscribe --mca pml ob1 --mca btl self,vader "
    "--mca btl_tcp_if_include lo --mca oob_tcp_if_include lo"
)
WARMUP = 5
MIN_ITERS = 5
MAX_ITERS = 2000
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_RESULT = "AIOCOLL-BENCH-RESULT "


# --------------------------------------------------------------------------- sizes
def parse_size(text: str) -> int:
    """``"4"``, ``"64K"``, ``"256M"``, ``"1G"`` -> bytes.

    Raises:
        ValueError: not a size.
    """
    t = text.strip().upper().removesuffix("B")
    try:
        if t and t[-1] in _UNITS:
            return int(t[:-1]) * _UNITS[t[-1]]
        return int(t)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (examples: 4, 64K, 256M)") from None


def parse_sizes(text: str) -> list[int]:
    """``"4:256M"`` (powers of 4 from 4 B to 256 MiB), ``"4:256M:2"`` (factor 2) or a list
    ``"4,1K,64M"``.

    Raises:
        ValueError: malformed, not increasing, a factor below 2, or a size below 1.
    """
    if ":" in text:
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"sizes {text!r}: expected LOW:HIGH or LOW:HIGH:FACTOR")
        lo, hi = parse_size(parts[0]), parse_size(parts[1])
        factor = int(parts[2]) if len(parts) == 3 else 4
        if factor < 2 or lo < 1 or hi < lo:
            raise ValueError(f"sizes {text!r}: need 1 <= LOW <= HIGH and FACTOR >= 2")
        sizes = []
        s = lo
        while s <= hi:
            sizes.append(s)
            s *= factor
        return sizes
    sizes = [parse_size(p) for p in text.split(",") if p.strip()]
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"sizes {text!r}: need at least one size >= 1")
    return sizes


def human(n: int) -> str:
    for unit, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def _iterations(estimate_s: float, target_s: float) -> int:
    return int(min(MAX_ITERS, max(MIN_ITERS, target_s / max(estimate_s, 1e-7))))


# --------------------------------------------------------------------------- workers
def _counts(op: str, size: int, n: int) -> tuple[int, int]:
    """(elements per rank's input, elements per rank's output) for ``size`` bytes of float32."""
    count = max(1, size // 4)
    if op == "all_gather":
        per = max(1, count // n)
        return per, per * n
    if op == "reduce_scatter":
        per = max(1, count // n)
        return per * n, per
    return count, count


def _emit(op: str, size: int, n: int, iters: int, times: Sequence[float]) -> None:
    print(
        _RESULT + json.dumps({"op": op, "size": size, "count": max(1, size // 4), "iters": iters,
                              "time_s": statistics.median(times)}),
        flush=True,
    )


def _cuda_device(rank: int) -> Any:
    import torch

    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


async def _aiocoll_worker(args: argparse.Namespace) -> None:
    import numpy as np

    import aiocoll

    if args.device == "cuda":
        _cuda_device(args.rank)
    await aiocoll.init(
        rank=args.rank, world_size=args.world_size, store=f"tcp://127.0.0.1:{args.port}",
        transport=args.transport, timeout=args.timeout,
    )
    rank, n = args.rank, args.world_size
    if args.device == "cuda":
        try:
            await _aiocoll_cuda(args)
        finally:
            await aiocoll.destroy()
        return
    try:
        for op in args.ops:
            for size in args.sizes:
                cin, cout = _counts(op, size, n)
                x = np.full(cin, rank + 1, dtype=np.float32)
                out = np.empty(cout, dtype=np.float32)
                if op == "all_reduce":
                    target = x if args.in_place else out

                    async def call() -> Any:
                        return await aiocoll.all_reduce(x, out=target)

                    want: Any = np.full(cout, n * (n + 1) / 2, np.float32)
                elif op == "all_gather":

                    async def call() -> Any:
                        return await aiocoll.all_gather(x)

                    want = np.repeat(np.arange(1, n + 1, dtype=np.float32), cin)
                elif op == "reduce_scatter":

                    async def call() -> Any:
                        return await aiocoll.reduce_scatter(x)

                    want = np.full(cout, n * (n + 1) / 2, np.float32)
                else:

                    async def call() -> Any:
                        return await aiocoll.broadcast(x, 0)

                    want = np.full(cout, 1, np.float32)
                got = await call()
                if not np.array_equal(got, want):
                    raise AssertionError(f"aiocoll {op} of {size} bytes gave a wrong result on rank {rank}")
                x.fill(rank + 1)
                t0 = time.perf_counter()
                for _ in range(WARMUP):
                    await call()
                est = await aiocoll.broadcast(np.array([(time.perf_counter() - t0) / WARMUP]), 0)
                iters = _iterations(float(est[0]), args.target_s)
                times = np.empty(iters)
                await aiocoll.barrier()
                for i in range(iters):
                    t0 = time.perf_counter()
                    await call()
                    times[i] = time.perf_counter() - t0
                slowest = await aiocoll.all_reduce(times, "max")
                if rank == 0:
                    _emit(op, size, n, iters, slowest.tolist())
                del x, out, got, want, call
    finally:
        await aiocoll.destroy()


async def _aiocoll_cuda(args: argparse.Namespace) -> None:
    """The aiocoll worker on CUDA tensors (``--device cuda``)."""
    import torch

    import aiocoll

    rank, n = args.rank, args.world_size
    device = torch.device("cuda", torch.cuda.current_device())
    world = aiocoll.world()
    direct_to = all(world.world.comm.has_device_path(p) for p in range(n) if p != rank)
    minimum = world.world.settings.gpu_direct_min_bytes
    if rank == 0:
        how = (f"GPU-direct over ucx from {minimum} B per rank (smaller: staged through pinned host memory)"
               if direct_to else "staged through pinned host memory (no GPU-direct transport)")
        print(f"# aiocoll path: {how}; {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(device)}",
              flush=True)
    sync = torch.cuda.current_stream(device).synchronize
    for op in args.ops:
        for size in args.sizes:
            cin, cout = _counts(op, size, n)
            x = torch.full((cin,), float(rank + 1), dtype=torch.float32, device=device)
            out = torch.empty(cout, dtype=torch.float32, device=device)
            if op == "all_reduce":
                target = x if args.in_place else out

                async def call() -> Any:
                    return await aiocoll.all_reduce(x, out=target)

                want: Any = torch.full((cout,), n * (n + 1) / 2, dtype=torch.float32, device=device)
            elif op == "all_gather":

                async def call() -> Any:
                    return await aiocoll.all_gather(x)

                want = torch.arange(1, n + 1, dtype=torch.float32, device=device).repeat_interleave(cin)
            elif op == "reduce_scatter":

                async def call() -> Any:
                    return await aiocoll.reduce_scatter(x)

                want = torch.full((cout,), n * (n + 1) / 2, dtype=torch.float32, device=device)
            else:

                async def call() -> Any:
                    return await aiocoll.broadcast(x, 0)

                want = torch.full((cout,), 1.0, dtype=torch.float32, device=device)
            got = await call()
            sync()
            if not torch.equal(got, want):
                raise AssertionError(f"aiocoll {op} of {size} bytes on CUDA gave a wrong result on rank {rank}")
            x.fill_(float(rank + 1))
            sync()
            t0 = time.perf_counter()
            for _ in range(WARMUP):
                await call()
                sync()
            est = await aiocoll.broadcast(torch.tensor([(time.perf_counter() - t0) / WARMUP], dtype=torch.float64), 0)
            iters = _iterations(float(est[0]), args.target_s)
            times = torch.empty(iters, dtype=torch.float64)
            await aiocoll.barrier()
            for i in range(iters):
                t0 = time.perf_counter()
                await call()
                sync()
                times[i] = time.perf_counter() - t0
            slowest = await aiocoll.all_reduce(times, "max")
            if rank == 0:
                _emit(op, size, n, iters, slowest.tolist())
            del x, out, got, want, call


def _gloo_worker(args: argparse.Namespace, backend: str = "gloo") -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    cuda = args.device == "cuda"
    device = _cuda_device(args.rank) if cuda else torch.device("cpu")
    extra: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=args.world_size, **extra
    )
    rank, n = args.rank, args.world_size

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    try:
        for op in args.ops:
            for size in args.sizes:
                cin, cout = _counts(op, size, n)
                x = torch.full((cin,), float(rank + 1), dtype=torch.float32, device=device)
                out = torch.empty(cout, dtype=torch.float32, device=device)
                if op == "all_reduce":

                    def call() -> None:
                        dist.all_reduce(x)

                    def check() -> bool:
                        x.fill_(float(rank + 1))
                        dist.all_reduce(x)
                        return bool(torch.all(x == n * (n + 1) / 2))
                elif op == "all_gather":

                    def call() -> None:
                        dist.all_gather_into_tensor(out, x)

                    def check() -> bool:
                        call()
                        return bool(torch.equal(out, torch.arange(1, n + 1, device=device).float().repeat_interleave(cin)))
                elif op == "reduce_scatter":

                    def call() -> None:
                        dist.reduce_scatter_tensor(out, x)

                    def check() -> bool:
                        call()
                        return bool(torch.all(out == n * (n + 1) / 2))
                else:

                    def call() -> None:
                        dist.broadcast(x, src=0)

                    def check() -> bool:
                        call()
                        return bool(torch.all(x == 1))
                try:
                    ok = check()
                except RuntimeError as exc:  # gloo lacks some collectives
                    if rank == 0:
                        print(_RESULT + json.dumps({"op": op, "size": size, "error": str(exc).splitlines()[0]}), flush=True)
                    continue
                if not ok:
                    raise AssertionError(f"{backend} {op} of {size} bytes gave a wrong result on rank {rank}")
                sync()
                t0 = time.perf_counter()
                for _ in range(WARMUP):
                    call()
                    sync()
                est = torch.tensor([(time.perf_counter() - t0) / WARMUP], dtype=torch.float64, device=device)
                dist.broadcast(est, src=0)
                iters = _iterations(est.item(), args.target_s)
                times = torch.empty(iters, dtype=torch.float64)
                dist.barrier()
                for i in range(iters):
                    t0 = time.perf_counter()
                    call()
                    sync()
                    times[i] = time.perf_counter() - t0
                times = times.to(device)
                dist.all_reduce(times, op=dist.ReduceOp.MAX)
                times = times.cpu()
                if rank == 0:
                    _emit(op, size, n, iters, times.tolist())
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _mpi_worker(args: argparse.Namespace) -> None:
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    for op in args.ops:
        for size in args.sizes:
            cin, cout = _counts(op, size, n)
            x = np.full(cin, rank + 1, dtype=np.float32)
            out = np.empty(cout, dtype=np.float32)
            if op == "all_reduce":

                def call() -> None:
                    if args.in_place:
                        comm.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM)
                    else:
                        comm.Allreduce(x, out, op=MPI.SUM)

                want: Any = np.full(cout, n * (n + 1) / 2, np.float32)
            elif op == "all_gather":

                def call() -> None:
                    comm.Allgather(x, out)

                want = np.repeat(np.arange(1, n + 1, dtype=np.float32), cin)
            elif op == "reduce_scatter":

                def call() -> None:
                    comm.Reduce_scatter_block(x, out, op=MPI.SUM)

                want = np.full(cout, n * (n + 1) / 2, np.float32)
            else:

                def call() -> None:
                    comm.Bcast(x, root=0)

                want = np.full(cin, 1, np.float32)
            call()
            got = x if op == "broadcast" or (op == "all_reduce" and args.in_place) else out
            if not np.array_equal(got, want):
                raise AssertionError(f"MPI {op} of {size} bytes gave a wrong result on rank {rank}")
            t0 = time.perf_counter()
            for _ in range(WARMUP):
                call()
            est = comm.bcast((time.perf_counter() - t0) / WARMUP, root=0)
            iters = _iterations(est, args.target_s)
            times = np.empty(iters)
            comm.Barrier()
            for i in range(iters):
                t0 = time.perf_counter()
                call()
                times[i] = time.perf_counter() - t0
            slowest = np.empty_like(times)
            comm.Allreduce(times, slowest, op=MPI.MAX)
            if rank == 0:
                _emit(op, size, n, iters, slowest.tolist())


def _worker_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m aiocoll.launch.bench --worker")
    p.add_argument("--worker", choices=("aiocoll", "gloo", "nccl", "mpi"), required=True)
    p.add_argument("--ops", type=lambda s: s.split(","), required=True)
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], required=True)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--transport", default="auto")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--target-s", type=float, default=1.0)
    p.add_argument("--in-place", action="store_true")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = p.parse_args(list(argv))
    if args.worker == "aiocoll":
        from ..core.loop import run

        run(_aiocoll_worker(args))
    elif args.worker in ("gloo", "nccl"):
        _gloo_worker(args, args.worker)
    else:
        _mpi_worker(args)
    return 0


# --------------------------------------------------------------------------- launching
@dataclass
class Row:
    """One measured size of one library."""

    op: str
    size: int
    count: int = 0
    iters: int = 0
    time_s: float = 0.0
    error: str = ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _env(job_id: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("AIOCOLL_SECRET", secrets.token_hex(16))
    env["AIOCOLL_JOB_ID"] = job_id
    env["GLOO_SOCKET_IFNAME"] = env.get("GLOO_SOCKET_IFNAME", "lo")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _common(args: argparse.Namespace, ops: list[str]) -> list[str]:
    return [
        "--ops", ",".join(ops), "--sizes", ",".join(map(str, args.sizes)),
        "--target-s", repr(args.target_s), "--timeout", repr(args.timeout), "--device", args.device,
        *(["--in-place"] if args.in_place else []),
    ]


def _collect(procs: list[subprocess.Popen[str]], label: str, deadline_s: float, on_row: Callable[[Row], None]) -> None:
    """Read rank 0's result lines until every process exits; stop them all on failure or time-out.

    Raises:
        RuntimeError: a process failed or the phase ran past its deadline.
    """
    errors: list[list[str]] = [[] for _ in procs]

    def drain(i: int) -> None:
        stream = procs[i].stderr
        assert stream is not None
        for line in stream:
            errors[i].append(line)
            del errors[i][:-40]

    threads = [threading.Thread(target=drain, args=(i,), daemon=True) for i in range(len(procs))]
    for t in threads:
        t.start()

    def kill_all() -> None:
        for p in procs:
            if p.poll() is None:
                # Each was started in its own session: this reaches what it started (mpirun's ranks).
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)

    stop = threading.Event()

    def watch() -> None:
        # One process failing leaves the others waiting for it (a store that never comes, a
        # collective that never completes): stop them all, as ``aiocoll run`` does.
        deadline = time.monotonic() + deadline_s
        while not stop.wait(0.05):
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes) or time.monotonic() > deadline:
                kill_all()
                return
            if all(c is not None for c in codes):
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert procs[0].stdout is not None
        for line in procs[0].stdout:
            if line.startswith(_RESULT):
                d = json.loads(line[len(_RESULT):])
                on_row(Row(d["op"], d["size"], d.get("count", 0), d.get("iters", 0), d.get("time_s", 0.0),
                           d.get("error", "")))
        codes = [p.wait() for p in procs]
    finally:
        stop.set()
        watcher.join(timeout=5)
        kill_all()
        for p in procs:
            p.wait()
        for t in threads:
            t.join(timeout=5)
    if any(codes):
        report = [f"{label}: process {i} exited with {c}:\n" + "".join(errors[i][-15:]) for i, c in enumerate(codes) if c]
        raise RuntimeError("\n".join(report))


def _spawn_ranks(args: argparse.Namespace, worker: str, ops: list[str], env: dict[str, str]) -> list[subprocess.Popen[str]]:
    port = _free_port()
    procs = []
    for r in range(args.n):
        cmd = [sys.executable, "-m", "aiocoll.launch.bench", "--worker", worker, *_common(args, ops),
               "--rank", str(r), "--world-size", str(args.n), "--port", str(port), "--transport", args.transport]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True))
    return procs


def _run_phase(args: argparse.Namespace, lib: str, ops: list[str], env: dict[str, str], on_row: Callable[[Row], None]) -> None:
    if lib == "mpi":
        cmd = [*shlex.split(args.mpirun), "-n", str(args.n), "-x", "PYTHONPATH", "-x", "AIOCOLL_JOB_ID",
               sys.executable, "-m", "aiocoll.launch.bench", "--worker", "mpi", *_common(args, ops)]
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True)]
    else:
        procs = _spawn_ranks(args, lib, ops, env)
    _collect(procs, lib, args.phase_timeout, on_row)


# --------------------------------------------------------------------------- the table
def _header(compare: list[str]) -> str:
    cols = f"{'size':>10} {'count':>10} {'type':>6} {'time_us':>11} {'algbw':>8} {'busbw':>8} {'iters':>6}"
    for lib in compare:
        cols += f" | {lib + ' us':>11} {lib[:4] + ' busbw':>10} {'x' + lib[:4]:>7}"
    return cols


def _format(row: Row, n: int, theirs: dict[str, Row | None]) -> str:
    def bw(r: Row) -> tuple[float, float]:
        alg = r.size / r.time_s / 1e9
        return alg, alg * BUSBW[r.op](n)

    if row.error:
        line = f"{human(row.size):>10} {row.count:>10} {'float':>6} {'error: ' + row.error}"
    else:
        alg, bus = bw(row)
        line = (f"{human(row.size):>10} {row.count:>10} {'float':>6} {row.time_s * 1e6:>11.1f} "
                f"{alg:>8.3f} {bus:>8.3f} {row.iters:>6}")
    for other in theirs.values():
        if other is None or other.error or row.error:
            line += f" | {'n/a':>11} {'':>10} {'':>7}"
        else:
            line += f" | {other.time_s * 1e6:>11.1f} {bw(other)[1]:>10.3f} {other.time_s / row.time_s:>7.2f}"
    return line


def _plot(path: str, n: int, results: dict[str, dict[tuple[str, int], Row]], ops: list[str]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # checked before the run (_preflight); still, never lose the table over it
        print("aiocoll bench: --plot needs matplotlib (pip install matplotlib); no plot written", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(ops), figsize=(6 * len(ops), 4.5), squeeze=False)
    for ax, op in zip(axes[0], ops):
        for lib, rows in results.items():
            pts = sorted((r.size, r.size / r.time_s / 1e9 * BUSBW[op](n)) for (o, _), r in rows.items()
                         if o == op and not r.error and r.time_s > 0)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lib)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("bytes")
        ax.set_ylabel("busbw GB/s")
        ax.set_title(f"{op}, {n} ranks")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"# plot written to {path}")


# --------------------------------------------------------------------------- before and during
def _preflight(args: argparse.Namespace, compare: list[str]) -> list[str]:
    """What this run needs and lacks, each as a sentence; checked before anything runs.

    A missing plotting library or MPI found only after minutes of measuring (as it once was)
    throws those minutes away.
    """
    missing = []
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        missing.append("--plot needs matplotlib: pip install matplotlib")
    if "gloo" in compare and importlib.util.find_spec("torch") is None:
        missing.append("--compare gloo needs torch: pip install torch")
    if "mpi" in compare:
        if importlib.util.find_spec("mpi4py") is None:
            missing.append("--compare mpi needs mpi4py: pip install mpi4py (and an MPI such as Open MPI)")
        launcher = shlex.split(args.mpirun)[:1]
        if not launcher or shutil.which(launcher[0]) is None:
            missing.append(f"--compare mpi needs {launcher[0] if launcher else 'mpirun'!r} on PATH "
                           "(install Open MPI, or name the launcher with --mpirun)")
    return missing


def _progress(lib: str, row: Row, n: int) -> None:
    """One line on stderr per measured size, as it comes (the table waits for every library)."""
    if row.error:
        what = f"error: {row.error}"
    else:
        busbw = row.size / row.time_s / 1e9 * BUSBW[row.op](n) if row.time_s > 0 else 0.0
        what = f"{row.time_s * 1e6:.1f} us, busbw {busbw:.3f} GB/s, {row.iters} iters"
    print(f"# {lib} {row.op} {human(row.size)}: {what}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aiocoll bench",
        description="Time collectives nccl-tests style (size, count, type, time_us, algbw, busbw); "
        "with --compare, the same sizes through gloo and/or MPI in the same run.",
    )
    p.add_argument("--op", default="all_reduce",
                   help=f"collective(s), comma-separated: {', '.join(OPS)} (default all_reduce)")
    p.add_argument("-n", "--nprocs", dest="n", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--transport", default="auto", help="aiocoll transport: auto, shm, tcp (default auto)")
    p.add_argument("--sizes", default=DEFAULT_SIZES,
                   help="LOW:HIGH[:FACTOR] (powers of FACTOR, default 4) or a list 4,1K,64M (default 4:256M)")
    p.add_argument("--compare", default="",
                   help="also run gloo, mpi (CPU) or nccl (--device cuda, one GPU per rank), comma-separated")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cpu: numpy arrays (default); cuda: CUDA float32 tensors, for every library")
    p.add_argument("--plot", metavar="F.png", help="write busbw against size (needs matplotlib)")
    p.add_argument("--target-s", type=float, default=1.0, help="seconds of timed calls per size (default 1)")
    p.add_argument("--in-place", action="store_true",
                   help="all_reduce into its input: aiocoll out=x, MPI_IN_PLACE (gloo always reduces in place)")
    p.add_argument("--timeout", type=float, default=300.0, help="aiocoll's collective timeout (default 300)")
    p.add_argument("--phase-timeout", type=float, default=3600.0,
                   help="seconds one library's whole run may take before it is killed (default 3600)")
    p.add_argument("--mpirun", default=DEFAULT_MPIRUN, help=f"launcher for --compare mpi (default: {DEFAULT_MPIRUN})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``aiocoll bench`` with ``argv``; return the exit code (0, 1 on failure, 2 on bad usage).

    Before measuring anything it checks what ``--plot`` and ``--compare`` need (exit code 2 and
    the install command when missing); while measuring it writes a progress line per size to
    stderr; the table goes to stdout at the end.

    Raises:
        Nothing on purpose: failures of a library's ranks are reported and give exit code 1.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--worker":
        return _worker_main(argv)
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        args.sizes = parse_sizes(args.sizes)
    except ValueError as exc:
        parser.print_usage(sys.stderr)
        print(f"aiocoll bench: {exc}", file=sys.stderr)
        return 2
    ops = [o.strip() for o in args.op.split(",") if o.strip()]
    compare = [c.strip() for c in args.compare.split(",") if c.strip()]
    # NCCL moves CUDA tensors only: with numpy arrays there is nothing to compare it on.
    known = ("gloo", "mpi", "nccl") if args.device == "cuda" else ("gloo", "mpi")
    bad = [o for o in ops if o not in OPS] + [c for c in compare if c not in known]
    if bad or args.n < 1 or not ops:
        parser.print_usage(sys.stderr)
        print(f"aiocoll bench: unknown op or comparison {bad}; ops: {', '.join(OPS)}; compare: gloo, mpi "
              "(and nccl with --device cuda)",
              file=sys.stderr)
        return 2
    missing = _preflight(args, compare)
    if missing:
        for why in missing:
            print(f"aiocoll bench: {why}", file=sys.stderr)
        return 2
    job_id = secrets.token_hex(8)
    env = _env(job_id)
    results: dict[str, dict[tuple[str, int], Row]] = {lib: {} for lib in ["aiocoll", *compare]}
    load = os.getloadavg()
    print(f"# aiocoll bench: {args.n} ranks, transport {args.transport}, float32 on {args.device}, sum; "
          f"host {platform.node()}, "
          f"{os.cpu_count()} cpus, python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, "
          f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    code = 0
    try:
        for lib in ["aiocoll", *compare]:
            print(f"# running {lib} ...", flush=True)

            def store(row: Row, lib: str = lib) -> None:
                results[lib][(row.op, row.size)] = row
                _progress(lib, row, args.n)

            try:
                _run_phase(args, lib, ops, env, store)
            except (RuntimeError, OSError) as exc:
                print(f"# {lib} failed: {exc}", flush=True)
                code = 1
    finally:
        from ..sharedmem.segment import cleanup_job

        cleanup_job(job_id)
    load = os.getloadavg()
    print(f"# load at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for op in ops:
        print(f"# op={op}" + (" sum" if op in ("all_reduce", "reduce_scatter") else "") +
              f" float32, {args.n} ranks, busbw factor {BUSBW[op](args.n):.3f}; ratio = their time / ours")
        print(_header(compare))
        for size in args.sizes:
            row = results["aiocoll"].get((op, size))
            if row is None:
                continue
            print(_format(row, args.n, {lib: results[lib].get((op, size)) for lib in compare}), flush=True)
    if args.plot:
        _plot(args.plot, args.n, results, ops)
    return code


if __name__ == "__main__":
    sys.exit(main())
