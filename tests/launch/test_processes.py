"""Real processes through `aiocoll run`: every collective over each real transport, and the examples."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def launch(n: int, script: Path, *args: str, transport: str = "tcp", timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("AIOCOLL_SECRET", None)
    return subprocess.run(
        [sys.executable, "-m", "aiocoll", "run", "-n", str(n), "--transport", transport, "--timeout", "60", str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


@pytest.mark.parametrize("n", [2, 4])
def test_every_collective_over_tcp_processes(n):
    proc = launch(n, SCRIPTS / "check_collectives.py")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in range(n):
        assert f"[{r}] rank {r} ok" in proc.stdout


def test_hello_example():
    proc = launch(3, REPO / "examples" / "hello_all_reduce.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in range(3):
        assert f"rank {r} of 3: sum of ranks = 3" in proc.stdout


def test_demo_example():
    proc = launch(4, REPO / "examples" / "demo.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "all_reduce -> [10.0, 10.0, 10.0, 10.0]" in proc.stdout
    # The verdict depends on the host's load; the demo must report the gap against its threshold.
    assert re.search(r"longest gap [\d.]+ ms against a threshold of 50 ms: ", proc.stdout), proc.stdout


@pytest.mark.parametrize("setting, expected", [(None, "uvloop"), ("asyncio", "asyncio")])
def test_aiocoll_run_prefers_uvloop_unless_told(setting, expected, monkeypatch):
    pytest.importorskip("uvloop", reason="uvloop is a default dependency on Linux; elsewhere asyncio is used")
    if setting:
        monkeypatch.setenv("AIOCOLL_LOOP", setting)
    else:
        monkeypatch.delenv("AIOCOLL_LOOP", raising=False)
    proc = launch(2, SCRIPTS / "print_loop.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"rank 0 loop {expected}" in proc.stdout and f"rank 1 loop {expected}" in proc.stdout
