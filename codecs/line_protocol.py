"""InfluxDB line protocol encoder: one record is one line, the hot path of every InfluxDB sink.

A record becomes ``measurement,tag=v,... point=value,...,uid="<id>" <time_ns>`` (see
``codecs/README.md`` for every mapping choice). The escaped ``measurement,tags`` prefix is built
once per Series and kept in ``series.cache["lp"]``; escaped field keys are kept in a bounded
module-level dict. A record is never escaped as a whole and never mutated: records are shared by
every subscriber of the bus.

What cannot be encoded is dropped and counted in ``EncodeStats``, never raised: one bad record
must not cost the other 4999 of its batch.

* NaN, ±Inf and integers outside int64 have no line-protocol form: the value is left out, the
  point gets ``<point>_status=NON_FINITE_STATUS`` and the line ``quality="bad"``.
* A name or tag that no InfluxDB parser reads back as written (a trailing backslash, a newline,
  see ``check_name``) makes the record invalid.
* A line left without any point value (status and uid aside) is not written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from plantbus.broker.record import Quality, Record, Series

__all__ = [
    "CODEC_NAME",
    "NON_FINITE_STATUS",
    "EncodeStats",
    "check_name",
    "encode",
    "encode_record",
    "is_bad_status",
    "series_prefix",
]

CODEC_NAME = "line_protocol"

NON_FINITE_STATUS = 0x803C0000
"""OPC UA ``Bad_OutOfRange``: the status written for a value the codec had to drop because it
has no form in the target format (NaN, ±Inf; in line protocol also integers outside int64)."""

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
# InfluxDB 1.x refuses the two extreme int64 timestamps (it reserves them as min/max markers).
TIME_MIN = INT64_MIN + 2
TIME_MAX = INT64_MAX - 1
# InfluxDB's limit on measurement + tags + field key of one series (models.MaxKeyLength).
MAX_KEY_BYTES = 65535

_KEY_CACHE_MAX = 10_000  # point names are few per device; a flood of names must not grow memory
_INF = float("inf")
_NINF = -_INF

_KINDS = ("measurement", "tag_key", "tag_value", "field_key")
_RESERVED_KEYS = frozenset({"time"})  # InfluxDB 1.x refuses these as tag or field keys

_QUALITY_FIELD = {
    Quality.UNCERTAIN: 'quality="uncertain"',
    Quality.BAD: 'quality="bad"',
}


class EncodeStats:
    """Counters of one or more ``encode`` calls (pass the same object to accumulate).

    Attributes:
        records: records given.
        lines: lines written.
        non_finite: values dropped because they have no line-protocol form (NaN, ±Inf,
            integers outside int64); the record itself may still be written.
        empty: records not written because no point value was left.
        invalid: records dropped because a name, tag, id, timestamp or value cannot be encoded.
        last_invalid: why the last invalid record was refused (for a log line), or "".
    """

    __slots__ = ("empty", "invalid", "last_invalid", "lines", "non_finite", "records")

    def __init__(self) -> None:
        self.records = 0
        self.lines = 0
        self.non_finite = 0
        self.empty = 0
        self.invalid = 0
        self.last_invalid = ""

    def __repr__(self) -> str:
        return (
            f"EncodeStats(records={self.records}, lines={self.lines}, "
            f"non_finite={self.non_finite}, empty={self.empty}, invalid={self.invalid})"
        )


class _Refused(Exception):
    """A record that has no valid encoding (internal: counted as invalid, never raised out)."""


# -- names ------------------------------------------------------------------------------------


def _has_special_after_backslash(text: str) -> bool:
    # InfluxDB 1.x scans field keys by skipping "\x" pairs but unescapes them without doing so,
    # and stores a measurement like a\\,b so that it cannot be queried (seen on 1.6.7): a
    # backslash right before , = space or " has no encoding it reads back as written.
    i = text.find("\\")
    while i != -1:
        if i + 1 < len(text) and text[i + 1] in ', ="':
            return True
        i = text.find("\\", i + 1)
    return False


def check_name(text: str, kind: str | None = None) -> str | None:
    """Tell whether ``text`` can be written as a line-protocol name, and if not, why.

    Args:
        text: a measurement, tag key, tag value or field key (point name).
        kind: ``"measurement"``, ``"tag_key"``, ``"tag_value"`` or ``"field_key"`` to add the
            rules of that position; ``None`` checks only the rules common to all of them.

    Returns:
        ``None`` when it is encodable, else the reason, worded to follow the name
        (``f"tag {name!r} {reason}"``).
    """
    if kind is not None and kind not in _KINDS:
        raise ValueError(f"unknown name kind {kind!r}; expected one of {', '.join(_KINDS)}")
    if "\n" in text:
        return "contains a newline"
    if text.endswith("\\"):
        return "ends with a backslash"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "is not valid Unicode text (it holds a lone surrogate)"
    if kind is None or kind == "tag_value":
        return None
    if not text:
        return "is empty"
    if kind == "measurement":
        if text[0] == "#":
            return "starts with '#', which makes the line a comment"
        if text[0] in "\t\0":
            return "starts with a tab or NUL, which InfluxDB strips"
        if _has_special_after_backslash(text):
            return "has a backslash before a comma, space, '=' or '\"', which InfluxDB 1.x misreads"
    elif kind == "field_key":
        if text[0] in "\t\0":
            return "starts with a tab or NUL, which InfluxDB strips"
        if _has_special_after_backslash(text):
            return "has a backslash before a comma, space, '=' or '\"', which InfluxDB 1.x misreads"
        if text in _RESERVED_KEYS:
            return f"is {text!r}, which InfluxDB refuses as a field key"
    elif text in _RESERVED_KEYS:
        return f"is {text!r}, which InfluxDB refuses as a tag key"
    return None


def _escape_measurement(text: str) -> str:
    return text.replace(",", "\\,").replace(" ", "\\ ")


def _escape_key(text: str) -> str:
    """Escape a tag key, tag value or field key (a backslash itself is never escaped)."""
    return text.replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def _escape_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _line_scan_is_clean(key: str) -> bool:
    """Whether InfluxDB 1.x's line splitter leaves ``key`` in the state a plain key would.

    1.x finds line ends before parsing (``models.scanLine``): it skips any backslash pair and
    starts counting ``=``, ``,`` and quotes at the first space it sees, so a tag value such as
    ``a\\ b`` (escaped as ``a\\\\ b``) starts that count early. Combined with more escapes and a
    double quote the splitter can believe the line end is inside a string and merge two lines.
    Conservative: whether a line really breaks depends on its fields, which this check, run
    once per series, does not know.
    """
    quoted = fields = False
    equals = commas = 0
    i, n = 0, len(key)
    while i < n:
        c = key[i]
        if c == "\\":
            i += 2
            continue
        if c == " ":
            fields = True
        if fields:
            if not quoted and c == "=":
                equals += 1
            elif not quoted and c == ",":
                commas += 1
            elif c == '"' and equals > commas:
                quoted = not quoted
        i += 1
    return not quoted and (not fields or equals == commas)


def _build_prefix(series: Series) -> tuple[str, str]:
    """The escaped ``measurement,tags`` of ``series`` and "" or ("", the reason it has none)."""
    m = series.measurement
    if type(m) is not str:
        return "", f"measurement {m!r} is not a string"
    reason = check_name(m, "measurement")
    if reason:
        return "", f"measurement {m!r} {reason}"
    parts = [_escape_measurement(m)]
    for k, v in series.tags:
        if type(k) is not str or type(v) is not str:
            return "", f"tag {k!r}={v!r} is not a pair of strings"
        reason = check_name(k, "tag_key")
        if reason:
            return "", f"tag key {k!r} {reason}"
        reason = check_name(v, "tag_value")
        if reason:
            return "", f"tag {k!r} value {v!r} {reason}"
        parts.append(f",{_escape_key(k)}={_escape_key(v)}")
    prefix = "".join(parts)
    if not _line_scan_is_clean(prefix):
        return "", (
            f"tags of {series!r} mix backslashes, '=' and '\"' in a way InfluxDB 1.x "
            "cannot split into lines"
        )
    # 5 = the shortest field key plus InfluxDB's 4-byte field separator
    if len(prefix.encode("utf-8")) > MAX_KEY_BYTES - 5:
        return "", f"measurement and tags of {series!r} exceed InfluxDB's 64 KiB series key"
    return prefix, ""


def _series_prefix(series: Series) -> str:
    """The cached prefix, computed on first use; "" when the series cannot be encoded."""
    prefix, reason = _build_prefix(series)
    series.cache["lp"] = prefix
    series.cache["lp_line"] = prefix + " " if prefix else ""
    if reason:
        series.cache["lp_error"] = reason
    return prefix


def series_prefix(series: Series) -> str:
    """The escaped ``measurement,tag=v,...`` of ``series``, cached in ``series.cache["lp"]``.

    Raises:
        ValueError: the measurement or a tag has no line-protocol encoding (the reason).
    """
    prefix = series.cache.get("lp")
    if prefix is None:
        prefix = _series_prefix(series)
    if not prefix:
        raise ValueError(series.cache["lp_error"])
    return prefix


_field_keys: dict[str, str] = {}  # point name -> 'escaped=' (valid names only)
_status_keys: dict[str, str] = {}  # point name -> 'escaped_status='
_bad_keys: dict[str, str] = {}  # field key -> reason it cannot be encoded


def _key_eq(name: str, cache: dict[str, str], key: str) -> str:
    """Escaped ``key=`` for field ``key`` (the field written for point ``name``), cached."""
    if type(key) is not str:
        raise _Refused(f"point name {key!r} is not a string")
    reason = _bad_keys.get(key)
    if reason is None:
        reason = check_name(key, "field_key") or ""
        if len(_bad_keys) >= _KEY_CACHE_MAX:
            _bad_keys.clear()
        if reason:
            _bad_keys[key] = reason
    if reason:
        raise _Refused(f"field {key!r} {reason}")
    if len(cache) >= _KEY_CACHE_MAX:
        cache.clear()
    out = cache[name] = _escape_key(key) + "="
    return out


def _field_key(name: str) -> str:
    return _key_eq(name, _field_keys, name)


def _status_key(name: str) -> str:
    key = _status_keys.get(name)
    if key is None:
        if type(name) is not str:
            raise _Refused(f"status point name {name!r} is not a string")
        key = _key_eq(name, _status_keys, name + "_status")
    return key


def _uid_key(uid_field: str) -> str:
    reason = check_name(uid_field, "field_key") if type(uid_field) is str else "is not a string"
    if reason:
        raise ValueError(f"uid field name {uid_field!r} {reason}")
    return _escape_key(uid_field) + '="'


def is_bad_status(code: int) -> bool:
    """Whether an OPC UA status code has Bad severity (its top two bits are ``10``)."""
    return code & 0xC0000000 == 0x80000000


# -- records ----------------------------------------------------------------------------------


def _value(name: str, v: object) -> str | None:
    """The line-protocol text of one value; None when it has no form (NaN, ±Inf, > int64)."""
    t = type(v)
    if t is not float and t is not int and t is not bool and t is not str:
        # Subclasses (IntEnum, numpy.float64) take the form of their base type.
        if isinstance(v, bool):
            v, t = bool(v), bool
        elif isinstance(v, int):
            v, t = int(v), int
        elif isinstance(v, float):
            v, t = float(v), float
        elif isinstance(v, str):
            v, t = str(v), str
        else:
            raise _Refused(f"point {name!r} has a {t.__name__} value, not a float/int/bool/str")
    if t is float:
        return repr(v) if _NINF < v < _INF else None  # type: ignore[operator]
    if t is int:
        return f"{v}i" if INT64_MIN <= v <= INT64_MAX else None  # type: ignore[operator]
    if t is bool:
        return "true" if v else "false"
    return f'"{_escape_string(v)}"'  # type: ignore[arg-type]


def _line_full(rec: Record, uid_key: str, stats: EncodeStats) -> str | None:
    """The line of any record, with status and quality fields; counts into ``stats``.

    Raises:
        _Refused: the record has no valid encoding.
    """
    series = rec.series
    prefix = series.cache.get("lp")
    if prefix is None:
        prefix = _series_prefix(series)
    if not prefix:
        raise _Refused(series.cache["lp_error"])
    uid = rec.id
    if type(uid) is not str:
        raise _Refused(f"record id {uid!r} is not a string")
    if "\\" in uid or '"' in uid:
        uid = _escape_string(uid)
    if not uid.isascii():
        try:
            uid.encode("utf-8")
        except UnicodeEncodeError:
            raise _Refused(f"record id {uid!r} is not valid Unicode text") from None
    t_ns = rec.time_ns
    if type(t_ns) is not int or not TIME_MIN <= t_ns <= TIME_MAX:
        raise _Refused(f"time_ns {t_ns!r} is not an integer InfluxDB accepts")

    status = rec.status or {}
    try:
        quality = Quality(rec.quality)
    except ValueError:
        raise _Refused(f"quality {rec.quality!r} is not a Quality") from None
    codes: dict[str, int] = {}
    for p, code in status.items():
        if type(code) is not int or not INT64_MIN <= code <= INT64_MAX:
            raise _Refused(f"status code {code!r} of point {p!r} is not an int64")
        codes[p] = code
    parts: list[str] = []
    dropped = 0
    for k, v in rec.fields.items():
        code = codes.get(k)
        if code is not None and is_bad_status(code):
            # a Bad value is never written, even if its connector forgot to remove it
            quality = Quality.BAD
            continue
        key = _field_keys.get(k) or _field_key(k)
        text = _value(k, v)
        if text is None:
            dropped += 1
            codes[k] = NON_FINITE_STATUS
            quality = Quality.BAD
            continue
        parts.append(key + text)
    has_points = bool(parts)
    for p, code in codes.items():
        parts.append(f"{_status_key(p)}{code}i")
    if quality:
        parts.append(_QUALITY_FIELD[quality])
    stats.non_finite += dropped
    if not has_points:
        stats.empty += 1
        return None
    return f'{prefix} {",".join(parts)},{uid_key}{uid}" {t_ns}'


def encode_record(record: Record, uid_field: str = "uid") -> str | None:
    """One record as one line, without the trailing newline.

    Args:
        record: the record (not modified).
        uid_field: name of the string field that carries the record ID.

    Returns:
        The line, or ``None`` when nothing is written: no point value left, or the record
        cannot be encoded (use ``encode`` with an ``EncodeStats`` to learn which).
    """
    data = encode((record,), None, uid_field)
    return data[:-1].decode("utf-8") if data else None


def encode(
    records: Sequence[Record], stats: EncodeStats | None = None, uid_field: str = "uid"
) -> bytes:
    """Encode a batch: one line per written record, each ending in ``\\n``.

    Args:
        records: the batch (not modified).
        stats: counters to add to (records, lines, dropped values, empty and invalid records).
        uid_field: name of the string field that carries the record ID.

    Returns:
        UTF-8 line protocol; ``b""`` when no record was written.

    Raises:
        ValueError: ``uid_field`` itself cannot be a field key (a configuration error).
    """
    uid_key = _uid_key(uid_field)
    batch = EncodeStats()
    try:
        data = _encode(records, batch, uid_key)
    except UnicodeEncodeError:
        # A string value or id holds a lone surrogate (e.g. from a JSON "\\ud800"): find it
        # record by record rather than lose the batch.
        batch = EncodeStats()
        pieces = []
        for rec in records:
            one = EncodeStats()
            try:
                pieces.append(_encode((rec,), one, uid_key))
            except UnicodeEncodeError:
                one = EncodeStats()
                one.records = one.invalid = 1
                one.last_invalid = "a string value or the id is not valid Unicode text"
            _add(batch, one)
        data = b"".join(pieces)
    if stats is not None:
        _add(stats, batch)
    return data


def _add(total: EncodeStats, part: EncodeStats) -> None:
    total.records += part.records
    total.lines += part.lines
    total.non_finite += part.non_finite
    total.empty += part.empty
    total.invalid += part.invalid
    if part.last_invalid:
        total.last_invalid = part.last_invalid


# -- layouts: one generated function per set of point names -------------------------------------
#
# A device emits the same points in the same order poll after poll. For such a layout a small
# function is generated once (like namedtuple and dataclasses do) that writes a run of records of
# that layout: it checks each value's type and range in straight-line code and builds the whole
# line in one f-string, record after record in one loop, so the batch loop's per-record work (a
# call, the layout lookup) is paid once per run rather than once per record. Names never enter
# the generated source; escaped keys are passed in as constants.

_LAYOUT_MAX_FIELDS = 128
_LAYOUT_CACHE_MAX = 1_000
_KIND_OF = {float: "f", int: "i", bool: "b", str: "s"}

# run(records, i, n, series, start, uid_key, append) -> index of the first record not written
RunFunction = Callable[[Sequence[Record], int, int, Series, str, str, Callable[[str], None]], int]
_layouts: dict[tuple[str, ...], RunFunction] = {}  # point names in order -> run function
_layouts_seen: dict[tuple[str, ...], int] = {}  # layouts seen once: a one-off gets no function


def _layout_function(keys: tuple[str, ...], kinds: str) -> RunFunction:
    """Generate ``run(records, i, n, series, start, U, append) -> int`` for one layout.

    From ``records[i]`` on, it appends the line of every record that is plain (no status,
    good quality, series already prefixed) with exactly these point names in this order and
    values of the kinds the layout was learned with (finite, in range), a plain id and time;
    it returns the index of the first record it did not write (``n`` when it wrote all), which
    the caller then takes down the general path. It never counts anything.
    """
    ns: dict[str, object] = {
        "_type": type,
        "_len": len,
        "_float": float,
        "_int": int,
        "_bool": bool,
        "_str": str,
        "_esc": _escape_string,
        "Q": '"',
        "NL": "\n",
        "KEYS": keys,
    }
    names = [f"v{i}" for i in range(len(keys))]
    knames = [f"k{i}" for i in range(len(keys))]
    checks: list[str] = []
    floats: list[str] = []
    fixes: list[str] = []
    out = ["{start}"]
    for i, (key, kind, v) in enumerate(zip(keys, kinds, names, strict=True)):
        ns[f"K{i}"] = key
        ns[f"C{i}"] = ("," if i else "") + (_field_keys.get(key) or _field_key(key))
        if kind == "f":
            checks.append(f"_type({v}) is _float")
            floats.append(v)
            out.append(f"{{C{i}}}{{{v}!r}}")
        elif kind == "i":
            checks.append(f"_type({v}) is _int and {INT64_MIN} <= {v} <= {INT64_MAX}")
            out.append(f"{{C{i}}}{{{v}}}i")
        elif kind == "b":
            checks.append(f"_type({v}) is _bool")
            out.append(f"{{C{i}}}{{('false', 'true')[{v}]}}")
        else:
            checks.append(f"_type({v}) is _str")
            fixes.append(f"        if '\"' in {v} or '\\\\' in {v}:\n            {v} = _esc({v})")
            out.append(f"{{C{i}}}{{Q}}{{{v}}}{{Q}}")
    if floats:
        # one test for all: a NaN or ±Inf makes the sum non-finite, and so does an overflow of
        # finite values, which merely sends that record down the general path
        checks.append(f"({' + '.join(floats)}) * 0.0 == 0.0")
    checks.append(f"_type(t) is _int and {TIME_MIN} <= t <= {TIME_MAX} and _type(uid) is _str")
    out.append(",{U}{uid}{Q} {t}{NL}")
    same_keys = " and ".join(f"{k} is K{i}" for i, k in enumerate(knames))
    src = "\n".join(
        [
            "def run(records, i, n, series, start, U, append):",
            "    while i < n:",
            "        r = records[i]",
            "        s = r.series",
            "        if s is not series:",
            "            s_start = s.cache.get('lp_line')",
            "            if not s_start:",
            "                return i",
            "            series, start = s, s_start",
            "        if r.status is not None or r.quality:",
            "            return i",
            "        f = r.fields",
            f"        if _len(f) != {len(keys)}:",
            "            return i",
            f"        {', '.join(knames)}, = f",
            # the names are the very same objects poll after poll; equal ones pass too
            f"        if not ({same_keys}) and ({', '.join(knames)},) != KEYS:",
            "            return i",
            f"        {', '.join(names)}, = f.values()",
            "        uid = r.id",
            "        t = r.time_ns",
            f"        if not ({' and '.join(checks)}) or '\"' in uid or '\\\\' in uid:",
            "            return i",
            *fixes,
            f'        append(f"{"".join(out)}")',
            "        i += 1",
            "    return i",
        ]
    )
    exec(compile(src, "<plantbus line-protocol layout>", "exec"), ns)
    return ns["run"]  # type: ignore[return-value]


def _learn_layout(keys: tuple[str, ...], fields: dict) -> None:
    """Give ``keys`` a line function the second time a plain record of it is written.

    Called after the loop over the fields wrote a record; a layout met only once (an event,
    a one-off payload) costs no code generation.
    """
    if keys in _layouts or len(keys) > _LAYOUT_MAX_FIELDS:
        return
    if _layouts_seen.get(keys) is None:
        if len(_layouts_seen) >= _LAYOUT_CACHE_MAX:
            _layouts_seen.clear()
        _layouts_seen[keys] = 1
        return
    del _layouts_seen[keys]
    kinds = "".join([_KIND_OF[type(v)] for v in fields.values()])
    if len(_layouts) >= _LAYOUT_CACHE_MAX:
        _layouts.clear()
    _layouts[keys] = _layout_function(keys, kinds)


def _encode(records: Sequence[Record], stats: EncodeStats, uid_key: str) -> bytes:
    """The batch loop of ``encode``; raises UnicodeEncodeError for a lone surrogate.

    Three paths, fastest first, each falling through to the next when a record is unusual:
    the layout's generated run function (which writes every following record of the layout
    it can); a loop over the fields for plain records of a layout without one (yet);
    ``_line_full`` for everything (status, NaN, invalid names, ...), which alone counts into
    ``stats``, so falling through never counts twice.
    """
    out: list[str] = []
    append = out.append
    layouts = _layouts
    field_keys = _field_keys
    i64_min, i64_max, t_min, t_max = INT64_MIN, INT64_MAX, TIME_MIN, TIME_MAX
    ninf, inf = _NINF, _INF
    last_series = None
    start = ""
    lines = 0
    i = 0
    n = len(records)
    while i < n:
        rec = records[i]
        i += 1
        series = rec.series
        if series is not last_series:
            start = series.cache.get("lp_line")
            if start is None:
                _series_prefix(series)
                start = series.cache["lp_line"]
            last_series = series
        if start and rec.status is None and not rec.quality:
            fields = rec.fields
            keys = tuple(fields)
            fn = layouts.get(keys)
            if fn is not None:
                end = fn(records, i - 1, n, series, start, uid_key, append)
                if end >= i:
                    lines += end - i + 1
                    i = end
                    continue
            # Pieces of one line: "prefix ", "key=value," per point, 'uid="…" time\n'.
            mark = len(out)
            append(start)
            for k, v in fields.items():
                key = field_keys.get(k)
                if key is None:
                    break
                t = type(v)
                if t is float:
                    if ninf < v < inf:
                        append(f"{key}{v!r},")
                        continue
                elif t is int:
                    if i64_min <= v <= i64_max:
                        append(f"{key}{v}i,")
                        continue
                elif t is bool:
                    append(f"{key}true," if v else f"{key}false,")
                    continue
                elif t is str:
                    if '"' in v or "\\" in v:
                        v = v.replace("\\", "\\\\").replace('"', '\\"')
                    append(f'{key}"{v}",')
                    continue
                break
            else:
                uid = rec.id
                t_ns = rec.time_ns
                if (
                    keys
                    and type(uid) is str
                    and '"' not in uid
                    and "\\" not in uid
                    and type(t_ns) is int
                    and t_min <= t_ns <= t_max
                ):
                    append(f'{uid_key}{uid}" {t_ns}\n')
                    lines += 1
                    if fn is None:
                        _learn_layout(keys, fields)
                    continue
            del out[mark:]
        try:
            line = _line_full(rec, uid_key, stats)
        except _Refused as e:
            stats.invalid += 1
            stats.last_invalid = str(e)
            continue
        if line is not None:
            append(line)
            append("\n")
            lines += 1
    data = "".join(out).encode("utf-8")
    stats.records += len(records)
    stats.lines += lines
    return data
