"""The ``mqtt`` device without a broker: config validation, topic mapping, decoding per burst."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from plantbus.broker.config import parse_config
from plantbus.broker.connector import BuildContext
from plantbus.broker.record import Quality
from plantbus.codecs import sparkplug_b_pb2 as pb
from plantbus.codecs.payload import BAD_NO_COMMUNICATION, BAD_TYPE_MISMATCH
from plantbus.connectors.mqtt import Config
from plantbus.connectors.mqtt.connector import MqttConnector, _Burst

REPO = Path(__file__).resolve().parents[2]
CTX = BuildContext(node_name="edge", node_tags={"site": "ulm"}, state_dir=Path("/nonexistent"))
NS = 1_714_564_800_000_000_000


def config(**kw: Any) -> Config:
    kw.setdefault("name", "hall1")
    kw.setdefault("subscriptions", [{"filter": "f/#"}])
    return Config.model_validate(kw)


def device(**kw: Any) -> MqttConnector:
    return MqttConnector(config(**kw), CTX)


# -- config ---------------------------------------------------------------------------------


def test_defaults_and_url_forms() -> None:
    c = config(url="mqtts://broker.local", protocol=5)
    assert (c.host, c.port, c.use_tls, c.protocol, c.qos) == ("broker.local", 8883, True, "5", 1)
    c = config(url="mqtt://10.0.0.5:1884", tls={"ca": "ca.pem"})
    assert (c.port, c.use_tls) == (1884, True)
    assert device().client_id == "plantbus-edge-hall1"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"url": "http://x:1883"}, 'use "mqtt://host:port"'),
        ({"url": "mqtt://u:p@x"}, "put credentials in username / password"),
        ({"protocol": "4"}, "'3.1.1' or '5'"),
        ({"password": "x"}, "password without username"),
        ({"qos": 3}, "0, 1 or 2"),
        ({"subscriptions": []}, "at least 1 item"),
        ({"tls": {"ca": "a", "verify": False, "cert": "x"}}, "Extra inputs"),
        ({"subscriptions": [{"filter": "a/#/b"}]}, "'#' must be a whole level and the last"),
        (
            {"subscriptions": [{"filter": "a/+", "topic": "plant/{3}"}]},
            "{3} is beyond the 2 levels of the filter",
        ),
        ({"subscriptions": [{"filter": "a/+", "topic": "plant/{x}"}]}, "unknown placeholder {x}"),
        ({"subscriptions": [{"filter": "a/+", "topic": "plant/{0}"}]}, "levels count from {1}"),
        ({"subscriptions": [{"filter": "a/+", "tags": {"k": "{1"}}]}, "a brace that is not"),
        (
            {"subscriptions": [{"filter": "a", "codec": "number", "fields": {"t": "t"}}]},
            "fields does not apply to codec 'number'",
        ),
        (
            {"subscriptions": [{"filter": "a", "fields": {"t": "a..b"}}]},
            "fields.t: JSON path 'a..b' has an empty step",
        ),
        ({"subscriptions": [{"filter": "a", "time_format": "weeks"}]}, "unknown time format"),
        ({"subscriptions": [{"filter": "a", "fields": {"x\\": "x"}}]}, "ends with a backslash"),
        ({"subscriptions": [{"filter": "a", "tags": {"device": "x"}}]}, "'device' is reserved"),
        (
            {"subscriptions": [{"filter": "other/#", "codec": "sparkplug_b"}]},
            "starts with spBv1.0/",
        ),
        ({"subscriptions": [{"filter": "a", "codec": "protobuf"}]}, "'json', 'line_protocol'"),
    ],
)
def test_config_errors(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re_escape(message)):
        config(**kw)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_check_names_the_file_and_key(tmp_path: Path) -> None:
    from plantbus.broker.config import ConfigError

    text = """
