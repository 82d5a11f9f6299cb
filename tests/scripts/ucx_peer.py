"""One rank of a two-rank ucx world, for tests/transports/test_ucx_transport.py.

    python ucx_peer.py ROLE RANK RENDEZVOUS_DIR [SECONDS]

Both ranks listen, publish their address in RENDEZVOUS_DIR, connect to each other and greet each
other with an empty frame (key HELLO); the secret comes from UCX_TEST_SECRET. Every event is one
JSON line on stdout, "ready" once connected both ways. Roles:

    sink   receive; report each frame (with whether it holds the pattern ``pattern(nbytes)``) and
           each loss; once the peer is lost, close and exit 0 (exit 3 after SECONDS without a loss)
    send   send one frame of SECONDS MiB holding the pattern, report "sent", then sleep
    idle   stay connected for SECONDS, then report the CPU time this process used meanwhile
    leave  send one small frame, then return without closing anything (the interpreter must exit)
    stuck  start sending large frames that cannot complete (the test stops the peer) and small
           ones, then return without closing anything
    abandon  as stuck, but the event loop is left as it is: its tasks are never cancelled
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from aiocoll.transports import KEY_SIZE, TransportConfig
from aiocoll.transports.ucx import UcxTransport


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def pattern(nbytes: int) -> np.ndarray:
    return (np.arange(nbytes, dtype=np.uint64) % 251).astype(np.uint8)


HELLO = b"hello".ljust(KEY_SIZE, b".")


class Sink:
    def __init__(self) -> None:
        self.lost = asyncio.Event()
        self.greeted = asyncio.Event()

    def frame_buffer(self, peer: int, key: bytes, nbytes: int) -> memoryview:
        return memoryview(bytearray(nbytes))

    def frame_received(self, peer: int, key: bytes, buffer: memoryview) -> None:
        if key == HELLO:
            self.greeted.set()
            return
        intact = bool(np.array_equal(np.frombuffer(buffer, np.uint8), pattern(buffer.nbytes)))
        emit("frame", peer=peer, nbytes=buffer.nbytes, intact=intact)

    def peer_lost(self, peer: int, exc: BaseException | None) -> None:
        emit("lost", peer=peer, error=None if exc is None else str(exc))
        self.lost.set()


async def main(role: str, rank: int, rendezvous: Path, seconds: float) -> int:
    timeout = float(os.environ.get("UCX_TEST_TIMEOUT", "60"))
    config = TransportConfig(rank=rank, world_size=2, secret=os.environ["UCX_TEST_SECRET"].encode(), timeout=timeout)
    transport = UcxTransport(config)
    sink = Sink()
    address = await transport.listen(sink)
    (rendezvous / f"{rank}.tmp").write_text(address)
    (rendezvous / f"{rank}.tmp").rename(rendezvous / str(rank))
    other = rendezvous / str(1 - rank)
    while not other.exists():
        await asyncio.sleep(0.01)
    conn = await transport.connect(1 - rank, other.read_text())
    # Ready means connected both ways: the peer's hello came over its connection to us.
    await conn.send(HELLO, b"")
    await sink.greeted.wait()
    emit("ready", pid=os.getpid())
    if role == "sink":
        try:
            await asyncio.wait_for(sink.lost.wait(), seconds)
        except TimeoutError:
            emit("no-loss")
            return 3
        await asyncio.sleep(0.2)  # time for a duplicate report or a late frame to show up
        await transport.aclose()
        emit("closed")
    elif role == "send":
        payload = pattern(int(seconds * (1 << 20)))
        await conn.send(b"s".ljust(KEY_SIZE, b"."), payload)
        emit("sent")
        await asyncio.sleep(3600)
    elif role == "idle":
        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        emit("idle", cpu_s=time.process_time() - cpu, wall_s=time.monotonic() - wall)
        await transport.aclose()
    elif role == "leave":
        await conn.send(b"l".ljust(KEY_SIZE, b"."), pattern(1000))
        emit("leaving")
    elif role in ("stuck", "abandon"):
        for i in range(4):
            asyncio.get_running_loop().create_task(conn.send(b"b".ljust(KEY_SIZE, b"."), pattern(4 << 20)))
        for i in range(2000):
            asyncio.get_running_loop().create_task(conn.send(b"e".ljust(KEY_SIZE, b"."), pattern(4000)))
        await asyncio.sleep(0.5)
        emit("leaving")
    return 0


if __name__ == "__main__":
    args = (sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) > 4 else 30.0)
    if args[0] == "abandon":
        # Leave the loop with its tasks still pending and never close it: nothing is cancelled
        # or closed, the interpreter just exits.
        loop = asyncio.new_event_loop()
        sys.exit(loop.run_until_complete(main(*args)))
    sys.exit(asyncio.run(main(*args)))
