"""Which event loop: uvloop when installed (a soft default), stdlib asyncio otherwise.

``AIOCOLL_LOOP=asyncio`` turns uvloop off; ``AIOCOLL_LOOP=uvloop`` insists on it (an error if it
is missing). aiocoll works on both: the choice only matters for speed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """The constructor of the event loop aiocoll prefers here.

    Raises:
        ValueError: AIOCOLL_LOOP has a value other than "uvloop" or "asyncio".
        ImportError: AIOCOLL_LOOP=uvloop but uvloop is not installed.
    """
    choice = os.environ.get("AIOCOLL_LOOP", "").strip().lower()
    if choice not in ("", "uvloop", "asyncio"):
        raise ValueError(f"AIOCOLL_LOOP={choice!r}: expected 'uvloop' or 'asyncio'")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ImportError("AIOCOLL_LOOP=uvloop but uvloop is not installed: pip install uvloop") from None
        else:
            factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
            return factory
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on aiocoll's preferred loop (uvloop when installed)."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def install_policy() -> None:
    """Make plain ``asyncio.run`` use the preferred loop in this process (used by ``aiocoll run``)."""
    if loop_factory() is not asyncio.new_event_loop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
