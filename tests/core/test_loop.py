"""The event-loop choice: uvloop when installed, AIOCOLL_LOOP to override."""

from __future__ import annotations

import asyncio

import pytest

import aiocoll
from aiocoll.core.loop import loop_factory


def test_run_uses_uvloop_by_default(monkeypatch):
    uvloop = pytest.importorskip("uvloop", reason="uvloop is installed by default on Linux")
    monkeypatch.delenv("AIOCOLL_LOOP", raising=False)

    async def kind():
        return type(asyncio.get_running_loop())

    assert aiocoll.run(kind()) is uvloop.Loop


def test_asyncio_when_asked(monkeypatch):
    monkeypatch.setenv("AIOCOLL_LOOP", "asyncio")
    assert loop_factory() is asyncio.new_event_loop


def test_bad_setting_is_named(monkeypatch):
    monkeypatch.setenv("AIOCOLL_LOOP", "trio")
    with pytest.raises(ValueError, match="AIOCOLL_LOOP"):
        loop_factory()
