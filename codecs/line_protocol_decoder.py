"""InfluxDB line protocol decoder, for devices that publish line protocol (e.g. over MQTT).

It follows InfluxData's reference Go codec (``github.com/influxdata/line-protocol/v2``) and
passes every decode case of its conformance corpus v2.2 (``tests/unit/test_lp_decoder*``):

* Sections are separated by one or more spaces; a tab, ``\\v`` or ``\\f`` is not a separator.
  Blank lines, lines of spaces and ``#`` comment lines are skipped; lines end in ``\\n`` or
  ``\\r\\n``; trailing spaces are allowed.
* Escapes: ``\\,`` and ``\\ `` in the measurement; ``\\,``, ``\\=`` and ``\\ `` in tag keys,
  tag values and field keys. A backslash before any other character is a literal backslash
  (``\\\\`` is *not* an escape there). In string values ``\\\\``, ``\\"``, ``\\n``, ``\\r`` and
  ``\\t`` are escapes (v2.2) and raw newlines are allowed inside the quotes.
* Names hold no ASCII control characters; tag values must not be empty, tag keys not repeat.
* Values: ``1.5`` / ``1`` / ``.1`` / ``1.`` / ``1e3`` (float64), ``-3i`` (int64), ``3u`` (uint64,
  returned as ``Unsigned``), ``"text"``, ``t T true True TRUE f F false False FALSE``. NaN, Inf
  and values that overflow their type are errors.
* Timestamps are optional and in units of ``precision_ns``; a line without one gets
  ``default_time_ns`` truncated to the precision.
* The input must be valid UTF-8, and one bad line fails the whole input (no partial result),
  as in the reference codec: a payload is one message, and half a message is not news.

Where the corpus and a real InfluxDB disagree the server wins. The only such difference known
to the project is the *encoder's* raw newline in string values (see ``codecs/README.md``); the
decoder reads both forms: a raw newline inside quotes and the two characters ``\\n`` (v2.2).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from plantbus.codecs.payload import PayloadError

__all__ = ["LineProtocolError", "Point", "Unsigned", "decode"]

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1
_OUT_OF_RANGE = 1 << 64  # beyond int64 and uint64 either way


def _integer(text: str) -> int:
    """``int(text)``, or ``_OUT_OF_RANGE`` for more than 20 significant digits.

    int() refuses text of more than 4300 digits with a plain ValueError (CPython's
    ``int_max_str_digits``), and such a number is out of every range here anyway.
    """
    if len(text) > 21 and len(text.lstrip("+-").lstrip("0")) > 20:
        return _OUT_OF_RANGE
    return int(text)


class LineProtocolError(PayloadError):
    """The text is not valid line protocol; the message names the line and column."""


class Unsigned(int):
    """An unsigned integer field (``42u``): an ``int`` that remembers its line-protocol kind."""

    __slots__ = ()


FieldValue = float | int | bool | str


class Point(NamedTuple):
    """One decoded line.

    Attributes:
        measurement: the measurement name.
        tags: ``(key, value)`` pairs sorted by key (bytewise, as UTF-8).
        fields: ``(key, value)`` pairs in the order of the line.
        time_ns: Unix time in ns.
    """

    measurement: str
    tags: tuple[tuple[str, str], ...]
    fields: tuple[tuple[str, FieldValue], ...]
    time_ns: int


# Token patterns. A backslash followed by an escapable character is taken as a pair; any other
# backslash is a literal character (the alternation order makes the regex prefer the pair).
_CTRL = "\\x00-\\x1f\\x7f"
_MEASUREMENT = re.compile(rf"(?:\\[ ,]|\\|[^ ,\\{_CTRL}])+")
_KEY = re.compile(rf"(?:\\[ ,=]|\\|[^ ,=\\{_CTRL}])+")  # tag keys, tag values, field keys
_STRING = re.compile(r'"((?:\\.|[^"\\])*)"', re.DOTALL)
_VALUE = re.compile(r"[^ ,\r\n]+")
_TIME = re.compile(r"[-0-9]+")
_SPACES = re.compile(r" +")
_COMMENT_BAD = re.compile("[\\x00-\\x08\\x0a-\\x1f\\x7f]")  # a tab is fine in a comment
_MEAS_ESC = re.compile(r"\\([ ,])")
_KEY_ESC = re.compile(r"\\([ ,=])")
_STR_ESC = re.compile(r'\\([\\"nrt])')
_STR_UNESC = {"\\": "\\", '"': '"', "n": "\n", "r": "\r", "t": "\t"}
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INT = re.compile(r"[+-]?[0-9]+")
_UINT = re.compile(r"[0-9]+")
_TRUE = frozenset({"t", "T", "true", "True", "TRUE"})
_FALSE = frozenset({"f", "F", "false", "False", "FALSE"})


def _str_unescape(m: re.Match[str]) -> str:
    return _STR_UNESC[m.group(1)]


class _Parser:
    __slots__ = ("default_ns", "line_start", "lineno", "n", "pos", "precision", "text")

    def __init__(self, text: str, precision_ns: int, default_time_ns: int):
        self.text = text
        self.n = len(text)
        self.pos = 0
        self.precision = precision_ns
        self.default_ns = default_time_ns - default_time_ns % precision_ns
        self.lineno = 1
        self.line_start = 0

    def error(self, msg: str, at: int | None = None) -> LineProtocolError:
        at = self.pos if at is None else at
        col = at - self.line_start + 1
        return LineProtocolError(f"line {self.lineno}, column {col}: {msg}")

    def _newline(self, at: int) -> None:
        self.lineno += 1
        self.line_start = at

    def skip_blank(self) -> bool:
        """Skip blank and comment lines; False at the end of the input."""
        text, n = self.text, self.n
        while True:
            i = self.pos
            while i < n and text[i] == " ":
                i += 1
            if i >= n:
                self.pos = i
                return False
            c = text[i]
            if c == "#":
                j = text.find("\n", i)
                end = n if j < 0 else j
                bad = _COMMENT_BAD.search(text, i, end - 1 if text[end - 1] == "\r" else end)
                if bad is not None:
                    raise self.error("invalid character in a comment line", bad.start())
                if j < 0:
                    self.pos = n
                    return False
                self.pos = j + 1
                self._newline(self.pos)
            elif c == "\n":
                self.pos = i + 1
                self._newline(self.pos)
            elif c == "\r" and i + 1 < n and text[i + 1] == "\n":
                self.pos = i + 2
                self._newline(self.pos)
            else:
                self.pos = i
                return True

    def take(self, pattern: re.Pattern[str]) -> str:
        m = pattern.match(self.text, self.pos)
        if m is None:
            return ""
        self.pos = m.end()
        return m.group()

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < self.n else ""

    def what(self) -> str:
        c = self.peek()
        return "the end of the input" if not c else repr(c)

    def point(self) -> Point:
        meas = self.take(_MEASUREMENT)
        if not meas:
            raise self.error(f"expected a measurement name, found {self.what()}")
        if "\\" in meas:
            meas = _MEAS_ESC.sub(r"\1", meas)
        tags: dict[str, str] = {}
        while self.peek() == ",":
            self.pos += 1
            key = self.take(_KEY)
            if not key:
                raise self.error(f"expected a tag key, found {self.what()}")
            if self.peek() != "=":
                raise self.error(f"expected '=' after tag key {key!r}, found {self.what()}")
            self.pos += 1
            value = self.take(_KEY)
            if not value:
                raise self.error(f"expected a value for tag {key!r}, found {self.what()}")
            if "\\" in key:
                key = _KEY_ESC.sub(r"\1", key)
            if "\\" in value:
                value = _KEY_ESC.sub(r"\1", value)
            if key in tags:
                raise self.error(f"tag key {key!r} appears twice")
            tags[key] = value
        if not self.take(_SPACES):
            raise self.error(f"expected a space before the fields, found {self.what()}")
        fields: list[tuple[str, FieldValue]] = []
        while True:
            key = self.take(_KEY)
            if not key:
                raise self.error(f"expected a field key, found {self.what()}")
            if self.peek() != "=":
                raise self.error(f"expected '=' after field key {key!r}, found {self.what()}")
            self.pos += 1
            if "\\" in key:
                key = _KEY_ESC.sub(r"\1", key)
            fields.append((key, self.value(key)))
            if self.peek() != ",":
                break
            self.pos += 1
        time_ns = self.default_ns
        if self.take(_SPACES):
            start = self.pos
            stamp = self.take(_TIME)
            if stamp:
                time_ns = self.timestamp(stamp, start)
                self.take(_SPACES)
        self.end_of_line()
        return Point(meas, tuple(sorted(tags.items())), tuple(fields), time_ns)

    def value(self, key: str) -> FieldValue:
        start = self.pos
        if self.peek() == '"':
            m = _STRING.match(self.text, self.pos)
            if m is None:
                raise self.error(f"field {key!r}: string value has no closing quote")
            self.pos = m.end()
            body = m.group(1)
            if "\n" in body:  # raw newlines inside quotes: keep the line count right
                self.lineno += body.count("\n")
                self.line_start = start + 1 + body.rfind("\n") + 1
            return _STR_ESC.sub(_str_unescape, body) if "\\" in body else body
        raw = self.take(_VALUE)
        if not raw:
            raise self.error(f"field {key!r} has no value")
        last = raw[-1]
        if last == "i" and _INT.fullmatch(raw, 0, len(raw) - 1):
            v = _integer(raw[:-1])
            if not INT64_MIN <= v <= INT64_MAX:
                raise self.error(f"field {key!r}: integer {raw} is out of the int64 range", start)
            return v
        if last == "u" and _UINT.fullmatch(raw, 0, len(raw) - 1):
            v = _integer(raw[:-1])
            if v > UINT64_MAX:
                raise self.error(f"field {key!r}: unsigned {raw} is out of the uint64 range", start)
            return Unsigned(v)
        if raw in _TRUE:
            return True
        if raw in _FALSE:
            return False
        if _FLOAT.fullmatch(raw):
            x = float(raw)
            if x in (float("inf"), float("-inf")):
                raise self.error(f"field {key!r}: {raw} is out of the float64 range", start)
            return x
        raise self.error(f"field {key!r}: invalid value {raw!r}", start)

    def timestamp(self, stamp: str, start: int) -> int:
        if not _INT.fullmatch(stamp):
            raise self.error(f"invalid timestamp {stamp!r}", start)
        t = _integer(stamp)
        if not INT64_MIN <= t <= INT64_MAX:
            raise self.error(f"timestamp {stamp} is out of the int64 range", start)
        t *= self.precision
        if not INT64_MIN <= t <= INT64_MAX:
            raise self.error(f"timestamp {stamp} is out of range at this precision", start)
        return t

    def end_of_line(self) -> None:
        text, i = self.text, self.pos
        if i >= self.n:
            return
        if text[i] == "\n":
            self.pos = i + 1
        elif text.startswith("\r\n", i):
            self.pos = i + 2
        elif text[i] == "\r" and i + 1 == self.n:
            # a lone CR closing the input is a line end too (the reference codec agrees)
            self.pos = i + 1
        else:
            raise self.error(f"unexpected {self.what()} after the fields")
        self._newline(self.pos)


def decode(data: bytes | str, precision_ns: int = 1, default_time_ns: int = 0) -> list[Point]:
    """Decode line-protocol text into points.

    Args:
        data: one or more lines (UTF-8 bytes or text).
        precision_ns: the unit of the timestamps in the text, in ns (1, 1000, 10**6, 10**9).
        default_time_ns: the time of lines without a timestamp (truncated to the precision).

    Returns:
        The points in input order (empty for blank or comment-only input).

    Raises:
        LineProtocolError: the input is not valid UTF-8 or some line is invalid; the message
            names the line and column.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise LineProtocolError(f"not UTF-8 text: invalid byte at offset {e.start}") from None
    else:
        text = data
    p = _Parser(text, precision_ns, default_time_ns)
    points: list[Point] = []
    while p.skip_blank():
        points.append(p.point())
    return points
