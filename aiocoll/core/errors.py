"""The exception tree of aiocoll.

    AiocollError
    ├── NotInitializedError        init() has not run (or destroy() has)      [RuntimeError]
    ├── StoreError                 the rendezvous store failed or refused us
    ├── TransportError             a transport could not connect, listen or move bytes  [ConnectionError]
    │   └── HandshakeError         a peer failed authentication; the connection was dropped
    └── CollectiveError            a collective did not complete; raised on *every* member
        ├── CollectiveTimeoutError the collective did not finish within its timeout  [TimeoutError]
        ├── PeerFailureError       a member died or its connection broke
        ├── MismatchError          members issued different collectives (kind, dtype, count, op)
        ├── RemoteAbortError       another member aborted this collective (cancelled, bad input there)
        └── GroupBrokenError       an earlier collective on this group failed or was cancelled

Bad arguments are not CollectiveErrors: they raise ValueError or TypeError on the calling rank,
before anything is sent, with a message naming the argument.

Who is at fault: every CollectiveError carries ``group`` (the group's name), ``seq`` (the
collective's sequence number in that group, the same on every member), ``op`` (the collective)
and ``ranks`` (the global ranks at fault: the dead peer, the ranks that did not arrive, or the
two sides of a mismatch).
"""

from __future__ import annotations

from collections.abc import Iterable


class AiocollError(Exception):
    """Base class of every error aiocoll raises on purpose."""


class NotInitializedError(AiocollError, RuntimeError):
    """A call needs the default group, and ``aiocoll.init()`` has not been awaited."""


class StoreError(AiocollError):
    """The rendezvous store could not be reached, refused us, or timed out waiting for a key."""


class TransportError(AiocollError, ConnectionError):
    """A transport failed to listen, connect, or move bytes."""


class HandshakeError(TransportError):
    """A connection failed the authentication handshake (wrong or missing shared secret)."""


class CollectiveError(AiocollError):
    """A collective failed. Raised on every member of the group, never on just one.

    Attributes:
        group: name of the group the collective ran on.
        seq: the collective's sequence number within the group (the same on every member).
        op: the collective's name, e.g. ``"all_reduce"``.
        ranks: global ranks at fault, as far as this member can tell.
    """

    def __init__(
        self,
        message: str,
        *,
        group: str = "",
        seq: int = -1,
        op: str = "",
        ranks: Iterable[int] = (),
    ) -> None:
        self.group = group
        self.seq = seq
        self.op = op
        self.ranks = tuple(sorted(set(ranks)))
        where = []
        if group:
            where.append(f"group {group!r}")
        if seq >= 0:
            where.append(f"step {seq}")
        if op:
            where.append(op)
        if self.ranks:
            where.append(f"ranks at fault {list(self.ranks)}")
        self.detail = message
        super().__init__(f"{message} ({', '.join(where)})" if where else message)

    def __reduce__(self):  # type: ignore[no-untyped-def]  # keep the keywords across processes
        return (_rebuild, (type(self), self.detail, self.group, self.seq, self.op, self.ranks))


def _rebuild(
    cls: type[CollectiveError], message: str, group: str, seq: int, op: str, ranks: tuple[int, ...]
) -> CollectiveError:
    return cls(message, group=group, seq=seq, op=op, ranks=ranks)


class CollectiveTimeoutError(CollectiveError, TimeoutError):
    """The collective did not complete within its timeout; ``ranks`` are those not heard from."""


class PeerFailureError(CollectiveError):
    """A member of the group died or its connection broke; ``ranks`` names it."""


class MismatchError(CollectiveError):
    """Members called different collectives, or the same one with different dtype, count or op."""


class RemoteAbortError(CollectiveError):
    """Another member aborted this collective; the message carries its reason."""


class GroupBrokenError(CollectiveError):
    """An earlier collective on this group failed or was cancelled; the group cannot be used."""


__all__ = [
    "AiocollError",
    "NotInitializedError",
    "StoreError",
    "TransportError",
    "HandshakeError",
    "CollectiveError",
    "CollectiveTimeoutError",
    "PeerFailureError",
    "MismatchError",
    "RemoteAbortError",
    "GroupBrokenError",
]
