"""Shared pieces of the payload decoders (MQTT payloads, text frames of legacy devices).

A decoder turns one payload (an MQTT message, a text frame) into ``Row``s: the values of one
timestamp, plus what the payload says about measurement and tags. The connector that owns the
decoder turns rows into ``Record``s of its Series. Decoders are pure and synchronous:

* a payload that cannot be read at all raises ``PayloadError`` (the connector counts and logs
  it, once per burst, and goes on);
* a value that is there but of the wrong type does not cost the rest of the payload: its point
  is marked Bad with ``BAD_TYPE_MISMATCH`` in ``Row.status`` and the reason is returned as a
  "problem" beside the rows.

Also here: text-to-value conversion (``convert``), the plain-number payload (``decode_number``)
and timestamps in the forms devices send (``TimeSpec``).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Literal

from plantbus.broker.record import FieldValue

__all__ = [
    "BAD_DECODING_ERROR",
    "BAD_NO_COMMUNICATION",
    "BAD_NO_DATA",
    "BAD_TYPE_MISMATCH",
    "TIME_UNITS",
    "VALUE_TYPES",
    "PayloadError",
    "Row",
    "TimeSpec",
    "ValueType",
    "convert",
    "decode_number",
    "preview",
]

# OPC UA StatusCodes (Part 4, 7.39 / Part 6 Annex A) used by the decoders.
BAD_TYPE_MISMATCH = 0x80740000
"""Bad_TypeMismatch: the value has a type the point's configured type cannot take."""
BAD_DECODING_ERROR = 0x80070000
"""Bad_DecodingError: the value could not be decoded (e.g. an unknown Sparkplug datatype)."""
BAD_NO_COMMUNICATION = 0x80310000
"""Bad_NoCommunication: the source went away (Sparkplug NDEATH / DDEATH)."""
BAD_NO_DATA = 0x809B0000
"""Bad_NoData: the source says the value is null."""

ValueType = Literal["float", "int", "bool", "string"]
VALUE_TYPES: tuple[str, ...] = ("float", "int", "bool", "string")

TIME_UNITS: dict[str, int] = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1


class PayloadError(ValueError):
    """A payload or frame that cannot be decoded at all; the message says why."""


class Row:
    """The values of one timestamp decoded from a payload.

    Attributes:
        fields: point name -> value (Bad points are not here).
        time_ns: the source timestamp, or None to use the receive time.
        measurement: a measurement the payload names (line protocol), else None.
        tags: tags the payload carries (line protocol, ``tag`` columns), else None.
        status: point -> OPC UA status code for points that are not Good, else None.
    """

    __slots__ = ("fields", "measurement", "status", "tags", "time_ns")

    def __init__(
        self,
        fields: dict[str, FieldValue],
        time_ns: int | None = None,
        measurement: str | None = None,
        tags: tuple[tuple[str, str], ...] | None = None,
        status: dict[str, int] | None = None,
    ):
        self.fields = fields
        self.time_ns = time_ns
        self.measurement = measurement
        self.tags = tags
        self.status = status

    def bad(self, point: str, code: int) -> None:
        """Mark ``point`` Bad with ``code`` (its value, if any, is removed)."""
        self.fields.pop(point, None)
        if self.status is None:
            self.status = {}
        self.status[point] = code

    def __repr__(self) -> str:
        return (
            f"Row({self.fields!r}, time_ns={self.time_ns}, measurement={self.measurement!r}, "
            f"tags={self.tags!r}, status={self.status!r})"
        )


def preview(data: bytes | str, limit: int = 120) -> str:
    """A short printable form of a payload or frame for a log line."""
    text = repr(data[:limit])
    return text + ("…" if len(data) > limit else "")


# -- values -------------------------------------------------------------------------------------

_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NON_FINITE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
_INT = re.compile(r"[+-]?[0-9]+")
_TRUE = frozenset({"true", "1", "on", "yes", "t", "y"})
_FALSE = frozenset({"false", "0", "off", "no", "f", "n"})


def convert(text: str, vtype: str) -> FieldValue:
    """Convert the text of one value to ``vtype``.

    Surrounding whitespace is ignored for numbers and booleans. Floats take the decimal forms
    ``21.5``, ``-3``, ``.5``, ``1e-3`` and ``nan`` / ``inf`` (which the encoders drop and mark
    Bad, so a device that reports "nan" on a sensor fault shows as a Bad point); ints are
    decimal int64; booleans are ``true/false``, ``1/0``, ``on/off``, ``yes/no``, ``t/f``,
    ``y/n`` in any case. Strings are kept as they are.

    Raises:
        PayloadError: the text is not a value of that type.
    """
    if vtype == "string":
        return text
    s = text.strip()
    if vtype == "float":
        if _FLOAT.fullmatch(s) or _NON_FINITE.fullmatch(s):
            return float(s)
        raise PayloadError(f"{preview(text, 40)} is not a number")
    if vtype == "int":
        if _INT.fullmatch(s):
            # int64 has 19 digits; beyond 4300 int() refuses with a plain ValueError
            v = int(s) if len(s.lstrip("+-").lstrip("0")) <= 19 else None
            if v is not None and INT64_MIN <= v <= INT64_MAX:
                return v
            raise PayloadError(f"{s if len(s) <= 40 else preview(s, 40)} is out of the int64 range")
        raise PayloadError(f"{preview(text, 40)} is not an integer")
    if vtype == "bool":
        low = s.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise PayloadError(f"{preview(text, 40)} is not a boolean (true/false, 1/0, on/off)")
    raise ValueError(f"unknown value type {vtype!r}")


