"""One-way latency and bandwidth of a transport between two processes of this host.

    python benchmarks/transport_pingpong.py [--transports tcp,shm,ucx] [--sizes 8,64M] [--reps 5]
    python benchmarks/transport_pingpong.py --transports ucx --device cuda   # torch CUDA tensors

Rank 0 (this process) and rank 1 (a child it starts) each run one transport and connect both
ways. For each size, rank 0 sends a frame and rank 1 answers with an 8-byte frame as soon as it
has the whole payload; the 8-byte ping-pong measured first gives the one-way latency of a small
frame (half its round trip), and a large frame's one-way time is its round trip less that. Every
received payload is checked against the pattern sent. Prints one line per transport and size,
the median of ``--reps`` runs of ``--iters`` round trips each. With ``--device cuda`` (transports
with cuda_memory only) every payload, acknowledgements included, is a CUDA tensor sent from and
received into device memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from aiocoll.transports import KEY_SIZE, TransportConfig, get_transport

SECRET = os.environ.setdefault("PINGPONG_SECRET", os.urandom(16).hex()).encode()  # the child inherits it
STOP = (1 << 64) - 1


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def pattern(size: int) -> np.ndarray:
    return (np.arange(size, dtype=np.uint64) % 251).astype(np.uint8)


class Memory:
    """Host memory (numpy), or CUDA memory (torch) with ``device="cuda"``."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        if self.cuda:
            import torch

            self.torch = torch

    def alloc(self, nbytes: int) -> Any:
        if self.cuda:
            return self.torch.zeros(nbytes, dtype=self.torch.uint8, device="cuda")
        return memoryview(bytearray(nbytes))  # FrameSink.frame_buffer returns a memoryview

    def pattern(self, nbytes: int) -> Any:
        data = pattern(nbytes)
        if not self.cuda:
            return data
        out = self.torch.from_numpy(data).to("cuda")
        self.torch.cuda.synchronize()  # a transport takes device memory as ready
        return out

    def to_host(self, buffer: Any) -> np.ndarray:
        return buffer.cpu().numpy() if self.cuda else np.frombuffer(buffer, np.uint8)


def key(n: int) -> bytes:
    return n.to_bytes(8, "little").ljust(KEY_SIZE, b"\0")


class Sink:
    """Receives every frame into one preallocated buffer per size; wakes whoever waits."""

    def __init__(self, memory: Memory) -> None:
        self.memory = memory
        self.buffers: dict[int, Any] = {}
        self.arrived: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self.lost: list[tuple[int, BaseException | None]] = []

    def frame_buffer(self, peer: int, k: bytes, nbytes: int) -> Any:
        if nbytes not in self.buffers:
            self.buffers[nbytes] = self.memory.alloc(nbytes)
        return self.buffers[nbytes]

    frame_device_buffer = frame_buffer  # with --device cuda, what it returns is device memory

    def frame_received(self, peer: int, k: bytes, buffer: Any) -> None:
        self.arrived.put_nowait((int.from_bytes(k[:8], "little"), buffer))

    def peer_lost(self, peer: int, exc: BaseException | None) -> None:
        self.lost.append((peer, exc))


async def start(name: str, rank: int, rendezvous: Path, memory: Memory) -> tuple[Any, Any, Sink]:
    transport = get_transport(name)(TransportConfig(rank=rank, world_size=2, secret=SECRET, timeout=60.0))
    sink = Sink(memory)
    address = await transport.listen(sink)
    mine, scratch = rendezvous / f"{name}.{rank}", rendezvous / f"{name}.{rank}.tmp"
    scratch.write_text(address)
    scratch.rename(mine)  # the other side never reads half an address
    other = rendezvous / f"{name}.{1 - rank}"
    while not other.exists():
        await asyncio.sleep(0.01)
    conn = await transport.connect(1 - rank, other.read_text())
    return transport, conn, sink


async def peer(name: str, rendezvous: Path, memory: Memory) -> None:
    transport, conn, sink = await start(name, 1, rendezvous, memory)
    ack = memory.pattern(8)
    checked: set[int] = set()
    while True:
        n, buffer = await sink.arrived.get()
        if n == STOP:
            break
        got = memory.to_host(buffer) if len(buffer) not in checked else None
        if got is not None:  # the first frame of each size is a warm-up, not timed
            checked.add(got.size)
            if not np.array_equal(got, pattern(got.size)):
                raise SystemExit(f"{name}: a frame of {got.size} bytes arrived corrupted")
        await conn.send(key(n), ack)
    await transport.aclose()


async def measure(
    name: str, sizes: list[int], reps: int, iters: int, rendezvous: Path, memory: Memory
) -> list[dict[str, Any]]:
    transport, conn, sink = await start(name, 0, rendezvous, memory)
    rows = []
    small = None
    seq = 0
    for size in sizes:
        payload = memory.pattern(size)
        n_iter = iters if size <= (1 << 20) else max(2, iters // 50)
        times = []
        for _ in range(reps + 1):  # the first is warm-up
            t0 = time.perf_counter()
            for _ in range(n_iter):
                seq += 1
                await conn.send(key(seq), payload)
                n, _ = await sink.arrived.get()
                assert n == seq
            times.append((time.perf_counter() - t0) / n_iter)
        rtt = statistics.median(times[1:])
        one_way = rtt / 2 if small is None else rtt - small
        if small is None:
            small = one_way
        rows.append({"transport": name, "device": "cuda" if memory.cuda else "cpu", "bytes": size,
                     "one_way_us": one_way * 1e6, "GBps": size / one_way / 1e9 if size >= (1 << 20) else None,
                     "iters": n_iter, "reps": reps})
    await conn.send(key(STOP), b"")
    await transport.aclose()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transports", default="tcp,shm,ucx")
    parser.add_argument("--sizes", default="8,64M")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    parser.add_argument("--rendezvous", help=argparse.SUPPRESS)
    args = parser.parse_args()
    memory = Memory(args.device)
    if args.peer:
        asyncio.run(peer(args.peer, Path(args.rendezvous), memory))
        return
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    if sizes[0] != 8:
        sizes.insert(0, 8)  # the small ping-pong is what large frames are measured against
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} host {os.uname().nodename} cores {os.cpu_count()} "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    for name in args.transports.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            child = subprocess.Popen([sys.executable, __file__, "--peer", name, "--rendezvous", tmp,
                                      "--device", args.device])
            try:
                rows = asyncio.run(measure(name, sizes, args.reps, args.iters, Path(tmp), memory))
            finally:
                try:
                    child.wait(30)
                except subprocess.TimeoutExpired:
                    child.kill()
        for row in rows:
            bw = f"{row['GBps']:8.2f} GB/s" if row["GBps"] is not None else ""
            print(f"{name:4} {args.device:4} {row['bytes']:>11} B  one-way {row['one_way_us']:10.1f} us  {bw}", flush=True)
            print("RESULT " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
