"""S7 addresses in the usual STEP 7 form, and the data types read at them.

Pure and light (no driver import): ``plantbus check`` parses every address with it.

Forms (case-insensitive, an optional leading ``%``, an optional ``:TYPE`` suffix)::

    DB1.DBX0.1   DB1.DBB2   DB1.DBW4   DB1.DBD6   DB1.DBD10:LREAL   DB1.DBB20:STRING[16]
    M10.2  MX10.2  MB10  MW20  MD30      I0.0  IB0  IW2  ID4      Q0.0  QB0  QW2  QD4

``E`` and ``A`` (the German mnemonics) are accepted for ``I`` and ``Q``. The size letter
(``X`` bit, ``B`` byte, ``W`` word, ``D`` double word) gives the default type (``bool``,
``byte``, ``word``, ``dword``) and must match the width of a 1, 2 or 4 byte type; a wider
type (``lreal``, ``lint``, ``string[n]``, ``date_and_time``, ...) only starts at the
address, so it may follow any of ``B``, ``W``, ``D``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "AREA_CODES",
    "FIXED_TYPES",
    "MAX_OFFSET",
    "Address",
    "S7Type",
    "parse_address",
    "parse_type",
]

# S7 area codes on the wire (S7-Any address specification)
AREA_CODES: dict[str, int] = {"I": 0x81, "Q": 0x82, "M": 0x83, "DB": 0x84}

MAX_OFFSET = 65535
"""Highest byte address: classic (absolute) access reaches 64 KiB of a DB or area."""

MAX_DB = 65535

# name -> size in bytes
FIXED_TYPES: dict[str, int] = {
    "bool": 1,
    "byte": 1,
    "char": 1,
    "sint": 1,
    "usint": 1,
    "word": 2,
    "int": 2,
    "uint": 2,
    "dword": 4,
    "dint": 4,
    "udint": 4,
    "real": 4,
    "lword": 8,
    "lint": 8,
    "ulint": 8,
    "lreal": 8,
    "date_and_time": 8,
    "dtl": 12,
}
_ALIASES = {"dt": "date_and_time"}
_DEFAULT_FOR_SIZE = {"X": "bool", "B": "byte", "W": "word", "D": "dword"}
_LETTER_FOR_WIDTH = {1: "B", 2: "W", 4: "D"}
_MAX_CHARS = {"string": 254, "wstring": 16382}

_STRING_RE = re.compile(r"^(w?string)(?:\[\s*(\d+)\s*\])?$")
_DB_RE = re.compile(r"^DB(\d+)\.DB([XBWD])(\d+)(?:\.(\d+))?$")
_AREA_RE = re.compile(r"^([MIQEA])([XBWD]?)(\d+)(?:\.(\d+))?$")
_AREA_ALIASES = {"E": "I", "A": "Q"}


@dataclass(frozen=True, slots=True)
class S7Type:
    """A data type as read from the PLC.

    Attributes:
        name: canonical lower-case name (``int``, ``string[16]``, ``date_and_time``).
        base: the name without a length (``string`` for ``string[16]``).
        size: bytes it occupies (a STRING its 2 header bytes + ``chars``).
        chars: the declared length of a ``string`` / ``wstring``, else 0.
    """

    name: str
    base: str
    size: int
    chars: int = 0


def parse_type(text: str) -> S7Type:
    """An ``S7Type`` from its name (case-insensitive): ``"int"``, ``"REAL"``, ``"string[20]"``.

    ``string`` / ``wstring`` without a length are the S7 default of 254 characters.

    Raises:
        ValueError: an unknown type or an impossible string length.
    """
    t = text.strip().lower()
    t = _ALIASES.get(t, t)
    if t in FIXED_TYPES:
        return S7Type(t, t, FIXED_TYPES[t])
    m = _STRING_RE.match(t)
    if m:
        base = m.group(1)
        chars = int(m.group(2)) if m.group(2) is not None else 254
        if not 1 <= chars <= _MAX_CHARS[base]:
            raise ValueError(
                f"{base} length must be 1 to {_MAX_CHARS[base]} characters, not {chars}"
            )
        size = 2 + chars if base == "string" else 4 + 2 * chars
        return S7Type(f"{base}[{chars}]", base, size, chars)
    known = ", ".join([*FIXED_TYPES, "dt", "string[n]", "wstring[n]"])
    raise ValueError(f"unknown S7 type {text!r} (known: {known})")


@dataclass(frozen=True, slots=True)
class Address:
    """Where a point lives in the PLC and how it is decoded.

    Attributes:
        area: ``DB``, ``M`` (merker), ``I`` (inputs) or ``Q`` (outputs).
        db: the DB number (0 outside ``DB``).
        offset: first byte.
        bit: bit number 0-7 of a ``bool``, else ``None``.
        type: the data type.
    """

    area: str
    db: int
    offset: int
    bit: int | None
    type: S7Type

    @property
    def size(self) -> int:
        return self.type.size

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.offset + self.type.size

    @property
    def area_code(self) -> int:
        return AREA_CODES[self.area]

    @property
    def block(self) -> tuple[str, int]:
        """``(area, db)``: what a range of bytes belongs to."""
        return (self.area, self.db)

    def __str__(self) -> str:
        """The canonical form: ``DB1.DBW4:INT``, ``M10.2``, ``IB0``, ``DB1.DBD10:LREAL``."""
        t = self.type
        if self.bit is not None:
            letter, where = "X", f"{self.offset}.{self.bit}"
        else:
            letter, where = _LETTER_FOR_WIDTH.get(t.size, "B"), str(self.offset)
        if self.area == "DB":
            text = f"DB{self.db}.DB{letter}{where}"
        elif letter == "X":
            text = f"{self.area}{where}"
        else:
            text = f"{self.area}{letter}{where}"
        default = _DEFAULT_FOR_SIZE[letter] if t.size <= 4 else None
        return text if t.name == default else f"{text}:{t.name.upper()}"


def parse_address(text: str, type_name: str | None = None) -> Address:
    """Parse an S7 address such as ``DB1.DBW4`` with an optional type (``type`` key or suffix).

    Args:
        text: the address, e.g. ``DB1.DBX0.1``, ``MW20``, ``DB1.DBD10:LREAL``.
        type_name: the point's ``type`` key; it must agree with a ``:TYPE`` suffix if both
            are given.

    Raises:
        ValueError: with a message saying what is wrong and, where it can, what to write.
    """
    return _parse(text.strip(), None if type_name is None else type_name.strip())


@lru_cache(maxsize=4096)
def _parse(text: str, type_name: str | None) -> Address:
    raw = text
    s = text.upper()
    if s.startswith("%"):
        s = s[1:]
    suffix: str | None = None
    if ":" in s:
        s, _, suffix = s.partition(":")
        s, suffix = s.strip(), suffix.strip()
        if not suffix:
            raise ValueError(f"address {raw!r}: nothing after ':' (e.g. {s}:REAL)")
    s = s.replace(" ", "")

    m = _DB_RE.match(s)
    if m:
        area, db = "DB", int(m.group(1))
        letter, offset_text, bit_text = m.group(2), m.group(3), m.group(4)
        if not 1 <= db <= MAX_DB:
            raise ValueError(f"address {raw!r}: DB number must be 1 to {MAX_DB}, not {db}")
    else:
        m = _AREA_RE.match(s)
        if not m:
            raise ValueError(
                f"address {raw!r} is not an S7 address (e.g. DB1.DBX0.1, DB1.DBW4, "
                "M10.2, MW20, I0.0, QB0)"
            )
        area, db = _AREA_ALIASES.get(m.group(1), m.group(1)), 0
        letter, offset_text, bit_text = m.group(2), m.group(3), m.group(4)
        if not letter:
            if bit_text is None:
                raise ValueError(
                    f"address {raw!r} needs a bit ({area}{offset_text}.0) or a size "
                    f"({area}B{offset_text}, {area}W{offset_text}, {area}D{offset_text})"
                )
            letter = "X"

    offset = int(offset_text)
    if offset > MAX_OFFSET:
        raise ValueError(f"address {raw!r}: byte offset must be at most {MAX_OFFSET}")
    if letter == "X":
        if bit_text is None:
            raise ValueError(f"address {raw!r}: a bit address needs its bit, e.g. .0 to .7")
        bit: int | None = int(bit_text)
        if bit > 7:
            raise ValueError(f"address {raw!r}: bit must be 0 to 7, not {bit}")
    elif bit_text is not None:
        raise ValueError(
            f"address {raw!r}: only a bit address (X) takes a bit number after the offset"
        )
    else:
        bit = None

    stype = _resolve_type(raw, letter, suffix, type_name)
    if (stype.base == "bool") != (letter == "X"):
        if letter == "X":
            raise ValueError(f"address {raw!r} is a bit, so its type is bool, not {stype.name}")
        where = f"DB{db}.DBX{offset}.0" if area == "DB" else f"{area}{offset}.0"
        raise ValueError(f"address {raw!r}: a bool needs a bit address such as {where}")
    if letter in "BWD" and stype.size <= 4 and _LETTER_FOR_WIDTH[stype.size] != letter:
        want = _LETTER_FOR_WIDTH[stype.size]
        better = f"DB{db}.DB{want}{offset}" if area == "DB" else f"{area}{want}{offset}"
        width = {"B": 1, "W": 2, "D": 4}[letter]
        raise ValueError(
            f"address {raw!r}: type {stype.name} is {stype.size} byte"
            f"{'s' if stype.size > 1 else ''} but a {letter} address is {width}: use {better}"
        )
    if offset + stype.size > MAX_OFFSET + 1:
        raise ValueError(
            f"address {raw!r}: {stype.name} at byte {offset} ends beyond byte {MAX_OFFSET}"
        )
    return Address(area, db, offset, bit, stype)


def _resolve_type(raw: str, letter: str, suffix: str | None, type_name: str | None) -> S7Type:
    try:
        from_suffix = parse_type(suffix) if suffix is not None else None
    except ValueError as e:
        raise ValueError(f"address {raw!r}: {e}") from None
    try:
        from_key = parse_type(type_name) if type_name is not None else None
    except ValueError as e:
        raise ValueError(f"type: {e}") from None
    if from_suffix is not None and from_key is not None and from_suffix != from_key:
        raise ValueError(
            f"address {raw!r} says {from_suffix.name} but type says {from_key.name}: "
            "give the type once"
        )
    return from_suffix or from_key or parse_type(_DEFAULT_FOR_SIZE[letter])
