"""A small, safe serialisation for object collectives: no code runs when decoding.

Encodes None, bool, int (any size), float, complex, str, bytes, list, tuple, dict, numpy arrays
and numpy scalars of numeric or bool dtype (raw buffers, no copy through text). Decoding
bounds depth and checks every length against what is left, so hostile bytes can neither make
it allocate more than the message holds nor recurse without end. Pickle is never used here;
the object collectives use it only when the caller passes ``allow_pickle=True``.

Format: one tag byte per value, then lengths as unsigned LEB128 varints.
"""

from __future__ import annotations

import re
import struct
from typing import Any

import numpy as np

from ..arrays.dtypes import wire_dtype

MAX_DEPTH = 100

# What encode() writes for a dtype: byte order, kind, item size ("<f4", "|b1", "<c16").
_DTYPE = re.compile(rb"[<>|=]?[biufc][0-9]{1,2}")

_NONE, _TRUE, _FALSE, _INT, _NEGINT, _FLOAT, _COMPLEX, _STR, _BYTES, _LIST, _TUPLE, _DICT, _ARRAY, _SCALAR = range(14)


class CodecError(ValueError):
    """The object cannot be encoded, or the bytes are not a valid encoding."""


def _varint(n: int, out: bytearray) -> None:
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return


def _enc(obj: Any, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise CodecError(f"object nested deeper than {MAX_DEPTH} levels")
    if obj is None:
        out.append(_NONE)
    elif obj is True:
        out.append(_TRUE)
    elif obj is False:
        out.append(_FALSE)
    elif isinstance(obj, int) and not isinstance(obj, np.integer):
        out.append(_INT if obj >= 0 else _NEGINT)
        mag = abs(obj)
        raw = mag.to_bytes((mag.bit_length() + 7) // 8, "little")
        _varint(len(raw), out)
        out += raw
    elif isinstance(obj, float):
        out.append(_FLOAT)
        out += struct.pack("<d", obj)
    elif isinstance(obj, complex):
        out.append(_COMPLEX)
        out += struct.pack("<dd", obj.real, obj.imag)
    elif isinstance(obj, str):
        raw = obj.encode("utf-8", "surrogatepass")
        out.append(_STR)
        _varint(len(raw), out)
        out += raw
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        raw = bytes(obj)
        out.append(_BYTES)
        _varint(len(raw), out)
        out += raw
    elif isinstance(obj, (list, tuple)):
        out.append(_LIST if isinstance(obj, list) else _TUPLE)
        _varint(len(obj), out)
        for item in obj:
            _enc(item, out, depth + 1)
    elif isinstance(obj, dict):
        out.append(_DICT)
        _varint(len(obj), out)
        for k, v in obj.items():
            _enc(k, out, depth + 1)
            _enc(v, out, depth + 1)
    elif isinstance(obj, (np.ndarray, np.generic)):
        arr = np.asarray(obj)
        try:
            wire_dtype(arr.dtype)
        except TypeError as exc:
            raise CodecError(str(exc)) from None
        out.append(_ARRAY if isinstance(obj, np.ndarray) else _SCALAR)
        dt = arr.dtype.newbyteorder("<").str.encode()
        _varint(len(dt), out)
        out += dt
        _varint(arr.ndim, out)
        for s in arr.shape:
            _varint(s, out)
        out += np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
    else:
        raise CodecError(
            f"cannot encode {type(obj).__name__} safely; pass allow_pickle=True to send arbitrary "
            "objects between trusted ranks"
        )


def encode(obj: Any) -> bytes:
    """Encode ``obj``.

    Raises:
        CodecError: a value of an unsupported type, nesting deeper than MAX_DEPTH, or any
            other failure while walking the object.
    """
    out = bytearray()
    try:
        _enc(obj, out, 0)
    except CodecError:
        raise
    except Exception as exc:  # e.g. a container changed while it was being encoded
        raise CodecError(f"cannot encode {type(obj).__name__}: {type(exc).__name__}: {exc}") from exc
    return bytes(out)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise CodecError(f"truncated: need {n} bytes at offset {self.pos}, {len(self.data) - self.pos} left")
        view = self.data[self.pos : self.pos + n]
        self.pos += n
        return view

    def varint(self) -> int:
        n = shift = 0
        while True:
            b = self.take(1)[0]
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7
            if shift > 63:
                raise CodecError("length field too long")


def _dec(r: _Reader, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise CodecError(f"nested deeper than {MAX_DEPTH} levels")
    tag = r.take(1)[0]
    if tag == _NONE:
        return None
    if tag == _TRUE:
        return True
    if tag == _FALSE:
        return False
    if tag in (_INT, _NEGINT):
        mag = int.from_bytes(r.take(r.varint()), "little")
        return mag if tag == _INT else -mag
    if tag == _FLOAT:
        return struct.unpack("<d", r.take(8))[0]
    if tag == _COMPLEX:
        re, im = struct.unpack("<dd", r.take(16))
        return complex(re, im)
    if tag == _STR:
        return bytes(r.take(r.varint())).decode("utf-8", "surrogatepass")
    if tag == _BYTES:
        return bytes(r.take(r.varint()))
    if tag in (_LIST, _TUPLE):
        n = r.varint()
        if n > len(r.data) - r.pos:  # every item takes at least one byte
            raise CodecError(f"list of {n} items in {len(r.data) - r.pos} bytes")
        items = [_dec(r, depth + 1) for _ in range(n)]
        return items if tag == _LIST else tuple(items)
    if tag == _DICT:
        n = r.varint()
        if 2 * n > len(r.data) - r.pos:
            raise CodecError(f"dict of {n} items in {len(r.data) - r.pos} bytes")
        out: dict[Any, Any] = {}
        for _ in range(n):
            k = _dec(r, depth + 1)
            try:
                out[k] = _dec(r, depth + 1)
            except TypeError as exc:
                raise CodecError(f"unhashable dict key: {exc}") from None
        return out
    if tag in (_ARRAY, _SCALAR):
        raw_dt = bytes(r.take(r.varint()))
        # np.dtype() parses its argument as a little language (tuples, commas, field lists;
        # "i4,(" raised SyntaxError): only the plain type strings that encode() writes reach it.
        if not _DTYPE.fullmatch(raw_dt):
            raise CodecError(f"bad array dtype {raw_dt[:40]!r}")
        try:
            dt = np.dtype(raw_dt.decode("ascii"))
            wire_dtype(dt.newbyteorder("="))
        except (TypeError, ValueError) as exc:
            raise CodecError(f"bad array dtype {raw_dt!r}: {exc}") from None
        ndim = r.varint()
        if ndim > 64:
            raise CodecError(f"array of {ndim} dimensions")
        shape = tuple(r.varint() for _ in range(ndim))
        count = 1
        for s in shape:
            count *= s
        raw = r.take(count * dt.itemsize)
        arr = np.frombuffer(raw, dtype=dt).reshape(shape).astype(dt.newbyteorder("="))
        return arr if tag == _ARRAY else arr[()]
    raise CodecError(f"unknown tag {tag} at offset {r.pos - 1}")


def decode(data: bytes) -> Any:
    """Decode what ``encode`` made.

    Raises:
        CodecError: the bytes are truncated, malformed, or have trailing garbage. Nothing else:
            whatever a hostile message makes the decoder or numpy raise is reported as this.
    """
    r = _Reader(data)
    try:
        obj = _dec(r, 0)
    except CodecError:
        raise
    except Exception as exc:
        # The bytes come from the network: any other exception here is a malformed message
        # reaching a case the checks above did not foresee, never a reason to crash the caller
        # with an error type it cannot expect.
        raise CodecError(f"malformed value at offset {r.pos}: {type(exc).__name__}: {exc}") from None
    if r.pos != len(r.data):
        raise CodecError(f"{len(r.data) - r.pos} bytes of trailing garbage")
    return obj
