"""One Settings object per world: every AIOCOLL_* knob of the engines and algorithms."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import aiocoll
from aiocoll.core.settings import VARIABLES, Settings
from aiocoll.testing import run_ranks

README = Path(__file__).resolve().parents[2] / "README.md"


def test_from_env_reads_every_engine_variable() -> None:
    s = Settings.from_env({
        "AIOCOLL_ALGO_ALL_REDUCE": "ring",
        "AIOCOLL_SHM_FASTPATH": "off",
        "AIOCOLL_SHM_FASTPATH_MIN_BROADCAST": "4096",
        "AIOCOLL_SHM_PART_BYTES": "65536",
        "AIOCOLL_SHM_DEPTH": "3",
        "AIOCOLL_SHM_DIRECT_MAX": "0x100",
        "AIOCOLL_SHM_THREAD_MIN": "1",
        "AIOCOLL_SHM_SPIN_US": "0",
        "AIOCOLL_SHM_SPIN_YIELD": "no",
    })
    assert dict(s.algorithms) == {"all_reduce": "ring"}
    assert not s.shm_engine and dict(s.shm_engine_min_bytes) == {"broadcast": 4096}
    assert (s.shm_part_bytes, s.shm_depth, s.shm_direct_max, s.shm_thread_min) == (65536, 3, 256, 1)
    assert s.shm_spin_us == 0 and not s.shm_spin_yield
    assert Settings.from_env({}) == Settings()


@pytest.mark.parametrize(("var", "value", "named"), [
    ("AIOCOLL_ALGO_ALL_REDUCE", "bogus", "AIOCOLL_ALGO_ALL_REDUCE"),
    ("AIOCOLL_SHM_FASTPATH", "maybe", "AIOCOLL_SHM_FASTPATH"),
    ("AIOCOLL_SHM_DEPTH", "four", "AIOCOLL_SHM_DEPTH"),
    ("AIOCOLL_SHM_SPIN_US", "fast", "AIOCOLL_SHM_SPIN_US"),
    ("AIOCOLL_SHM_FASTPATH_MIN_ALL_GATHER", "-1", "shm_engine_min_bytes"),
])
def test_a_malformed_variable_is_named(var: str, value: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        Settings.from_env({var: value})


def test_settings_are_checked_and_frozen() -> None:
    with pytest.raises(ValueError, match="choose from"):
        Settings(algorithms={"all_reduce": "tree"})
    with pytest.raises(ValueError, match="shm_depth"):
        Settings(shm_depth=0)
    with pytest.raises(ValueError, match="no field"):
        Settings.from_env({}, shm_dept=2)
    s = Settings(algorithms={"broadcast": "tree"})
    with pytest.raises(TypeError):
        s.algorithms["broadcast"] = "scatter_allgather"  # type: ignore[index]


async def test_init_rejects_what_is_not_settings() -> None:
    with pytest.raises(TypeError, match="aiocoll.Settings"):
        await aiocoll.init(settings={"shm_engine": False})  # type: ignore[arg-type]


@pytest.mark.parametrize("algorithm", ["direct", "rsag", "ring"])
async def test_two_worlds_in_one_process_can_differ(algorithm: str) -> None:
    """Settings belong to the world: a world forced to one algorithm beside a default one,
    at the same time, both exact (what was module state before)."""
    n, size = 3, 10_001
    xs = [np.random.default_rng(r).standard_normal(size) for r in range(n)]
    want = sum(xs)
    forced = Settings(algorithms={"all_reduce": algorithm})

    async def body(rank: int) -> np.ndarray:
        assert aiocoll.core.world.current_world().settings.algorithms.get("all_reduce") in (None, algorithm)
        return await aiocoll.all_reduce(xs[rank])

    import asyncio

    a, b = await asyncio.gather(run_ranks(body, n, settings=forced), run_ranks(body, n))
    for y in (*a, *b):
        np.testing.assert_allclose(y, want, rtol=1e-12)


def test_readme_lists_every_variable() -> None:
    text = README.read_text()
    missing = [name for name, *_ in VARIABLES if f"`{name}`" not in text]
    assert not missing, f"README's settings table lacks {missing}"
    # and names none that does not exist
    named = set(re.findall(r"`(AIOCOLL_[A-Z_<>]+)`", text))
    known = {name for name, *_ in VARIABLES}
    assert named <= known | {"AIOCOLL_ALGO_ALL_REDUCE"}, f"README names unknown variables {sorted(named - known)}"


def test_every_variable_the_code_reads_is_in_the_table() -> None:
    root = Path(__file__).resolve().parents[2]
    read: set[str] = set()
    for path in [*(root / "aiocoll").rglob("*.py"), *(root / "transports").glob("*.py")]:
        read |= set(re.findall(r"AIOCOLL_[A-Z][A-Z_]*[A-Z]", path.read_text()))
    known = {name for name, *_ in VARIABLES}
    prefixes = {name.split("<")[0] for name in known if "<" in name}
    unlisted = {v for v in read if v not in known and not any((v + "_").startswith(p) for p in prefixes)}
    assert not unlisted, f"read by the code but not in Settings' VARIABLES (and README): {sorted(unlisted)}"
