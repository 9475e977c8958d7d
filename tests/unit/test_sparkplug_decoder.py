"""Sparkplug B: births define aliases and datatypes, data decodes by them, death marks Bad.

Payloads are built with the generated protobuf module from ``codecs/sparkplug_b.proto``.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from plantbus.codecs import sparkplug_b_pb2 as pb
from plantbus.codecs.payload import (
    BAD_NO_COMMUNICATION,
    BAD_NO_DATA,
    BAD_TYPE_MISMATCH,
    PayloadError,
)
from plantbus.codecs.sparkplug import SparkplugDecoder, parse_topic

NOW = 1_714_564_800_000_000_000
MS = 1_714_564_800_123


def payload(metrics: list[dict[str, Any]], ts: int | None = MS, seq: int | None = None) -> bytes:
    p = pb.Payload()
    if ts is not None:
        p.timestamp = ts
    if seq is not None:
        p.seq = seq
    for m in metrics:
        pm = p.metrics.add()
        for k, v in m.items():
            setattr(pm, k, v)
    return p.SerializeToString()


NBIRTH = payload(
    [
        {"name": "bdSeq", "datatype": pb.Int64, "long_value": 3},
        {
            "name": "Node Control/Rebirth",
            "alias": 0,
            "datatype": pb.Boolean,
            "boolean_value": False,
        },
        {"name": "temp", "alias": 1, "datatype": pb.Float, "float_value": 21.5},
        {"name": "count", "alias": 2, "datatype": pb.Int16, "int_value": (-2) & 0xFFFFFFFF},
        {"name": "big", "alias": 3, "datatype": pb.Int64, "long_value": (-5) & (2**64 - 1)},
        {"name": "u8", "alias": 4, "datatype": pb.UInt8, "int_value": 255},
        {"name": "label", "alias": 5, "datatype": pb.String, "string_value": "hello"},
        {"name": "when", "alias": 6, "datatype": pb.DateTime, "long_value": MS},
        {"name": "d", "alias": 7, "datatype": pb.Double, "double_value": 0.1},
    ],
    seq=0,
)
G, N = "plant1", "edge7"


def test_topics() -> None:
    assert parse_topic("spBv1.0/plant1/DDATA/edge7/press") == (G, "DDATA", N, "press")
    assert parse_topic("spBv1.0/plant1/NBIRTH/edge7") == (G, "NBIRTH", N, "")
    assert parse_topic("spBv1.0/STATE/host1").message_type == "STATE"
    for bad in (
        "spBv1.0/plant1/NDATA",
        "spAv1.0/g/NDATA/n",
        "spBv1.0/g/XDATA/n",
        "spBv1.0/g/DDATA/n",
    ):
        with pytest.raises(PayloadError):
            parse_topic(bad)


def test_birth_values_with_datatypes() -> None:
    dec = SparkplugDecoder()
    pairs, problems = dec.decode(f"spBv1.0/{G}/NBIRTH/{N}", NBIRTH, NOW)
    assert problems == []
    ((entity, row),) = pairs
    assert entity == (G, N, "")
    assert row.time_ns == MS * 1_000_000
    assert row.fields == {
        "Node Control/Rebirth": False,
        "temp": 21.5,
        "count": -2,  # two's complement in the unsigned field, signed again
        "big": -5,
        "u8": 255,
        "label": "hello",
        "when": MS,
        "d": 0.1,
    }
    assert "bdSeq" not in row.fields


def test_data_by_alias_with_metric_timestamps_grouped() -> None:
    dec = SparkplugDecoder()
    dec.decode(f"spBv1.0/{G}/NBIRTH/{N}", NBIRTH, NOW)
    data = payload(
        [
            {"alias": 1, "float_value": 22.0},
            {"alias": 2, "int_value": 7},
            {"alias": 5, "timestamp": MS + 5, "string_value": "later"},
        ],
        seq=1,
    )
    pairs, problems = dec.decode(f"spBv1.0/{G}/NDATA/{N}", data, NOW)
    assert problems == []
    assert [(e, r.time_ns, r.fields) for e, r in pairs] == [
        ((G, N, ""), MS * 1_000_000, {"temp": 22.0, "count": 7}),
        ((G, N, ""), (MS + 5) * 1_000_000, {"label": "later"}),
    ]


def test_device_birth_data_death_and_node_death() -> None:
    dec = SparkplugDecoder()
    dec.decode(f"spBv1.0/{G}/NBIRTH/{N}", NBIRTH, NOW)
    dbirth = payload(
        [{"name": "rpm", "alias": 10, "datatype": pb.UInt32, "int_value": 1500}], seq=1
    )
    pairs, _ = dec.decode(f"spBv1.0/{G}/DBIRTH/{N}/press", dbirth, NOW)
    assert [(e, r.fields) for e, r in pairs] == [((G, N, "press"), {"rpm": 1500})]
    ddata = payload([{"alias": 10, "int_value": 1600}], seq=2)
    pairs, _ = dec.decode(f"spBv1.0/{G}/DDATA/{N}/press", ddata, NOW)
    assert [r.fields for _, r in pairs] == [{"rpm": 1600}]

    pairs, _ = dec.decode(f"spBv1.0/{G}/DDEATH/{N}/press", payload([], seq=3), NOW)
    ((entity, row),) = pairs
    assert entity == (G, N, "press") and row.fields == {}
    assert row.status == {"rpm": BAD_NO_COMMUNICATION}

    # the device is gone: its aliases are unknown until the next DBIRTH
    pairs, problems = dec.decode(
        f"spBv1.0/{G}/DDATA/{N}/press", payload([{"alias": 10, "int_value": 1}], seq=4), NOW
    )
    assert pairs == [] and problems == ["plant1/edge7/press: alias 10 is not defined by a birth"]

    ndeath = payload([{"name": "bdSeq", "datatype": pb.Int64, "long_value": 3}], ts=None)
    pairs, _ = dec.decode(f"spBv1.0/{G}/NDEATH/{N}", ndeath, NOW)
    ((entity, row),) = pairs
    assert entity == (G, N, "") and row.time_ns == NOW
    assert set(row.status or {}) == {
        "Node Control/Rebirth",
        "temp",
        "count",
        "big",
        "u8",
        "label",
        "when",
        "d",
    }
    assert set((row.status or {}).values()) == {BAD_NO_COMMUNICATION}


def test_ndeath_of_an_older_session_is_ignored() -> None:
    dec = SparkplugDecoder()
    dec.decode(f"spBv1.0/{G}/NBIRTH/{N}", NBIRTH, NOW)  # bdSeq 3
    stale = payload([{"name": "bdSeq", "datatype": pb.Int64, "long_value": 2}], ts=None)
    pairs, problems = dec.decode(f"spBv1.0/{G}/NDEATH/{N}", stale, NOW)
    assert pairs == [] and dec.stale_deaths == 1
    assert "NDEATH bdSeq 2 is not the current session's (3)" in problems[0]


def test_null_mismatch_unsupported_and_seq_gap() -> None:
    dec = SparkplugDecoder()
    dec.decode(f"spBv1.0/{G}/NBIRTH/{N}", NBIRTH, NOW)
    data = payload(
        [
            {"alias": 1, "is_null": True},
            {"alias": 2, "string_value": "x"},  # Int16 metric holding a string
            {"name": "blob", "datatype": pb.Bytes, "bytes_value": b"\x00\x01"},
            {"alias": 99, "int_value": 1},
            {"alias": 4, "int_value": 1},
        ],
        seq=5,  # after 0: a gap
    )
    ((_, row),), problems = dec.decode(f"spBv1.0/{G}/NDATA/{N}", data, NOW)
    assert row.fields == {"u8": 1}
    assert row.status == {"temp": BAD_NO_DATA, "count": BAD_TYPE_MISMATCH}
    assert dec.seq_gaps == 1
    assert problems == [
        "plant1/edge7: seq 5 after 0 (a message was lost or reordered)",
        "plant1/edge7: metric 'count' is Int16 but holds string_value",
        "plant1/edge7: metric 'blob': Bytes values are not supported",
        "plant1/edge7: alias 99 is not defined by a birth",
    ]


def test_commands_and_state_are_ignored_and_garbage_is_malformed() -> None:
    dec = SparkplugDecoder()
    assert dec.decode(f"spBv1.0/{G}/NCMD/{N}", b"\xff\xff", NOW) == ([], [])
    assert dec.decode("spBv1.0/STATE/host", b'{"online": true}', NOW) == ([], [])
    with pytest.raises(PayloadError, match="not a Sparkplug B payload"):
        dec.decode(f"spBv1.0/{G}/NDATA/{N}", b"\xff\xff\xff\xff", NOW)


def test_float32_values_are_the_float32_value() -> None:
    dec = SparkplugDecoder()
    birth = payload([{"name": "f", "alias": 1, "datatype": pb.Float, "float_value": 0.1}])
    ((_, row),), _ = dec.decode(f"spBv1.0/{G}/NBIRTH/{N}", birth, NOW)
    assert row.fields["f"] == struct.unpack("f", struct.pack("f", 0.1))[0]
