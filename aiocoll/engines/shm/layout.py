"""Where things live in a group's shared segment, and the typed views the algorithms use.

One segment per group, made by group rank 0 and mapped by every member::

    0            header: magic, version, world, part bytes C, depth D, size, the largest
                 one-round all_reduce, group id, setup token (one page)
    4096         control block of each member, 1024 bytes, written by that member only:
                   +0   STAGED    rounds whose input this member has published
                   +64  REDUCED   rounds whose reduced part this member has published
                   +128 RELEASED  rounds this member has finished reading from everyone
                   +192 sleeping: 1 while this member sleeps on its doorbell
                   +256 pid, attached flag
                   +320 doorbell name (64 bytes, NUL padded)
                   +384 descriptor slot i (8 u64) at +384+64*i, i < depth: what the member's
                        operation whose first round uses buffer slot i is (kind, op, dtype,
                        count, root, algorithm), so members catch mismatched calls
    data         per member, page aligned: stage[D][W*C] then result[D][C]

Counters only grow, in "rounds" (one pipelined step of an operation), and every operation
advances each member's STAGED, REDUCED and RELEASED by its number of rounds, so all members agree on where an
operation's rounds start without talking. Round g uses buffer slot g mod D; before a member
overwrites slot s it waits until every other member's RELEASED has passed the round that last used it.
The same wait protects descriptor slot s, so a member that runs ahead (a broadcast root waits
for nobody) cannot overwrite a descriptor that a slower member has yet to check.

The creator's header also fixes the tunables that every member must agree on (part size,
depth, the largest all_reduce done in one round), so a member started with other settings
follows the creator instead of falling out of step. The group id and a random token tell a
member which of the descriptors it was handed is the one its setup announced (``peek``): a
descriptor left over from a setup that failed carries another token.
"""

from __future__ import annotations

import array
import mmap
import os
import struct
from typing import Any

import numpy as np

MAGIC = int.from_bytes(b"AIOCGRP1", "little")
VERSION = 2
PAGE = 4096
CTRL_BYTES = 1024
MAX_DEPTH = 8
#: Fewest slots that work: the all_reduce pipeline has three rounds in flight (copy-in of round
#: k, reduction of k-1, copy-out of k-2), and a slot is reused only once its round is released;
#: with fewer slots every member waits for the others' copy-out, which waits for its own.
MIN_DEPTH = 3
_HEADER = struct.Struct("<10Q")  # magic, version, world, part, depth, size, direct_max, gid, token, reserved

# u64 offsets inside a control block
#: The three progress counters of a member (u64 offsets in its control block), all in rounds:
#: STAGED, its input for a round is in its staging slot; REDUCED, its reduced part of a round is
#: in its result area; RELEASED, it has finished reading everyone's slots of a round.
STAGED, REDUCED, RELEASED = 0, 8, 16
_SLEEPING = 24
_PID, _ATTACHED = 32, 33
_BELL_BYTE = 320
BELL_BYTES = 64
_DESC0 = 48
DESC_WORDS = 8


