"""Payload decoders: JSON by path, plain numbers, text frames (regex / CSV), timestamps."""

from __future__ import annotations

import json

import pytest

from plantbus.codecs.json_fields import JsonFieldsDecoder, parse_path
from plantbus.codecs.payload import (
    BAD_TYPE_MISMATCH,
    PayloadError,
    TimeSpec,
    convert,
    decode_number,
)
from plantbus.codecs.text import Column, TextDecoder

T = 1_714_564_800  # 2024-05-01T12:00:00Z
NS = 1_000_000_000


# -- JSON ---------------------------------------------------------------------------------------


def test_json_mapping_paths_types_and_time() -> None:
    dec = JsonFieldsDecoder(
        {
            "temp": ("data.temp", "auto"),
            "rpm": ("motor.rpm", "int"),
            "axis2": ("axes.1.pos", "float"),
            "ok": ("/status/ok.flag", "bool"),  # JSON Pointer: a key holding a dot
            "mode": ("mode", "string"),
        },
        time="ts",
        time_spec=TimeSpec("ms"),
    )
    payload = {
        "ts": T * 1000 + 123,
        "data": {"temp": 21},
        "motor": {"rpm": 1500.0},
        "axes": [{"pos": 1}, {"pos": "2.5"}],
        "status": {"ok.flag": "on"},
        "mode": 3,
    }
    (row,), problems = dec.decode(json.dumps(payload).encode())
    assert problems == []
    assert row.time_ns == T * NS + 123_000_000
    assert row.fields == {"temp": 21.0, "rpm": 1500, "axis2": 2.5, "ok": True, "mode": "3"}
    assert type(row.fields["temp"]) is float  # JSON numbers are floats: no field type conflicts
    assert type(row.fields["rpm"]) is int


def test_json_without_mapping_takes_scalars_flattened_and_never_the_time() -> None:
    dec = JsonFieldsDecoder(time="meta.ts", time_spec=TimeSpec("s"))
    (row,), _ = dec.decode(
        b'{"meta": {"ts": 1714564800.5, "fw": "1.2"}, "t": 20, "on": true, "xs": [1], "n": null}'
    )
    assert row.fields == {"meta.fw": "1.2", "t": 20.0, "on": True}
    assert row.time_ns == T * NS + NS // 2


def test_json_array_gives_one_row_per_element() -> None:
    rows, _ = JsonFieldsDecoder().decode(b'[{"a": 1}, {"a": 2}]')
    assert [r.fields for r in rows] == [{"a": 1.0}, {"a": 2.0}]


def test_json_wrong_type_marks_point_bad_and_keeps_the_rest() -> None:
    dec = JsonFieldsDecoder({"temp": ("temp", "float"), "p": ("p", "auto")})
    (row,), problems = dec.decode(b'{"temp": {"v": 1}, "p": 2}')
    assert row.fields == {"p": 2.0}
    assert row.status == {"temp": BAD_TYPE_MISMATCH}
    assert problems == ["point 'temp' at temp: expected float, got an object"]


def test_json_missing_and_null_are_no_value() -> None:
    dec = JsonFieldsDecoder({"a": ("a", "auto"), "b": ("b", "auto")})
    (row,), problems = dec.decode(b'{"a": null, "c": 1, "b": 5}')
    assert row.fields == {"b": 5.0} and row.status is None and problems == []


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b'{"temp": 21.', "not JSON"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        (b"[1, 2]", "expected a JSON object or an array of objects, got an array"),
        (b'"text"', "got a string"),
        (b'{"t": NaN}', "NaN is not a JSON value"),
        (b'{"x": [1]}', "no values in the payload"),
    ],
)
def test_json_malformed(payload: bytes, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        JsonFieldsDecoder().decode(payload)


def test_json_missing_time_is_malformed() -> None:
    with pytest.raises(PayloadError, match="no timestamp at ts"):
        JsonFieldsDecoder(time="ts").decode(b'{"a": 1}')


def test_parse_path_errors() -> None:
    assert parse_path("a.0.b") == ("a", 0, "b")
    assert parse_path("/a~1b/c~0d") == ("a/b", "c~d")
    with pytest.raises(ValueError, match="empty step"):
        parse_path("a..b")


# -- plain values and time ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "vtype", "value"),
    [
        (b"21.5", "float", 21.5),
        (b" -3\n", "float", -3.0),
        (b"1e-3", "float", 0.001),
        (b"42", "int", 42),
        (b"ON", "bool", True),
        (b"0", "bool", False),
        (b"running", "string", "running"),
    ],
)
def test_decode_number(payload: bytes, vtype: str, value: object) -> None:
    v = decode_number(payload, vtype)
    assert v == value and type(v) is type(value)


