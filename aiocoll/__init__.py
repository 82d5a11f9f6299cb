"""aiocoll: asyncio-native collective communication."""

from __future__ import annotations

from ._layout import mount_transports

mount_transports()

from ._errors import (  # noqa: E402
    AiocollError,
    CollectiveError,
    CollectiveTimeoutError,
    GroupBrokenError,
    HandshakeError,
    MismatchError,
    NotInitializedError,
    PeerFailureError,
    RemoteAbortError,
    StoreError,
    TransportError,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # errors
    "AiocollError",
    "CollectiveError",
    "CollectiveTimeoutError",
    "GroupBrokenError",
    "HandshakeError",
    "MismatchError",
    "NotInitializedError",
    "PeerFailureError",
    "RemoteAbortError",
    "StoreError",
    "TransportError",
]