def _align(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


def segment_bytes(world: int, part: int, depth: int) -> int:
    """Bytes of a segment for ``world`` members with parts of ``part`` bytes, ``depth`` slots."""
    ctrl = _align(world * CTRL_BYTES)
    per_member = _align(depth * (world + 1) * part)
    return PAGE + ctrl + world * per_member


class GroupSegment:
    """Typed access to a mapped group segment.

    Attributes:
        world: members; part: bytes per part (C); depth: slots (D); slot_bytes: W*C.
        gid: the group's id; token: the creator's random token for this segment.
    """

    def __init__(
        self,
        mm: mmap.mmap | bytearray,
        *,
        world: int | None = None,
        part: int = 0,
        depth: int = 0,
        direct_max: int = 0,
        gid: int = 0,
        token: int = 0,
    ) -> None:
        """Wrap ``mm``. With ``world`` given, write a fresh header from the arguments (the
        creator); without, read and check the header (the other members).

        Raises:
            ValueError: the header is not an aiocoll group segment of this version, or it
                disagrees with the mapping's size; bad arguments for a fresh one.
        """
        self._mm = mm
        raw = memoryview(mm)
        if world is not None:
            if not MIN_DEPTH <= depth <= MAX_DEPTH or part <= 0 or part % PAGE:
                raise ValueError(
                    f"bad segment geometry: part {part} (a multiple of {PAGE}), depth {depth} ({MIN_DEPTH}..{MAX_DEPTH})"
                )
            size = segment_bytes(world, part, depth)
            _HEADER.pack_into(raw, 0, 0, VERSION, world, part, depth, size, direct_max, gid, token, 0)
            raw[:8] = MAGIC.to_bytes(8, "little")  # last: the header is whole once this is set
        magic, version, w, c, d, size, dmax, g, tok, _ = _HEADER.unpack_from(raw, 0)
        raw.release()
        if magic != MAGIC or version != VERSION:
            raise ValueError("shared segment is not an aiocoll group segment of this version")
        if not 1 <= d <= MAX_DEPTH or size != segment_bytes(w, c, d) or size > len(mm):
            raise ValueError(f"group segment header claims {size} bytes, the mapping has {len(mm)}")
        self.world, self.part, self.depth, self.direct_max = int(w), int(c), int(d), int(dmax)
        self.gid, self.token = int(g), int(tok)
        self.slot_bytes = self.world * self.part
        ctrl = _align(self.world * CTRL_BYTES)
        self._q = memoryview(mm)[PAGE : PAGE + ctrl].cast("Q")
        self._ctrl_raw = memoryview(mm)[PAGE : PAGE + ctrl]
        per_member = _align(self.depth * (self.world + 1) * self.part)
        data = np.frombuffer(mm, dtype=np.uint8, count=self.world * per_member, offset=PAGE + ctrl)
        #: stage[r][slot] is member r's uint8 staging area of W*C bytes for that slot
        self.stage: list[list[np.ndarray[Any, Any]]] = []
        #: result[r][slot] is member r's uint8 area of C bytes for its reduced part
        self.result: list[list[np.ndarray[Any, Any]]] = []
        for r in range(self.world):
            base = r * per_member
            self.stage.append(
                [data[base + s * self.slot_bytes : base + (s + 1) * self.slot_bytes] for s in range(self.depth)]
            )
            rbase = base + self.depth * self.slot_bytes
            self.result.append([data[rbase + s * self.part : rbase + (s + 1) * self.part] for s in range(self.depth)])
        self._bells: list[str] = [""] * self.world

    # ------------------------------------------------------------------ counters
    def counter(self, member: int, which: int) -> int:
        return int(self._q[member * (CTRL_BYTES // 8) + which])

    def set_counter(self, member: int, which: int, value: int) -> None:
        self._q[member * (CTRL_BYTES // 8) + which] = value

    def sleeping(self, member: int) -> bool:
        return bool(self._q[member * (CTRL_BYTES // 8) + _SLEEPING])

    def set_sleeping(self, member: int, on: bool) -> None:
        self._q[member * (CTRL_BYTES // 8) + _SLEEPING] = int(on)

    # ------------------------------------------------------------------ descriptors
    def write_descriptor(self, member: int, slot: int, words: tuple[int, ...]) -> None:
        """Record what ``member``'s operation whose first round uses ``slot`` is (at most
        DESC_WORDS words; written before that round is published)."""
        base = member * (CTRL_BYTES // 8) + _DESC0 + 8 * slot
        n = min(len(words), DESC_WORDS)
        # One copy; readers look only after the next counter store, so tearing cannot be seen.
        self._q[base : base + n] = array.array("Q", words[:n])

    def descriptor(self, member: int, slot: int, n: int = DESC_WORDS) -> list[int]:
        base = member * (CTRL_BYTES // 8) + _DESC0 + 8 * slot
        return self._q[base : base + n].tolist()

    # ------------------------------------------------------------------ membership
    def attach(self, member: int, bell: str) -> None:
        """Record this process as ``member`` with its doorbell's name."""
        name = bell.encode()
        if len(name) >= BELL_BYTES:
            raise ValueError(f"doorbell name too long: {bell!r}")
        off = member * CTRL_BYTES + _BELL_BYTE
        self._ctrl_raw[off : off + BELL_BYTES] = name.ljust(BELL_BYTES, b"\0")
        q = member * (CTRL_BYTES // 8)
        self._q[q + _PID] = os.getpid()
        self._q[q + _ATTACHED] = 1

    def attached(self, member: int) -> bool:
        return bool(self._q[member * (CTRL_BYTES // 8) + _ATTACHED])

    def pid(self, member: int) -> int:
        return int(self._q[member * (CTRL_BYTES // 8) + _PID])

    def bell(self, member: int) -> str:
        """``member``'s doorbell name ("" until it has attached)."""
        name = self._bells[member]
        if not name:
            off = member * CTRL_BYTES + _BELL_BYTE
            name = bytes(self._ctrl_raw[off : off + BELL_BYTES]).rstrip(b"\0").decode()
            self._bells[member] = name
        return name

    # ------------------------------------------------------------------ lifetime
    def close(self) -> bool:
        """Drop the views and unmap; False if a view is still in use (the GC unmaps later)."""
        self.stage = []
        self.result = []
        self._q.release()
        self._ctrl_raw.release()
        close = getattr(self._mm, "close", None)  # a plain bytearray (aiocoll.testing) has none
        if close is None:
            return True
        try:
            close()
        except BufferError:
            return False
        return True


def peek(fd: int) -> tuple[int, int, int] | None:
    """``(gid, token, size)`` from the header of the group segment file ``fd``, read without
    mapping it; None if ``fd`` holds no whole header of this version."""
    try:
        raw = os.pread(fd, _HEADER.size, 0)
    except OSError:
        return None
    if len(raw) < _HEADER.size:
        return None
    magic, version, _, _, _, size, _, gid, token, _ = _HEADER.unpack(raw)
    if magic != MAGIC or version != VERSION:
        return None
    return int(gid), int(token), int(size)


__all__ = ["STAGED", "REDUCED", "RELEASED", "DESC_WORDS", "MAX_DEPTH", "MIN_DEPTH", "GroupSegment", "peek", "segment_bytes"]
