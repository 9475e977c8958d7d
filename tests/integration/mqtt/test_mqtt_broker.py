"""The ``mqtt`` device against a real Mosquitto: codecs, MQTT 3.1.1 and 5, TLS, auth,
persistent sessions, Sparkplug B, malformed payloads, back-pressure and a lost connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from plantbus.broker.connector import BuildContext
from plantbus.broker.record import Quality, Record
from plantbus.codecs import sparkplug_b_pb2 as pb
from plantbus.codecs.payload import BAD_NO_COMMUNICATION, BAD_TYPE_MISMATCH
from plantbus.connectors.mqtt import Config
from plantbus.connectors.mqtt.connector import MqttConnector

Mosquitto = Any  # the session fixture's server (tests/integration/mqtt/conftest.py)
CTX = BuildContext(node_name="edge", node_tags={}, state_dir=Path("/nonexistent"))
T_MS = 1_714_564_800_000
_ids = iter(range(1_000_000))


class Sink:
    """The device's emit: collects batches; tests wait for counts with a deadline."""

    def __init__(self, delay: float = 0.0):
        self.batches: list[list[Record]] = []
        self.records: list[Record] = []
        self.delay = delay
        self._changed = asyncio.Event()

    async def emit(self, records: list[Record]) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)  # a slow bus: back-pressure on the device
        self.batches.append(records)
        self.records.extend(records)
        self._changed.set()

    async def wait_for(self, n: int, within: float = 20.0) -> list[Record]:
        deadline = time.monotonic() + within
        while len(self.records) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(self.records)} of {n} records after {within}s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return self.records


async def until(predicate: Any, within: float, what: str) -> None:
    """Poll ``predicate`` (cheap, no I/O) until true or the deadline passes."""
    deadline = time.monotonic() + within
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {within}s: {what}")
        await asyncio.sleep(0.02)


def device(port: int, **kw: Any) -> MqttConnector:
    kw.setdefault("name", f"m{next(_ids)}")
    kw.setdefault("url", f"mqtt://127.0.0.1:{port}")
    kw.setdefault("subscriptions", [{"filter": f"t/{kw['name']}/#"}])
    return MqttConnector(Config.model_validate(kw), CTX)


