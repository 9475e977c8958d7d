"""Unit tests of the line-protocol encoder: name rules, caches, fallbacks and odd inputs.

The byte-exact mapping lives in the golden cases (tests/golden/); these tests cover what TOML
cannot express (value subclasses, lone surrogates, non-int times) and the machinery around the
hot path: caches, generated layout functions and their agreement with the general path.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plantbus.broker.record import Quality, Record, Series
from plantbus.codecs import line_protocol as lp


@pytest.fixture(autouse=True)
def cold_caches() -> Iterator[None]:
    """Each test starts without learned keys and layouts (module-level caches)."""
    for cache in (lp._field_keys, lp._status_keys, lp._bad_keys, lp._layouts, lp._layouts_seen):
        cache.clear()
    yield


def rec(fields: dict, series: Series | None = None, **kw: object) -> Record:
    return Record(
        series or Series("plant/t", "m", {"d": "x"}),
        fields,
        kw.pop("time_ns", 1_000),  # type: ignore[arg-type]
        kw.pop("id", "u1"),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


# -- check_name ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "reason"),
    [
        ("ok", None, None),
        ('a b,c=d"e', None, None),
        ("", None, None),
        ("a\nb", None, "contains a newline"),
        ("ab\\", None, "ends with a backslash"),
        ("a\ud800", None, "lone surrogate"),
        ("", "measurement", "is empty"),
        ("", "tag_key", "is empty"),
        ("", "field_key", "is empty"),
        ("", "tag_value", None),
        ("#m", "measurement", "comment"),
        ("m#", "measurement", None),
        ("#k", "field_key", None),
        ("\tm", "measurement", "tab or NUL"),
        ("\x00m", "measurement", "tab or NUL"),
        (" m", "measurement", None),
        ("\tk", "field_key", "tab or NUL"),
        ("\tv", "tag_value", None),
        ("a\\,b", "measurement", "backslash before"),
        ("a\\=b", "field_key", "backslash before"),
        ('a\\"b', "field_key", "backslash before"),
        ("a\\ b", "tag_value", None),
        ("a\\,b", "tag_key", None),
        ("a\\b", "field_key", None),
        ("time", "field_key", "refuses"),
        ("time", "tag_key", "refuses"),
        ("time", "tag_value", None),
        ("time", "measurement", None),
    ],
)
def test_check_name(text: str, kind: str | None, reason: str | None) -> None:
    got = lp.check_name(text, kind)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got


def test_check_name_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown name kind"):
        lp.check_name("x", "tag")


# -- series prefix ------------------------------------------------------------------------------


def test_series_prefix_is_cached_on_the_series() -> None:
    s = Series("t", "press 7", {"line": "L,1", "empty": ""})
    p = lp.series_prefix(s)
    assert p == "press\\ 7,line=L\\,1"
    assert s.cache["lp"] is p
    assert lp.series_prefix(s) is p


def test_series_prefix_of_unencodable_series_raises_with_reason() -> None:
    s = Series("t", "m", {"dir": "C:\\"})
    with pytest.raises(ValueError, match=r"tag 'dir' value .* ends with a backslash"):
        lp.series_prefix(s)
    # the verdict is cached too: a record of it is counted invalid, with the same reason
    stats = lp.EncodeStats()
    assert lp.encode([rec({"v": 1.0}, s)], stats) == b""
    assert stats.invalid == 1 and "ends with a backslash" in stats.last_invalid


def test_series_key_longer_than_influxdb_allows_is_refused() -> None:
    s = Series("t", "m", {"k": "v" * 70_000})
    with pytest.raises(ValueError, match="64 KiB"):
        lp.series_prefix(s)


def test_non_string_tag_values_are_refused() -> None:
    s = Series("t", "m", {"unit": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="not a pair of strings"):
        lp.series_prefix(s)


# -- values the golden TOML cannot express ------------------------------------------------------


class Mode(enum.IntEnum):
    AUTO = 2


class MyFloat(float):
    pass


class MyStr(str):
    __slots__ = ()


def test_value_subclasses_take_their_base_form() -> None:
    line = lp.encode_record(rec({"mode": Mode.AUTO, "f": MyFloat(1.5), "s": MyStr('a"b')}))
    assert line == 'm,d=x mode=2i,f=1.5,s="a\\"b",uid="u1" 1000'


@pytest.mark.parametrize("value", [None, b"bytes", [1], {"a": 1}, 1 + 2j])
def test_unsupported_value_types_make_the_record_invalid(value: object) -> None:
    stats = lp.EncodeStats()
    data = lp.encode([rec({"v": value}), rec({"v": 1.5}, id="u2")], stats)
    assert data == b'm,d=x v=1.5,uid="u2" 1000\n'
    assert (stats.records, stats.lines, stats.invalid) == (2, 1, 1)
    assert "point 'v' has a" in stats.last_invalid


def test_lone_surrogate_in_a_string_drops_only_that_record() -> None:
    stats = lp.EncodeStats()
    records = [rec({"s": "ok"}), rec({"s": "bad\udc80"}, id="u2"), rec({"s": "ok"}, id="u3")]
    data = lp.encode(records, stats)
    assert data == b'm,d=x s="ok",uid="u1" 1000\nm,d=x s="ok",uid="u3" 1000\n'
    assert (stats.records, stats.lines, stats.invalid) == (3, 2, 1)
    assert "not valid Unicode" in stats.last_invalid


def test_lone_surrogate_in_a_name_or_id_is_invalid() -> None:
    stats = lp.EncodeStats()
    lp.encode([rec({"k\ud800": 1.0}), rec({"k": 1.0}, id="u\ud800")], stats)
    assert (stats.lines, stats.invalid) == (0, 2)


@pytest.mark.parametrize("t", [1.7e18, "1700000000000000000", None, lp.TIME_MIN - 1])
def test_time_must_be_an_int_influxdb_accepts(t: object) -> None:
    stats = lp.EncodeStats()
    assert lp.encode([rec({"v": 1.0}, time_ns=t)], stats) == b""
    assert stats.invalid == 1 and "time_ns" in stats.last_invalid


def test_bad_status_codes_and_quality_make_the_record_invalid() -> None:
    stats = lp.EncodeStats()
    lp.encode(
        [
            rec({"v": 1.0}, status={"v": 1.5}, quality=Quality.UNCERTAIN),
            rec({"v": 1.0}, status={"v": True}, quality=Quality.UNCERTAIN),
            rec({"v": 1.0}, status={"v": 1 << 70}, quality=Quality.UNCERTAIN),
            rec({"v": 1.0}, quality=7),
        ],
        stats,
    )
    assert (stats.lines, stats.invalid) == (0, 4)


def test_negative_status_codes_of_signed_sources_are_bad_by_their_bits() -> None:
    code = 0x80320000 - (1 << 32)  # Bad_Timeout as a signed int32
    assert lp.is_bad_status(code) and lp.is_bad_status(0x80320000)
    assert not lp.is_bad_status(0x40920000) and not lp.is_bad_status(0)
    line = lp.encode_record(rec({"a": 1.0, "b": 2.0}, status={"a": code}, quality=Quality.BAD))
    assert line == f'm,d=x b=2.0,a_status={code}i,quality="bad",uid="u1" 1000'


def test_uid_field_name_is_checked() -> None:
    with pytest.raises(ValueError, match="uid field name 'id\\\\\\\\' ends with a backslash"):
        lp.encode([rec({"v": 1.0})], uid_field="id\\")
    with pytest.raises(ValueError, match="refuses"):
        lp.encode_record(rec({"v": 1.0}), uid_field="time")


def test_stats_accumulate_over_calls_and_are_optional() -> None:
    stats = lp.EncodeStats()
    lp.encode([rec({"v": float("nan")})], stats)
    lp.encode([rec({"v": 1.0}), rec({})], stats)
    assert (stats.records, stats.lines, stats.non_finite, stats.empty, stats.invalid) == (
        3,
        1,
        1,
        2,
        0,
    )
    assert repr(stats).startswith("EncodeStats(records=3")
    assert lp.encode([rec({"v": 1.0})]) == b'm,d=x v=1.0,uid="u1" 1000\n'
    assert lp.encode([]) == b""


def test_encode_record_returns_the_line_without_newline_or_none() -> None:
    assert lp.encode_record(rec({"s": "a\nb"})) == 'm,d=x s="a\nb",uid="u1" 1000'
    assert lp.encode_record(rec({"v": float("inf")})) is None
    assert lp.encode_record(rec({"v\\": 1.0})) is None


# -- caches and generated layout functions ------------------------------------------------------


def test_key_caches_stay_bounded() -> None:
    for i in range(lp._KEY_CACHE_MAX + 50):
        lp.encode([rec({f"p{i}": 1.0})])
    assert len(lp._field_keys) <= lp._KEY_CACHE_MAX
    assert len(lp._layouts_seen) <= lp._LAYOUT_CACHE_MAX


def test_a_layout_gets_a_function_once_it_recurs() -> None:
    r = rec({"a": 1.5, "b": 2, "c": True, "s": "x"})
    first = lp.encode([r])  # new point names: the general path learns the keys
    assert lp.encode([r]) == first  # first plain sighting of the layout
    assert not lp._layouts
    assert lp.encode([r]) == first  # second: a function is generated
    assert list(lp._layouts) == [("a", "b", "c", "s")]
    assert lp.encode([r]) == first


def test_wide_records_use_the_general_path() -> None:
    fields = {f"p{i}": float(i) for i in range(lp._LAYOUT_MAX_FIELDS + 1)}
    r = rec(fields)
    lines = {lp.encode([r]) for _ in range(3)}
    assert len(lines) == 1 and not lp._layouts


def test_layout_function_falls_back_on_anything_unusual() -> None:
    plain = {"a": 1.5, "n": 2, "on": True, "s": "x"}
    for _ in range(3):
        lp.encode([rec(dict(plain))])
    assert lp._layouts
    odd = [
        {**plain, "a": float("nan")},
        {**plain, "a": 7},  # an int where a float was
        {**plain, "n": 1 << 64},
        {**plain, "n": 2.5},
        {**plain, "on": 1},
        {**plain, "s": 'q"uote\\'},
        {**plain, "s": 5},
    ]
    for fields in odd:
        lp._layouts.clear()
        lp._layouts_seen.clear()
        cold = lp.encode([rec(fields)])
        for _ in range(2):
            lp.encode([rec(dict(plain))])
        assert lp._layouts
        warm_stats = lp.EncodeStats()
        assert lp.encode([rec(fields)], warm_stats) == cold, fields
    uid_odd = rec(dict(plain), id='x"y')
    assert lp.encode([uid_odd]) == lp.encode_record(uid_odd).encode() + b"\n"  # type: ignore[union-attr]


def test_a_run_of_records_across_series_and_odd_records_matches_the_general_path() -> None:
    good = [Series(f"plant/s{i}", "m", {"d": f"s{i}"}) for i in range(3)]
    unencodable = Series("plant/bad", "bad\\", {})
    fresh = Series("plant/fresh", "m", {"d": "fresh"})  # prefix not computed yet
    plain = {"a": 1.5, "n": 2, "on": True, "s": "x"}
    rows: list[Record] = []
    for i in range(60):
        fields: dict[str, object] = {**plain, "a": i / 3, "n": i}
        series = good[i % 3] if i % 10 else good[0]
        kw: dict[str, object] = {"id": f"u{i}", "time_ns": 1_000 + i}
        if i == 17:
            fields["a"] = float("nan")
        elif i == 23:
            series = unencodable
        elif i == 29:
            kw["status"] = {"a": 0x40000000}
        elif i == 31:
            kw["quality"] = Quality.UNCERTAIN
        elif i == 37:
            fields = {"n": i, "a": 1.0, "on": True, "s": "x"}  # same names, another order
        elif i == 41:
            fields = {"".join(["a"]): 2.5, "".join(["n"]): i, "on": False, "s": "y"}  # equal keys
        elif i == 43:
            series = fresh
        elif i == 47:
            fields["s"] = 'q"uote\\'
        elif i == 53:
            kw["id"] = 'x"y'
        elif i == 59:
            fields["extra"] = 1
        rows.append(rec(fields, series, **kw))
    cold_stats, warm_stats = lp.EncodeStats(), lp.EncodeStats()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lp, "_LAYOUT_MAX_FIELDS", 0)  # no generated functions: the general paths
        cold = lp.encode(rows, cold_stats)
        cold_singles = [lp.encode_record(r) for r in rows]
    assert not lp._layouts
    lp.encode(rows)
    assert ("a", "n", "on", "s") in lp._layouts
    warm = lp.encode(rows, warm_stats)
    assert warm == cold
    assert repr(warm_stats) == repr(cold_stats)
    assert [lp.encode_record(r) for r in rows] == cold_singles
    assert (cold_stats.lines, cold_stats.invalid) == (59, 1)


names = st.text(alphabet=st.sampled_from(list('ab ,="\\é\n#\t')), min_size=1, max_size=4)
values = st.one_of(
    st.floats(),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.booleans(),
    st.text(max_size=5),
)


@settings(max_examples=300, deadline=None)
@given(
    measurement=names,
    tags=st.dictionaries(names, names | st.just(""), max_size=3),
    rows=st.lists(st.dictionaries(names, values, max_size=4), min_size=1, max_size=6),
)
def test_warm_caches_change_nothing_and_records_are_never_modified(
    measurement: str, tags: dict[str, str], rows: list[dict[str, object]]
) -> None:
    for cache in (lp._field_keys, lp._status_keys, lp._bad_keys, lp._layouts, lp._layouts_seen):
        cache.clear()
    series = Series("t", measurement, tags)
    records = [rec(fields, series, id=f"u{i}", time_ns=i) for i, fields in enumerate(rows)]
    snapshot = [copy.deepcopy(r.fields) for r in records]
    cold_stats, warm_stats = lp.EncodeStats(), lp.EncodeStats()
    cold = lp.encode(records, cold_stats)
    lp.encode(records * 3)  # every layout recurs: generated functions from now on
    warm = lp.encode(records, warm_stats)
    assert warm == cold
    assert repr(warm_stats) == repr(cold_stats)
    assert [r.fields for r in records] == snapshot
    singles = [lp.encode_record(r) for r in records]
    assert b"".join(s.encode() + b"\n" for s in singles if s is not None) == cold
    assert cold_stats.lines + cold_stats.empty + cold_stats.invalid == len(records)
