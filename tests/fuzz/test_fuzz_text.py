"""Fuzz: text from legacy devices and plain-value payloads.

* The ``line`` device's path from bytes to records: ``Framer`` (frames at a delimiter, at
  most ``max_frame``), then ``LineConnector.decode`` (text encoding, strip, ignore, the regex
  or CSV decoder, typed columns, timestamps of every format). It returns records, counting
  bad frames; it never raises.
* ``decode_number`` (MQTT ``codec = "number"``) and ``TimeSpec.parse``: a value or
  ``PayloadError``.

Round trip: a stream cut into chunks anywhere frames the same as in one piece.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from fuzzkit import FUZZ, ROUND_TRIP, mutated, noise, within
from hypothesis import example, given
from hypothesis import strategies as st

from plantbus.broker.connector import BuildContext
from plantbus.codecs.payload import PayloadError, TimeSpec, decode_number
from plantbus.connectors.line import Config
from plantbus.connectors.line.connector import Framer, LineConnector, _Burst

pytestmark = pytest.mark.fuzz

CTX = BuildContext(node_name="edge", node_tags={"site": "ulm"}, state_dir=Path("/nonexistent"))


def _device(**kw: object) -> LineConnector:
    kw.setdefault("name", "rig")
    kw.setdefault("connect", "127.0.0.1:4001")
    return LineConnector(Config.model_validate(kw), CTX)


DEVICES = [
    _device(
        regex=r"^(?P<status>ST|US),GS,(?P<weight>[-+0-9.]+)\s*(?P<unit>\w+)$",
        columns={"status": "string", "unit": "tag"},
        ignore=["^SCALE READY"],
    ),
    _device(
        csv={
            "columns": [
                {"name": "ts", "type": "time", "format": "rfc3339"},
                "t",
                "n:int",
                "ok:bool",
                "-",
                "s:string",
                "site:tag",
            ]
        },
        peer_tag="peer",
        listen=":5000",
        connect=None,
    ),
    _device(
        csv={
            "separator": ";",
            "quote": "'",
            "columns": [
                {
                    "name": "ts",
                    "type": "time",
                    "format": "%d.%m.%Y %H:%M:%S",
                    "timezone": "Europe/Berlin",
                },
                "t",
            ],
        },
        encoding="latin-1",
        strip=False,
    ),
    _device(
        regex=r"(?P<ts>\S+) (?P<v>\S+)",
        columns={"ts": {"type": "time", "format": "ms"}, "v": "int"},
        encoding="ascii",
    ),
]
FRAMES = [
    b"ST,GS,+0012.50 kg",
    b'2024-05-01T12:00:00.123456789Z,21.5,3,on,x,"a,""b",L1',
    b"01.05.2024 12:00:00;'21,5'",
    b"1714564800000 -42",
    b"SCALE READY",
]
frames = st.lists(
    st.one_of(st.binary(max_size=60), mutated(st.sampled_from(FRAMES)), noise(60)), max_size=5
)


@FUZZ
@given(frames, st.sampled_from(range(len(DEVICES))), st.sampled_from([None, "10.0.0.7"]))
@example([b"1714564800000" + b"9" * 5000 + b" 1"], 3, None)
@example([b"9e999999 1"], 3, None)
@example([b"1714564800000 -" + b"9" * 5000], 3, None)  # found: a 5000-digit int column
@example([b"0001-01-01T00:00:00+23:59,1,1,on,x,s,t"], 1, None)
@example([b"1.1.0001\t0:0:0;1"], 2, None)  # found: year 1 in Berlin is before int64 ns
def test_line_device(raw: list[bytes], which: int, peer: str | None) -> None:
    dev = DEVICES[which]
    if dev.config.peer_tag is None:
        peer = None  # the device passes a peer only with peer_tag set
    burst = _Burst()
    with within():
        records = dev.decode(raw, burst, peer)
    assert len(records) + burst.bad <= len(raw)
    for rec in records:
        assert rec.fields or rec.status
        assert all(type(v) in (float, int, bool, str) for v in rec.fields.values())
        assert -(2**63) < rec.time_ns < 2**63
    if burst.bad:
        assert burst.bad_first


@ROUND_TRIP
@given(
    st.binary(max_size=300),
    st.lists(st.integers(0, 300), max_size=6),
    st.sampled_from([b"\n", b"\r\n", b"\x03", b"END"]),
    st.integers(1, 80),
)
def test_framer_any_chunking(
    stream: bytes, cuts: list[int], delimiter: bytes, max_frame: int
) -> None:
    whole = Framer(delimiter, max_frame)
    expected = whole.feed(stream)
    chunked = Framer(delimiter, max_frame)
    got: list[bytes] = []
    last = 0
    for cut in [*sorted(cuts), len(stream)]:
        got += chunked.feed(stream[last:cut])
        last = max(last, cut)
    assert all(len(f) <= max_frame for f in got)
    if whole.overflows == 0 and chunked.overflows == 0:
        assert got == expected
        assert delimiter.join([*got, chunked.buf]) == stream


@FUZZ
@given(
    st.one_of(
        noise(80),
        mutated(
            st.sampled_from([b"21.5", b"-3\n", b" on ", b"1e-3", b"nan", b"9223372036854775807"])
        ),
    ),
    st.sampled_from(["float", "int", "bool", "string"]),
)
@example(b"9" * 64, "int")
@example(b"1" + b"0" * 63, "float")
def test_number_payload(payload: bytes, vtype: str) -> None:
    with within():
        try:
            v = decode_number(payload, vtype)
        except PayloadError as e:
            assert str(e)
            return
    assert type(v) is {"float": float, "int": int, "bool": bool, "string": str}[vtype]
    if vtype == "int":
        assert -(2**63) <= v < 2**63


SPECS = [
    TimeSpec(f)
    for f in ("s", "ms", "us", "ns", "rfc3339", "%Y-%m-%d %H:%M:%S", "%d.%m.%Y %H:%M:%S.%f")
] + [
    TimeSpec("rfc3339", "America/New_York"),
    TimeSpec("%Y-%m-%d %H:%M", "Europe/Berlin"),
]
_TIMES = [
    b"2024-05-01T12:00:00Z",
    b"2024-05-01 12:00:00",
    b"01.05.2024 12:00:00.5",
    b"1714564800.123",
    b"-1e3",
]


def _as_value(data: bytes, seed: int) -> object:
    rng = random.Random(seed)
    k = rng.randrange(4)
    if k == 0:
        return data.decode("utf-8", "replace")
    if k == 1:
        return rng.choice([0, -1, 2**62, 2**63, -(2**64), 10**30, 1714564800])
    if k == 2:
        return rng.choice([0.5, -0.0, 1e308, -1e308, 5e-324, math.nan, math.inf, 1714564800.123])
    return rng.choice([None, True, [], {}, b"x"])


@FUZZ
@given(
    st.one_of(noise(40), mutated(st.sampled_from(_TIMES))),
    st.integers(0, 2**32),
    st.sampled_from(range(len(SPECS))),
)
@example(b"0001-01-01T00:00:00+23:59", 0, 4)  # 2024: year 1 with an offset
@example(b"9999-12-31T23:59:59-23:59", 0, 4)
@example(b"1e999999", 0, 3)  # found: 25 s to build a million-digit int, then "out of range"
def test_time_spec(data: bytes, seed: int, which: int) -> None:
    value = _as_value(data, seed)
    with within():
        try:
            ns = SPECS[which].parse(value)
        except PayloadError as e:
            assert str(e)
            return
    assert type(ns) is int


@pytest.mark.parametrize("value", ["1e999999", "-1E+999999999", 1e308, "9" * 400])
def test_huge_epoch_times_are_refused_as_out_of_range(value: object) -> None:
    # found by Hypothesis (tests/unit/test_decoders_fuzz.py, folded in here): decimal.Overflow
    # escaped the decoder
    with pytest.raises(PayloadError, match="out of range"):
        TimeSpec("ms").parse(value)
