"""The frame key: what every frame says about itself, in 32 bytes (transports' KEY_SIZE).

    gid:u64  seq:u48  step:u32  kind:u8  op:u8  dtype:u8  flags:u8  count:u48  call:u32

(gid, seq, step, flags) place the frame: which group, which collective in that group's order
(or, for point-to-point, the message number between the two ranks on that tag), and which of
the messages between this pair of ranks within the collective. (kind, op, dtype, count, call)
describe the sender's call, so a receiver detects a mismatch from the first frame instead of
reducing garbage: different collective, reduce op, element type, element count, or anything
else the members must agree on (root, shape, dim, permutation: see :class:`Call`), of which
``call`` carries a 32-bit digest. A digest cannot say what the other side called, so a receiver
that sees a different one asks the sender (a DESCRIBE control frame) and the sender, which
knows both calls, fails the collective on every member with a message naming both.

seq and count travel modulo 2**48: a group would need 2**48 collectives, an array 2**48
elements, to wrap (collectives refuse arrays that large).
"""

from __future__ import annotations

import functools
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

_KEY = struct.Struct("!QHIIBBBBHII")
assert _KEY.size == 32

#: seq and count are 48-bit fields
FIELD_MAX = 1 << 48
_LO = 0xFFFFFFFF

#: Steps of a collective's agreement rounds (Communicator.agree) start here; a schedule's own
#: messages between a pair never number that many.
AGREE_STEP = 1 << 31

FLAG_P2P = 1  # point-to-point: seq is the per-(pair, tag) message number, step is the tag
FLAG_CONTROL = 2  # control message (abort); payload is UTF-8 JSON


class Kind(IntEnum):
    """The collective a frame belongs to (names as in the public API)."""

    ALL_REDUCE = 1
    ALL_GATHER = 2
    REDUCE_SCATTER = 3
    ALL_TO_ALL = 4
    BROADCAST = 5
    REDUCE = 6
    GATHER = 7
    SCATTER = 8
    BARRIER = 9
    SEND = 10
    PERMUTE = 11
    BROADCAST_OBJECT = 12
    ALL_GATHER_OBJECT = 13
    ABORT = 250
    LOST = 251  # control: "rank N is lost", sent by a rank that saw it crash
    WAITING = 252  # control: "I am still in collective (gid, seq)", sent shortly before a timeout
    DESCRIBE = 253  # control: "my call at (gid, seq) was this; yours differs" (see Call)


@dataclass(frozen=True)
class FrameKey:
    gid: int
    seq: int
    step: int
    kind: int
    op: int
    dtype: int
    flags: int
    count: int
    call: int = 0

    def pack(self) -> bytes:
        seq, count = self.seq % FIELD_MAX, self.count % FIELD_MAX
        return _KEY.pack(
            self.gid, seq >> 32, seq & _LO, self.step, self.kind, self.op, self.dtype, self.flags,
            count >> 32, count & _LO, self.call,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> FrameKey:
        gid, seq_hi, seq_lo, step, kind, op, dtype, flags, count_hi, count_lo, call = _KEY.unpack(raw)
        return cls(gid, seq_hi << 32 | seq_lo, step, kind, op, dtype, flags, count_hi << 32 | count_lo, call)

    @property
    def slot(self) -> tuple[int, int, int, int]:
        """What a receive is matched on."""
        return (self.gid, self.seq, self.step, self.flags)


def kind_name(kind: int) -> str:
    try:
        return Kind(kind).name.lower()
    except ValueError:
        return f"kind {kind}"


def show_value(value: Any) -> str:
    """A field value as messages print it (shapes as tuples)."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return "(" + ", ".join(map(str, value)) + ("," if len(value) == 1 else "") + ")"
    return str(value)


class Call:
    """What the members of one collective must agree on besides kind, op, dtype and count.

    ``fields`` are (name, value) pairs in the order a message lists them, values being ints,
    strings or (nested) tuples of them: ``("src", 0)``, ``("shape", (2, 3))``, ``("dim", 1)``.
    Every frame of the collective carries :attr:`digest`.
    """

    __slots__ = ("fields", "digest")

    def __init__(self, *fields: tuple[str, Any]) -> None:
        self.fields: tuple[tuple[str, Any], ...] = tuple([(str(n), _plain(v)) for n, v in fields])
        self.digest = _digest(self.fields)

    def to_json(self) -> list[Any]:
        return [list(f) for f in self.fields]

    @classmethod
    def from_json(cls, data: Any) -> Call:
        """The Call a DESCRIBE frame carried.

        Raises:
            ValueError: ``data`` is not a list of [name, value] pairs of ints, strings and lists.
        """
        if not isinstance(data, list) or not all(isinstance(f, list) and len(f) == 2 and isinstance(f[0], str) for f in data):
            raise ValueError("malformed call description")
        try:
            return cls(*((f[0], f[1]) for f in data))
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"malformed call description: {exc}") from None

    def differences(self, other: Call, mine: str, theirs: str) -> list[str]:
        """Each field that differs, as "<name> <my value> on <mine> vs <their value> on <theirs>"."""
        a, b = dict(self.fields), dict(other.fields)
        out = []
        for name in [n for n, _ in self.fields] + [n for n, _ in other.fields if n not in a]:
            x, y = a.get(name), b.get(name)
            if x == y:
                continue
            label = name
            if isinstance(x, tuple) and isinstance(y, tuple) and len(x) == len(y) and any(isinstance(v, tuple) for v in x):
                # A list of shapes (coalesced collectives): name the first that differs.
                i = next(i for i, (p, q) in enumerate(zip(x, y)) if p != q)
                label, x, y = f"{name}[{i}]", x[i], y[i]
            out.append(f"{label} {show_value(x) if x is not None else 'not given'} on {mine} vs "
                       f"{show_value(y) if y is not None else 'not given'} on {theirs}")
        return out

    def __repr__(self) -> str:
        return "Call(" + ", ".join(f"{n}={show_value(v)}" for n, v in self.fields) + ")"


def _plain(value: Any) -> Any:
    """``value`` with lists as tuples and numpy ints as ints: hashable, and printed (repr) the
    same by every member."""
    kind = type(value)
    if kind is int or kind is str:
        return value
    if kind is tuple and all(type(v) is int for v in value):
        return value  # a shape, as collectives pass them
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, str):
        return value
    return int(value)


@functools.lru_cache(maxsize=4096)
def _digest(fields: tuple[tuple[str, Any], ...]) -> int:
    # Collectives repeat the same few calls (a training step's shapes): computed once each.
    return zlib.crc32(repr(fields).encode())


#: The call of a collective with nothing to agree on beyond kind, op, dtype and count.
NO_CALL = Call()