[node]
name = "edge"
[[devices.mqtt]]
name = "m"
[[devices.mqtt.subscriptions]]
filter = "a/+"
topic = "plant/{5}"
"""
    with pytest.raises(ConfigError) as e:
        parse_config(text, tmp_path / "plantbus.toml")
    assert e.value.errors == [
        "plantbus.toml: devices.mqtt[0].subscriptions[0]: topic: 'plant/{5}': {5} is beyond "
        "the 2 levels of the filter"
    ]


def test_sample_toml_passes_plantbus_check(tmp_path: Path) -> None:
    sample = REPO / "connectors" / "mqtt" / "sample.toml"
    main = tmp_path / "plantbus.toml"
    main.write_text('[node]\nname = "edge"\n')
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "mqtt.toml").write_text(sample.read_text())
    (tmp_path / "ca.pem").write_text("")  # paths only: check never opens them
    out = subprocess.run(
        [sys.executable, "-m", "plantbus.broker.cli", "check", "-c", str(main)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("config OK: ")


def test_check_does_not_import_paho_or_protobuf(tmp_path: Path) -> None:
    code = (
        "import sys; from plantbus.broker.config import parse_config; "
        "parse_config(open(sys.argv[1]).read(), sys.argv[1]); "
        "bad = [m for m in ('paho', 'google.protobuf', 'serial') if m in sys.modules]; "
        "print(bad)"
    )
    path = tmp_path / "p.toml"
    path.write_text(
        '[node]\nname = "e"\n[[devices.mqtt]]\nname = "m"\n'
        '[[devices.mqtt.subscriptions]]\nfilter = "spBv1.0/#"\ncodec = "sparkplug_b"\n'
        '[[devices.line]]\nname = "l"\nserial = "/dev/ttyS0"\nregex = "(?P<a>.*)"\n'
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=False
    )
    assert out.stdout.strip() == "[]", out.stderr


# -- decoding -------------------------------------------------------------------------------


def test_topic_levels_map_to_topic_tags_and_measurement() -> None:
    d = device(
        subscriptions=[
            {
                "filter": "factory/+/+/telemetry",
                "topic": "plant/{2}/{3}",
                "measurement": "{3}",
                "tags": {"line": "{2}", "src": "{topic}"},
                "fields": {"temp": "t", "rpm": {"path": "m.rpm", "type": "int"}},
                "time": "ts",
            }
        ]
    )
    msgs = [
        ("factory/L1/press7/telemetry", b'{"t": 21.5, "m": {"rpm": 1500}, "ts": 1714564800000}', 1),
        ("factory/L2/oven/telemetry", b'{"t": 180, "ts": 1714564800001}', 2),
        ("factory/L1/press7/telemetry", b'{"t": 22, "ts": 1714564800002}', 3),
    ]
    batches = d.decode(msgs)
    assert [[r.topic for r in b] for b in batches] == [
        ["plant/L1/press7", "plant/L1/press7"],
        ["plant/L2/oven"],
    ]
    r = batches[0][0]
    assert r.fields == {"temp": 21.5, "rpm": 1500}
    assert r.time_ns == NS
    assert r.series.measurement == "press7"
    assert r.series.tag_dict == {
        "site": "ulm",
        "device": "hall1",
        "line": "L1",
        "src": "factory/L1/press7/telemetry",
    }
    assert batches[0][0].series is batches[0][1].series  # one Series per MQTT topic, cached
    assert len({r.id for b in batches for r in b}) == 3


def test_number_codec_field_from_topic_and_receive_time() -> None:
    d = device(subscriptions=[{"filter": "s/+/+", "codec": "number", "field": "{3}"}])
    (batch,) = d.decode([("s/p7/temp", b"21.5", 10), ("s/p7/on", b"1", 20)])
    assert [(r.fields, r.time_ns, r.topic) for r in batch] == [
        ({"temp": 21.5}, 10, "edge/hall1"),
        ({"on": 1.0}, 20, "edge/hall1"),
    ]


def test_line_protocol_codec_keeps_payload_measurement_and_tags() -> None:
    d = device(
        topic="plant/lp",
        tags={"line": "L1"},
        subscriptions=[{"filter": "lp/#", "codec": "line_protocol", "precision": "ms"}],
    )
    payload = b"cpu,host=a,line=X usage=1.5,n=3i 1714564800000\nmem,host=a free=2u\n"
    (batch,) = d.decode([("lp/x", payload, NS + 5)])
    cpu, mem = batch
    assert (cpu.series.measurement, cpu.fields, cpu.time_ns) == ("cpu", {"usage": 1.5, "n": 3}, NS)
    # configured tags win over the payload's; `device` is always the device
    assert cpu.series.tag_dict == {"device": "hall1", "host": "a", "line": "L1", "site": "ulm"}
    # no timestamp: the receive time, truncated to the precision as line protocol says
    assert (mem.series.measurement, mem.fields, mem.time_ns) == ("mem", {"free": 2}, NS)


def test_first_matching_subscription_wins_and_shared_filters_match() -> None:
    d = device(
        subscriptions=[
            {"filter": "$share/g/a/b", "codec": "number", "field": "first"},
            {"filter": "a/+", "codec": "number", "field": "second"},
        ]
    )
    (batch,) = d.decode([("a/b", b"1", 1), ("a/c", b"2", 2)])
    assert [r.fields for r in batch] == [{"first": 1.0}, {"second": 2.0}]


def test_malformed_payloads_counted_logged_once_and_good_ones_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = device(subscriptions=[{"filter": "f/#", "fields": {"t": {"path": "t", "type": "float"}}}])
    msgs = [
        ("f/1", b'{"t": 21.', 1),  # truncated
        ("f/2", b"\x00\xff\xfe binary", 2),
        ("f/3", b'{"t": "warm"}', 3),  # wrong type: a Bad point, not a lost payload
        ("f/4", b'{"t": 20}', 4),
    ]
    burst = _Burst()
    (batch,) = d.decode(msgs, burst)
    assert [(r.fields, r.quality, r.status) for r in batch] == [
        ({}, Quality.BAD, {"t": BAD_TYPE_MISMATCH}),
        ({"t": 20.0}, Quality.GOOD, None),
    ]
    with caplog.at_level(logging.WARNING, "plantbus.connectors.mqtt"):
        d._report(burst)
        d._report(burst)  # within LOG_EVERY: counted, not logged again
    assert (d.malformed, d.problems) == (4, 2)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "mqtt device hall1: 2 payloads could not be decoded; first: topic 'f/1' (json): not JSON "
        "(Expecting ',' delimiter: line 1 column 9 (char 8)); payload b'{\"t\": 21.'",
        "mqtt device hall1: 1 value could not be decoded; first: topic 'f/3': point 't' at t: "
        "'warm' is not a number",
    ]


def test_unmapped_topic_level_is_counted() -> None:
    d = device(subscriptions=[{"filter": "a/#", "codec": "number", "topic": "p/{3}"}])
    burst = _Burst()
    (batch,) = d.decode([("a/b", b"1", 1), ("a/b/c", b"2", 2)], burst)
    assert [r.topic for r in batch] == ["p/c"]
    assert burst.unmapped == 1 and "has no level 3" in burst.malformed_first


def _sp(metrics: list[dict[str, Any]], seq: int) -> bytes:
    p = pb.Payload()
    p.timestamp = NS // 1_000_000
    p.seq = seq
    for m in metrics:
        pm = p.metrics.add()
        for k, v in m.items():
            setattr(pm, k, v)
    return p.SerializeToString()


def test_sparkplug_entities_become_topics_and_tags_and_death_marks_bad() -> None:
    d = device(topic="plant/sp", subscriptions=[{"filter": "spBv1.0/#", "codec": "sparkplug_b"}])
    birth = _sp([{"name": "temp", "alias": 1, "datatype": pb.Double, "double_value": 20.0}], 0)
    dbirth = _sp([{"name": "rpm", "alias": 1, "datatype": pb.Int32, "int_value": 3}], 1)
    batches = d.decode(
        [
            ("spBv1.0/g1/NBIRTH/n1", birth, 1),
            ("spBv1.0/g1/DBIRTH/n1/press", dbirth, 2),
            ("spBv1.0/g1/DDATA/n1/press", _sp([{"alias": 1, "int_value": 4}], 2), 3),
            ("spBv1.0/g1/NDEATH/n1", _sp([], 3), 4),
        ]
    )
    node, dev = batches
    assert [r.topic for r in node] == ["plant/sp/g1/n1", "plant/sp/g1/n1"]
    assert [r.topic for r in dev] == ["plant/sp/g1/n1/press"] * 3
    assert dev[0].series.tag_dict == {
        "device": "hall1",
        "device_id": "press",
        "edge_node_id": "n1",
        "group_id": "g1",
        "site": "ulm",
    }
    assert [r.fields for r in dev] == [{"rpm": 3}, {"rpm": 4}, {}]
    assert (dev[2].quality, dev[2].status) == (Quality.BAD, {"rpm": BAD_NO_COMMUNICATION})
    assert (node[1].quality, node[1].status) == (Quality.BAD, {"temp": BAD_NO_COMMUNICATION})


def test_json_payload_in_json_record_shape_round_trips_through_the_json_codec() -> None:
    # a record decoded here encodes to the JSON record contract (bridges, API)
    from plantbus.codecs.json import record_to_dict

    d = device(subscriptions=[{"filter": "f/#", "time": "ts", "time_format": "rfc3339"}])
    payload = json.dumps({"ts": "2024-05-01T12:00:00Z", "temp": 21.5}).encode()
    ((r,),) = d.decode([("f/x", payload, 0)])
    doc = record_to_dict(r)
    assert (doc["time"], doc["fields"], doc["quality"]) == (NS, {"temp": 21.5}, "good")
