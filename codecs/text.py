"""Text frames of legacy devices: fields by a regex with named groups, or by CSV columns.

A frame is one message of a device that prints lines (``"T=21.5;P=1.02"``, ``"21.5,1.02,OK"``),
already split off its stream by the connector and decoded to text. ``TextDecoder`` turns it
into one ``Row``:

* **regex**: ``re.search`` with the pattern (anchor it with ``^…$`` to match whole frames);
  every named group is a column, typed by ``columns`` (default ``float``). A group that did not
  take part in the match, or matched nothing, is no value this time.
* **csv**: the frame is split by ``separator`` (with ``quote`` for quoted cells, as the ``csv``
  module reads them); it must have exactly as many cells as there are columns. An empty cell
  is no value this time.

Column types: ``float``, ``int``, ``bool``, ``string`` (values; see ``payload.convert``),
``tag`` (the text becomes a tag of the record, e.g. a sensor id), ``time`` (the record's
timestamp, read with the column's ``TimeSpec``), ``skip`` (CSV only: ignore the cell).

A frame that does not match the regex, has the wrong number of cells, or a timestamp that
cannot be read raises ``PayloadError``. A value that cannot be converted marks its point Bad
(``BAD_TYPE_MISMATCH``) and is reported as a problem; the other values of the frame are kept.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence

from plantbus.codecs.payload import (
    BAD_TYPE_MISMATCH,
    VALUE_TYPES,
    PayloadError,
    Row,
    TimeSpec,
    convert,
    preview,
)

__all__ = ["COLUMN_TYPES", "Column", "TextDecoder"]

COLUMN_TYPES = (*VALUE_TYPES, "tag", "time", "skip")

_NO_PROBLEMS: list[str] = []


class Column:
    """One regex group or CSV column.

    Args:
        name: the point (field) name, tag key, or anything for ``time`` / ``skip``.
        type: one of ``COLUMN_TYPES``.
        time: the ``TimeSpec`` of a ``time`` column.
    """

    __slots__ = ("name", "time", "type")

    def __init__(self, name: str, type: str = "float", time: TimeSpec | None = None):
        if type not in COLUMN_TYPES:
            raise ValueError(f"column {name!r}: unknown type {type!r}")
        if type == "time" and time is None:
            raise ValueError(f"column {name!r}: a time column needs a time format")
        self.name = name
        self.type = type
        self.time = time

    def __repr__(self) -> str:
        return f"Column({self.name!r}, {self.type!r})"


class TextDecoder:
    """Decode text frames by regex or CSV (see the module doc); build with ``regex`` / ``csv``."""

    __slots__ = ("columns", "pattern", "quote", "separator")

    def __init__(
        self,
        columns: Sequence[Column],
        pattern: re.Pattern[str] | None = None,
        separator: str = ",",
        quote: str = '"',
    ):
        self.columns = list(columns)
        self.pattern = pattern
        self.separator = separator
        self.quote = quote
        if sum(c.type == "time" for c in self.columns) > 1:
            raise ValueError("only one column can be the time")
        if not any(c.type in VALUE_TYPES for c in self.columns):
            raise ValueError("no column is a value (float, int, bool or string)")

    @classmethod
    def regex(cls, pattern: str, columns: Mapping[str, Column] | None = None) -> TextDecoder:
        """A decoder by regex; named groups not in ``columns`` are floats.

        Raises:
            ValueError: the pattern does not compile, has no named group, or ``columns``
                names a group it does not have (messages fit for a config error).
        """
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"invalid regex {pattern!r}: {e}") from None
        groups = list(compiled.groupindex)
        if not groups:
            raise ValueError(f"regex {pattern!r} has no named group such as (?P<temp>[0-9.]+)")
        columns = dict(columns or {})
        unknown = sorted(set(columns) - set(groups))
        if unknown:
            raise ValueError(
                f"columns {', '.join(map(repr, unknown))} are not named groups of the regex "
                f"(its groups: {', '.join(groups)})"
            )
        if any(c.type == "skip" for c in columns.values()):
            raise ValueError("'skip' is for CSV columns; leave the group unnamed instead")
        cols = [columns.get(g) or Column(g) for g in groups]
        return cls(cols, pattern=compiled)

    @classmethod
    def csv(cls, columns: Sequence[Column], separator: str = ",", quote: str = '"') -> TextDecoder:
        """A decoder of CSV frames with exactly ``len(columns)`` cells.

        Raises:
            ValueError: a separator or quote that is not one character, or the same one.
        """
        if len(separator) != 1 or len(quote) != 1 or separator == quote:
            raise ValueError("separator and quote must be two different single characters")
        if not columns:
            raise ValueError("CSV needs at least one column")
        return cls(columns, separator=separator, quote=quote)

    def cells(self, frame: str) -> list[str | None]:
        """The frame's text per column (None where there is no value).

        Raises:
            PayloadError: no match, or not the number of cells the columns say.
        """
        if self.pattern is not None:
            m = self.pattern.search(frame)
            if m is None:
                raise PayloadError("does not match the regex")
            return [m.group(c.name) for c in self.columns]
        try:
            row = next(
                csv.reader([frame], delimiter=self.separator, quotechar=self.quote, strict=True),
                [],
            )
        except csv.Error as e:
            raise PayloadError(f"not CSV: {e}") from None
        if len(row) != len(self.columns):
            raise PayloadError(f"{len(row)} cells, expected {len(self.columns)}")
        return list(row)

    def decode(self, frame: str) -> tuple[Row, list[str]]:
        """One frame's row and the problems met (values that could not be converted).

        Raises:
            PayloadError: the frame does not parse, its time is unreadable, or it has no value.
        """
        cells = self.cells(frame)
        row = Row({})
        problems = _NO_PROBLEMS
        tags: list[tuple[str, str]] | None = None
        for col, text in zip(self.columns, cells, strict=True):
            if not text:
                continue
            ctype = col.type
            if ctype == "skip":
                continue
            if ctype == "tag":
                if tags is None:
                    tags = []
                tags.append((col.name, text))
            elif ctype == "time":
                assert col.time is not None
                row.time_ns = col.time.parse(text)
            else:
                try:
                    row.fields[col.name] = convert(text, ctype)
                except PayloadError as e:
                    row.bad(col.name, BAD_TYPE_MISMATCH)
                    if problems is _NO_PROBLEMS:
                        problems = []
                    problems.append(f"point {col.name!r}: {e} in frame {preview(frame)}")
        if not row.fields and not row.status:
            raise PayloadError("no values in the frame")
        if tags:
            row.tags = tuple(sorted(tags))
        return row, problems