@pytest.mark.parametrize(
    ("payload", "vtype", "message"),
    [
        (b"21,5", "float", "is not a number"),
        (b"4.2", "int", "is not an integer"),
        (b"99999999999999999999", "int", "out of the int64 range"),
        (b"maybe", "bool", "is not a boolean"),
        (b"\xff", "float", "not UTF-8"),
        (b"1" * 100, "float", "100 bytes is too long"),
    ],
)
def test_decode_number_malformed(payload: bytes, vtype: str, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        decode_number(payload, vtype)


def test_nan_text_is_a_float_for_the_encoders_to_mark() -> None:
    assert convert("nan", "float") != convert("nan", "float")


@pytest.mark.parametrize(
    ("fmt", "value", "ns"),
    [
        ("s", T, T * NS),
        ("s", "1714564800.25", T * NS + NS // 4),
        ("ms", T * 1000, T * NS),
        ("us", T * 10**6 + 1, T * NS + 1000),
        ("ns", T * NS + 7, T * NS + 7),
        ("rfc3339", "2024-05-01T12:00:00Z", T * NS),
        ("rfc3339", "2024-05-01T14:00:00.123456789+02:00", T * NS + 123_456_789),
        ("rfc3339", "2024-05-01 12:00:00", T * NS),
        ("%d.%m.%Y %H:%M:%S", "01.05.2024 12:00:00", T * NS),
    ],
)
def test_time_formats(fmt: str, value: object, ns: int) -> None:
    assert TimeSpec(fmt).parse(value) == ns


def test_time_zone_of_naive_times() -> None:
    assert TimeSpec("%Y-%m-%d %H:%M", "Europe/Berlin").parse("2024-05-01 14:00") == T * NS


@pytest.mark.parametrize(
    ("fmt", "value", "message"),
    [
        ("ms", "soon", "is not a number"),
        ("ms", [1], "expected a number"),
        ("rfc3339", "yesterday", "Invalid isoformat"),
        ("rfc3339", 5, "expected text"),
        ("s", float("nan"), "not a finite number"),
    ],
)
def test_time_errors(fmt: str, value: object, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        TimeSpec(fmt).parse(value)


def test_time_spec_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown time format 'weeks'"):
        TimeSpec("weeks")
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Base'"):
        TimeSpec("s", "Mars/Base")


# -- text frames --------------------------------------------------------------------------------


def test_regex_frame_with_types_tags_and_time() -> None:
    dec = TextDecoder.regex(
        r"^(?P<sensor>S\d+);(?P<ts>\S+);T=(?P<temp>[-0-9.]+);N=(?P<n>\d+);(?P<state>\w+)?$",
        {
            "sensor": Column("sensor", "tag"),
            "ts": Column("ts", "time", TimeSpec("rfc3339")),
            "n": Column("n", "int"),
            "state": Column("state", "string"),
        },
    )
    row, problems = dec.decode("S7;2024-05-01T12:00:00Z;T=21.5;N=3;RUN")
    assert (row.fields, row.tags, row.time_ns, problems) == (
        {"temp": 21.5, "n": 3, "state": "RUN"},
        (("sensor", "S7"),),
        T * NS,
        [],
    )
    row, _ = dec.decode("S7;2024-05-01T12:00:00Z;T=21.5;N=3;")  # optional group: no value
    assert row.fields == {"temp": 21.5, "n": 3}


def test_regex_no_match_is_malformed() -> None:
    dec = TextDecoder.regex(r"^T=(?P<t>[0-9.]+)$")
    with pytest.raises(PayloadError, match="does not match the regex"):
        dec.decode("HELLO")


def test_regex_config_errors() -> None:
    with pytest.raises(ValueError, match="invalid regex"):
        TextDecoder.regex("(?P<a>")
    with pytest.raises(ValueError, match="no named group"):
        TextDecoder.regex(r"(\d+)")
    with pytest.raises(ValueError, match="'b' are not named groups"):
        TextDecoder.regex(r"(?P<a>\d+)", {"b": Column("b", "int")})


def test_csv_frame() -> None:
    dec = TextDecoder.csv(
        [
            Column("ts", "time", TimeSpec("s")),
            Column("temp"),
            Column("-", "skip"),
            Column("ok", "bool"),
            Column("label", "string"),
        ],
        separator=";",
    )
    row, problems = dec.decode('1714564800;21.5;x;1;"a;b"')
    assert row.fields == {"temp": 21.5, "ok": True, "label": "a;b"}
    assert row.time_ns == T * NS and problems == []
    row, problems = dec.decode("1714564800;abc;x;;")  # a bad value: Bad point, frame kept
    assert row.fields == {} and row.status == {"temp": BAD_TYPE_MISMATCH}
    assert problems and "'abc' is not a number" in problems[0]


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ("1;2", "2 cells, expected 3"),
        ("1;2;3;4", "4 cells, expected 3"),
        (";;", "no values in the frame"),
    ],
)
def test_csv_malformed(frame: str, message: str) -> None:
    dec = TextDecoder.csv([Column("a"), Column("b"), Column("c")], separator=";")
    with pytest.raises(PayloadError, match=message):
        dec.decode(frame)
