"""No pickle from the network, and frames that say what they are.

Tensor collectives carry raw buffers behind a fixed 32-byte key; object collectives use the
safe codec, and pickle only between ranks that all opted in. Every data frame names its group,
sequence number, step, collective, reduce op, dtype and element count, which is what makes a
mismatch cheap to see.
"""

from __future__ import annotations

import ast
import importlib
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

import aiocoll
from aiocoll.core.comm import Communicator
from aiocoll.arrays.dtypes import WireDtype
from aiocoll.collectives.objects import _broadcast_payload_start
from aiocoll.arrays.ops import ReduceOp
from aiocoll.core.wire import FLAG_CONTROL, FrameKey, Kind
from aiocoll.testing import run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _reliability_ops import OPS, groups  # noqa: E402

PACKAGE = Path(aiocoll.__file__).resolve().parent
TRANSPORTS = Path(importlib.import_module("aiocoll.transports").__file__).resolve().parent


def _forbidden(*_args, **_kwargs):
    raise AssertionError("something unpickled data during a collective")


@pytest.mark.parametrize("transport", ["tcp", "shm"])
async def test_no_collective_unpickles_anything(transport, monkeypatch):
    monkeypatch.setattr(pickle, "loads", _forbidden)
    monkeypatch.setattr(pickle, "load", _forbidden)
    monkeypatch.setattr(pickle, "Unpickler", _forbidden)

    async def body(rank):
        gs = groups(3)
        for name, (call, check) in OPS.items():
            wrong = check(await call(gs[name], rank, 3), rank, 3)
            assert wrong is None, f"{name}: {wrong}"
        return "ok"

    assert await run_ranks(body, 3, transport=transport, secret="wire-test", timeout=20) == ["ok"] * 3


def test_the_only_unpickling_in_the_package_is_the_opt_in_one():
    """Static check over every module of aiocoll and its transports: no pickle.load(s),
    Unpickler, marshal.loads, eval or exec, except _objects._loads behind allow_pickle."""
    hits = []
    for path in sorted([*PACKAGE.rglob("*.py"), *TRANSPORTS.rglob("*.py")]):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f"{getattr(f.value, 'id', '?')}.{f.attr}" if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("pickle.loads", "pickle.load", "pickle.Unpickler", "marshal.loads", "marshal.load",
                        "eval", "exec", "dill.loads", "cloudpickle.loads"):
                hits.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {name}")
    assert [h for h in hits if not h.startswith("aiocoll/collectives/objects.py")] == [], hits
    assert len(hits) == 1, hits
    src = (PACKAGE / "collectives" / "objects.py").read_text()
    assert "if not allow_pickle:" in src and "refusing to unpickle" in src


async def test_pickled_bytes_are_refused_by_a_rank_that_did_not_opt_in(tmp_path):
    """Rank 0 opts in and sends a pickle that would create a file when loaded; rank 1 did not
    opt in: it refuses (ValueError) and the file never appears."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    async def body(rank):
        if rank == 0:
            # broadcast_object's collective with b"P" + pickle as its payload, without the
            # decoding, so that this rank, sharing the test's process, does not load it itself
            raw = np.frombuffer(b"P" + pickle.dumps(Exploit()), np.uint8)
            await _broadcast_payload_start(aiocoll.world(), 0, raw, 10.0)
            return "sent"
        with pytest.raises(ValueError, match="allow_pickle is False"):
            await aiocoll.broadcast_object(None, 0)
        return "refused"

    results = await run_ranks(body, 2, return_exceptions=True)
    assert results == ["sent", "refused"], results
    assert not marker.exists()


async def test_every_data_frame_names_group_step_collective_op_dtype_and_count(monkeypatch):
    seen: list[tuple[int, FrameKey]] = []
    real = Communicator.frame_received

    def spy(self, peer, key, buffer):
        k = FrameKey.unpack(key)
        if not k.flags & FLAG_CONTROL:
            seen.append((self.rank, k))
        return real(self, peer, key, buffer)

    monkeypatch.setattr(Communicator, "frame_received", spy)
    gids = {}

    async def body(rank):
        g = aiocoll.new_group([0, 1, 2], tag="frames")
        gids[rank] = g.gid
        await aiocoll.all_reduce(np.ones(1000, np.float64), "max", g)  # seq 0
        await aiocoll.all_gather(np.ones(7, np.int16), g)  # seq 1
        return "ok"

    assert await run_ranks(body, 3) == ["ok"] * 3
    gid = gids[0]
    assert set(gids.values()) == {gid}
    by_seq = {}
    for _, k in seen:
        if k.gid == gid:  # (destroy's barrier runs on the world)
            by_seq.setdefault(k.seq, []).append(k)
    assert sorted(by_seq) == [0, 1]
    for k in by_seq[0]:
        assert (k.kind, k.op, k.dtype, k.count) == (Kind.ALL_REDUCE, ReduceOp.MAX, WireDtype.FLOAT64, 1000), k
    for k in by_seq[1]:
        assert (k.kind, k.dtype, k.count) == (Kind.ALL_GATHER, WireDtype.INT16, 7), k
    steps = sorted(k.step for k in by_seq[0])
    assert steps and steps[0] == 0
