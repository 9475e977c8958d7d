"""Fuzz: the Sparkplug B decoder (MQTT ``codec = "sparkplug_b"``), protobuf from the wire.

One decoder (it keeps birth definitions per edge node) is fed messages on every message
type: random bytes, protobuf payloads built from a seed (metrics of every datatype, values
in the wrong protobuf field, aliases with and without births, nulls, huge timestamps and
sequence numbers) and mutations of those. A message decodes into rows or raises
``PayloadError``; values it cannot use are problems, never exceptions.
Round trip: a birth then data of plain types gives the values back.
"""

from __future__ import annotations

import math
import random

import pytest
from fuzzkit import FUZZ, ROUND_TRIP, mutated, within
from hypothesis import example, given
from hypothesis import strategies as st

from plantbus.codecs import sparkplug_b_pb2 as pb
from plantbus.codecs.payload import PayloadError
from plantbus.codecs.sparkplug import DATA_TYPES, SparkplugDecoder

pytestmark = pytest.mark.fuzz

TOPICS = [
    "spBv1.0/g/NBIRTH/n",
    "spBv1.0/g/NDATA/n",
    "spBv1.0/g/NDEATH/n",
    "spBv1.0/g/DBIRTH/n/d",
    "spBv1.0/g/DDATA/n/d",
    "spBv1.0/g/DDEATH/n/d",
    "spBv1.0/g/NCMD/n",
    "spBv1.0/g/STATE/n",
    "spBv1.0/g2/NDATA/n",
    "spBv1.0/g/DDATA/n",  # no device id
    "spBv1.0//NDATA/n",
    "spBv1.0/g/XDATA/n",
    "spAv1.0/g/NDATA/n",
    "spBv1.0",
]
_U64 = 2**64 - 1
_NAMES = ["bdSeq", "temp", "a/b", "", "é", "n", "x" * 200]


def _set_value(m: pb.Payload.Metric, rng: random.Random) -> None:
    k = rng.randrange(9)
    if k == 0:
        m.int_value = rng.choice([0, 1, 2**31, 2**32 - 1, rng.randrange(2**32)])
    elif k == 1:
        m.long_value = rng.choice([0, 2**63, _U64, rng.randrange(2**64)])
    elif k == 2:
        m.float_value = rng.choice([0.5, math.nan, math.inf, -math.inf, 3.4e38])
    elif k == 3:
        m.double_value = rng.choice([0.5, math.nan, math.inf, 1e308, -0.0])
    elif k == 4:
        m.boolean_value = rng.random() < 0.5
    elif k == 5:
        m.string_value = rng.choice(["", "x", "é😀", "\x00"])
    elif k == 6:
        m.bytes_value = rng.randbytes(rng.randrange(5))
    elif k == 7:
        m.dataset_value.num_of_columns = rng.randrange(3)
    # else: no value at all


def payload(seed: int) -> bytes:
    """A Sparkplug B payload built from ``seed``: valid protobuf, Sparkplug-wise anything."""
    rng = random.Random(seed)
    p = pb.Payload()
    if rng.random() < 0.8:
        p.timestamp = rng.choice([1714564800000, 0, _U64, 2**53, rng.randrange(2**64)])
    if rng.random() < 0.8:
        p.seq = rng.choice([0, 1, 255, 256, _U64, rng.randrange(300)])
    for _ in range(rng.randrange(5)):
        m = p.metrics.add()
        if rng.random() < 0.8:
            m.name = rng.choice(_NAMES)
        if rng.random() < 0.5:
            m.alias = rng.choice([0, 1, 2, _U64])
        if rng.random() < 0.8:
            m.datatype = rng.choice([*DATA_TYPES, 35, 2**32 - 1])
        if rng.random() < 0.3:
            m.timestamp = rng.choice([1714564800001, 0, _U64, rng.randrange(2**64)])
        if rng.random() < 0.1:
            m.is_null = True
        if rng.random() < 0.1:
            m.is_transient = True
        _set_value(m, rng)
    if rng.random() < 0.1:
        # a string field with bytes that are not UTF-8 (proto2 does not check them)
        raw = p.SerializeToString()
        bad = pb.Payload.Metric(name="ZZZZ").SerializeToString().replace(b"ZZZZ", b"\xff\xfe\xc3(")
        return raw + b"\x12" + bytes([len(bad)]) + bad
    return p.SerializeToString()


built = st.integers(0, 2**64).map(payload)
payloads = st.one_of(st.binary(max_size=120), built, mutated(built))


def _check(pairs: list, problems: list[str]) -> None:
    for entity, row in pairs:
        assert len(entity) == 3 and all(type(p) is str for p in entity)
        for k, v in row.fields.items():
            assert type(k) is str and type(v) in (float, int, bool, str)
        assert type(row.time_ns) is int
        assert -(2**63) <= row.time_ns < 2**63, row.time_ns
        for code in (row.status or {}).values():
            assert 0 <= code < 2**32
    assert all(type(p) is str and p for p in problems)


DECODER = SparkplugDecoder()


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(TOPICS), payloads), min_size=1, max_size=3))
@example([("spBv1.0/g/NDATA/n", b"\x08" + b"\xff" * 9 + b"\x01")])  # timestamp 2^64-1 ms
def test_sparkplug_decoder(messages: list[tuple[str, bytes]]) -> None:
    for topic, data in messages:
        with within():
            try:
                pairs, problems = DECODER.decode(topic, data, 1_714_564_800_000_000_000)
            except PayloadError as e:
                assert str(e)
                continue
        _check(pairs, problems)
    if len(DECODER.nodes) > 100:
        DECODER.nodes.clear()


_PLAIN = {
    pb.Int32: ("int_value", st.integers(-(2**31), 2**31 - 1)),
    pb.UInt16: ("int_value", st.integers(0, 2**16 - 1)),
    pb.Int64: ("long_value", st.integers(-(2**63), 2**63 - 1)),
    pb.UInt64: ("long_value", st.integers(0, _U64)),
    pb.Double: ("double_value", st.floats(allow_nan=False)),
    pb.Boolean: ("boolean_value", st.booleans()),
    pb.String: ("string_value", st.text(max_size=10)),
}


@ROUND_TRIP
@given(
    st.lists(
        st.sampled_from(sorted(_PLAIN)).flatmap(lambda dt: st.tuples(st.just(dt), _PLAIN[dt][1])),
        min_size=1,
        max_size=5,
    )
)
def test_birth_then_data_round_trip(metrics: list[tuple[int, object]]) -> None:
    dec = SparkplugDecoder()
    birth = pb.Payload(timestamp=1, seq=0)
    data = pb.Payload(timestamp=2, seq=1)
    for i, (dt, v) in enumerate(metrics):
        birth.metrics.add(name=f"m{i}", alias=i, datatype=dt)
        m = data.metrics.add(alias=i)
        field = _PLAIN[dt][0]
        setattr(
            m,
            field,
            v & _U64 if field == "long_value" else v & 0xFFFFFFFF if field == "int_value" else v,
        )
    dec.decode("spBv1.0/g/NBIRTH/n", birth.SerializeToString(), 0)
    pairs, problems = dec.decode("spBv1.0/g/NDATA/n", data.SerializeToString(), 0)
    assert problems == []
    ((_, row),) = pairs
    assert row.time_ns == 2_000_000
    for i, (_, v) in enumerate(metrics):
        assert row.fields[f"m{i}"] == v
