"""The JSON record shape shared by the API, the bridges and punt-out.

One record is one object, a batch is a JSON array of them::

    {"uid": "0190…", "topic": "plant/h1/press7", "measurement": "press7",
     "time": 1732790000123456789, "tags": {"device": "press7", "line": "L1"},
     "fields": {"temp": 21.5, "running": true}, "quality": "good"}

``time`` is integer ns, ``quality`` one of ``good`` / ``uncertain`` / ``bad``, with
``"status": {"<point>": <source code>}`` when a point is not good. Results coming back from
punt-out add ``"parent": "<uid of the source record>"``.

Values follow the same rules as line protocol where JSON has the same limits: NaN and ±Inf
(which strict JSON cannot hold) are left out of ``fields``, the point is listed in ``status``
with ``NON_FINITE_STATUS`` and the record's quality becomes ``bad``; a point whose status is Bad
is never written as a value. Integers of any size are kept (JSON has no int64 limit; line
protocol drops those beyond int64 itself). Unlike a line, a record left with no value is
still written: its status is the news.
"""

from __future__ import annotations

import json as _json
from collections.abc import Mapping, Sequence
from typing import Any

from plantbus.broker.record import Quality, Record, Series
from plantbus.broker.topics import validate_topic
from plantbus.codecs.line_protocol import NON_FINITE_STATUS, EncodeStats, is_bad_status

__all__ = [
    "CODEC_NAME",
    "DecodeError",
    "SeriesCache",
    "decode",
    "encode",
    "record_to_dict",
    "to_record",
]

CODEC_NAME = "json"

_LABELS = {Quality.GOOD: "good", Quality.UNCERTAIN: "uncertain", Quality.BAD: "bad"}
_QUALITIES = frozenset(_LABELS.values())
_KEYS = frozenset(
    {"uid", "topic", "measurement", "time", "tags", "fields", "quality", "status", "parent"}
)
_STRING_KEYS = ("uid", "topic", "measurement", "parent")
_LEFT_OUT = {"uid": "a new one is given", "parent": "the record has none"}
_PLAIN = frozenset({float, int, bool, str})
_INF = float("inf")

# allow_nan=False: a NaN that slipped past the checks fails loudly instead of writing "NaN",
# which is not JSON. ensure_ascii=False keeps non-ASCII names readable and short.
_dumps = _json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode
_dumps_ascii = _json.JSONEncoder(allow_nan=False, ensure_ascii=True, separators=(",", ":")).encode


class DecodeError(ValueError):
    """A payload that is not a valid batch of JSON records; the message names the place."""


def _tags(record: Record) -> dict[str, str]:
    # one dict per series, shared by the records being dumped (json never mutates it)
    cache = record.series.cache
    tags = cache.get("json_tags")
    if tags is None:
        tags = cache["json_tags"] = dict(record.series.tags)
    return tags  # type: ignore[no-any-return]


def _clean(record: Record) -> tuple[dict[str, Any], dict[str, int] | None, Quality, int]:
    """Fields, status and quality with non-finite and Bad values taken out (copies).

    Raises:
        ValueError: a value is not a number, boolean or string, or the quality is unknown.
    """
    status = dict(record.status) if record.status else {}
    quality = Quality(record.quality)
    fields: dict[str, Any] = {}
    dropped = 0
    for k, v in record.fields.items():
        code = status.get(k)
        if code is not None and is_bad_status(code):
            quality = Quality.BAD
            continue
        t = type(v)
        if t not in _PLAIN:
            # subclasses (IntEnum, numpy.float64) in their base form, as in line protocol
            base = next((b for b in (bool, int, float, str) if isinstance(v, b)), None)
            if base is None:
                raise ValueError(f"point {k!r} has a {t.__name__} value, not a float/int/bool/str")
            v, t = base(v), base
        if t is float and not -_INF < v < _INF:
            status[k] = NON_FINITE_STATUS
            quality = Quality.BAD
            dropped += 1
            continue
        fields[k] = v
    return fields, status or None, quality, dropped


def _doc(record: Record, tags: dict[str, str]) -> tuple[dict[str, Any], int]:
    """The JSON record and the number of values left out (non-finite).

    Raises:
        ValueError: the record holds something a JSON record cannot (see ``decode``).
    """
    fields, status, quality, dropped = _clean(record)
    series = record.series
    if type(record.id) is not str or type(record.time_ns) is not int:
        raise ValueError(f"id {record.id!r} / time_ns {record.time_ns!r}: not a str / int")
    doc: dict[str, Any] = {
        "uid": record.id,
        "topic": series.topic,
        "measurement": series.measurement,
        "time": record.time_ns,
        "tags": tags,
        "fields": fields,
        "quality": _LABELS[quality],
    }
    if status:
        doc["status"] = status
    if record.parent is not None:
        doc["parent"] = record.parent
    return doc, dropped


