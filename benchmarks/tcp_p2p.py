"""Point to point over TCP: aiocoll's send/recv against a raw blocking socket, in the same run.

    python benchmarks/tcp_p2p.py [--sizes 1M,64M] [--iters 10] [--reps 5]

Two processes on this host (this one starts both). For each size, first a raw blocking socket
pair (``sendall`` on one side, ``recv_into`` a preallocated numpy buffer on the other: the
fastest a Python program moves bytes through one TCP connection), then ``aiocoll.send`` /
``aiocoll.recv(buf, out=buf)`` over the tcp transport. Each measured message is followed by a 1-byte
(raw) or 1-element (aiocoll) answer, so the sender's clock covers the whole delivery; the
1-byte round trip is measured first and printed. Time per size = median of ``--reps`` runs of
``--iters`` messages, the answer's round trip included (not subtracted: under load aiocoll's
small round trip varies by more than a 1 MiB transfer takes); GB/s = size / time (1 GB = 1e9 B).
The receiver checks every payload's
first and last element. Prints one line per size and ``aiocoll / raw`` (the issue's target is
at least 0.8 at 64 MiB).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B")
    return int(t[:-1]) * UNITS[t[-1]] if t[-1] in UNITS else int(t)


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


def raw(rank: int, port: int, sizes: list[int], iters: int, reps: int) -> dict[int, float]:
    """Per size, the median time of one message through a blocking socket (rank 0's clock)."""
    if rank == 1:
        lsock = socket.create_server(("127.0.0.1", port))
        sock, _ = lsock.accept()
        lsock.close()
    else:
        for _ in range(500):
            try:
                sock = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                time.sleep(0.01)
        else:
            raise ConnectionError("no raw listener")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    one = bytearray(1)
    result: dict[int, float] = {}
    with sock:
        for size in sizes:
            buf = np.full(size, rank + 1, dtype=np.uint8)
            view = memoryview(buf).cast("B")
            runs = []
            for rep in range(reps + 1):  # the first is a warm-up
                t0 = time.perf_counter()
                for _ in range(iters):
                    if rank == 0:
                        sock.sendall(view)
                        _recv_exact(sock, memoryview(one))
                    else:
                        _recv_exact(sock, view)
                        if buf[0] != 1 or buf[-1] != 1:
                            raise AssertionError("raw payload corrupted")
                        sock.sendall(one)
                if rep:
                    runs.append((time.perf_counter() - t0) / iters)
            result[size] = statistics.median(runs)
    return result


async def with_aiocoll(rank: int, store: str, sizes: list[int], iters: int, reps: int) -> dict[int, float]:
    import aiocoll

    await aiocoll.init(rank=rank, world_size=2, store=store, transport="tcp", timeout=120)
    result: dict[int, float] = {}
    try:
        one = np.zeros(1, dtype=np.uint8)
        for size in sizes:
            buf = np.full(size, rank + 1, dtype=np.uint8)
            runs = []
            for rep in range(reps + 1):
                await aiocoll.barrier()
                t0 = time.perf_counter()
                for _ in range(iters):
                    if rank == 0:
                        await aiocoll.send(buf, 1)
                        await aiocoll.recv(one, 1, out=one)
                    else:
                        await aiocoll.recv(buf, 0, out=buf)
                        if buf[0] != 1 or buf[-1] != 1:
                            raise AssertionError("aiocoll payload corrupted")
                        await aiocoll.send(one, 0)
                if rep:
                    runs.append((time.perf_counter() - t0) / iters)
            result[size] = statistics.median(runs)
    finally:
        await aiocoll.destroy()
    return result


def worker(args: argparse.Namespace) -> None:
    sizes = [1, *args.sizes]  # 1 B first: the small round trip, printed for reference
    r = raw(args.rank, args.raw_port, sizes, args.iters, args.reps)
    from aiocoll.core.loop import run

    a: dict[int, Any] = run(with_aiocoll(args.rank, f"tcp://127.0.0.1:{args.store_port}", sizes, args.iters, args.reps))
    if args.rank != 0:
        return
    print(f"# tcp point to point, 2 processes, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}; "
          f"1 B round trip: raw {r[1] * 1e6:.1f} us, aiocoll {a[1] * 1e6:.1f} us")
    print(f"{'size':>10} {'raw us':>10} {'raw GB/s':>9} {'aiocoll us':>11} {'aiocoll GB/s':>12} {'aiocoll/raw':>11}")
    for size in args.sizes:
        tr, ta = r[size], a[size]
        label = next((f"{size // m}{u}" for u, m in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10))
                      if size >= m and size % m == 0), str(size))
        print(f"{label:>10} {tr * 1e6:>10.1f} {size / tr / 1e9:>9.3f} {ta * 1e6:>11.1f} {size / ta / 1e9:>12.3f} "
              f"{tr / ta:>11.2f}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1M,16M,64M", type=lambda s: [parse_size(v) for v in s.split(",")])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--raw-port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--store-port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank >= 0:
        worker(args)
        return 0
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    env = dict(os.environ)
    env.setdefault("AIOCOLL_SECRET", os.urandom(16).hex())
    sizes = ",".join(map(str, args.sizes))
    procs = [
        subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--raw-port", str(ports[0]),
                          "--store-port", str(ports[1]), "--sizes", sizes, "--iters", str(args.iters),
                          "--reps", str(args.reps)], env=env)
        for r in range(2)
    ]
    codes = [proc.wait() for proc in procs]
    return max(abs(c) for c in codes)


if __name__ == "__main__":
    sys.exit(main())
