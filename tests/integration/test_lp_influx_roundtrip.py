"""Property: every record the line-protocol encoder writes reads back from InfluxDB 1.6.7 as is.

Hypothesis builds small batches with names, tags and strings dense in the characters that need
escaping (comma, equals, space, quote, backslash, newline, tab, '#', NUL, non-ASCII), values
across int64 and beyond, all kinds of floats, and Uncertain/Bad points. Each batch goes to a
fresh database through POST /write; /query then must return exactly the measurement, tags,
times, values, field types, status and quality fields that the mapping promises. Records the
encoder refuses must be those ``check_name`` (or the series key check) refuses.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

import pytest
from golden.cases import CASES, HERE, load_case  # tests/ is on sys.path (conftest.py)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from plantbus.broker.ids import new_id
from plantbus.broker.record import Quality, Record, Series
from plantbus.codecs import line_protocol as lp

T0 = 1_700_000_000_000_000_000
UID = "uid"
_dbs = itertools.count()

# Names never contain "_", "q" or "u", so a point can never collide with "<other>_status",
# "quality" or "uid"; collisions are a documented rule tested in the golden cases instead.
_plain = st.sampled_from(list("abcxyzABC019"))
_escaped = st.sampled_from([",", "=", " ", '"', "\\"])
_rare = st.sampled_from(["\n", "\t", "\r", "#", "\x00", "\x01"])
_wide = st.sampled_from(list("éß中😀€\u00a0"))
names = st.text(
    alphabet=st.one_of(*[_plain] * 6, *[_escaped] * 3, _wide, _rare), min_size=1, max_size=6
)

floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, 1.0, 1e16, 1e-7, 5e-324, 1.7976931348623157e308, -2.5, 0.1]
)
ints = st.integers(min_value=lp.INT64_MIN, max_value=lp.INT64_MAX) | st.sampled_from(
    [lp.INT64_MIN, lp.INT64_MAX, lp.INT64_MIN - 1, lp.INT64_MAX + 1, 0, -1, 2**64]
)
strings = st.text(max_size=12) | st.text(
    alphabet=st.one_of(_escaped, _rare, _plain, _wide), max_size=12
)
VALUES = {"f": floats, "i": ints, "b": st.booleans(), "s": strings}


@st.composite
def batches(draw: st.DrawFn) -> list[Record]:
    """One to three series sharing a schema (point -> kind), one to three records each."""
    pool = draw(st.lists(names, min_size=2, max_size=9, unique=True))
    n_tags = draw(st.integers(0, min(3, len(pool) - 1)))
    tag_keys, points = pool[:n_tags], pool[n_tags:]
    kinds = {p: draw(st.sampled_from("fibs")) for p in points}
    records = []
    t = T0
    for _ in range(draw(st.integers(1, 3))):
        series = Series(
            "plant/test",
            draw(names),
            {k: draw(names | st.just("")) for k in tag_keys},
        )
        for _ in range(draw(st.integers(1, 3))):
            chosen = draw(st.lists(st.sampled_from(points), min_size=1, unique=True))
            rec = Record(series, {p: draw(VALUES[kinds[p]]) for p in chosen}, t, new_id())
            t += 1000
            for p in chosen:
                q = draw(st.sampled_from([Quality.GOOD] * 6 + [Quality.UNCERTAIN, Quality.BAD]))
                code = {Quality.UNCERTAIN: 0x40920000, Quality.BAD: 0x80320000}.get(q, 0)
                rec.mark(p, q, code)
            records.append(rec)
    return records


def _expected(rec: Record, uid_field: str = UID) -> dict[str, Any] | None:
    """The fields InfluxDB must return for ``rec`` per the mapping, or None if not written."""
    codes = dict(rec.status or {})
    quality = rec.quality
    points: dict[str, Any] = {}
    for k, v in rec.fields.items():
        if k in codes and lp.is_bad_status(codes[k]):
            quality = Quality.BAD
            continue
        if (type(v) is float and not math.isfinite(v)) or (
            type(v) is int and not lp.INT64_MIN <= v <= lp.INT64_MAX
        ):
            codes[k] = lp.NON_FINITE_STATUS
            quality = Quality.BAD
            continue
        points[k] = v
    if not points:
        return None
    out = dict(points)
    out.update({f"{p}_status": c for p, c in codes.items()})
    if quality:
        out["quality"] = quality.label
    out[uid_field] = rec.id
    return out


def _refused_reason(rec: Record) -> str | None:
    try:
        lp.series_prefix(rec.series)
    except ValueError as e:
        return str(e)
    for k in list(rec.fields) + [f"{p}_status" for p in rec.status or {}]:
        reason = lp.check_name(k, "field_key")
        if reason:
            return reason
    return None


_INFLUX_TYPES = {float: "float", int: "integer", bool: "boolean", str: "string"}
Key = tuple[str, tuple[tuple[str, str], ...], int]


def _read_back(
    influxdb: Any, db: str
) -> tuple[dict[Key, dict[str, Any]], dict[tuple[str, str], str]]:
    """Every point of ``db`` by (measurement, tags, time), and every field's type."""
    res = influxdb.query("SELECT * FROM /.*/ GROUP BY *", db)["results"][0]
    got: dict[Key, dict[str, Any]] = {}
    for series in res.get("series", []):
        tags = tuple(sorted((k, v) for k, v in (series.get("tags") or {}).items() if v))
        for row in series["values"]:
            values = dict(zip(series["columns"], row, strict=True))
            t = values.pop("time")
            got[(series["name"], tags, t)] = {k: v for k, v in values.items() if v is not None}
    res = influxdb.query("SHOW FIELD KEYS", db)["results"][0]
    types = {(s["name"], k): ftype for s in res.get("series", []) for k, ftype in s["values"]}
    return got, types


