"""No unauthenticated peers: a world of several ranks starts only with a shared secret.

The secret is ``AIOCOLL_SECRET`` / ``init(secret=)``, the one ``aiocoll run`` makes per job, or
the one the torch backend shares through torch's store. Without any of these ``init`` refuses
before anything listens, unless the caller opts in (``insecure=True`` / ``AIOCOLL_INSECURE=1``,
logged as a warning). The attack this closes: ranks started with torchrun's variables and no
secret used to serve an open store holding a generated connection secret; an outsider read it,
joined as rank 1 and changed every result.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import aiocoll
from aiocoll.core.errors import StoreError
from aiocoll.store.base import MemoryStore
from aiocoll.store.tcp import TcpStoreClient
from aiocoll.core.world import in_harness
from aiocoll.testing import run_ranks

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process tests run on Linux")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _plain_env(**extra: str) -> dict[str, str]:
    """This process's environment without any AIOCOLL_ setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOCOLL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPTS), env.get("PYTHONPATH")]))
    return {**env, **extra}


@pytest.fixture
def no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AIOCOLL_SECRET", "AIOCOLL_INSECURE", "AIOCOLL_STORE", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------- refusal
@pytest.mark.parametrize("transport", ["tcp", "shm", "auto"])
async def test_init_without_a_secret_refuses_before_anything_listens(transport, no_secret):
    port = _free_port()
    with pytest.raises(ValueError, match="no shared secret") as info:
        await aiocoll.init(rank=0, world_size=2, store=f"tcp://127.0.0.1:{port}", transport=transport, timeout=3)
    message = str(info.value)
    for hint in ("AIOCOLL_SECRET", "aiocoll run", "init_process_group", "insecure=True", "AIOCOLL_INSECURE=1"):
        assert hint in message
    assert not _listening(port), "the store was served although init refused"
    with pytest.raises(aiocoll.NotInitializedError):
        aiocoll.world()


async def test_init_without_a_secret_refuses_with_a_file_store_but_not_where_nothing_listens(no_secret, tmp_path):
    with pytest.raises(ValueError, match="no shared secret"):
        await aiocoll.init(rank=1, world_size=2, store=f"file://{tmp_path}", transport="tcp", timeout=3)
    assert list(tmp_path.iterdir()) == []  # nothing published
    # Worlds that open nothing to other processes need no secret: a world of one, and ranks of
    # one process on inproc meeting through an in-process store.
    async with aiocoll.init(rank=0, world_size=1) as world:
        assert world.size == 1
    store = MemoryStore()

    async def rank(r: int) -> list[float]:
        in_harness.set(True)
        async with aiocoll.init(rank=r, world_size=2, store=store, transport="inproc", timeout=5):
            return (await aiocoll.all_reduce(np.ones(2))).tolist()

    assert await asyncio.gather(rank(0), rank(1)) == [[2.0, 2.0]] * 2


async def test_a_bad_aiocoll_insecure_value_is_an_error(no_secret, monkeypatch):
    monkeypatch.setenv("AIOCOLL_INSECURE", "maybe")
    with pytest.raises(ValueError, match="AIOCOLL_INSECURE"):
        await aiocoll.init(rank=0, world_size=2, store=f"tcp://127.0.0.1:{_free_port()}", transport="tcp", timeout=3)


# --------------------------------------------------------------------------- opting in
async def test_insecure_true_starts_without_a_secret_and_warns_on_every_rank(no_secret, caplog):
    async def body(rank: int) -> list[float]:
        return (await aiocoll.all_reduce(np.full(3, rank + 1.0))).tolist()

    with caplog.at_level(logging.WARNING, logger="aiocoll"):
        assert await run_ranks(body, 2, transport="tcp", insecure=True, timeout=10) == [[3.0] * 3] * 2
    warnings = [r.getMessage() for r in caplog.records if "INSECURE" in r.getMessage()]
    assert len(warnings) == 2 and all("can join" in w for w in warnings), warnings


