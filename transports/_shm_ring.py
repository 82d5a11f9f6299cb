"""A single-producer, single-consumer byte ring in shared memory, carrying framed messages.

Layout of the segment (counters are native-endian u64, each on its own cache line so that the
writer's and the reader's stores never share a line)::

    offset    0  magic "AIOCRNG1"        offset  64  head   (bytes written; writer only)
    offset    8  capacity                offset 128  tail   (bytes consumed; reader only)
                                         offset 192  reader-sleeping flag (reader only)
                                         offset 256  writer-sleeping flag (writer only)
                                         offset 320  goodbye: the writer closed (writer only)
    offset 4096  data[capacity]          (capacity: a power of two, at least 64 KiB)

A frame is a 64-byte header (``"ACF1" | 0:u32 | nbytes:u64 | key[32] | zeros``) and its payload,
padded to a multiple of 64, so every header is aligned and never wraps around the end of the
ring (payloads may). head and tail only grow; a position is the counter mod capacity. The
writer publishes head after writing the bytes it covers; the reader publishes tail after copying
out the bytes it covers (``_shm_doorbell`` explains why that order suffices on x86). Large
payloads stream: the reader copies out while the writer is still copying in.

This module is the memory layout and the copies, nothing else: no sockets, no waiting.
"""

from __future__ import annotations

import mmap
import struct

from . import KEY_SIZE

MAGIC = int.from_bytes(b"AIOCRNG1", "little")
HEADER_BYTES = 4096
FRAME_HEADER = 64
_FRAME = struct.Struct(f"<4sIQ{KEY_SIZE}s")
_FRAME_MAGIC = b"ACF1"
MIN_CAPACITY = 64 << 10

# u64 indexes of the control words
_MAGIC, _CAPACITY, _HEAD, _TAIL, _READER_SLEEPING, _WRITER_SLEEPING, _GOODBYE = 0, 1, 8, 16, 24, 32, 40


def segment_size(capacity: int) -> int:
    """Bytes of shared memory a ring of ``capacity`` data bytes needs."""
    return HEADER_BYTES + capacity


def check_capacity(capacity: int) -> int:
    """``capacity`` if usable.

    Raises:
        ValueError: not a power of two, or below 64 KiB.
    """
    if capacity < MIN_CAPACITY or capacity & (capacity - 1):
        raise ValueError(f"ring capacity must be a power of two >= {MIN_CAPACITY}, got {capacity}")
    return capacity


def padded(nbytes: int) -> int:
    """Bytes a payload of ``nbytes`` occupies in the ring."""
    return (nbytes + 63) & ~63


class RingError(Exception):
    """The ring's contents break the format (a corrupt or hostile peer)."""


class Ring:
    """One side's view of a ring: the writer uses ``put*``/``publish``, the reader ``get*``/``release``.

    Each side caches its own counter (the writer's head, the reader's tail) and reads the other
    side's from shared memory.
    """

    def __init__(self, mm: mmap.mmap, capacity: int, *, initialise: bool) -> None:
        self._mm = mm
        self._q = memoryview(mm).cast("Q")
        self._data = memoryview(mm)[HEADER_BYTES : HEADER_BYTES + capacity]
        self.capacity = capacity
        self._mask = capacity - 1
        if initialise:
            self._q[_CAPACITY] = capacity
            self._q[_MAGIC] = MAGIC
        elif self._q[_MAGIC] != MAGIC or self._q[_CAPACITY] != capacity:
            raise RingError("shared segment is not an aiocoll ring of the announced capacity")
        self._head = self._q[_HEAD]
        self._tail = self._q[_TAIL]

    # ------------------------------------------------------------------ writer side
    def free(self) -> int:
        """Bytes the writer may write now."""
        return self.capacity - (self._head - self._q[_TAIL])

    def unpublished(self) -> bool:
        return self._head != self._q[_HEAD]

    def put_header(self, key: bytes, nbytes: int) -> None:
        """Write a frame header (the caller checked ``free() >= FRAME_HEADER``)."""
        pos = self._head & self._mask
        _FRAME.pack_into(self._data, pos, _FRAME_MAGIC, 0, nbytes, key)
        self._data[pos + _FRAME.size : pos + FRAME_HEADER] = bytes(FRAME_HEADER - _FRAME.size)
        self._head += FRAME_HEADER

    def put(self, src: memoryview) -> None:
        """Append ``src`` (at most ``free()`` bytes), wrapping around the end of the ring."""
        n = src.nbytes
        pos = self._head & self._mask
        first = min(n, self.capacity - pos)
        self._data[pos : pos + first] = src[:first]
        if first < n:
            self._data[: n - first] = src[first:]
        self._head += n

    def pad(self, nbytes: int) -> None:
        """Skip to the next 64-byte boundary after a payload of ``nbytes``."""
        self._head += padded(nbytes) - nbytes

    def publish(self) -> None:
        """Make everything written so far visible to the reader."""
        self._q[_HEAD] = self._head

    @property
    def reader_sleeping(self) -> bool:
        return bool(self._q[_READER_SLEEPING])

    def set_writer_sleeping(self, on: bool) -> None:
        self._q[_WRITER_SLEEPING] = int(on)

    def say_goodbye(self) -> None:
        self._q[_GOODBYE] = 1

    # ------------------------------------------------------------------ reader side
    def available(self) -> int:
        """Bytes the reader may consume now."""
        return self._q[_HEAD] - self._tail

    def get_header(self) -> tuple[bytes, int]:
        """Read the frame header at the tail (the caller checked ``available() >= FRAME_HEADER``).

        Raises:
            RingError: not a frame header.
        """
        pos = self._tail & self._mask
        magic, _, nbytes, key = _FRAME.unpack_from(self._data, pos)
        if magic != _FRAME_MAGIC:
            raise RingError(f"bad frame magic {magic!r} at ring offset {self._tail}")
        self._tail += FRAME_HEADER
        return bytes(key), nbytes

    def get(self, dst: memoryview) -> None:
        """Copy ``dst.nbytes`` bytes (at most ``available()``) out of the ring into ``dst``."""
        n = dst.nbytes
        pos = self._tail & self._mask
        first = min(n, self.capacity - pos)
        dst[:first] = self._data[pos : pos + first]
        if first < n:
            dst[first:] = self._data[: n - first]
        self._tail += n

    def skip(self, n: int) -> None:
        self._tail += n

    def release(self) -> None:
        """Hand the bytes consumed so far back to the writer."""
        self._q[_TAIL] = self._tail

    @property
    def writer_sleeping(self) -> bool:
        return bool(self._q[_WRITER_SLEEPING])

    def set_reader_sleeping(self, on: bool) -> None:
        self._q[_READER_SLEEPING] = int(on)

    @property
    def goodbye(self) -> bool:
        return bool(self._q[_GOODBYE])

    # ------------------------------------------------------------------ both
    def close(self) -> None:
        """Drop this side's views and unmap (the other side's mapping stays valid)."""
        self._q.release()
        self._data.release()
        try:
            self._mm.close()
        except BufferError:  # pragma: no cover - a view escaped; the GC unmaps it later
            pass


__all__ = ["FRAME_HEADER", "Ring", "RingError", "check_capacity", "padded", "segment_size"]
