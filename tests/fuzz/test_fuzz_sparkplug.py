"""Fuzz: the Sparkplug B decoder (MQTT ``codec = "sparkplug_b"``), protobuf from the wire.

One decoder (it keeps birth definitions per edge node) is fed messages on every message
type: random bytes, protobuf payloads built from a seed (metrics of every datatype, values
in the wrong protobuf field, aliases with and without births, nulls, huge timestamps and
sequence numbers) and mutations of those. A message decodes into rows or raises
``PayloadError``; values it cannot use are problems, never exceptions.
Round trip: a birth then data of plain types gives the values back.
"""

from __future__ import annotations

import pytest
from fuzzkit import FUZZ, ROUND_TRIP, mutated, within
from hypothesis import example, given
from hypothesis import strategies as st
from sparkplug_gen import built

from plantbus.codecs import sparkplug_b_pb2 as pb
from plantbus.codecs.payload import PayloadError
from plantbus.codecs.sparkplug import SparkplugDecoder

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