@contextlib.asynccontextmanager
async def running(conn: MqttConnector, sink: Sink) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(conn.run(sink.emit))
    ready = asyncio.create_task(conn.ready.wait())
    try:
        await asyncio.wait({task, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises the device's error
        assert conn.ready.is_set(), "device not subscribed within 15s"
        yield task
    finally:
        ready.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def run_until_error(conn: MqttConnector, within: float = 15) -> BaseException:
    task = asyncio.create_task(conn.run(Sink().emit))
    try:
        await asyncio.wait_for(task, within)
    except Exception as e:  # the device's error is the outcome under test
        return e
    raise AssertionError("run returned without an error")


def publish(
    port: int,
    messages: list[tuple[str, bytes, int]],
    *,
    v5: bool = False,
    client_id: str = "",
) -> None:
    """Publish and wait until the broker has every message (runs in a thread)."""
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
    )
    c.max_inflight_messages_set(1000)
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        assert connected.wait(10)
        infos = [c.publish(t, p, qos=q) for t, p, q in messages]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        c.disconnect()
        c.loop_stop()


async def apublish(port: int, messages: list[tuple[str, bytes, int]], **kw: Any) -> None:
    await asyncio.to_thread(publish, port, messages, **kw)


# -- codecs, protocols ----------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_json_topic_mapping_over_mqtt(mosquitto: Mosquitto, protocol: str) -> None:
    conn = device(
        mosquitto.plain,
        protocol=protocol,
        subscriptions=[
            {
                "filter": f"factory{protocol}/+/+/telemetry",
                "topic": "plant/{2}/{3}",
                "tags": {"line": "{2}"},
                "fields": {"temp": "temp", "rpm": {"path": "motor.rpm", "type": "int"}},
                "time": "ts",
            }
        ],
    )
    sink = Sink()
    async with running(conn, sink):
        await apublish(
            mosquitto.plain,
            [
                (f"factory{protocol}/L1/press7/telemetry", b'{"ts": %d, "temp": 21.5}' % T_MS, 1),
                (
                    f"factory{protocol}/L2/oven/telemetry",
                    b'{"ts": %d, "temp": 180, "motor": {"rpm": 900}}' % (T_MS + 1),
                    2,
                ),
            ],
            v5=protocol == "5",
        )
        recs = await sink.wait_for(2)
    got = sorted((r.topic, r.fields, r.time_ns, r.series.tag_dict["line"]) for r in recs)
    assert got == [
        ("plant/L1/press7", {"temp": 21.5}, T_MS * 1_000_000, "L1"),
        ("plant/L2/oven", {"temp": 180.0, "rpm": 900}, (T_MS + 1) * 1_000_000, "L2"),
    ]


async def test_line_protocol_and_number_payloads(mosquitto: Mosquitto) -> None:
    conn = device(
        mosquitto.plain,
        protocol="5",
        topic="plant/mixed",
        subscriptions=[
            {"filter": "lp5/#", "codec": "line_protocol"},
            {"filter": "num5/+/+", "codec": "number", "field": "{3}", "topic": "plant/{2}"},
        ],
    )
    sink = Sink()
    async with running(conn, sink):
        await apublish(
            mosquitto.plain,
            [
                ("lp5/x", b"cpu,host=a usage=12.5,n=3i 1714564800000000000\n", 1),
                ("num5/press7/temp", b"21.5\n", 1),
            ],
        )
        recs = await sink.wait_for(2)
    by_topic = {r.topic: r for r in recs}
    cpu = by_topic["plant/mixed"]
    assert (cpu.series.measurement, cpu.fields, cpu.series.tag_dict["host"]) == (
        "cpu",
        {"usage": 12.5, "n": 3},
        "a",
    )
    assert by_topic["plant/press7"].fields == {"temp": 21.5}


# -- TLS and authentication -----------------------------------------------------------------


async def test_tls_with_server_verification(mosquitto: Mosquitto) -> None:
    name = "tls1"
    conn = device(
        mosquitto.tls,
        name=name,
        url=f"mqtts://127.0.0.1:{mosquitto.tls}",
        tls={"ca": str(mosquitto.certs.ca)},
    )
    sink = Sink()
    async with running(conn, sink):
        await apublish(mosquitto.plain, [(f"t/{name}/a", b'{"v": 1}', 1)])
        (rec,) = await sink.wait_for(1)
    assert rec.fields == {"v": 1.0}


async def test_mutual_tls_with_client_certificate(mosquitto: Mosquitto) -> None:
    c = mosquitto.certs
    name = "mtls1"
    conn = device(
        mosquitto.mtls,
        name=name,
        url=f"mqtts://localhost:{mosquitto.mtls}",
        tls={"ca": str(c.ca), "certificate": str(c.client_cert), "private_key": str(c.client_key)},
    )
    sink = Sink()
    async with running(conn, sink):
        await apublish(mosquitto.plain, [(f"t/{name}/a", b'{"v": 2}', 1)])
        (rec,) = await sink.wait_for(1)
    assert rec.fields == {"v": 2.0}


async def test_mutual_tls_without_client_certificate_fails(mosquitto: Mosquitto) -> None:
    conn = device(
        mosquitto.mtls,
        url=f"mqtts://127.0.0.1:{mosquitto.mtls}",
        tls={"ca": str(mosquitto.certs.ca)},
        connect_timeout="3s",
    )
    err = await run_until_error(conn)
    assert isinstance(err, ssl.SSLError | ConnectionError | OSError), err


async def test_tls_with_the_wrong_ca_is_refused_unless_verify_is_off(mosquitto: Mosquitto) -> None:
    url = f"mqtts://127.0.0.1:{mosquitto.tls}"
    conn = device(mosquitto.tls, url=url, tls={"ca": str(mosquitto.certs.other_ca)})
    err = await run_until_error(conn)
    assert isinstance(err, ssl.SSLCertVerificationError)
    assert "certificate verify failed" in str(err)

    name = "noverify"
    conn = device(mosquitto.tls, name=name, url=url, tls={"verify": False})
    sink = Sink()
    async with running(conn, sink):
        await apublish(mosquitto.plain, [(f"t/{name}/a", b'{"v": 3}', 1)])
        await sink.wait_for(1)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_username_and_password(mosquitto: Mosquitto, protocol: str) -> None:
    name = f"auth{protocol[0]}"
    conn = device(
        mosquitto.auth,
        name=name,
        protocol=protocol,
        username=mosquitto.user,
        password=mosquitto.password,
    )
    sink = Sink()
    async with running(conn, sink):
        await asyncio.to_thread(_publish_auth, mosquitto, f"t/{name}/a")
        (rec,) = await sink.wait_for(1)
    assert rec.fields == {"v": 4.0}

    bad = device(mosquitto.auth, protocol=protocol, username=mosquitto.user, password="wrong")
    err = await run_until_error(bad)
    assert isinstance(err, ConnectionError)
    assert "refused the connection" in str(err)
    assert "Not authorized" in str(err) or "Bad user name or password" in str(err)


def _publish_auth(server: Mosquitto, topic: str) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2)
    c.username_pw_set(server.user, server.password)
    c.connect("127.0.0.1", server.auth)
    c.loop_start()
    c.publish(topic, b'{"v": 4}', qos=1).wait_for_publish(10)
    c.disconnect()
    c.loop_stop()


