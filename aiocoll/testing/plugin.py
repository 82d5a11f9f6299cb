"""The pytest plugin (entry point ``pytest11``, name ``aiocoll``): fixtures for testing code
that uses aiocoll, loaded by pytest wherever aiocoll is installed.

    @pytest.mark.aiocoll(world_size=4)
    async def test_my_sum(aiocoll_ranks):
        results = await aiocoll_ranks(lambda rank: aiocoll.all_reduce(np.array([rank])))
        assert [int(r[0]) for r in results] == [6, 6, 6, 6]

    async def test_in_processes(aiocoll_processes):
        assert await aiocoll_processes(module_level_body, 2) == [...]

Fixtures:
- ``aiocoll_ranks``: ``await aiocoll_ranks(fn, world_size=None, **kwargs)`` is
  :func:`aiocoll.testing.run_ranks` (N ranks as tasks of the test's event loop);
- ``aiocoll_processes``: ``await aiocoll_processes(fn, world_size=None, **kwargs)`` is
  :func:`aiocoll.testing.run_processes` (one process per rank; ``fn`` at module level);
- ``aiocoll_world_size``: the default world size, from the marker (default 2).

The marker ``@pytest.mark.aiocoll(world_size=..., transport=..., timeout=...)`` sets the
defaults of both for one test (or a module, through ``pytestmark``). The tests are coroutines:
run them with pytest-asyncio (``asyncio_mode = "auto"``, or ``@pytest.mark.asyncio`` on each)
or anyio.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

_DEFAULT_WORLD_SIZE = 2


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "aiocoll(world_size=2, transport=None, timeout=None): defaults of the aiocoll_ranks and "
        "aiocoll_processes fixtures for this test",
    )


def _marker_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    marker = request.node.get_closest_marker("aiocoll")
    if marker is None:
        return {}
    if marker.args:
        raise pytest.UsageError("@pytest.mark.aiocoll takes keywords only: world_size=, transport=, timeout=")
    unknown = set(marker.kwargs) - {"world_size", "transport", "timeout"}
    if unknown:
        raise pytest.UsageError(f"@pytest.mark.aiocoll: unknown options {sorted(unknown)}")
    return dict(marker.kwargs)


@pytest.fixture
def aiocoll_world_size(request: pytest.FixtureRequest) -> int:
    """The world size the marker asks for (default 2)."""
    size = _marker_options(request).get("world_size", _DEFAULT_WORLD_SIZE)
    if not isinstance(size, int) or size < 1:
        raise pytest.UsageError(f"@pytest.mark.aiocoll: world_size must be a positive int, got {size!r}")
    return size


@pytest.fixture
def aiocoll_ranks(
    request: pytest.FixtureRequest, aiocoll_world_size: int
) -> Callable[..., Awaitable[list[Any]]]:
    """``await aiocoll_ranks(fn, world_size=None, **kwargs)``: ``run_ranks`` with the marker's
    defaults."""
    options = {k: v for k, v in _marker_options(request).items() if k != "world_size" and v is not None}

    async def run(fn: Callable[[int], Awaitable[Any]], world_size: int | None = None, **kwargs: Any) -> list[Any]:
        from . import run_ranks  # here, not at the top: pytest loads this plugin in every run

        return await run_ranks(fn, world_size or aiocoll_world_size, **{**options, **kwargs})

    return run


@pytest.fixture
def aiocoll_processes(
    request: pytest.FixtureRequest, aiocoll_world_size: int
) -> Callable[..., Awaitable[list[Any]]]:
    """``await aiocoll_processes(fn, world_size=None, **kwargs)``: ``run_processes`` with the
    marker's defaults."""
    options = {k: v for k, v in _marker_options(request).items() if k != "world_size" and v is not None}

    async def run(fn: Callable[[int], Any], world_size: int | None = None, **kwargs: Any) -> list[Any]:
        from . import run_processes

        return await run_processes(fn, world_size or aiocoll_world_size, **{**options, **kwargs})

    return run