def record_to_dict(record: Record) -> dict[str, Any]:
    """The JSON record of ``record`` as a new dict (the record is not modified).

    Returns:
        ``uid``, ``topic``, ``measurement``, ``time``, ``tags``, ``fields``, ``quality`` and,
        when some point is not good, ``status``; ``parent`` when the record has one.

    Raises:
        ValueError: a value is not a number, boolean or string, the id not a string or the
            time not an integer.
    """
    return _doc(record, dict(record.series.tags))[0]


def encode(records: Sequence[Record], stats: EncodeStats | None = None) -> bytes:
    """A batch of records as one JSON array (UTF-8).

    Args:
        records: the batch (not modified).
        stats: counters to add to; ``lines`` counts the records written, ``non_finite`` the
            values left out, ``invalid`` the records JSON cannot carry (an unsupported value,
            a lone surrogate).

    Returns:
        The JSON array; ``b"[]"`` when no record was written.
    """
    batch = EncodeStats()
    batch.records = len(records)
    docs: list[dict[str, Any]] = []
    append = docs.append
    plain = _PLAIN
    for r in records:
        if (
            r.status is None
            and r.parent is None
            and not r.quality
            and type(r.id) is str
            and type(r.time_ns) is int
            and set(map(type, r.fields.values())) <= plain
        ):
            # all good and plain: share the record's dicts, json only reads them
            series = r.series
            append(
                {
                    "uid": r.id,
                    "topic": series.topic,
                    "measurement": series.measurement,
                    "time": r.time_ns,
                    "tags": _tags(r),
                    "fields": r.fields,
                    "quality": "good",
                }
            )
            continue
        try:
            doc, dropped = _doc(r, _tags(r))
        except ValueError as e:
            batch.invalid += 1
            batch.last_invalid = f"record {r.id!r}: {e}"
            continue
        batch.non_finite += dropped
        append(doc)
    try:
        data = _dumps(docs).encode("utf-8")
    except ValueError:
        # A NaN/Inf in a "good" record or a lone surrogate (UnicodeEncodeError is a ValueError):
        # sort it out record by record.
        batch = EncodeStats()
        batch.records = len(records)
        docs = []
        pieces = []
        for r in records:
            try:
                doc, dropped = _doc(r, _tags(r))
                pieces.append(_dumps(doc).encode("utf-8"))
            except ValueError as e:
                batch.invalid += 1
                batch.last_invalid = f"record {r.id!r}: {e}"
                continue
            batch.non_finite += dropped
            docs.append(doc)
        data = b"[" + b",".join(pieces) + b"]"
    batch.lines = len(docs)
    if stats is not None:
        stats.records += batch.records
        stats.lines += batch.lines
        stats.non_finite += batch.non_finite
        stats.invalid += batch.invalid
        if batch.last_invalid:
            stats.last_invalid = batch.last_invalid
    return data


# -- decoding -----------------------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise DecodeError(f"{name} is not a JSON value")


