"""Transports move frames between two ranks; see ``aiocoll.transports._base`` for the interface.

Built in: ``inproc`` (ranks as tasks of one event loop), ``tcp``, ``shm`` (same host) and
``ucx`` (needs ``ucxx``). Third parties add one through the entry-point group
``aiocoll.transports``. ``python -m aiocoll.transports`` lists what is found and why a
transport cannot load.
"""

from __future__ import annotations

from ._base import (
    KEY_SIZE,
    MAX_FRAME,
    Capabilities,
    Connection,
    FrameSink,
    Transport,
    TransportConfig,
    TransportFactory,
)
from ._registry import (
    ENTRY_POINT_GROUP,
    TransportInfo,
    available_transports,
    get_transport,
    register_transport,
)

__all__ = [
    "KEY_SIZE",
    "MAX_FRAME",
    "Capabilities",
    "Connection",
    "FrameSink",
    "Transport",
    "TransportConfig",
    "TransportFactory",
    "ENTRY_POINT_GROUP",
    "TransportInfo",
    "available_transports",
    "get_transport",
    "register_transport",
]