def test_aiocoll_insecure_1_starts_ranks_launched_without_a_secret_and_warns():
    port = _free_port()
    script = textwrap.dedent(
        """
        import asyncio, numpy as np, aiocoll
        async def main():
            async with aiocoll.init(transport="tcp", timeout=30) as w:
                y = await aiocoll.all_reduce(np.full(2, w.rank + 1.0))
                print(f"rank {w.rank} sum {y.tolist()}", flush=True)
        asyncio.run(main())
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=_plain_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           AIOCOLL_INSECURE="1"),
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out + err
        assert f"rank {r} sum [3.0, 3.0]" in out
        assert "INSECURE" in err and "can join" in err, err


# --------------------------------------------------------------------------- launchers
def test_the_torch_backend_shares_a_secret_through_torchs_store_without_opting_in(tmp_path):
    pytest.importorskip("torch", reason="the torch extra is in [test]; CI installs it")
    script = tmp_path / "torch_rounds.py"
    script.write_text(
        textwrap.dedent(
            """
            import warnings, torch, torch.distributed as dist
            import aiocoll.torch  # noqa: F401  (registers the backend)
            warnings.simplefilter("ignore", FutureWarning)
            for i in range(3):
                dist.init_process_group("aiocoll")
                t = torch.full((2,), float(dist.get_rank() + i)); dist.all_reduce(t)
                w = dist.get_world_size()
                assert t.tolist() == [float(sum(range(w)) + w * i)] * 2, t
                print(f"rank {dist.get_rank()} round {i} ok", flush=True)
                dist.destroy_process_group()
            """
        )
    )
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun comes with torch (in [test]); CI has it")
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", str(script)],
        capture_output=True, text=True, timeout=240, env=_plain_env(AIOCOLL_TRANSPORT="tcp"), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in range(2):
        assert f"rank {r} round 2 ok" in proc.stdout, proc.stdout
    assert "INSECURE" not in proc.stderr and "no shared secret" not in proc.stderr


# --------------------------------------------------------------------------- the attack
async def test_an_outsider_cannot_read_a_secret_from_the_store_and_join(tmp_path):
    """Rank 0 of a 2-rank job is started with torchrun's variables and no secret; an outsider
    who can reach MASTER_PORT tries what worked before: read the connection secret from the
    open store, join as rank 1, and feed rank 0 wrong numbers."""
    port = _free_port()
    stop = tmp_path / "stop"
    victim = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPTS / "reliability_auth.py"), str(stop),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=_plain_env(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       AIOCOLL_TRANSPORT="tcp", AIOCOLL_TIMEOUT="20"),
    )
    try:
        async with asyncio.timeout(60):
            while victim.returncode is None and not _listening(port):
                await asyncio.sleep(0.05)
        try:
            client = await TcpStoreClient.connect("127.0.0.1", port, secret=b"", timeout=5)
        except StoreError:
            client = None  # nothing to connect to: rank 0 refused to start
        if client is not None:
            # What the attack did: read the connection secret, join as rank 1 through the open
            # store with it, and hand rank 0 wrong numbers.
            stolen = await client.get("aiocoll/secret", timeout=5)
            async with aiocoll.init(rank=1, world_size=2, store=client, transport="tcp", secret=stolen, timeout=10):
                await aiocoll.all_reduce(np.array([0], np.int64), "max")
                await aiocoll.all_reduce(np.full(1000, 10**6, np.int64))
            pytest.fail("an outsider read the connection secret from the store and joined as rank 1")
        async with asyncio.timeout(60):
            out, err = await victim.communicate()
    finally:
        stop.touch()
        if victim.returncode is None:
            victim.kill()
            await victim.wait()
    assert victim.returncode != 0
    assert b"no shared secret" in err, err[-2000:]
    assert b"ADDR" not in out  # it never started