def _text(value: object, where: str) -> str:
    if type(value) is not str:
        raise DecodeError(f"{where}: expected a string, got {_kind(value)}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise DecodeError(f"{where}: not valid Unicode text (lone surrogate)") from None
    return value


def _int(value: object, where: str) -> int:
    if type(value) is not int:
        raise DecodeError(f"{where}: expected an integer, got {_kind(value)}")
    return value


def _kind(value: object) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _record(doc: object, where: str) -> dict[str, Any]:
    if type(doc) is not dict:
        raise DecodeError(f"{where}: expected a record object, got {_kind(doc)}")
    for key in doc:
        if key not in _KEYS:
            raise DecodeError(f"{where}: unknown key {key!r}")
    for key in _STRING_KEYS:
        if key in doc:
            _text(doc[key], f"{where}.{key}")
    if "time" in doc:
        _int(doc["time"], f"{where}.time")
    if "fields" not in doc:
        raise DecodeError(f"{where}: missing 'fields'")
    fields = doc["fields"]
    if type(fields) is not dict:
        raise DecodeError(f"{where}.fields: expected an object, got {_kind(fields)}")
    for k, v in fields.items():
        _text(k, f"{where}.fields: key")
        t = type(v)
        if t is str:
            _text(v, f"{where}.fields.{k}")
        elif t is float:
            if not -_INF < v < _INF:
                raise DecodeError(f"{where}.fields.{k}: {v} is not a finite number")
        elif t is not int and t is not bool:
            raise DecodeError(
                f"{where}.fields.{k}: expected a number, boolean or string, got {_kind(v)}"
            )
    if "tags" in doc:
        tags = doc["tags"]
        if type(tags) is not dict:
            raise DecodeError(f"{where}.tags: expected an object, got {_kind(tags)}")
        for k, v in tags.items():
            _text(k, f"{where}.tags: key")
            _text(v, f"{where}.tags.{k}")
    # type first: a list or an object is unhashable, and `in` a frozenset would raise TypeError
    if "quality" in doc and (type(doc["quality"]) is not str or doc["quality"] not in _QUALITIES):
        raise DecodeError(
            f"{where}.quality: expected 'good', 'uncertain' or 'bad', got {doc['quality']!r}"
        )
    if "status" in doc:
        status = doc["status"]
        if type(status) is not dict:
            raise DecodeError(f"{where}.status: expected an object, got {_kind(status)}")
        for k, v in status.items():
            _text(k, f"{where}.status: key")
            _int(v, f"{where}.status.{k}")
    return doc


def decode(payload: bytes) -> list[dict[str, Any]]:
    """Parse and validate JSON records (an array of them, or one record object).

    Only ``fields`` is required; the caller fills in what a publisher may leave out (uid,
    time, topic, quality). Values must be numbers, booleans or strings; NaN, Infinity and
    lone surrogates are refused.

    Returns:
        The records as parsed (plain dicts), in order.

    Raises:
        DecodeError: not JSON, or not records; the message names the record and key.
    """
    try:
        doc = _json.loads(payload, parse_constant=_no_constant)
    except DecodeError:
        raise
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise DecodeError(f"not JSON: {e}") from None
    if type(doc) is dict:
        return [_record(doc, "record")]
    if type(doc) is not list:
        raise DecodeError(f"expected an array of records, got {_kind(doc)}")
    return [_record(d, f"[{i}]") for i, d in enumerate(doc)]


# -- decoded records into Records -------------------------------------------------------------


class SeriesCache:
    """Series by (topic, measurement, tags), so records of one stream share one Series.

    A Series carries the codecs' per-series caches (the escaped line-protocol prefix); building
    one per decoded record would throw that away. Bounded: past ``limit`` distinct series
    (a publisher inventing tags) it starts over rather than growing without end.
    """

    def __init__(self, limit: int = 10_000):
        self.limit = limit
        self._series: dict[tuple[str, str, tuple[tuple[str, str], ...]], Series] = {}

    def get(self, topic: str, measurement: str, tags: Mapping[str, str]) -> Series:
        key = (topic, measurement, tuple(sorted(tags.items())))
        series = self._series.get(key)
        if series is None:
            if len(self._series) >= self.limit:
                self._series.clear()
            series = self._series[key] = Series(topic, measurement, tags)
        return series

    def __len__(self) -> int:
        return len(self._series)


def to_record(
    doc: Mapping[str, Any],
    *,
    topic: str,
    time_ns: int,
    uid: str,
    parent: str | None = None,
    series: SeriesCache | None = None,
) -> Record:
    """A Record from one record as ``decode`` returns it, defaults filling what it leaves out.

    Args:
        doc: a validated JSON record (only ``fields`` is certain to be there).
        topic / time_ns / uid / parent: used where ``doc`` has no ``topic`` / ``time`` /
            ``uid`` / ``parent``.
        series: where to look up (and keep) the record's Series.

    Returns:
        The record: ``measurement`` defaults to the topic's last level, ``tags`` to none;
        ``quality`` is the document's, made at least as bad as its ``status`` codes say, and a
        point whose status is Bad loses its value (as everywhere, a Bad value is never kept).

    Raises:
        DecodeError: the topic cannot be published to, or the measurement, ``uid`` or
            ``parent`` is empty.
    """
    rec_topic = doc.get("topic", topic)
    try:
        validate_topic(rec_topic)
    except ValueError as e:
        raise DecodeError(f"topic: {e}") from None
    for key in ("uid", "parent"):
        if doc.get(key) == "":
            # an empty id would be stored and matched as one: a record needs its own
            raise DecodeError(f"{key} is empty (leave it out: {_LEFT_OUT[key]})")
    measurement = doc.get("measurement", rec_topic.rsplit("/", 1)[-1])
    if not measurement:
        raise DecodeError("measurement is empty")
    tags = doc.get("tags") or {}
    found = series.get(rec_topic, measurement, tags) if series is not None else None
    fields = dict(doc["fields"])
    quality = Quality.from_label(doc.get("quality", "good"))
    status = doc.get("status")
    if status:
        status = dict(status)
        for point, code in status.items():
            if is_bad_status(code):
                fields.pop(point, None)
                quality = Quality.BAD
            elif code & 0xC0000000 == 0x40000000 and quality is Quality.GOOD:
                quality = Quality.UNCERTAIN  # Uncertain severity
    return Record(
        found or Series(rec_topic, measurement, tags),
        fields,
        doc.get("time", time_ns),
        doc.get("uid", uid),
        quality,
        status or None,
        doc.get("parent", parent),
    )