def decode_number(payload: bytes, vtype: str = "float") -> FieldValue:
    """The value of a plain-value payload: ``b"21.5"``, ``b"-3\\n"``, ``b"on"``.

    Raises:
        PayloadError: not UTF-8, or not a value of ``vtype`` (see ``convert``).
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError("not UTF-8 text") from None
    if vtype != "string" and len(text) > 64:
        raise PayloadError(f"{len(payload)} bytes is too long for a single {vtype}")
    return convert(text, vtype)


# -- timestamps ---------------------------------------------------------------------------------

_ISO_FRACTION = re.compile(r"([T ]\d{2}:\d{2}:\d{2})[.,](\d+)")


class TimeSpec:
    """How a timestamp is written by a device, and how to read it into Unix ns.

    Args:
        format: ``"s"``, ``"ms"``, ``"us"`` or ``"ns"`` (a Unix epoch number, possibly
            fractional or written as text), ``"rfc3339"`` (ISO 8601 / RFC 3339 text such as
            ``2024-05-01T12:00:00.123456789Z``, fractions to the ns), or a ``strptime`` pattern
            containing ``%`` (``"%d.%m.%Y %H:%M:%S"``).
        timezone: the IANA zone of times written without an offset (default UTC).

    Raises:
        ValueError: an unknown format or time zone (for config validation).
    """

    __slots__ = ("format", "timezone", "tz", "unit")

    def __init__(self, format: str, timezone: str = "UTC"):
        self.format = format
        self.timezone = timezone
        self.unit = TIME_UNITS.get(format, 0)
        if not self.unit and format != "rfc3339" and "%" not in format:
            raise ValueError(
                f"unknown time format {format!r}: use s, ms, us, ns, rfc3339 or a strptime "
                "pattern such as '%Y-%m-%d %H:%M:%S'"
            )
        self.tz = _zone(timezone)

    def parse(self, value: object) -> int:
        """Unix ns of ``value`` (a number or text, as the format says).

        Raises:
            PayloadError: the value is not a timestamp of this format.
        """
        if self.unit:
            return self._epoch(value)
        if type(value) is not str:
            raise PayloadError(f"time {preview(str(value), 40)}: expected text ({self.format})")
        try:
            if self.format == "rfc3339":
                return self._iso(value.strip())
            return _ns(datetime.strptime(value.strip(), self.format), self.tz)
        except ValueError as e:
            raise PayloadError(f"time {preview(value, 40)}: {e}") from None

    def _epoch(self, value: object) -> int:
        t = type(value)
        if t is int:
            n = value * self.unit  # type: ignore[operator]
        elif t is float:
            if value != value or value in (float("inf"), float("-inf")):
                raise PayloadError(f"time {value!r} is not a finite number")
            try:
                n = round(Decimal(repr(value)) * self.unit)
            except ArithmeticError:  # decimal.Overflow on a huge exponent
                raise PayloadError(f"time {value!r} {self.format} is out of range") from None
        elif t is str:
            try:
                d = Decimal(value.strip())  # type: ignore[attr-defined]
                # round() of "1e999999" builds a million-digit int (25 s): a number of more
                # than 30 digits before the point is out of range anyway
                if d.is_finite() and d.adjusted() > 30:
                    raise OverflowError
                n = round(d * self.unit)
            except InvalidOperation:
                raise PayloadError(f"time {preview(value, 40)} is not a number") from None  # type: ignore[arg-type]
            except (ArithmeticError, ValueError):
                # decimal.Overflow ("1e999999"), or a value that round() cannot make an int
                raise PayloadError(f"time {preview(value, 40)} is out of range") from None  # type: ignore[arg-type]
        else:
            raise PayloadError(f"time: expected a number, got {type(value).__name__}")
        if not INT64_MIN < n < INT64_MAX:
            raise PayloadError(f"time {value!r} {self.format} is out of range")
        return int(n)

    def _iso(self, text: str) -> int:
        # datetime keeps microseconds: take the fraction off and add it back in ns
        frac_ns = 0
        m = _ISO_FRACTION.search(text)
        if m:
            digits = m.group(2)
            frac_ns = int((digits + "000000000")[:9])
            text = text[: m.start()] + m.group(1) + text[m.end() :]
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        dt = datetime.fromisoformat(text)
        return _ns(dt, self.tz) + frac_ns


def _ns(dt: datetime, tz: tzinfo) -> int:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=tz)
    delta = dt - _EPOCH
    ns = (delta // timedelta(microseconds=1)) * 1000
    # datetime spans years 1..9999, int64 ns only 1677..2262: the same limit as epoch numbers
    if not INT64_MIN < ns < INT64_MAX - 999_999_999:
        raise ValueError(f"{dt.isoformat()} is out of range (years 1678 to 2261)")
    return ns


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _zone(name: str) -> tzinfo:
    if name.upper() == "UTC":
        return UTC
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r} (use an IANA name such as 'Europe/Berlin')"
        ) from None
