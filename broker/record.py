"""The data model every layer shares: Series (who), Record (what, when, how good).

A Series is built once per device or point group at start-up and shared by all of its
records; codecs cache their encoded form of it on the Series (see ``Series.cache``) so a
record never re-escapes its measurement and tags.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum
from typing import Any

__all__ = ["FieldValue", "Quality", "Record", "Series"]

FieldValue = float | int | bool | str


class Quality(IntEnum):
    """OPC UA-style quality; a larger value is worse, so ``max()`` gives the worst."""

    GOOD = 0
    UNCERTAIN = 1
    BAD = 2

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> Quality:
        return cls[label.upper()]


class Series:
    """Immutable identity of a stream of records: topic, measurement and tags.

    Tags are stored sorted by key with empty values left out, as line protocol wants them.
    ``cache`` is a small per-series dict for codecs (e.g. the escaped line-protocol prefix),
    filled on first use and never per record.
    """

    __slots__ = ("cache", "measurement", "tags", "topic")

    topic: str
    measurement: str
    tags: tuple[tuple[str, str], ...]
    cache: dict[str, Any]

    def __init__(self, topic: str, measurement: str, tags: Mapping[str, str] | None = None):
        self.topic = topic
        self.measurement = measurement
        self.tags = tuple(sorted((k, v) for k, v in (tags or {}).items() if v != ""))
        self.cache = {}

    @property
    def tag_dict(self) -> dict[str, str]:
        return dict(self.tags)

    def __repr__(self) -> str:
        return f"Series({self.topic!r}, {self.measurement!r}, {dict(self.tags)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Series):
            return NotImplemented
        return (self.topic, self.measurement, self.tags) == (
            other.topic,
            other.measurement,
            other.tags,
        )

    def __hash__(self) -> int:
        return hash((self.topic, self.measurement, self.tags))


class Record:
    """One reading of a series at one time.

    Attributes:
        series: the shared Series.
        fields: point name -> value. A Bad point is never here; it is in ``status``.
        time_ns: source timestamp if the device gives one, else read time (Unix ns).
        id: the record's UUIDv7 string (``plantbus.broker.ids``).
        quality: the worst quality of its points.
        status: point -> status code, for every point that is not Good (``None`` when all
            are Good, the common case, which costs nothing). Codes are OPC UA StatusCodes
            (severity in the top two bits: 0b10 Bad, 0b01 Uncertain); connectors of other
            protocols map their errors onto one (e.g. a Modbus exception to a Bad code that
            carries the exception number in its low bits) and document the mapping.
        parent: the uid of the record this one answers (a command's reply, a punt-out
            result), else ``None``.
    """

    __slots__ = ("fields", "id", "parent", "quality", "series", "status", "time_ns")

    def __init__(
        self,
        series: Series,
        fields: dict[str, FieldValue],
        time_ns: int,
        id: str,
        quality: Quality = Quality.GOOD,
        status: dict[str, int] | None = None,
        parent: str | None = None,
    ):
        self.series = series
        self.fields = fields
        self.time_ns = time_ns
        self.id = id
        self.quality = quality
        self.status = status
        self.parent = parent

    @property
    def topic(self) -> str:
        return self.series.topic

    def mark(self, point: str, quality: Quality, code: int) -> None:
        """Flag ``point`` with ``quality`` and its source status code.

        A Bad point's value is removed from ``fields``: it must never be written as a value.
        """
        if quality is Quality.GOOD:
            return
        if self.status is None:
            self.status = {}
        self.status[point] = code
        if quality is Quality.BAD:
            self.fields.pop(point, None)
        if quality > self.quality:
            self.quality = quality

    def __repr__(self) -> str:
        return (
            f"Record({self.series.topic!r}, {self.fields!r}, time_ns={self.time_ns}, "
            f"id={self.id!r}, quality={self.quality.label}, status={self.status!r})"
        )
