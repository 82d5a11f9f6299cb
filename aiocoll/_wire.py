"""The frame key: what every frame says about itself, in 32 bytes (transports' KEY_SIZE).

    gid:u64  seq:u64  step:u32  kind:u8  op:u8  dtype:u8  flags:u8  count:u64

(gid, seq, step, flags) place the frame: which group, which collective in that group's order
(or, for point-to-point, the message number between the two ranks on that tag), and which of
the messages between this pair of ranks within the collective. (kind, op, dtype, count) describe
the sender's call, so a receiver detects a mismatch from the first frame instead of reducing
garbage: different collective, reduce op, element type or element count.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

_KEY = struct.Struct("!QQIBBBBQ")
assert _KEY.size == 32

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
    ABORT = 250
    LOST = 251  # control: "rank N is lost", sent by a rank that saw it crash
    WAITING = 252  # control: "I am still in collective (gid, seq)", sent shortly before a timeout


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

    def pack(self) -> bytes:
        return _KEY.pack(self.gid, self.seq, self.step, self.kind, self.op, self.dtype, self.flags, self.count)

    @classmethod
    def unpack(cls, raw: bytes) -> FrameKey:
        return cls(*_KEY.unpack(raw))

    @property
    def slot(self) -> tuple[int, int, int, int]:
        """What a receive is matched on."""
        return (self.gid, self.seq, self.step, self.flags)


def kind_name(kind: int) -> str:
    try:
        return Kind(kind).name.lower()
    except ValueError:
        return f"kind {kind}"
