"""Fuzz: the line-protocol decoder (MQTT ``codec = "line_protocol"``).

Inputs: random bytes and text, and valid lines (escapes, every value kind, timestamps) with
mutations. The decoder returns points or raises ``LineProtocolError`` naming the line and
column (or saying the input is not UTF-8); nothing else, and every input finishes in time.
Round trip: what the encoder writes, the decoder reads back value for value.
"""

from __future__ import annotations

import math
import random

import pytest
from fuzzkit import FUZZ, ROUND_TRIP, mutated, within
from hypothesis import example, given
from hypothesis import strategies as st

from plantbus.broker.record import Record, Series
from plantbus.codecs.line_protocol import encode_record
from plantbus.codecs.line_protocol_decoder import LineProtocolError, Point, Unsigned, decode

pytestmark = pytest.mark.fuzz

PRECISIONS = (1, 1_000, 1_000_000, 1_000_000_000)

# names dense in what needs escaping
_name_chars = st.sampled_from(list("abcxyz_09 ,=\\\"'#é€\t")) | st.characters(codec="utf-8")
names = st.text(_name_chars, min_size=1, max_size=12)
# what line protocol can carry in a name: no control characters (the decoder refuses them, as
# InfluxData's reference codec does) and no trailing backslash (it would escape the separator)
lp_names = names.filter(
    lambda s: not s.endswith("\\") and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in s)
)


def _esc_measurement(s: str) -> str:
    return s.replace(",", "\\,").replace(" ", "\\ ")


def _esc_key(s: str) -> str:
    return s.replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


_NAME_CHARS = "abcxyz_09 ,=\\\"'#é€😀"


def _name(rng: random.Random) -> str:
    """A name dense in what needs escaping; no control characters (the decoder refuses them,
    as InfluxData's reference codec does) and no trailing backslash (it would escape the
    separator after it)."""
    n = "".join(
        rng.choice(_NAME_CHARS) if rng.random() < 0.8 else chr(rng.randrange(0x80, 0x3000))
        for _ in range(rng.randint(1, 10))
    )
    return n + "x" if n.endswith("\\") else n


def _value(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return repr(rng.choice([rng.uniform(-1e9, 1e9), 1e308, -5e-324, 0.0, -0.0, 1e-7]))
    if kind == 1:
        return f"{rng.randint(-(2**63), 2**63 - 1)}i"
    if kind == 2:
        return f"{rng.randint(0, 2**64 - 1)}u"
    if kind == 3:
        return rng.choice(["t", "T", "true", "True", "TRUE", "f", "false", "FALSE"])
    if kind == 4:
        s = "".join(rng.choice('ab \\"\n\t,=é') for _ in range(rng.randrange(12)))
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return rng.choice(["1", "-1.5", ".5", "1.", "1e3", "-2E-7", "0", "+3"])


def valid_lines(seed: int) -> bytes:
    """1-3 valid lines built from ``seed``: escapes, every value kind, optional timestamps."""
    rng = random.Random(seed)
    out = []
    for _ in range(rng.randint(1, 3)):
        meas = _name(rng)
        if meas.startswith("#"):
            meas = "m" + meas
        tags = {_name(rng): _name(rng) for _ in range(rng.randrange(4))}
        tag_text = "".join(f",{_esc_key(k)}={_esc_key(v)}" for k, v in tags.items())
        fields = ",".join(f"{_esc_key(_name(rng))}={_value(rng)}" for _ in range(rng.randint(1, 4)))
        stamp = rng.choice(["", " 1714564800000000000", " -1", " 0", " 1714564800"])
        out.append(f"{_esc_measurement(meas)}{tag_text}{rng.choice([' ', '  '])}{fields}{stamp}")
    sep = rng.choice(["\n", "\r\n"])
    return (sep.join(out) + rng.choice(["", sep])).encode("utf-8")


generated_lines = st.integers(0, 2**64).map(valid_lines)


SEEDS = [
    b'm,tag=a f=1.5,i=3i,s="x",b=t 1714564800000000000\n',
    b"cpu\\ load,host=a\\,b,path=C:\\data v=-1.5e-7,n=18446744073709551615u\r\n",
    b'weather,loc=us\\=west temp=82 1465839830100400200\nweather temp=1.,s="a\\"b\\\\c\\nd"',
    b'# comment\n\n  m f="multi\nline",g=TRUE,h=F -1\n',
    b"m,a=1,b=2,c=3 x=-9223372036854775808i,y=.5,z=1e308 9223372036854775807",
]


def _check(points: list[Point]) -> None:
    for p in points:
        assert p.measurement and isinstance(p.measurement, str)
        assert p.fields
        for k, v in p.fields:
            assert isinstance(k, str) and k
            assert type(v) in (float, int, bool, str, Unsigned)
            if type(v) is float:
                assert math.isfinite(v)
        assert all(v for _, v in p.tags)
        assert -(2**63) <= p.time_ns < 2**63


def _message_ok(e: LineProtocolError) -> None:
    text = str(e)
    assert text.startswith(("line ", "not UTF-8")), text


@FUZZ
@given(
    st.one_of(st.binary(max_size=300), mutated(st.sampled_from(SEEDS)), mutated(generated_lines)),
    st.sampled_from(PRECISIONS),
    st.integers(0, 2**63 - 1),  # the receive time
)
@example(b"m f=1 " + b"9" * 5000, 1, 0)  # found: int() refused 5000 digits with a ValueError
@example(b"m f=" + b"9" * 5000 + b"i", 1, 0)
@example(b"m f=" + b"9" * 5000 + b"u", 1, 0)
@example(b'm f="\\', 1, 0)
@example(b"m f=1 9999999999999999999", 1_000_000_000, 0)
@example(b"#\r", 1, 0)
def test_decoder_survives(data: bytes, precision: int, default_ns: int) -> None:
    with within():
        try:
            points = decode(data, precision, default_ns)
        except LineProtocolError as e:
            _message_ok(e)
            return
    _check(points)


@ROUND_TRIP
@given(generated_lines)
def test_valid_lines_decode(data: bytes) -> None:
    # the generator behind the mutations writes valid lines: they all decode
    with within():
        points = decode(data)
    _check(points)


_values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(2**63), 2**63 - 1),
    st.booleans(),
    st.text(max_size=20),
)


@ROUND_TRIP
@given(
    lp_names.filter(lambda s: s != "uid"),
    st.dictionaries(lp_names, lp_names, max_size=3),
    st.dictionaries(lp_names.filter(lambda s: s != "uid"), _values, min_size=1, max_size=4),
    st.integers(-(2**63) + 2, 2**63 - 2),
)
def test_encode_decode_round_trip(
    measurement: str, tags: dict[str, str], fields: dict, time_ns: int
) -> None:
    rec = Record(Series("t/x", measurement, tags), fields, time_ns, "0190abcd")
    line = encode_record(rec)
    if line is None:  # a name the encoder refuses (README: names that cannot be encoded)
        return
    with within():
        (point,) = decode(line.encode("utf-8"))
    assert point.measurement == measurement
    assert point.tags == Series("t/x", measurement, tags).tags
    got = dict(point.fields)
    assert got.pop("uid") == "0190abcd"
    assert got == fields
    assert point.time_ns == time_ns


def test_seeds_are_valid() -> None:
    # the mutations start from valid input, or they test only the first byte
    for seed in SEEDS:
        _check(decode(seed))
