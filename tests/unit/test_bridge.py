"""The bridges' shared pieces: templates, config rules, splitting a JSON batch by target."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from plantbus.broker.connector import BuildContext
from plantbus.broker.ids import new_ids
from plantbus.broker.record import Quality, Record, Series
from plantbus.broker.registry import SINK_KINDS, load_sink_module
from plantbus.broker.sinks.base import EncodedBatch
from plantbus.broker.sinks.bridge import Delivery, RecordKey, Splitter, Template
from plantbus.codecs import json as json_codec

CTX = BuildContext(node_name="edge-07", node_tags={}, state_dir=Path("/nonexistent"))


def encoded(records: list[Record], seq: int = 1) -> EncodedBatch:
    stats = json_codec.EncodeStats()
    payload = json_codec.encode(records, stats)
    return EncodedBatch(payload, stats.lines, "json", seq, records[0].id, records[-1].id)


def series(topic: str, device: str, **tags: str) -> Series:
    return Series(topic, device, {"device": device, **tags})


def make(s: Series, n: int, **fields: object) -> list[Record]:
    ids = new_ids(n)
    now = time.time_ns()
    return [Record(s, {"n": i, **fields}, now + i, ids[i]) for i in range(n)]  # type: ignore[arg-type]


def by_topic(rk: RecordKey) -> str:
    return rk.topic


def splitter(target_of=by_topic, **kw: object) -> Splitter:  # type: ignore[no-untyped-def]
    kw.setdefault("needs_device", False)
    kw.setdefault("max_records", 1000)
    kw.setdefault("max_bytes", 1 << 20)
    return Splitter("json", target_of, **kw)  # type: ignore[arg-type]


# -- templates ------------------------------------------------------------------------------


def test_template_fields_and_render() -> None:
    t = Template("plantbus/{topic}/{device}")
    assert t.fields == ("topic", "device") and not t.static
    assert t.render({"topic": "a/b", "device": "d", "measurement": "m"}) == "plantbus/a/b/d"
    assert Template("fixed{{x}}").static
    assert Template("fixed{{x}}").render({}) == "fixed{x}"


@pytest.mark.parametrize("bad", ["{node}", "{topic:>5}", "{topic!r}", "{", "a}"])
def test_template_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="template"):
        Template(bad)


# -- config rules ---------------------------------------------------------------------------


def test_registry_has_the_bridges() -> None:
    for kind in ("mqtt", "amqp", "kafka"):
        assert kind in SINK_KINDS
        assert load_sink_module(kind).Config.model_validate({}).codec == "json"


def test_line_protocol_needs_a_fixed_target() -> None:
    mqtt = load_sink_module("mqtt").Config
    with pytest.raises(ValidationError, match="line_protocol"):
        mqtt.model_validate({"codec": "line_protocol"})  # topic defaults to "{topic}"
    assert mqtt.model_validate({"codec": "line_protocol", "topic": "plant/lp"}).topic == "plant/lp"
    kafka = load_sink_module("kafka").Config
    with pytest.raises(ValidationError, match="line_protocol"):
        kafka.model_validate({"codec": "line_protocol"})  # key defaults to "{device}"
    assert kafka.model_validate({"codec": "line_protocol", "key": ""}).key == ""


@pytest.mark.parametrize(
    ("kind", "table", "message"),
    [
        ("mqtt", {"url": "http://x:1"}, "mqtt://"),
        ("mqtt", {"url": "mqtt://u:p@x:1"}, "credentials"),
        ("mqtt", {"topic": "a/+/b"}, "no \\+ #"),
        ("mqtt", {"tls": {"ca": "ca.pem"}}, "not mqtts"),
        ("mqtt", {"qos": 2}, "qos"),
        ("mqtt", {"password": "x"}, "username"),
        ("amqp", {"url": "amqp://guest:guest@x/"}, "credentials"),
        ("amqp", {"routing_key": "{host}"}, "unknown placeholder"),
        ("amqp", {"tls": {}}, "not amqps"),
        ("kafka", {"topic": "a/b"}, "invalid Kafka topic"),
        ("kafka", {"acks": 1}, "idempotence"),
        ("kafka", {"bootstrap_servers": ["nohost"]}, "host:port"),
        ("kafka", {"max_records": 0}, "max_records"),
    ],
)
def test_config_refuses(kind: str, table: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        load_sink_module(kind).Config.model_validate(table)


def test_build_contacts_nothing_and_names_the_client() -> None:
    for kind in ("mqtt", "amqp", "kafka"):
        module = load_sink_module(kind)
        sink = module.build(module.Config.model_validate({"name": "up"}), CTX)
        assert sink.name == "up" and sink.codec == "json"
    mqtt = load_sink_module("mqtt")
    assert mqtt.build(mqtt.Config.model_validate({}), CTX).client_id == "plantbus-edge-07-mqtt"


# -- splitting ------------------------------------------------------------------------------


def decoded(messages) -> dict[object, list[str]]:  # type: ignore[no-untyped-def]
    out: dict[object, list[str]] = {}
    for m in messages:
        docs = json.loads(m.payload)
        assert len(docs) == m.records
        out.setdefault(m.target, []).extend(d["uid"] for d in docs)
    return out


def test_split_groups_by_target_keeps_order_and_bounds() -> None:
    a, b = series("plant/h1/a", "a"), series("plant/h1/b", "b")
    ra, rb = make(a, 25), make(b, 7)
    mixed = [r for pair in zip(ra, rb + [None] * 18, strict=True) for r in pair if r]
    sp = splitter(max_records=10)
    messages = sp.split(encoded(mixed))
    assert sp.slow_splits == 0
    assert decoded(messages) == {"plant/h1/a": [r.id for r in ra], "plant/h1/b": [r.id for r in rb]}
    assert [m.records for m in messages] == [10, 10, 5, 7]
    # every message is a JSON array of complete records, as the codec wrote them
    assert json.loads(messages[0].payload)[0] == json_codec.record_to_dict(ra[0])


def test_split_by_device_and_measurement() -> None:
    s1 = Series("t/x", "m1", {"device": "d1", "line": "L1"})
    s2 = Series("t/x", "m1", {"line": "L1", "device": "d2"})
    s3 = Series("t/y", "m2", {})  # no device tag: the last topic level
    recs = make(s1, 2) + make(s2, 2) + make(s3, 2)
    tpl = Template("{measurement}.{device}")
    sp = splitter(lambda rk: tpl.render(rk.values()), needs_device=True)
    assert set(decoded(sp.split(encoded(recs)))) == {"m1.d1", "m1.d2", "m2.y"}
    assert sp.slow_splits == 0


def test_split_by_bytes_halves_messages() -> None:
    s = series("t/big", "big")
    recs = make(s, 40, text="x" * 2000)
    sp = splitter(max_records=1000, max_bytes=10_000)
    messages = sp.split(encoded(recs))
    assert all(len(m.payload) <= 10_000 for m in messages)
    assert sum(m.records for m in messages) == 40
    assert decoded(messages)["t/big"] == [r.id for r in recs]
    # one record larger than the bound still goes, alone
    huge = make(s, 1, text="y" * 20_000)
    (only,) = sp.split(encoded(huge))
    assert only.records == 1


def test_split_records_with_status_and_tricky_strings() -> None:
    s = Series('t/"q"/\\b', 'm"},{"uid":"x', {"device": 'd},{"uid":"', "k": "v\n"})
    recs = make(s, 3, note='},{"uid":"0190', other="\\")
    recs[1].mark("n", Quality.BAD, 0x80000000)
    recs[2].fields["f"] = float("nan")
    sp = splitter(lambda rk: (rk.topic, rk.measurement, rk.device), needs_device=True)
    messages = sp.split(encoded(recs))
    assert sp.slow_splits == 0
    assert decoded(messages) == {(s.topic, s.measurement, 'd},{"uid":"'): [r.id for r in recs]}
    docs = json.loads(messages[0].payload)
    assert docs[1]["quality"] == "bad" and "n" in docs[1]["status"]


def test_a_payload_in_another_shape_is_decoded() -> None:
    s = series("t/a", "a")
    recs = make(s, 3)
    docs = [json_codec.record_to_dict(r) for r in recs]
    for d in docs:
        d["topic"], d["uid"] = d.pop("topic"), d.pop("uid")  # other key order
    payload = json.dumps(docs, indent=1).encode()
    sp = splitter(max_records=2)
    messages = sp.split(EncodedBatch(payload, 3, "json", 1, recs[0].id, recs[-1].id))
    assert sp.slow_splits == 1
    assert decoded(messages) == {"t/a": [r.id for r in recs]}
    assert [m.records for m in messages] == [2, 1]


def test_line_protocol_is_one_message_to_the_fixed_target() -> None:
    sp = Splitter(
        "line_protocol", by_topic, needs_device=False, max_records=1, max_bytes=10, fixed="lp"
    )
    batch = EncodedBatch(b"m f=1i 1\nm f=2i 2\n", 2, "line_protocol", 1)
    (m,) = sp.split(batch)
    assert (m.target, m.payload, m.records) == ("lp", batch.payload, 2)


_piece = st.sampled_from([*'ab/",{}:\\\n\tü€ ', '},{"uid":"', '","time":', '},"fields":'])
_text = st.lists(_piece, min_size=1, max_size=8).map("".join)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_text, _text, st.integers(0, 3), _text), min_size=1, max_size=30))
def test_split_fast_path_matches_decoding(rows: list[tuple[str, str, int, str]]) -> None:
    """For any topics, tags and string values, the byte split equals decoding the array."""
    cache: dict[tuple[str, str], Series] = {}
    recs = []
    ids = new_ids(len(rows))
    for i, (topic, device, n, text) in enumerate(rows):
        s = cache.setdefault((topic, device), Series(topic, "m", {"device": device, "x": text}))
        recs.append(Record(s, {"n": n, "s": text}, i, ids[i]))
    batch = encoded(recs)
    sp = splitter(lambda rk: (rk.topic, rk.device), needs_device=True, max_records=4)
    got = decoded(sp.split(batch))
    assert sp.slow_splits == 0
    want: dict[object, list[str]] = {}
    for d in json.loads(batch.payload):
        want.setdefault((d["topic"], d["tags"]["device"]), []).append(d["uid"])
    assert got == want


# -- delivery bookkeeping -------------------------------------------------------------------


def test_delivery_skips_acknowledged_and_counts_resent() -> None:
    s = series("t/a", "a")
    recs = make(s, 30)
    batch = encoded(recs)
    sp = splitter(max_records=10)
    d = Delivery()
    assert d.start(batch, sp.split) == [0, 1, 2]
    for i in (0, 1, 2):
        d.sent(i)
    d.acked(0)
    # the write failed: the outlet retries the same batch
    assert d.start(batch, sp.split) == [1, 2]
    assert d.unacked_sent() == [1, 2]
    d.sent(1)
    assert (d.resent_messages, d.resent_records) == (1, 10)
    d.acked(1)
    d.acked(2)
    d.done()
    assert (d.messages_out, d.records_out) == (3, 30)
    # the next batch starts afresh
    assert d.start(encoded(make(s, 5), seq=2), sp.split) == [0]


def test_sample_configs_check(tmp_path: Path) -> None:
    """The sample tables of broker/sinks/bridges.md load; tls paths resolve beside the file."""
    from plantbus.broker.config import parse_config

    text = """
[node]
name = "edge-07"

[[sinks.mqtt]]
url = "mqtts://broker.plant:8883"
topic = "plantbus/{topic}"
qos = 1
username = "plantbus"
password = "secret"
tls = { ca = "ca.pem", certificate = "client.pem", private_key = "client.key" }
subscribe = ["plant/#"]

[[sinks.amqp]]
url = "amqp://rabbit.plant:5672/"
exchange = "plantbus"
routing_key = "{topic}"
subscribe = ["plant/#"]

[[sinks.kafka]]
bootstrap_servers = ["kafka1:9092", "kafka2:9092"]
topic = "plant.{device}"
key = "{device}"
acks = "all"
compression = "gzip"
enable_idempotence = true
subscribe = ["plant/#"]
"""
    config = parse_config(text, tmp_path / "plantbus.toml")
    kinds = {s.kind: s.config for s in config.sinks}
    assert set(kinds) == {"mqtt", "amqp", "kafka"}
    assert kinds["mqtt"].tls.ca == tmp_path / "ca.pem"
    assert kinds["mqtt"].password.get_secret_value() == "secret"
    assert kinds["kafka"].compression == "gzip"
