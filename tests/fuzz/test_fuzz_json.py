"""Fuzz: the JSON decoders: records (API publish, punt results, bridges) and JSON fields (MQTT).

* ``codecs.json.decode`` + ``to_record``: a payload is records or a ``DecodeError`` naming
  the record and key; a record that decodes becomes a ``Record`` or a ``DecodeError``.
* ``codecs.json_fields.JsonFieldsDecoder`` (MQTT ``codec = "json"``): rows or a
  ``PayloadError``; values of the wrong type are problems, never exceptions.

Inputs: random bytes and text, mutations of valid payloads, and record-shaped documents
with wrong types, NaN/Infinity, numbers beyond int64 and float64, lone surrogates.
Round trip: ``encode`` -> ``decode`` -> ``to_record`` gives the records back.
"""

from __future__ import annotations

import math

import pytest
from fuzzkit import FUZZ, ROUND_TRIP, mutated, within
from hypothesis import example, given
from hypothesis import strategies as st
from jsongen import record_payloads

from plantbus.broker.record import Quality, Record, Series
from plantbus.codecs import json as json_codec
from plantbus.codecs.json_fields import JsonFieldsDecoder
from plantbus.codecs.payload import PayloadError, Row, TimeSpec

pytestmark = pytest.mark.fuzz

SEEDS = [
    b'[{"uid":"0190a","topic":"plant/h1/press7","measurement":"press7","time":1732790000123456789,'
    b'"tags":{"device":"press7","line":"L1"},"fields":{"temp":21.5,"running":true,"n":3,"s":"x"},'
    b'"quality":"uncertain","status":{"temp":1073741824},"parent":"0190b"}]',
    b'{"fields":{"a":-1e308,"b":"\\u00e9\\ud83d\\ude00"},"status":{"c":2151415808}}',
    b'[{"fields":{}},{"fields":{"x":0}, "topic":"a/b"}]',
]
payloads = st.one_of(st.binary(max_size=200), mutated(st.sampled_from(SEEDS)), record_payloads)

SERIES = json_codec.SeriesCache(limit=50)


def _check_record(rec: Record) -> None:
    assert isinstance(rec.series, Series) and rec.series.measurement
    for k, v in rec.fields.items():
        assert type(k) is str
        assert type(v) in (float, int, bool, str)
        if type(v) is float:
            assert math.isfinite(v)
    assert type(rec.time_ns) is int and type(rec.id) is str
    assert isinstance(rec.quality, Quality)


@FUZZ
@given(payloads)
@example(b"[" * 100_000)  # deep nesting: RecursionError must be a DecodeError
@example(b'{"fields":{"a":' + b"9" * 5000 + b"}}")  # int() refuses > 4300 digits
@example(b'{"fields":{"a":1e400}}')
@example(b'{"fields":{},"quality":[]}')  # found: TypeError (unhashable) instead of DecodeError
@example(b'{"fields":{"\\ud800":1}}')
def test_json_records(payload: bytes) -> None:
    with within():
        try:
            docs = json_codec.decode(payload)
        except json_codec.DecodeError as e:
            assert str(e)
            return
        for doc in docs:
            try:
                rec = json_codec.to_record(
                    doc, topic="plant/default", time_ns=1, uid="0190", series=SERIES
                )
            except json_codec.DecodeError as e:
                assert str(e)
                continue
            _check_record(rec)


_names = st.text(min_size=1, max_size=8).filter(
    lambda s: s.encode("utf-8", "ignore") == s.encode("utf-8", "surrogatepass")
)
_vals = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(),
    st.booleans(),
    st.text(max_size=8).filter(lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s)),
)


@ROUND_TRIP
@given(
    st.lists(
        st.tuples(
            _names,
            st.dictionaries(_names, _names, max_size=2),
            st.dictionaries(_names, _vals, min_size=1, max_size=3),
            st.integers(-(2**63), 2**63 - 1),
            st.sampled_from(list(Quality)),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_encode_decode_round_trip(items: list) -> None:
    records = [
        Record(Series("plant/rt", m, tags), fields, t, f"id{i}", q)
        for i, (m, tags, fields, t, q) in enumerate(items)
    ]
    with within():
        docs = json_codec.decode(json_codec.encode(records))
    assert len(docs) == len(records)
    for doc, rec in zip(docs, records, strict=True):
        back = json_codec.to_record(doc, topic="x", time_ns=0, uid="u")
        assert (back.series.topic, back.series.measurement) == ("plant/rt", rec.series.measurement)
        assert back.series.tags == rec.series.tags
        assert back.fields == rec.fields
        assert (back.time_ns, back.id, back.quality) == (rec.time_ns, rec.id, rec.quality)


DECODERS = [
    JsonFieldsDecoder(),
    JsonFieldsDecoder(time="ts", time_spec=TimeSpec("ms")),
    JsonFieldsDecoder(
        {
            "t": ("data.t", "float"),
            "n": ("/n", "int"),
            "b": ("b", "bool"),
            "s": ("s", "string"),
            "a": ("arr.1", "auto"),
        },
        time="ts",
        time_spec=TimeSpec("rfc3339"),
    ),
    JsonFieldsDecoder({"x": ("x", "auto")}, time="t", time_spec=TimeSpec("%d.%m.%Y %H:%M:%S")),
]
FIELD_SEEDS = [
    b'{"ts": 1714564800000, "data": {"t": 21.5}, "n": 3, "b": true, "s": "x", "arr": [1, 2]}',
    b'[{"ts": "2024-05-01T12:00:00.123456789Z", "data": {"t": "21.5"}, "n": "7", "b": "on"}]',
    b'{"t": "01.05.2024 12:00:00", "x": 1e300, "nested": {"deep": {"er": false}}}',
]
field_payloads = st.one_of(
    st.binary(max_size=200), mutated(st.sampled_from(FIELD_SEEDS)), record_payloads
)


def _check_rows(rows: list[Row], problems: list[str]) -> None:
    assert rows
    for row in rows:
        for k, v in row.fields.items():
            assert type(k) is str and type(v) in (float, int, bool, str)
        assert row.time_ns is None or -(2**63) < row.time_ns < 2**63
    assert all(isinstance(p, str) and p for p in problems)


@FUZZ
@given(field_payloads, st.sampled_from(range(len(DECODERS))))
@example(b'{"a": ' + b"9" * 400 + b"}", 0)  # found: float() of a huge int raised OverflowError
@example(b'{"a": {"b": ' + b"9" * 400 + b"}}", 0)
@example(b'{"ts": 1714564800000, "arr": [0, ' + b"9" * 400 + b"]}", 2)
@example(b'{"ts": 1, "data": {"t": ' + b"9" * 400 + b"}}", 2)
def test_json_fields(payload: bytes, which: int) -> None:
    with within():
        try:
            rows, problems = DECODERS[which].decode(payload)
        except PayloadError as e:
            assert str(e)
            return
    _check_rows(rows, problems)
