"""``aiocoll bench``: a quick smoke test with tiny sizes (the real numbers live in BENCHMARKS.md)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aiocoll.launch import bench as _bench

REPO = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\s*(\S+)\s+(\d+)\s+float\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)")


def _rows(text: str, op: str) -> list[re.Match[str]]:
    block = text.split(f"# op={op}", 1)[1].split("# op=", 1)[0]
    return [m for line in block.splitlines() if (m := ROW.match(line))]


@pytest.mark.parametrize(
    "text, sizes",
    [
        ("4:256M", [4 << (2 * i) for i in range(14)]),
        ("4:64:2", [4, 8, 16, 32, 64]),
        ("4,1K,64M", [4, 1024, 64 << 20]),
        ("1G", [1 << 30]),
    ],
)
def test_sizes_parse(text, sizes):
    assert _bench.parse_sizes(text) == sizes


@pytest.mark.parametrize("bad", ["", "x", "4:2", "4:64:1", "0", "4:1K:2:3"])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(ValueError):
        _bench.parse_sizes(bad)


def test_table_for_every_op_over_shm(capsys):
    code = _bench.main(["-n", "2", "--transport", "shm", "--sizes", "4,64K", "--target-s", "0.02",
                        "--op", "all_reduce,all_gather,broadcast,reduce_scatter"])
    out = capsys.readouterr().out
    assert code == 0, out
    for op, factor in (("all_reduce", 1.0), ("all_gather", 0.5), ("broadcast", 1.0), ("reduce_scatter", 0.5)):
        rows = _rows(out, op)
        assert [r.group(1) for r in rows] == ["4", "64K"], out
        for r in rows:
            size = _bench.parse_size(r.group(1))
            t_us, algbw, busbw, iters = float(r.group(3)), float(r.group(4)), float(r.group(5)), int(r.group(6))
            assert t_us > 0 and _bench.MIN_ITERS <= iters <= _bench.MAX_ITERS
            assert algbw == pytest.approx(size / (t_us * 1e-6) / 1e9, rel=0.02, abs=2e-3)
            assert busbw == pytest.approx(algbw * factor, rel=0.02, abs=2e-3)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch for gloo")
def test_compare_gloo_adds_its_time_and_the_ratio(capsys):
    code = _bench.main(["-n", "2", "--transport", "tcp", "--sizes", "4,4K", "--target-s", "0.02", "--compare", "gloo"])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = [line for line in out.splitlines() if ROW.match(line)]
    assert len(lines) == 2
    for line in lines:
        ours, theirs = line.split("|")
        t_ours = float(ours.split()[3])
        t_gloo, _, ratio = (float(v) for v in theirs.split())
        # The ratio is printed with two decimals: 0.11 stands for anything in [0.105, 0.115).
        assert ratio == pytest.approx(t_gloo / t_ours, rel=0.02, abs=0.006)


@pytest.mark.skipif(
    shutil.which("mpirun") is None or importlib.util.find_spec("mpi4py") is None, reason="needs mpirun and mpi4py (not in the [test] extra); runs where Open MPI is installed, e.g. the device machine via scripts/device_cpu_bench.sh"
)
def test_compare_mpi(capsys):
    code = _bench.main(["-n", "2", "--sizes", "4", "--target-s", "0.02", "--compare", "mpi"])
    out = capsys.readouterr().out
    assert code == 0, out
    line = next(line for line in out.splitlines() if ROW.match(line))
    assert len(line.split("|")[1].split()) == 3


def test_bad_usage_exits_2(capsys):
    assert _bench.main(["--op", "all_to_everyone"]) == 2
    assert _bench.main(["--sizes", "lots"]) == 2
    assert _bench.main(["--compare", "nccl"]) == 2
    assert "aiocoll bench:" in capsys.readouterr().err


def test_a_failing_library_is_reported_with_exit_code_1(capsys):
    code = _bench.main(["-n", "2", "--transport", "carrier-pigeon", "--sizes", "4", "--target-s", "0.01"])
    out = capsys.readouterr().out
    assert code == 1
    assert "aiocoll failed" in out and "carrier-pigeon" in out


def test_the_cli_dispatches_to_the_benchmark():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.run(
        [sys.executable, "-m", "aiocoll", "bench", "-n", "2", "--sizes", "4", "--target-s", "0.01"],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "# op=all_reduce" in proc.stdout and _rows(proc.stdout, "all_reduce")
