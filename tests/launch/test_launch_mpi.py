"""``aiocoll.init()`` under a real ``mpirun -n 2`` without MASTER_*: with mpi4py (rank 0 serves a
store and broadcasts its address and a fresh secret with MPI_Bcast of bytes), and without it
(the store derived from the MPI job id on one host; the secret from AIOCOLL_SECRET).

Skipped where mpirun/mpiexec or mpi4py is missing, with the reason; the GPU machine has both
(Open MPI), and ``pip install mpich mpi4py`` gives both anywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.launch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "launch_allreduce.py"


def _mpirun() -> str | None:
    here = Path(sys.executable).parent
    for name in ("mpirun", "mpiexec"):
        if (here / name).exists():
            return str(here / name)
        found = shutil.which(name)
        if found:
            return found
    return None


def _env() -> dict[str, str]:
    # What would tell the ranks who they are, not how mpirun itself is configured: OMPI_MCA_*
    # (e.g. the launch agent of a container without ssh) must reach mpirun.
    drop = ("AIOCOLL_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_", "TORCHELASTIC_", "SLURM_", "OMPI_COMM_WORLD_",
            "OMPI_UNIVERSE_", "PMI")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    # Open MPI refuses root without these; harmless for MPICH.
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def _run(args: list[str], env: dict[str, str], out: Path) -> list[dict]:
    mpirun = _mpirun()
    if mpirun is None:
        pytest.skip("no mpirun or mpiexec here (the GPU machine has Open MPI; or pip install mpich mpi4py)")
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install mpi4py)")
    flags = ["--oversubscribe"] if "Open MPI" in subprocess.run(
        [mpirun, "--version"], capture_output=True, text=True, timeout=30).stdout else []
    proc = subprocess.run([mpirun, *flags, "-n", "2", sys.executable, str(SCRIPT), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def _check(results: list[dict], seed: int) -> None:
    assert sorted(r["rank"] for r in results) == [0, 1]
    expected = sum(np.random.default_rng([seed, r]).standard_normal(1000) for r in range(2))
    for r in results:
        np.testing.assert_allclose(r["sum"], expected)


def test_mpirun_with_mpi4py_needs_no_master_and_no_secret(tmp_path: Path) -> None:
    seed = int(np.random.default_rng().integers(1 << 30))
    results = _run([str(seed)], _env(), tmp_path)
    _check(results, seed)
    assert {r["store"] for r in results} == {"ServedStore", "TcpStoreClient"}  # rank 0 served it


def test_mpirun_without_mpi4py_derives_the_store_from_the_mpi_job(tmp_path: Path) -> None:
    seed = int(np.random.default_rng().integers(1 << 30))
    env = dict(_env(), AIOCOLL_SECRET="mpirun-test-secret")
    try:
        results = _run([str(seed), "--hide-mpi4py"], env, tmp_path)
    except AssertionError as exc:
        if "gives no store" in str(exc):
            pytest.skip("this MPI names its job in no variable aiocoll reads (PMIX_NAMESPACE, "
                        "OMPI_MCA_ess_base_jobid): only mpi4py's exchange works here")
        raise
    _check(results, seed)