# -- sessions, throughput, back-pressure ------------------------------------------------------


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_persistent_session_delivers_what_came_while_down(
    mosquitto: Mosquitto, protocol: str
) -> None:
    """QoS 1 messages published while the device is down arrive when it is back; the drain
    rate of the queued backlog is the device's receive throughput (no publisher in the way)."""
    n = 20_000
    name = f"persist{protocol[0]}"
    kw = {"name": name, "protocol": protocol, "persistent_session": True}
    first = Sink()
    async with running(device(mosquitto.plain, **kw), first):
        await apublish(mosquitto.plain, [(f"t/{name}/a", b'{"i": -1}', 1)])
        await first.wait_for(1)
    # down: the broker keeps the session and queues QoS 1 messages for it
    msgs = [(f"t/{name}/a", b'{"i": %d}' % i, 1) for i in range(n)]
    await apublish(mosquitto.plain, msgs)
    back = device(mosquitto.plain, **kw)
    sink = Sink()
    t0 = time.perf_counter()
    async with running(back, sink):
        recs = await sink.wait_for(n, within=60)
        elapsed = time.perf_counter() - t0
    values = sorted(int(r.fields["i"]) for r in recs)
    assert values == list(range(n))  # every one, none twice
    rate = n / elapsed
    mean_batch = n / back.bursts
    print(
        f"\nmqtt {protocol} persistent-session backlog: {n} QoS 1 msgs in {elapsed:.2f}s = "
        f"{rate:,.0f} msg/s, {back.bursts} bursts (mean {mean_batch:.1f} msgs per emit)"
    )
    assert mean_batch > 1.5  # a backlog arrives in bursts, not one emit per message


async def test_slow_bus_back_pressure_keeps_qos1_and_counts_qos0_drops(
    mosquitto: Mosquitto,
) -> None:
    """A slow emit neither deadlocks paho's thread nor loses QoS 1 messages: they wait at the
    broker (acknowledged only once on the bus). QoS 0 beyond max_pending is dropped, counted."""
    name = "slow1"
    conn = device(mosquitto.plain, name=name, max_pending=50)
    sink = Sink(delay=0.05)
    n = 2000
    async with running(conn, sink):
        await apublish(mosquitto.plain, [(f"t/{name}/a", b'{"i": %d}' % i, 1) for i in range(n)])
        recs = await sink.wait_for(n, within=60)
        assert sorted(int(r.fields["i"]) for r in recs) == list(range(n))
        assert len(sink.batches) < n / 5  # batched per burst while the bus was slow

        sink.delay = 0.2
        before = len(sink.records)
        m = 3000
        await apublish(mosquitto.plain, [(f"t/{name}/b", b'{"i": 0}', 0)] * m)

        def settled() -> bool:
            return len(sink.records) - before + conn.dropped == m

        await until(settled, 30, "every QoS 0 message delivered or counted as dropped")
        assert conn.dropped > 0


# -- malformed payloads, Sparkplug, lost connection ------------------------------------------