def _write_and_compare(influxdb: Any, body: bytes, expected: dict[Key, dict[str, Any]]) -> None:
    db = f"rt{next(_dbs)}"
    influxdb.query(f'CREATE DATABASE "{db}"')
    try:
        status, text = influxdb.write(db, body)
        assert status == 204, f"{status} {text}\n{body!r}"
        got, types = _read_back(influxdb, db)
    finally:
        influxdb.query(f'DROP DATABASE "{db}"')
    assert set(got) == set(expected), body
    for key, want in expected.items():
        have = got[key]
        assert set(have) == set(want), (key, body)
        for k, v in want.items():
            if type(v) is float:
                assert type(have[k]) in (int, float) and float(have[k]) == v, (k, v, have[k])
            else:
                assert have[k] == v and type(have[k]) is type(v), (k, v, have[k])
            assert types[(key[0], k)] == _INFLUX_TYPES[type(v)], (key, k, v)


@settings(
    max_examples=int(os.environ.get("RT_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(records=batches())
def test_written_records_read_back_exactly(influxdb: Any, records: list[Record]) -> None:
    # the batch path and the one-record path agree line for line
    singles = [lp.encode_record(r, UID) for r in records]
    stats = lp.EncodeStats()
    body = lp.encode(records, stats, UID)
    assert body == b"".join(s.encode() + b"\n" for s in singles if s is not None)
    assert stats.lines == sum(s is not None for s in singles)
    event(f"{stats.lines} of {len(records)} records written")

    expected: dict[Key, dict[str, Any]] = {}
    for rec, line in zip(records, singles, strict=True):
        want = _expected(rec)
        reason = _refused_reason(rec)
        if line is None:
            assert want is None or reason, f"{rec!r} was dropped without a reason"
            continue
        assert want is not None and reason is None, f"{rec!r} should not have been written"
        expected[(rec.series.measurement, rec.series.tags, rec.time_ns)] = want
    if body:
        _write_and_compare(influxdb, body, expected)


@pytest.mark.parametrize("name", [n for n in CASES if (HERE / n / "expected.lp").stat().st_size])
def test_golden_cases_read_back_exactly(influxdb: Any, name: str) -> None:
    """The golden files are not just self-consistent: InfluxDB 1.6.7 reads them as meant."""
    case, records = load_case(name)
    uid_field = case.get("uid_field", UID)
    expected = {
        (r.series.measurement, r.series.tags, r.time_ns): want
        for r in records
        if lp.encode_record(r, uid_field) is not None and (want := _expected(r, uid_field))
    }
    _write_and_compare(influxdb, (HERE / name / "expected.lp").read_bytes(), expected)
