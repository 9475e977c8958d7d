"""Encoding command values into the bytes of S7 points (write-back): the reverse of ``decode``.

What each type takes (the values ``decode`` gives, so a value read can be written back):

* ``bool`` -> true / false (written as an S7 bit write: the other bits of the byte stay);
* ``byte`` … ``lword`` and the integer types -> an integer within the type's range;
* ``real`` / ``lreal`` -> a number (a REAL must fit float32);
* ``char`` -> a 1-character Latin-1 string; ``string[n]`` -> Latin-1 text of at most ``n``
  characters; ``wstring[n]`` -> text of at most ``n`` UTF-16 code units;
* ``date_and_time`` / ``dtl`` -> ISO 8601 text without a zone (``2024-03-27T14:30:00.250``),
  the PLC's clock as it is.

A value that does not fit raises ``EncodeError`` whose text is the reply's reason
(``out of range: …`` or ``refused: …``).
"""

from __future__ import annotations

import struct
from datetime import datetime

from plantbus.broker.connector import ValueKind
from plantbus.broker.record import FieldValue
from plantbus.connectors.s7.address import Address

__all__ = ["EncodeError", "encode", "value_kind"]

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
_SIGNED = {"sint", "int", "dint", "lint"}
_FLOAT_MAX = 3.4028234663852886e38
_TEXT = {"char", "string", "wstring", "date_and_time", "dtl"}


class EncodeError(ValueError):
    """The value cannot be written to the point; the text starts with its reply class."""


def value_kind(address: Address) -> ValueKind:
    """What a command may write at ``address``."""
    base = address.type.base
    if base == "bool":
        return "bool"
    if base in _INT_FORMATS:
        return "int"
    if base in ("real", "lreal"):
        return "float"
    return "str"


def _bcd(n: int) -> int:
    return (n // 10) << 4 | n % 10


def _parse_time(text: str, what: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise EncodeError(
            f"refused: {text!r} is not a {what} (ISO 8601 text such as 2024-03-27T14:30:00.250)"
        ) from None


def encode(name: str, address: Address, value: FieldValue) -> bytes:
    """The bytes of ``value`` at ``address`` (a bool: one byte, 1 or 0, for a bit write).

    Raises:
        EncodeError: the value is not of the point's kind or does not fit its type.
    """
    t = address.type
    base = t.base
    if base == "bool":
        if not isinstance(value, bool):
            raise EncodeError(f"refused: point {name!r} takes true or false, not {value!r}")
        return b"\x01" if value else b"\x00"
    if base in _INT_FORMATS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise EncodeError(f"refused: point {name!r} takes an integer, not {value!r}")
        if isinstance(value, float) and not value.is_integer():
            raise EncodeError(f"refused: point {name!r} takes an integer, not {value!r}")
        n = int(value)
        bits = 8 * t.size
        low, high = (
            (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if base in _SIGNED else (0, 2**bits - 1)
        )
        if not low <= n <= high:
            raise EncodeError(f"out of range: {value!r} does not fit {t.name} [{low}, {high}]")
        return struct.pack(_INT_FORMATS[base], n)
    if base in ("real", "lreal"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise EncodeError(f"refused: point {name!r} takes a number, not {value!r}")
        x = float(value)
        if base == "real":
            if abs(x) > _FLOAT_MAX:
                raise EncodeError(f"out of range: {value!r} does not fit a REAL")
            return struct.pack(">f", x)
        return struct.pack(">d", x)
    if base not in _TEXT:  # parse_type admits no other
        raise EncodeError(f"refused: point {name!r} is of type {t.name}, which cannot be written")
    if not isinstance(value, str):
        raise EncodeError(f"refused: point {name!r} takes a string, not {value!r}")
    if base == "char":
        if len(value) != 1 or ord(value) > 0xFF:
            raise EncodeError(f"out of range: a CHAR holds one Latin-1 character, not {value!r}")
        return value.encode("latin-1")
    if base == "string":
        try:
            raw = value.encode("latin-1")
        except UnicodeEncodeError:
            raise EncodeError(f"out of range: {value!r} is not Latin-1 text") from None
        if len(raw) > t.chars:
            raise EncodeError(
                f"out of range: {len(raw)} characters do not fit the {t.chars} of {t.name}"
            )
        return bytes((t.chars, len(raw))) + raw
    if base == "wstring":
        raw = value.encode("utf-16-be")
        units = len(raw) // 2
        if units > t.chars:
            raise EncodeError(
                f"out of range: {units} characters do not fit the {t.chars} of {t.name}"
            )
        return struct.pack(">HH", t.chars, units) + raw
    if base == "date_and_time":
        d = _parse_time(value, "DATE_AND_TIME")
        if not 1990 <= d.year <= 2089:
            raise EncodeError(f"out of range: a DATE_AND_TIME holds 1990 to 2089, not {d.year}")
        ms = d.microsecond // 1000
        weekday = d.isoweekday() % 7 + 1  # S7: 1 = Sunday
        return bytes(
            (
                _bcd(d.year % 100),
                _bcd(d.month),
                _bcd(d.day),
                _bcd(d.hour),
                _bcd(d.minute),
                _bcd(d.second),
                _bcd(ms // 10),
                (ms % 10) << 4 | weekday,
            )
        )
    d = _parse_time(value, "DTL")
    if not 1970 <= d.year <= 2262:
        raise EncodeError(f"out of range: a DTL holds 1970 to 2262, not {d.year}")
    # fromisoformat keeps microseconds; nanoseconds beyond them are taken from the text
    ns = d.microsecond * 1000
    frac = value.rpartition(".")[2] if "." in value else ""
    if frac.isdigit() and len(frac) > 6:
        ns = int(frac[:9].ljust(9, "0"))
    weekday = d.isoweekday() % 7 + 1
    return struct.pack(">HBBBBBBI", d.year, d.month, d.day, weekday, d.hour, d.minute, d.second, ns)
