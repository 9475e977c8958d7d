"""The JSON record codec: the DESIGN shape, round trips, status/quality, strict decoding."""

from __future__ import annotations

import copy
import enum
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plantbus.broker.record import Quality, Record, Series
from plantbus.codecs import json as jc
from plantbus.codecs import line_protocol as lp

SERIES = Series("plant/h1/press7", "press7", {"device": "press7", "line": "L1"})
T = 1732790000123456789


def rec(fields: dict, **kw: object) -> Record:
    return Record(SERIES, fields, kw.pop("time_ns", T), kw.pop("id", "0190-a"), **kw)  # type: ignore[arg-type]


def test_stdlib_json_is_not_shadowed() -> None:
    assert jc._json is json and json.__name__ == "json"
    assert jc.CODEC_NAME == "json"


def test_shape_of_a_good_record() -> None:
    data = jc.encode([rec({"temp": 21.5, "running": True, "n": 3, "mode": "auto"})])
    assert json.loads(data) == [
        {
            "uid": "0190-a",
            "topic": "plant/h1/press7",
            "measurement": "press7",
            "time": T,
            "tags": {"device": "press7", "line": "L1"},
            "fields": {"temp": 21.5, "running": True, "n": 3, "mode": "auto"},
            "quality": "good",
        }
    ]
    assert b" " not in data  # compact separators
    assert jc.encode([]) == b"[]"


def test_non_ascii_stays_readable_utf8() -> None:
    data = jc.encode([rec({"Drück": "温度 ✓"})])
    assert "Drück".encode() in data and "温度 ✓".encode() in data


def test_uncertain_and_bad_points() -> None:
    r = rec({"temp": 21.5, "pressure": 1.5, "flow": 3.0})
    r.mark("temp", Quality.UNCERTAIN, 0x40920000)
    r.mark("flow", Quality.BAD, 0x80320000)
    d = jc.record_to_dict(r)
    assert d["fields"] == {"temp": 21.5, "pressure": 1.5}
    assert d["quality"] == "bad"
    assert d["status"] == {"temp": 0x40920000, "flow": 0x80320000}


def test_a_bad_value_left_in_fields_is_not_written() -> None:
    r = rec({"temp": 21.5, "p": 1.0}, status={"temp": 0x80320000}, quality=Quality.BAD)
    assert jc.record_to_dict(r)["fields"] == {"p": 1.0}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_dropped_and_marked_like_in_line_protocol(bad: float) -> None:
    r = rec({"temp": bad, "p": 1.0})
    stats = lp.EncodeStats()
    (d,) = json.loads(jc.encode([r], stats))
    assert d["fields"] == {"p": 1.0}
    assert d["status"] == {"temp": lp.NON_FINITE_STATUS}
    assert d["quality"] == "bad"
    assert (stats.records, stats.lines, stats.non_finite) == (1, 1, 1)
    line = lp.encode_record(r)
    assert line is not None and f"temp_status={lp.NON_FINITE_STATUS}i" in line


def test_a_record_without_values_is_still_written() -> None:
    r = rec({"temp": math.nan})
    (d,) = json.loads(jc.encode([r]))
    assert d["fields"] == {} and d["status"] == {"temp": lp.NON_FINITE_STATUS}
    assert lp.encode_record(r) is None  # a line needs a point value, a JSON record does not


def test_big_integers_are_kept() -> None:
    (d,) = json.loads(jc.encode([rec({"big": 2**70})]))
    assert d["fields"] == {"big": 2**70} and d["quality"] == "good"


def test_encoding_never_modifies_records_or_series() -> None:
    r = rec({"temp": math.nan, "p": 1.0}, status={"x": 0x40000000}, quality=Quality.UNCERTAIN)
    before = (copy.deepcopy(r.fields), dict(r.status or {}), r.quality, SERIES.tags)
    jc.encode([r, rec({"a": 1.0})])
    d = jc.record_to_dict(r)
    d["fields"]["new"] = 1
    d["tags"]["new"] = "x"
    d["status"]["new"] = 1
    assert (r.fields, r.status, r.quality, SERIES.tags) == before
    assert jc.record_to_dict(rec({"a": 1.0}))["tags"] == {"device": "press7", "line": "L1"}


@pytest.mark.parametrize("value", [b"raw", None, [1], object()])
def test_values_json_cannot_hold_drop_their_record(value: object) -> None:
    stats = lp.EncodeStats()
    data = jc.encode([rec({"v": value}), rec({"v": 1.0}, id="ok")], stats)
    assert [d["uid"] for d in json.loads(data)] == ["ok"]
    assert (stats.records, stats.lines, stats.invalid) == (2, 1, 1)


def test_lone_surrogates_drop_their_record() -> None:
    stats = lp.EncodeStats()
    data = jc.encode([rec({"s": "x\ud800"}), rec({"s": "fine"}, id="ok")], stats)
    assert [d["uid"] for d in json.loads(data)] == ["ok"]
    assert stats.invalid == 1


def test_round_trip() -> None:
    records = [
        rec({"temp": 21.5, "on": False, "n": -(2**63), "s": 'q"\\\n'}),
        rec({"temp": math.nan}, id="b"),
    ]
    records[0].mark("n", Quality.UNCERTAIN, 0x40000000)
    assert jc.decode(jc.encode(records)) == [jc.record_to_dict(r) for r in records]


# -- decoding -----------------------------------------------------------------------------------