async def test_malformed_payloads_are_counted_logged_and_the_device_goes_on(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    name = "garbage1"
    conn = device(
        mosquitto.plain,
        name=name,
        subscriptions=[
            {"filter": f"t/{name}/json", "fields": {"t": {"path": "t", "type": "float"}}},
            {"filter": f"t/{name}/lp", "codec": "line_protocol"},
            {"filter": f"t/{name}/num", "codec": "number"},
            {"filter": f"spBv1.0/{name}/#", "codec": "sparkplug_b"},
        ],
    )
    sink = Sink()
    caplog.set_level(logging.WARNING, "plantbus.connectors.mqtt")
    async with running(conn, sink):
        await apublish(
            mosquitto.plain,
            [
                (f"t/{name}/json", b'{"t": 21.', 1),
                (f"t/{name}/json", b"\x89PNG\r\n\x1a\n\x00\x00", 1),
                (f"t/{name}/json", b'{"t": "hot"}', 1),
                (f"t/{name}/lp", b"cpu usage=", 1),
                (f"t/{name}/num", b"twelve", 1),
                (f"spBv1.0/{name}/NDATA/n1", b"\xff\xff\xff\xff\xff", 1),
                (f"t/{name}/json", b'{"t": 20}', 1),
            ],
        )
        recs = await sink.wait_for(2)
        await apublish(mosquitto.plain, [(f"t/{name}/num", b"7", 1)])
        recs = await sink.wait_for(3)
    assert [(r.fields, r.status) for r in recs] == [
        ({}, {"t": BAD_TYPE_MISMATCH}),
        ({"t": 20.0}, None),
        ({"value": 7.0}, None),
    ]
    assert conn.malformed == 5 and conn.problems == 1
    text = caplog.text
    assert f"mqtt device {name}: " in text and "could not be decoded; first: topic" in text
    assert "'hot' is not a number" in text


def _sp(metrics: list[dict[str, Any]], seq: int | None, ts: int | None = T_MS) -> bytes:
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


async def test_sparkplug_b_birth_data_death(mosquitto: Mosquitto) -> None:
    g, node = "plantSP", "edge7"
    conn = device(
        mosquitto.plain,
        name="sp1",
        topic="plant/sp",
        subscriptions=[{"filter": f"spBv1.0/{g}/#", "codec": "sparkplug_b"}],
    )
    nbirth = _sp(
        [
            {"name": "bdSeq", "datatype": pb.Int64, "long_value": 0},
            {"name": "temp", "alias": 1, "datatype": pb.Float, "float_value": 20.5},
            {"name": "count", "alias": 2, "datatype": pb.Int32, "int_value": (-7) & 0xFFFFFFFF},
        ],
        0,
    )
    dbirth = _sp(
        [
            {"name": "rpm", "alias": 1, "datatype": pb.UInt16, "int_value": 1500},
            {"name": "running", "alias": 2, "datatype": pb.Boolean, "boolean_value": True},
        ],
        1,
    )
    sink = Sink()
    async with running(conn, sink):
        base = f"spBv1.0/{g}"
        await apublish(
            mosquitto.plain,
            [
                (f"{base}/NBIRTH/{node}", nbirth, 1),
                (f"{base}/DBIRTH/{node}/press", dbirth, 1),
                (f"{base}/NDATA/{node}", _sp([{"alias": 1, "float_value": 21.0}], 2, T_MS + 1), 1),
                (
                    f"{base}/DDATA/{node}/press",
                    _sp([{"alias": 1, "int_value": 1600}, {"alias": 2, "boolean_value": False}], 3),
                    1,
                ),
                (f"{base}/DDEATH/{node}/press", _sp([], 4), 1),
                (
                    f"{base}/NDEATH/{node}",
                    _sp([{"name": "bdSeq", "datatype": pb.Int64, "long_value": 0}], None, None),
                    1,
                ),
            ],
        )
        recs = await sink.wait_for(6)
    node_recs = [r for r in recs if r.topic == f"plant/sp/{g}/{node}"]
    dev_recs = [r for r in recs if r.topic == f"plant/sp/{g}/{node}/press"]
    assert [r.fields for r in node_recs] == [{"temp": 20.5, "count": -7}, {"temp": 21.0}, {}]
    assert node_recs[1].time_ns == (T_MS + 1) * 1_000_000
    assert node_recs[2].quality is Quality.BAD
    assert node_recs[2].status == {"temp": BAD_NO_COMMUNICATION, "count": BAD_NO_COMMUNICATION}
    assert [r.fields for r in dev_recs] == [
        {"rpm": 1500, "running": True},
        {"rpm": 1600, "running": False},
        {},
    ]
    assert dev_recs[2].status == {"rpm": BAD_NO_COMMUNICATION, "running": BAD_NO_COMMUNICATION}
    assert dev_recs[0].series.tag_dict == {
        "device": "sp1",
        "device_id": "press",
        "edge_node_id": node,
        "group_id": g,
    }


async def test_lost_connection_raises_for_the_supervisor(
    mosquitto: Mosquitto, tcp_cutter: Any
) -> None:
    cutter = tcp_cutter(mosquitto.plain)
    conn = device(cutter.port, keepalive="5s")
    task = asyncio.create_task(conn.run(Sink().emit))
    deadline = time.monotonic() + 10
    while not conn.ready.is_set():
        assert time.monotonic() < deadline and not task.done()
        await asyncio.sleep(0.02)
    cutter.cut()
    with pytest.raises(ConnectionError, match=r"connection to .* lost"):
        await asyncio.wait_for(task, 15)
    assert not conn.connected


async def test_unreachable_broker_raises(mosquitto: Mosquitto) -> None:
    from servers import free_port

    err = await run_until_error(device(free_port()))
    assert isinstance(err, ConnectionRefusedError)
