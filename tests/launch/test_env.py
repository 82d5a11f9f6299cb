"""read_launch_env: every launcher's variables, which one wins, and what bad values say."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("aiocoll") is None:
    # --import-mode=importlib leaves sys.path alone; without an install, test this tree.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aiocoll.launch.env import LaunchEnv, read_launch_env  # noqa: E402

TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "10.0.0.5",
    "MASTER_PORT": "29500",
}
OPENMPI = {
    "OMPI_COMM_WORLD_RANK": "5",
    "OMPI_COMM_WORLD_SIZE": "6",
    "OMPI_COMM_WORLD_LOCAL_RANK": "2",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "3",
}
MPICH = {"PMI_RANK": "1", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
SLURM = {
    "SLURM_PROCID": "4",
    "SLURM_NTASKS": "5",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "2",
    "SLURM_TASKS_PER_NODE": "2(x2),1",
}


def test_no_launcher_variables_means_none() -> None:
    assert read_launch_env({}) is None
    assert read_launch_env({"PATH": "/bin", "AIOCOLL_TRANSPORT": "tcp", "MASTER_PORT": "1"}) is None


def test_torchrun_variables_give_everything() -> None:
    env = read_launch_env(TORCHRUN)
    assert env == LaunchEnv(
        rank=3,
        world_size=8,
        local_rank=1,
        local_world_size=2,
        store="tcp://10.0.0.5:29500",
        transport=None,
        timeout=None,
        secret=None,
        source="torchrun",
    )


def test_torchrun_without_master_address_has_no_store() -> None:
    env = read_launch_env({"RANK": "0", "WORLD_SIZE": "1"})
    assert env is not None
    assert (env.rank, env.world_size, env.store, env.local_rank, env.local_world_size) == (0, 1, None, None, None)


def test_open_mpi_variables() -> None:
    env = read_launch_env(OPENMPI)
    assert env is not None
    assert (env.source, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("openmpi", 5, 6, 2, 3)
    assert env.store is None  # MPI gives no rendezvous: the caller must ask for one


def test_mpich_variables() -> None:
    env = read_launch_env(MPICH)
    assert env is not None
    assert (env.source, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("mpich", 1, 4, 1, 2)


def test_slurm_variables_with_local_size_from_tasks_per_node() -> None:
    env = read_launch_env(SLURM)
    assert env is not None
    # Node 2 of "2(x2),1" runs one task.
    assert (env.source, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("slurm", 4, 5, 0, 1)


def test_slurm_without_node_layout_leaves_local_size_unknown() -> None:
    env = read_launch_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1"})
    assert env is not None
    assert (env.local_rank, env.local_world_size) == (1, None)


@pytest.mark.parametrize("launcher", [OPENMPI, MPICH, SLURM], ids=["openmpi", "mpich", "slurm"])
def test_mpi_and_slurm_take_the_store_from_master_addr_and_port(launcher: dict[str, str]) -> None:
    env = read_launch_env({**launcher, "MASTER_ADDR": "node0", "MASTER_PORT": "1234"})
    assert env is not None and env.store == "tcp://node0:1234"


@pytest.mark.parametrize(
    ("layers", "source", "rank"),
    [
        ([SLURM, MPICH, OPENMPI, TORCHRUN], "torchrun", 3),
        ([SLURM, MPICH, OPENMPI], "openmpi", 5),
        ([SLURM, MPICH], "mpich", 1),
        ([SLURM], "slurm", 4),
    ],
)
def test_first_launcher_in_order_wins(layers: list[dict[str, str]], source: str, rank: int) -> None:
    merged: dict[str, str] = {}
    for layer in layers:
        merged.update(layer)
    env = read_launch_env(merged)
    assert env is not None and (env.source, env.rank) == (source, rank)


def test_aiocoll_store_overrides_master_addr() -> None:
    env = read_launch_env({**TORCHRUN, "AIOCOLL_STORE": "file:///shared/rdzv"})
    assert env is not None and env.store == "file:///shared/rdzv"


def test_ipv6_master_addr_is_bracketed() -> None:
    env = read_launch_env({**TORCHRUN, "MASTER_ADDR": "fe80::1"})
    assert env is not None and env.store == "tcp://[fe80::1]:29500"


def test_aiocoll_settings_are_read() -> None:
    env = read_launch_env(
        {**MPICH, "AIOCOLL_TRANSPORT": "shm", "AIOCOLL_TIMEOUT": "12.5", "AIOCOLL_SECRET": " s3cr3t "}
    )
    assert env is not None
    assert (env.transport, env.timeout, env.secret) == ("shm", 12.5, b" s3cr3t ")


def test_the_secret_stays_out_of_the_repr() -> None:
    env = read_launch_env({**TORCHRUN, "AIOCOLL_SECRET": "hunter2"})
    assert "hunter2" not in repr(env)


def test_whitespace_around_numbers_is_tolerated() -> None:
    env = read_launch_env({"RANK": " 1\n", "WORLD_SIZE": "2 "})
    assert env is not None and (env.rank, env.world_size) == (1, 2)


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [*TORCHRUN, *OPENMPI, *MPICH, *SLURM, "AIOCOLL_STORE"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PMI_RANK", "2")
    monkeypatch.setenv("PMI_SIZE", "3")
    env = read_launch_env()
    assert env is not None and (env.source, env.rank, env.world_size) == ("mpich", 2, 3)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK='one'"),
        ({"RANK": "1.0", "WORLD_SIZE": "2"}, "RANK='1.0'"),
        ({"RANK": "1_0", "WORLD_SIZE": "20"}, "RANK='1_0'"),
        ({"RANK": "0", "WORLD_SIZE": ""}, "WORLD_SIZE is set but empty"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is out of range"),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK=-1 is out of range"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 is out of range"),
        ({"RANK": "0"}, "WORLD_SIZE is not set"),
        ({"WORLD_SIZE": "2"}, "RANK is not set"),
        ({**TORCHRUN, "LOCAL_RANK": "2"}, "LOCAL_RANK=2 is out of range"),
        ({**TORCHRUN, "LOCAL_WORLD_SIZE": "9"}, "LOCAL_WORLD_SIZE=9 is out of range"),
        ({**TORCHRUN, "LOCAL_RANK": "x"}, "LOCAL_RANK='x'"),
        ({**TORCHRUN, "MASTER_PORT": "http"}, "MASTER_PORT='http'"),
        ({**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is out of range"),
        ({**TORCHRUN, "MASTER_PORT": "0"}, "MASTER_PORT=0 is out of range"),
        ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "h"}, "MASTER_PORT"),
        ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "1"}, "MASTER_ADDR"),
        ({**TORCHRUN, "AIOCOLL_STORE": "redis://h:1"}, "AIOCOLL_STORE"),
        ({**TORCHRUN, "AIOCOLL_TIMEOUT": "soon"}, "AIOCOLL_TIMEOUT='soon'"),
        ({**TORCHRUN, "AIOCOLL_TIMEOUT": "-5"}, "AIOCOLL_TIMEOUT='-5' is out of range"),
        ({**TORCHRUN, "AIOCOLL_TIMEOUT": "nan"}, "AIOCOLL_TIMEOUT='nan' is out of range"),
        ({**TORCHRUN, "AIOCOLL_SECRET": ""}, "AIOCOLL_SECRET"),
        ({**OPENMPI, "OMPI_COMM_WORLD_SIZE": "5"}, "OMPI_COMM_WORLD_RANK=5 is out of range"),
        ({**OPENMPI, "OMPI_COMM_WORLD_LOCAL_RANK": "3"}, "OMPI_COMM_WORLD_LOCAL_RANK=3 is out of range"),
        ({**MPICH, "PMI_SIZE": "four"}, "PMI_SIZE='four'"),
        ({**SLURM, "SLURM_PROCID": "5"}, "SLURM_PROCID=5 is out of range"),
        ({**SLURM, "SLURM_NODEID": "3"}, "SLURM_NODEID=3 is out of range"),
        ({**SLURM, "SLURM_TASKS_PER_NODE": "2(x2"}, "SLURM_TASKS_PER_NODE='2(x2'"),
        ({**SLURM, "SLURM_LOCALID": "1"}, "SLURM_LOCALID=1 is out of range"),
    ],
)
def test_bad_values_raise_value_error_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError) as info:
        read_launch_env(env)
    assert named in str(info.value)


def test_a_later_launchers_bad_values_are_ignored_when_an_earlier_one_matches() -> None:
    # SLURM variables inside a torchrun job describe the allocation, not the ranks: never read.
    env = read_launch_env({**TORCHRUN, "SLURM_PROCID": "junk", "SLURM_NTASKS": "junk"})
    assert env is not None and env.source == "torchrun"