def test_decode_accepts_one_object_or_an_array_and_parent() -> None:
    one = {"fields": {"x": 1}, "parent": "0190-a", "time": 5}
    assert jc.decode(json.dumps(one).encode()) == [one]
    assert jc.decode(json.dumps([one, one]).encode()) == [one, one]
    assert jc.decode(b"[]") == []


@pytest.mark.parametrize(
    ("payload", "where"),
    [
        (b"{", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"3", "expected an array of records"),
        (b"[3]", "[0]: expected a record object"),
        (b'[{"fields": {}}, {"feilds": {}}]', "[1]: unknown key 'feilds'"),
        (b'[{"uid": "a"}]', "[0]: missing 'fields'"),
        (b'{"fields": []}', "record.fields: expected an object"),
        (b'{"fields": {"x": null}}', "record.fields.x: expected a number, boolean or string"),
        (b'{"fields": {"x": [1]}}', "record.fields.x: expected a number"),
        (b'{"fields": {"x": NaN}}', "NaN is not a JSON value"),
        (b'{"fields": {"x": -Infinity}}', "-Infinity is not a JSON value"),
        (b'{"fields": {"x": 1e400}}', "record.fields.x: inf is not a finite number"),
        (b'{"fields": {"x": "\\ud800"}}', "record.fields.x: not valid Unicode"),
        (b'{"fields": {}, "time": 1.5}', "record.time: expected an integer"),
        (b'{"fields": {}, "time": true}', "record.time: expected an integer"),
        (b'{"fields": {}, "uid": 7}', "record.uid: expected a string"),
        (b'{"fields": {}, "tags": {"a": 1}}', "record.tags.a: expected a string"),
        (b'{"fields": {}, "tags": []}', "record.tags: expected an object"),
        (b'{"fields": {}, "quality": "ok"}', "record.quality: expected 'good'"),
        (b'{"fields": {}, "status": {"a": "x"}}', "record.status.a: expected an integer"),
        (b'{"fields": {}, "status": {"a": false}}', "record.status.a: expected an integer"),
    ],
)
def test_decode_refuses_with_the_place(payload: bytes, where: str) -> None:
    with pytest.raises(jc.DecodeError) as e:
        jc.decode(payload)
    assert where in str(e.value)
    assert isinstance(e.value, ValueError)


# -- agreement with line protocol ---------------------------------------------------------------

values = st.one_of(
    st.floats(),
    st.integers(min_value=lp.INT64_MIN, max_value=lp.INT64_MAX),
    st.booleans(),
    st.text(max_size=4),
)
qualities = st.sampled_from([(Quality.UNCERTAIN, 0x40920000), (Quality.BAD, 0x80320000)])


def _lp_fields(line: str) -> dict[str, str]:
    """The fields of a line of SERIES (its prefix has no escapes) as raw value texts."""
    body = line[len(lp.series_prefix(SERIES)) + 1 : line.rindex(" ")]
    out: dict[str, str] = {}
    i = 0
    while i < len(body):
        eq = body.index("=", i)
        key, i = body[i:eq], eq + 1
        if body[i] == '"':
            j = i + 1
            while body[j] != '"':
                j += 2 if body[j] == "\\" else 1
            j += 1
        else:
            j = body.find(",", i)
            j = len(body) if j < 0 else j
        out[key] = body[i:j]
        i = j + 1
    return out


def _lp_text(v: object) -> str:
    if type(v) is float:
        return repr(v)
    if type(v) is bool:
        return "true" if v else "false"
    if type(v) is int:
        return f"{v}i"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


@settings(max_examples=300, deadline=None)
@given(
    fields=st.dictionaries(st.sampled_from(list("abcdef")), values, min_size=1, max_size=5),
    marks=st.dictionaries(st.sampled_from(list("abcdefg")), qualities, max_size=3),
)
def test_json_and_line_protocol_tell_the_same_story(
    fields: dict[str, object], marks: dict[str, tuple[Quality, int]]
) -> None:
    r = rec(fields)
    for p, (q, code) in marks.items():
        r.mark(p, q, code)
    d = jc.record_to_dict(r)
    line = lp.encode_record(r)
    if line is None:
        assert d["fields"] == {}  # nothing left to write as a line
        return
    got = _lp_fields(line)
    assert got.pop("uid") == '"0190-a"'
    quality = got.pop("quality", '"good"')
    status = {k[: -len("_status")]: int(v[:-1]) for k, v in got.items() if k.endswith("_status")}
    points = {k: v for k, v in got.items() if not k.endswith("_status")}
    assert quality == f'"{d["quality"]}"'
    assert status == d.get("status", {})
    assert points == {k: _lp_text(v) for k, v in d["fields"].items()}


def test_value_subclasses_take_their_base_form() -> None:
    class Mode(enum.IntEnum):
        AUTO = 2

    d = jc.record_to_dict(rec({"mode": Mode.AUTO}, status={"x": 0x40000000}))
    assert type(d["fields"]["mode"]) is int


@pytest.mark.parametrize("kw", [{"time_ns": 1.5e18}, {"id": 7}, {"quality": 9}])
def test_records_decode_would_refuse_are_not_written(kw: dict[str, object]) -> None:
    stats = lp.EncodeStats()
    data = jc.encode([rec({"v": 1.0}, **kw), rec({"v": 1.0}, id="ok")], stats)
    assert [d["uid"] for d in jc.decode(data)] == ["ok"]
    assert stats.invalid == 1
