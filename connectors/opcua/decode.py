"""From OPC UA DataValues to plantbus records: status codes, value types and timestamps.

Quality follows the status code's severity bits (Part 4, 7.34.1): ``00`` Good, ``01``
Uncertain, ``10`` (and the reserved ``11``) Bad. A Bad point is left out of the record's
fields and listed in its ``status`` with the server's code; an Uncertain point keeps its value
and is listed too. Two conditions of the value itself are reported with codes of their own:
a Good value that is empty (a Null variant) as ``BadNoValue``, and a value plantbus cannot
represent as a field (a structure) as ``BadDataEncodingUnsupported``.

Value types: Boolean → bool; the integer types and enumerations → int; Float and Double →
float; String → str; DateTime → int (Unix ns); ByteString → hex text; Guid, NodeId,
QualifiedName, LocalizedText → their text; StatusCode → int; arrays → JSON text.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from asyncua import ua

from plantbus.broker.ids import new_id, new_ids
from plantbus.broker.record import FieldValue, Quality, Record, Series

__all__ = [
    "BAD_DATA_ENCODING_UNSUPPORTED",
    "BAD_NOT_CONNECTED",
    "BAD_NO_VALUE",
    "BAD_TIMEOUT",
    "Decoder",
    "Unsupported",
    "datetime_ns",
    "field_value",
    "quality_of",
]

BAD_NO_VALUE = 0x80F00000
BAD_DATA_ENCODING_UNSUPPORTED = 0x80390000
BAD_NOT_CONNECTED = 0x808A0000
BAD_TIMEOUT = 0x800A0000

_SEVERITY = (Quality.GOOD, Quality.UNCERTAIN, Quality.BAD, Quality.BAD)
_PLAIN = frozenset({float, int, bool, str})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def quality_of(code: int) -> Quality:
    """The quality of an OPC UA status code, from its two severity bits."""
    return _SEVERITY[(code >> 30) & 3]


def datetime_ns(dt: datetime) -> int:
    """Unix nanoseconds of an OPC UA DateTime (asyncua decodes them as aware UTC datetimes)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // _MICROSECOND * 1000


class Unsupported(Exception):
    """A value that cannot be a field; ``code`` is the status code the point is marked with."""

    def __init__(self, code: int, what: str):
        super().__init__(what)
        self.code = code


def _json_item(v: Any) -> Any:
    if type(v) in _PLAIN or v is None:
        return v
    if isinstance(v, list | tuple):
        return [_json_item(x) for x in v]
    return field_value(v)


def field_value(v: Any) -> FieldValue:
    """``v``, a decoded Variant value, as a record field value.

    Raises:
        Unsupported: ``v`` is empty (``BadNoValue``) or has no field form
            (``BadDataEncodingUnsupported``).
    """
    if type(v) in _PLAIN:
        return v  # type: ignore[no-any-return]
    if v is None:
        raise Unsupported(BAD_NO_VALUE, "no value")
    # subclasses: enumerations (IntEnum) and asyncua's aliases of the builtin types
    if isinstance(v, bool):
        return bool(v)
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v)
    if isinstance(v, str):
        return str(v)
    if isinstance(v, datetime):
        return datetime_ns(v)
    if isinstance(v, bytes | bytearray):
        return bytes(v).hex()
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, ua.LocalizedText):
        return v.Text or ""
    if isinstance(v, ua.QualifiedName):
        return f"{v.NamespaceIndex}:{v.Name}"
    if isinstance(v, ua.NodeId):
        return v.to_string()
    if isinstance(v, ua.StatusCode):
        return int(v.value)
    if isinstance(v, list | tuple):
        return json.dumps([_json_item(x) for x in v], separators=(",", ":"))
    raise Unsupported(BAD_DATA_ENCODING_UNSUPPORTED, f"a {type(v).__name__} value")


class Decoder:
    """Turns (point name, DataValue) pairs of one read or publish into records.

    Args:
        series: the device's Series.
        timestamp: ``source``, ``server`` or ``read`` (see the device's ``timestamp`` key).

    With ``source`` (``server``) the pairs are grouped by the value's source (server)
    timestamp, one record per distinct timestamp; a value without one joins the record at
    read time. With ``read`` all values of one call form one record at read time.
    """

    __slots__ = ("_mode", "series")

    def __init__(self, series: Series, timestamp: str):
        self.series = series
        self._mode = ("source", "server", "read").index(timestamp)

    def records(self, items: Iterable[tuple[str, ua.DataValue]], read_ns: int) -> list[Record]:
        """The records of one read or publish response, in time order."""
        mode = self._mode
        plain = _PLAIN
        groups: dict[datetime | None, dict[str, FieldValue]] = {}
        marks: list[tuple[datetime | None, str, int]] = []
        for name, dv in items:
            if mode == 0:
                key = dv.SourceTimestamp or dv.ServerTimestamp
            elif mode == 1:
                key = dv.ServerTimestamp
            else:
                key = None
            fields = groups.get(key)
            if fields is None:
                fields = groups[key] = {}
            sc = dv.StatusCode
            code = sc.value if sc is not None else 0
            if code >= 0x80000000:  # Bad: its value (if any) must never be written
                marks.append((key, name, code))
                continue
            var = dv.Value
            v = var.Value if var is not None else None
            if type(v) not in plain:
                try:
                    v = field_value(v)
                except Unsupported as e:
                    marks.append((key, name, e.code))
                    continue
            fields[name] = v
            if code:
                marks.append((key, name, code))  # Uncertain (or Good with info bits: ignored)
        return self._assemble(groups, marks, read_ns)

    def _assemble(
        self,
        groups: dict[datetime | None, dict[str, FieldValue]],
        marks: list[tuple[datetime | None, str, int]],
        read_ns: int,
    ) -> list[Record]:
        # one record per distinct time: timestamps that convert to the same ns (or that are
        # missing or before 1970, which means "none" for many servers) share one record
        by_ns: dict[int, dict[str, FieldValue]] = {}
        key_ns: dict[datetime | None, int] = {}
        for key, fields in groups.items():
            ns = read_ns if key is None else datetime_ns(key)
            if ns <= 0:
                ns = read_ns
            key_ns[key] = ns
            have = by_ns.get(ns)
            if have is None:
                by_ns[ns] = fields
            else:
                have.update(fields)
        series = self.series
        times = sorted(by_ns) if len(by_ns) > 1 else list(by_ns)
        ids = new_ids(len(times))
        out = [Record(series, by_ns[ns], ns, uid) for ns, uid in zip(times, ids, strict=True)]
        if marks:
            index = {r.time_ns: r for r in out}
            for key, name, code in marks:
                index[key_ns[key]].mark(name, quality_of(code), code)
        return out

    def all_bad(self, names: Iterable[str], code: int, time_ns: int) -> Record:
        """One record that marks every point in ``names`` Bad with ``code`` (no fields)."""
        record = Record(self.series, {}, time_ns, new_id())
        quality = quality_of(code)
        for name in names:
            record.mark(name, quality, code)
        return record
