"""Three "hosts": ranks in three network namespaces joined by veth pairs to a bridge (in a
fourth namespace, the switch), all-reducing over TCP. Then rank 1's link is degraded (tc netem
delay and loss where the kernel has netem; otherwise a token-bucket filter with a tiny queue,
which delays and tail-drops real packets) and results must stay exact; then rank 2's link is
cut at the switch (no reset reaches anyone: only the timeout can tell), and every rank must fail
the collective naming the other side of the cut.

Needs root and ``ip netns`` (CI runs as root); skipped with the reason otherwise. Addresses are
10.213.7.0/24 inside the test's own namespaces only: nothing touches the host's interfaces,
routes or namespaces, and every namespace is deleted (with its veths) even when the test fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
from _reliability_harness import Job  # noqa: E402

pytestmark = pytest.mark.netns

PREFIX = "aiocoll-rel-"
SUBNET = "10.213.7"
CUT_TIMEOUT = 3.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def _why_no_netns() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root for `ip netns` (the CI job runs it as root)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (`ip` and `tc`)"
    probe = f"{PREFIX}probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _sweep_stale() -> None:
    """Namespaces of earlier runs of this test whose process is gone (a SIGKILLed pytest)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(re.escape(PREFIX) + r"(\d+)-\w+", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _ip("netns", "del", name, check=False)


class Fabric:
    """A switch namespace with a bridge, and one namespace per rank with a veth to the switch."""

    def __init__(self, n: int) -> None:
        tag = f"{PREFIX}{os.getpid()}"
        self.switch = f"{tag}-sw"
        self.hosts = [f"{tag}-r{i}" for i in range(n)]
        self.addrs = [f"{SUBNET}.{i + 1}" for i in range(n)]
        self.made: list[str] = []

    def up(self) -> None:
        for ns in [self.switch, *self.hosts]:
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, (ns, addr) in enumerate(zip(self.hosts, self.addrs)):
            # made inside the switch namespace, the far end moved straight into the host's
            _ip("-n", self.switch, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        for ns in self.hosts[1:]:  # the bridge learns and forwards: every host reaches rank 0
            ping = subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "2", self.addrs[0]],
                                  capture_output=True, text=True, timeout=10)
            if ping.returncode != 0 and shutil.which("ping"):
                raise AssertionError(f"{ns} cannot reach {self.addrs[0]}: {ping.stdout} {ping.stderr}")

    def down(self) -> None:
        for ns in reversed(self.made):  # deleting a namespace deletes the veth ends inside it
            _ip("netns", "del", ns, check=False)
        self.made.clear()

    def tc(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", ns, "tc", *args], capture_output=True, text=True,
                              timeout=20, check=check)

    def degrade(self, host: int) -> str:
        """Slow and lossy link for ``host``, both directions; returns what was applied."""
        ends = [(self.hosts[host], "eth0"), (self.switch, f"p{host}")]
        netem = self.tc(ends[0][0], "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "20ms", "5ms",
                        "loss", "3%", check=False)
        if netem.returncode == 0:
            self.tc(ends[1][0], "qdisc", "add", "dev", ends[1][1], "root", "netem", "delay", "20ms", "5ms", "loss", "3%")
            return "netem delay 20ms±5ms loss 3%"
        # No netem in this kernel: a token bucket at 40 Mbit/s with a 30 KB queue; bursts above it
        # are dropped, so TCP meets real loss and retransmits. Segmentation offload must be off:
        # a 64 KB GSO packet is larger than the bucket and would be dropped every time (a stall,
        # not a lossy link).
        for ns, dev in ends:
            _ip("-n", ns, "link", "set", "dev", dev, "gso_max_size", "1500", check=False)
            self.tc(ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", "40mbit", "burst", "16kb", "limit", "30kb")
        return f"tbf 40mbit burst 16kb limit 30kb (netem unavailable: {netem.stderr.strip()})"

    def drops(self, host: int) -> int:
        total = 0
        for ns, dev in [(self.hosts[host], "eth0"), (self.switch, f"p{host}")]:
            out = self.tc(ns, "-s", "qdisc", "show", "dev", dev).stdout
            total += sum(int(n) for n in re.findall(r"dropped (\d+)", out))
        return total

    def cut(self, host: int) -> None:
        _ip("-n", self.switch, "link", "set", f"p{host}", "down")


@pytest.fixture
def fabric():
    why = _why_no_netns()
    if why:
        pytest.skip(why)
    _sweep_stale()
    f = Fabric(3)
    try:
        f.up()
        yield f
    finally:
        f.down()
        left = [line for line in _ip("netns", "list", check=False).stdout.splitlines() if f.switch[:-3] in line]
        assert not left, f"namespaces left behind: {left}"


def test_all_reduce_across_namespaces_survives_delay_and_loss_and_names_the_cut_peer(fabric):
    sync = tempfile.mkdtemp(prefix="aiocoll-netns-")
    prefixes = [["ip", "netns", "exec", ns] for ns in fabric.hosts]
    try:
        with Job(3, "reliability_netns.py", sync, transport="tcp", timeout=30, prefixes=prefixes,
                 addrs=fabric.addrs, master=fabric.addrs[0], CUT_TIMEOUT=str(CUT_TIMEOUT)) as job:
            clean = [r.wait_for("CLEAN", 60) for r in job.ranks]
            applied = fabric.degrade(1)
            Path(sync, "degraded").touch()
            degraded = [r.wait_for("DEGRADED", 120) for r in job.ranks]
            assert all(d["rounds"] == 15 for d in degraded), degraded
            dropped = fabric.drops(1)
            if applied.startswith("tbf"):
                assert dropped > 0, "the degraded link dropped nothing: the loss was not exercised"
            for r in job.ranks:
                r.wait_for("READY_TO_CUT", 30)
            Path(sync, "cut").touch()
            time.sleep(0.3)  # collectives run fine on the intact fabric...
            cut_at = time.time()
            fabric.cut(2)  # ...until rank 2's cable is pulled at the switch
            results = [r.wait_for("RESULT", CUT_TIMEOUT + 15) for r in job.ranks]
            codes = job.finish(30)
            assert codes == [0, 0, 0], job.output()
    finally:
        shutil.rmtree(sync, ignore_errors=True)
    for rank, res in enumerate(results):
        assert res["type"] in ("CollectiveTimeoutError", "RemoteAbortError", "PeerFailureError"), res
        detect = res["t"] - cut_at
        assert detect < CUT_TIMEOUT + 1.5, f"rank {rank} took {detect:.2f} s to fail"
        if rank in (0, 1):
            assert res["ranks"] == [2], f"rank {rank} named {res['ranks']}: {res['msg']}"
        else:
            assert res["ranks"] and set(res["ranks"]) <= {0, 1}, res
    log = os.environ.get("AIOCOLL_RELIABILITY_LOG")
    if log:
        with open(log, "a") as f:
            for rank, res in enumerate(results):
                f.write(json.dumps(dict(res, scenario="link cut (netns)", transport="tcp", size=3, victim=2,
                                        detect=res["t"] - cut_at, degraded=applied, drops=dropped,
                                        clean_s=clean[rank]["seconds"], degraded_s=degraded[rank]["seconds"])) + "\n")
