"""Decoding S7 values from the bytes read: one small function per point, built once.

All S7 values are big-endian. What each type becomes in a record:

* ``bool`` -> bool; ``byte``, ``word``, ``dword``, ``lword`` and the integer types -> int;
* ``real`` -> float: the shortest decimal that reads back as the same 32-bit REAL, so a
  PLC's ``1.013`` is written as ``1.013``, not ``1.0130000114440918`` (its exact binary
  value); ``lreal`` -> float as is;
* ``char`` -> a 1-character str; ``string[n]`` -> str (Latin-1, the current length from the
  header); ``wstring[n]`` -> str (UTF-16);
* ``date_and_time`` (BCD) and ``dtl`` -> ISO 8601 text without a zone
  (``2024-03-27T14:30:00.250``, ``dtl`` with 9 fraction digits), because S7 keeps neither
  a time zone nor a UTC convention: the text is the PLC's clock as it is. It sorts in time
  order.

A value that cannot be decoded (a BCD digit above 9, a month 13, a string whose header
claims more characters than were read) raises ``DecodeError``; the point is then Bad.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import datetime

from plantbus.broker.record import FieldValue
from plantbus.connectors.s7.address import Address

__all__ = ["DecodeError", "Decoder", "decoder", "real_value"]

Decoder = Callable[[bytes | bytearray | memoryview, int], FieldValue]
"""``decode(buffer, position)``: the point's value from the bytes at ``position``."""


class DecodeError(ValueError):
    """The bytes read do not hold a valid value of the point's type."""


_F32 = struct.Struct(">f")

_INT_FORMATS = {
    "byte": ">B",
    "usint": ">B",
    "sint": ">b",
    "word": ">H",
    "uint": ">H",
    "int": ">h",
    "dword": ">I",
    "udint": ">I",
    "dint": ">i",
    "lword": ">Q",
    "ulint": ">Q",
    "lint": ">q",
}


def real_value(x: float) -> float:
    """The shortest decimal that rounds to the same float32 as ``x`` (a REAL's value).

    Every decimal of up to 6 significant digits survives float32, and 9 digits always
    identify one; so the first of 6, 7, 8, 9 digits that round-trips is the shortest.
    """
    if x != x or x in (float("inf"), float("-inf")) or x == 0.0:
        return x
    pack, unpack = _F32.pack, _F32.unpack
    for digits in (6, 7, 8):
        y = float(f"{x:.{digits}g}")
        if unpack(pack(y))[0] == x:
            return y
    return float(f"{x:.9g}")


def _bcd(b: int) -> int:
    hi, lo = b >> 4, b & 0x0F
    if hi > 9 or lo > 9:
        raise DecodeError(f"invalid BCD byte 0x{b:02x}")
    return hi * 10 + lo


def _date_and_time(buf: bytes | bytearray | memoryview, pos: int) -> str:
    b = bytes(buf[pos : pos + 8])
    yy = _bcd(b[0])
    year = 1900 + yy if yy >= 90 else 2000 + yy
    ms_last = b[7] >> 4
    if ms_last > 9:
        raise DecodeError(f"invalid BCD nibble 0x{ms_last:x} in the milliseconds")
    ms = _bcd(b[6]) * 10 + ms_last
    try:
        # datetime() validates the calendar (month 13, 31 February, hour 24 ...)
        t = datetime(year, _bcd(b[1]), _bcd(b[2]), _bcd(b[3]), _bcd(b[4]), _bcd(b[5]))
    except ValueError as e:
        raise DecodeError(f"invalid DATE_AND_TIME {b.hex()}: {e}") from None
    return f"{t.isoformat()}.{ms:03d}"


_DTL = struct.Struct(">HBBBBBBI")


def _dtl(buf: bytes | bytearray | memoryview, pos: int) -> str:
    year, month, day, _weekday, hour, minute, second, ns = _DTL.unpack_from(buf, pos)
    if ns > 999_999_999:
        raise DecodeError(f"invalid DTL nanoseconds {ns}")
    try:
        t = datetime(year, month, day, hour, minute, second)
    except ValueError as e:
        raise DecodeError(f"invalid DTL: {e}") from None
    return f"{t.isoformat()}.{ns:09d}"


def _string(chars: int) -> Decoder:
    def decode(buf: bytes | bytearray | memoryview, pos: int) -> str:
        declared, length = buf[pos], buf[pos + 1]
        if length > declared:
            raise DecodeError(f"STRING header holds length {length} above its maximum {declared}")
        if length > chars:
            raise DecodeError(
                f"STRING holds {length} characters but the point reads {chars}: "
                f"declare it as string[{declared}]"
            )
        return bytes(buf[pos + 2 : pos + 2 + length]).decode("latin-1")

    return decode


def _wstring(chars: int) -> Decoder:
    header = struct.Struct(">HH")

    def decode(buf: bytes | bytearray | memoryview, pos: int) -> str:
        declared, length = header.unpack_from(buf, pos)
        if length > declared:
            raise DecodeError(f"WSTRING header holds length {length} above its maximum {declared}")
        if length > chars:
            raise DecodeError(
                f"WSTRING holds {length} characters but the point reads {chars}: "
                f"declare it as wstring[{declared}]"
            )
        raw = bytes(buf[pos + 4 : pos + 4 + 2 * length])
        return raw.decode("utf-16-be", errors="replace")

    return decode


def decoder(address: Address) -> Decoder:
    """The decode function of a point at ``address`` (its bit and type are built in)."""
    t = address.type
    base = t.base
    if base == "bool":
        mask = 1 << (address.bit or 0)
        return lambda buf, pos: bool(buf[pos] & mask)
    if base in _INT_FORMATS:
        unpack = struct.Struct(_INT_FORMATS[base]).unpack_from
        return lambda buf, pos: unpack(buf, pos)[0]  # type: ignore[no-any-return]
    if base == "real":
        unpack = _F32.unpack_from
        return lambda buf, pos: real_value(unpack(buf, pos)[0])
    if base == "lreal":
        unpack = struct.Struct(">d").unpack_from
        return lambda buf, pos: unpack(buf, pos)[0]  # type: ignore[no-any-return]
    if base == "char":
        return lambda buf, pos: chr(buf[pos])  # Latin-1: byte value = code point
    if base == "string":
        return _string(t.chars)
    if base == "wstring":
        return _wstring(t.chars)
    if base == "date_and_time":
        return _date_and_time
    if base == "dtl":
        return _dtl
    raise ValueError(f"no decoder for S7 type {t.name!r}")  # parse_type admits no other
