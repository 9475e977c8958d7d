"""Every payload decoder, fed random bytes: it returns rows or raises PayloadError, nothing else.

A device must survive whatever arrives on the wire: truncated JSON, the wrong types, binary
garbage. Each decoder gets a few thousand random inputs (plus inputs mutated from a valid
payload, which reach deeper than pure noise).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plantbus.codecs import sparkplug_b_pb2 as pb
from plantbus.codecs.json_fields import JsonFieldsDecoder
from plantbus.codecs.line_protocol_decoder import decode as lp_decode
from plantbus.codecs.payload import PayloadError, Row, TimeSpec, decode_number
from plantbus.codecs.sparkplug import SparkplugDecoder
from plantbus.codecs.text import Column, TextDecoder

FUZZ = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JSON_MAPPED = JsonFieldsDecoder(
    {"t": ("data.t", "float"), "n": ("n", "int"), "b": ("b", "bool"), "s": ("s", "string")},
    time="ts",
    time_spec=TimeSpec("ms"),
)
JSON_ALL = JsonFieldsDecoder()
REGEX = TextDecoder.regex(
    r"^(?P<id>\w+);(?P<t>[^;]*);(?P<n>[^;]*);(?P<ts>[^;]*)$",
    {
        "id": Column("id", "tag"),
        "n": Column("n", "int"),
        "ts": Column("ts", "time", TimeSpec("rfc3339")),
    },
)
CSV = TextDecoder.csv(
    [Column("t"), Column("b", "bool"), Column("ts", "time", TimeSpec("s")), Column("s", "string")]
)
SPARKPLUG = SparkplugDecoder()

VALID_JSON = b'{"ts": 1714564800000, "data": {"t": 21.5}, "n": 3, "b": true, "s": "x"}'
VALID_LP = b'm,tag=a f=1.5,i=3i,s="x",b=t 1714564800000000000\n'
VALID_TEXT = b"S1;21.5;3;2024-05-01T12:00:00Z"
VALID_CSV = b'21.5,true,1714564800,"a,b"'


def _sparkplug_birth() -> bytes:
    p = pb.Payload()
    p.timestamp = 1
    p.seq = 0
    m = p.metrics.add()
    m.name, m.alias, m.datatype, m.int_value = "x", 1, pb.Int32, 5
    return p.SerializeToString()


VALID_SP = _sparkplug_birth()


def _check_rows(rows: list[Row]) -> None:
    for row in rows:
        assert isinstance(row.fields, dict)
        for k, v in row.fields.items():
            assert isinstance(k, str)
            assert isinstance(v, float | int | bool | str)


def _mutate(data: bytes) -> st.SearchStrategy[bytes]:
    """``data`` with a random slice replaced by random bytes (truncation included)."""
    n = len(data)
    return st.tuples(st.integers(0, n), st.integers(0, n), st.binary(max_size=12)).map(
        lambda t: data[: min(t[0], t[1])] + t[2] + data[max(t[0], t[1]) :]
    )


def _inputs(valid: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=200), _mutate(valid))


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


@FUZZ
@given(_inputs(VALID_JSON))
def test_json_decoders(data: bytes) -> None:
    for dec in (JSON_MAPPED, JSON_ALL):
        try:
            rows, problems = dec.decode(data)
        except PayloadError:
            continue
        _check_rows(rows)
        assert all(isinstance(p, str) for p in problems)


@FUZZ
@given(_inputs(VALID_LP))
def test_line_protocol_decoder(data: bytes) -> None:
    try:
        points = lp_decode(data, 1, 0)
    except PayloadError:
        return
    for p in points:
        assert p.fields and all(isinstance(k, str) for k, _ in p.fields)


@FUZZ
@given(st.binary(max_size=80), st.sampled_from(["float", "int", "bool", "string"]))
def test_number_decoder(data: bytes, vtype: str) -> None:
    try:
        v = decode_number(data, vtype)
    except PayloadError:
        return
    assert isinstance(v, float | int | bool | str)


@FUZZ
@given(st.one_of(_inputs(VALID_TEXT), _inputs(VALID_CSV)))
def test_text_decoders(data: bytes) -> None:
    for dec in (REGEX, CSV):
        try:
            row, _ = dec.decode(_text(data))
        except PayloadError:
            continue
        _check_rows([row])


@FUZZ
@given(
    _inputs(VALID_SP),
    st.sampled_from(["NBIRTH", "NDATA", "NDEATH", "DBIRTH/d", "DDATA/d", "DDEATH/d"]),
)
def test_sparkplug_decoder(data: bytes, mtype: str) -> None:
    kind, _, device = mtype.partition("/")
    topic = f"spBv1.0/g/{kind}/n" + (f"/{device}" if device else "")
    try:
        pairs, problems = SPARKPLUG.decode(topic, data, 1)
    except PayloadError:
        return
    _check_rows([row for _, row in pairs])
    assert all(isinstance(p, str) for p in problems)


@pytest.mark.parametrize("value", ["1e999999", "-1E+999999999", 1e308, "9" * 400])
def test_huge_epoch_times_are_refused_as_out_of_range(value):
    # found by Hypothesis: decimal.Overflow escaped the decoder
    with pytest.raises(PayloadError, match="out of range"):
        TimeSpec("ms").parse(value)
