"""``aiocoll.init()`` under torchrun with no variable of ours: on one host, and on two "hosts"
(network and UTS namespaces joined by a veth pair), where the ranks of a host meet over shared
memory and the hosts over TCP on the interface that routes between them.

The two-host test needs root, ``ip netns`` and ``unshare`` (CI runs as root); it is skipped
with the reason elsewhere. Its namespaces use 10.213.9.0/24 only and are deleted even when the
test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.launch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "launch_allreduce.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"
PREFIX = "aiocoll-trun-"
SUBNET = "10.213.9"


def _clean_env() -> dict[str, str]:
    """The caller's environment without anything that would tell aiocoll where to meet."""
    drop = ("AIOCOLL_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_", "TORCHELASTIC_", "SLURM_", "OMPI_", "PMI")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _expected(seed: int, size: int) -> np.ndarray:
    return sum(np.random.default_rng([seed, r]).standard_normal(1000) for r in range(size))


def _results(out: Path) -> list[dict]:
    # One file per rank: ranks sharing a pipe may interleave their long lines.
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


@pytest.fixture
def seed() -> int:
    return int(np.random.default_rng().integers(1 << 30))


def test_init_under_torchrun_on_one_host_needs_no_variable_of_ours(seed: int, tmp_path: Path) -> None:
    if not TORCHRUN.exists():
        pytest.skip(f"torchrun is not installed next to {sys.executable} (pip install torch)")
    proc = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(SCRIPT), str(seed), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=240, env=_clean_env(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = _results(tmp_path)
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        np.testing.assert_allclose(r["sum"], _expected(seed, 2))
        assert r["store"] == "C10dStore"  # torch's own store, not ours on its port


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def _why_no_hosts() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root for `ip netns` (the CI job runs it as root)"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "needs iproute2 (`ip`) and util-linux (`unshare`)"
    if not TORCHRUN.exists():
        return f"torchrun is not installed next to {sys.executable} (pip install torch)"
    probe = f"{PREFIX}probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@pytest.fixture
def two_hosts():
    why = _why_no_hosts()
    if why:
        pytest.skip(why)
    tag = f"{PREFIX}{os.getpid()}"
    hosts = [f"{tag}-a", f"{tag}-b"]
    made: list[str] = []
    try:
        for ns in hosts:
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", hosts[0], "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", hosts[1])
        for i, ns in enumerate(hosts):
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        yield hosts
    finally:
        for ns in made:
            _ip("netns", "del", ns, check=False)


@pytest.mark.netns
def test_init_under_torchrun_on_two_hosts_meets_over_the_routed_interface(two_hosts: list[str], seed: int) -> None:
    port = 29500  # a fresh namespace: nothing listens there
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        for node, ns in enumerate(two_hosts):
            # Its own hostname too: ranks of one "host" share memory, the hosts do not.
            command = (
                f"hostname node{node} && exec {TORCHRUN} --nnodes 2 --node-rank {node} --nproc-per-node 2 "
                f"--master-addr {SUBNET}.1 --master-port {port} {SCRIPT} {seed} --out {tmp}"
            )
            out = open(Path(tmp) / f"node{node}.out", "w+")
            procs.append((subprocess.Popen(
                ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c", command],
                stdout=out, stderr=subprocess.STDOUT, text=True, env=_clean_env(), start_new_session=True,
            ), out))
        try:
            for proc, _ in procs:
                proc.wait(timeout=240)
        finally:
            for proc, _ in procs:
                if proc.poll() is None:  # torchrun and its workers: the whole session
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        outputs = []
        for proc, out in procs:
            out.seek(0)
            outputs.append(out.read())
            out.close()
        for (proc, _), text in zip(procs, outputs):
            assert proc.returncode == 0, text[-4000:]
        results = _results(Path(tmp))
    assert sorted(r["rank"] for r in results) == [0, 1, 2, 3]
    for r in results:
        np.testing.assert_allclose(r["sum"], _expected(seed, 4))
        node = r["rank"] // 2
        # Listening on the interface that routes to the store's host, not on 127.0.0.1.
        assert r["tcp"] and all(a.startswith(f"tcp://{SUBNET}.{node + 1}:") for a in r["tcp"]), r
        peers = r["transports"]
        for peer, name in peers.items():
            assert name == ("shm" if int(peer) // 2 == node else "tcp"), r
