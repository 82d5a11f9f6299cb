"""What the launchers' environments give without MASTER_*: Slurm and MPI stores, job ids,
torchrun's own store, the join timeout; and the PYTHONPATH ``aiocoll run`` gives its ranks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from aiocoll.launch.env import (
    derived_port,
    expand_hostlist,
    first_host,
    read_job_id,
    read_join_timeout,
    read_launch_env,
)

SRUN = {
    "SLURM_PROCID": "3",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_TASKS_PER_NODE": "2(x4)",
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_JOB_NODELIST": "gpu[007-010]",
    "SLURM_STEP_NODELIST": "gpu[008-010,012]",
}
OPENMPI = {
    "OMPI_COMM_WORLD_RANK": "1",
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
    "PMIX_NAMESPACE": "prterun-host-4711@1",
}


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("login1", ["login1"]),
        ("a[8-10],b3,c[1]", ["a8", "a9", "a10", "b3", "c1"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("rack2-[3,5]-x", ["rack2-3-x", "rack2-5-x"]),
    ],
)
def test_slurm_hostlists_expand_as_scontrol_does(hostlist: str, hosts: list[str]) -> None:
    assert list(expand_hostlist(hostlist)) == hosts
    assert first_host(hostlist) == hosts[0]


@pytest.mark.parametrize("bad", ["node[01-04", "node]1[", "n[a-b]", "n[5-2]", "n[[1]]", ""])
def test_malformed_hostlists_raise_naming_the_list(bad: str) -> None:
    with pytest.raises(ValueError, match="hostlist"):
        first_host(bad)


def test_a_huge_hostlist_costs_nothing_until_read() -> None:
    assert first_host("n[0000001-9999999]") == "n0000001"


def test_srun_without_master_derives_the_store_from_the_step_nodes_and_job_id() -> None:
    env = read_launch_env(SRUN)
    assert env is not None and env.source == "slurm"
    assert env.store == f"tcp://gpu008:{derived_port('4242.0')}"
    assert env.store_from == "slurm" and env.job_id == "slurm-4242.0"
    # Another step of the job, running at the same time, is another world on another port.
    other = read_launch_env({**SRUN, "SLURM_STEP_ID": "1"})
    assert other is not None and other.store != env.store
    # Without a step node list, the job's.
    env = read_launch_env({k: v for k, v in SRUN.items() if k != "SLURM_STEP_NODELIST"})
    assert env is not None and env.store == f"tcp://gpu007:{derived_port('4242.0')}"


def test_master_addr_and_aiocoll_store_still_win_over_derived_stores() -> None:
    env = read_launch_env({**SRUN, "MASTER_ADDR": "head", "MASTER_PORT": "1234"})
    assert env is not None and env.store == "tcp://head:1234" and env.store_from == "MASTER_ADDR"
    env = read_launch_env({**OPENMPI, "AIOCOLL_STORE": "file:///shared/x"})
    assert env is not None and env.store == "file:///shared/x" and env.store_from == "AIOCOLL_STORE"


def test_derived_ports_are_the_same_everywhere_and_outside_the_ephemeral_range() -> None:
    ports = {derived_port(str(job)) for job in range(2000)}
    assert all(10000 <= p < 30000 for p in ports)
    assert len(ports) > 1800  # rarely the same for two jobs
    # A fixed value: every rank, every Python, every host computes the same.
    assert derived_port("4242.0") == derived_port("4242.0") == 10000 + int.from_bytes(
        __import__("hashlib").sha256(b"4242.0").digest()[:4], "big"
    ) % 20000


def test_mpirun_on_one_host_derives_a_loopback_store_from_the_mpi_job() -> None:
    env = read_launch_env(OPENMPI)
    assert env is not None and env.source == "openmpi"
    assert env.store == f"tcp://127.0.0.1:{derived_port('prterun-host-4711@1')}" and env.store_from == "mpi"
    # Open MPI 4 names its job with the ess jobid instead.
    v4 = {**{k: v for k, v in OPENMPI.items() if k != "PMIX_NAMESPACE"}, "OMPI_MCA_ess_base_jobid": "31"}
    env = read_launch_env(v4)
    assert env is not None and env.store == f"tcp://127.0.0.1:{derived_port('31')}"


def test_mpirun_across_hosts_inside_slurm_uses_the_allocation_without_its_step() -> None:
    across = {**OPENMPI, "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "3",
              "SLURM_JOB_NODELIST": "c[2-3]"}
    env = read_launch_env(across)
    assert env is not None and env.store == f"tcp://c2:{derived_port('77')}" and env.store_from == "slurm"


def test_mpirun_across_hosts_alone_names_no_store() -> None:
    env = read_launch_env({**OPENMPI, "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert env is not None and env.store is None  # mpi4py's exchange, or an error naming it


def test_torchrun_is_recognised_so_that_its_store_is_used_as_torchs() -> None:
    base = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    env = read_launch_env({**base, "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "abc"})
    assert env is not None and env.torch_store and env.job_id == "torchrun-abc"
    # The same variables set by hand (no torchrun): MASTER_PORT is ours to serve.
    env = read_launch_env(base)
    assert env is not None and not env.torch_store
    # AIOCOLL_STORE names an aiocoll store even under torchrun.
    env = read_launch_env({**base, "TORCHELASTIC_RUN_ID": "abc", "AIOCOLL_STORE": "tcp://h:1"})
    assert env is not None and not env.torch_store


def test_job_ids_first_launcher_wins_and_torchruns_none_names_no_job() -> None:
    assert read_job_id({}) is None
    assert read_job_id({"TORCHELASTIC_RUN_ID": "none"}) is None
    assert read_job_id({"TORCHELASTIC_RUN_ID": "none", "SLURM_JOB_ID": "5"}) == "slurm-5.0"
    assert read_job_id({"AIOCOLL_JOB_ID": "j1", "SLURM_JOB_ID": "5"}) == "aiocoll-j1"
    assert read_job_id({"OMPI_MCA_ess_base_jobid": "9"}) == "openmpi-9"


def test_join_timeout_is_read_and_checked() -> None:
    assert read_join_timeout({}) is None
    assert read_join_timeout({"AIOCOLL_JOIN_TIMEOUT": "900"}) == 900.0
    env = read_launch_env({"RANK": "0", "WORLD_SIZE": "1", "AIOCOLL_JOIN_TIMEOUT": "12.5"})
    assert env is not None and env.join_timeout == 12.5
    for bad in ("", "soon", "0", "-1", "inf"):
        with pytest.raises(ValueError, match="AIOCOLL_JOIN_TIMEOUT"):
            read_join_timeout({"AIOCOLL_JOIN_TIMEOUT": bad})


def test_python_m_aiocoll_launch_env_prints_the_derived_store_but_never_the_secret() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI", "MASTER_", "AIOCOLL_"))}
    env.update(SRUN, AIOCOLL_SECRET="do-not-print-me")
    out = subprocess.run([sys.executable, "-m", "aiocoll.launch.env"], capture_output=True, text=True,
                         env=env, timeout=60, check=True).stdout
    assert f"tcp://gpu008:{derived_port('4242.0')}" in out and "do-not-print-me" not in out


