"""Fuzz: the ``mqtt`` device's decoding of a burst: topic mapping and every payload codec.

One device subscribes with each codec (JSON fields with topic-level templates, line
protocol, plain numbers with a field template, Sparkplug B). Bursts of messages on topics
with odd levels (empty, ``$``, wildcards, long) carry random bytes, mutations of valid
payloads, JSON records and Sparkplug payloads. ``decode`` returns batches of records and
counts what it could not map or decode; it never raises.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from fuzzkit import FUZZ, mutated, within
from hypothesis import example, given
from hypothesis import strategies as st
from jsongen import record_payloads
from sparkplug_gen import built as sparkplug_payloads

from plantbus.broker.connector import BuildContext
from plantbus.broker.record import Quality
from plantbus.connectors.mqtt import Config
from plantbus.connectors.mqtt.connector import MqttConnector, _Burst

pytestmark = pytest.mark.fuzz

CTX = BuildContext(node_name="edge", node_tags={"site": "ulm"}, state_dir=Path("/nonexistent"))
DEVICE = MqttConnector(
    Config.model_validate(
        {
            "name": "hall1",
            "subscriptions": [
                {
                    "filter": "j/+/#",
                    "topic": "plant/{2}",
                    "measurement": "{3}",
                    "tags": {"line": "{2}"},
                    "time": "ts",
                    "time_format": "rfc3339",
                },
                {"filter": "ja/#", "fields": {"t": "data.t", "n": {"path": "n", "type": "int"}}},
                {
                    "filter": "lp/#",
                    "codec": "line_protocol",
                    "precision": "ms",
                    "topic": "plant/lp/{2}",
                },
                {"filter": "n/+/+", "codec": "number", "field": "{3}", "type": "int"},
                {"filter": "nf/#", "codec": "number", "commands": True, "topic": "edge/{2}"},
                {"filter": "spBv1.0/#", "codec": "sparkplug_b"},
            ],
        }
    ),
    CTX,
)

_levels = st.sampled_from(["a", "", "$x", "+", "#", "é", "x" * 300, "L1", "a b", "\x00"])
topics = st.one_of(
    st.tuples(
        st.sampled_from(["j", "ja", "lp", "n", "nf", "other"]), st.lists(_levels, max_size=3)
    ).map(lambda t: "/".join([t[0], *t[1]])),
    st.sampled_from(
        [
            "spBv1.0/g/NBIRTH/n",
            "spBv1.0/g/NDATA/n",
            "spBv1.0/g/DBIRTH/n/d",
            "spBv1.0/g/DDATA/n/d",
            "spBv1.0/g/NDEATH/n",
            "spBv1.0/g/NDATA",
            "spBv1.0/$g/NDATA/n",
        ]
    ),
)
SEEDS = [
    b'{"ts": "2024-05-01T12:00:00Z", "temp": 21.5, "on": true, "s": "x"}',
    b'[{"data": {"t": "21.5"}, "n": 3}, {"data": {"t": 1}, "n": "x"}]',
    b'm,tag=a f=1.5,i=3i,s="x" 1714564800000\nm2 g=t',
    b"42",
    b"-9223372036854775808",
]
payloads = st.one_of(
    st.binary(max_size=100), mutated(st.sampled_from(SEEDS)), record_payloads, sparkplug_payloads
)


@FUZZ
@given(st.lists(st.tuples(topics, payloads), min_size=1, max_size=3))
@example([("j/L1/press", b'{"ts": "0001-01-01T00:00:00Z", "t": 1}')])
@example([("ja", b'{"data": {"t": ' + b"9" * 400 + b"}}")])
@example([("lp", b"m f=1 " + b"9" * 5000)])
def test_mqtt_burst(messages: list[tuple[str, bytes]]) -> None:
    burst = _Burst()
    with within():
        batches = DEVICE.decode([(t, p, 1_714_564_800_000_000_000) for t, p in messages], burst)
    n = 0
    for batch in batches:
        assert batch and len({r.series.topic for r in batch}) == 1
        for rec in batch:
            n += 1
            assert all(type(v) in (float, int, bool, str) for v in rec.fields.values())
            assert type(rec.time_ns) is int and -(2**63) < rec.time_ns < 2**63
            assert isinstance(rec.quality, Quality)
            assert all(
                not (type(v) is float and math.isnan(v)) or True for v in rec.fields.values()
            )
    if burst.malformed:
        assert burst.malformed_first
    if burst.problems:
        assert burst.problem_first
    if len(DEVICE._series) > 1000 or len(DEVICE.subs[-1].decoder.nodes) > 100:
        DEVICE._series.clear()
        DEVICE.subs[-1].decoder.nodes.clear()
