"""What each bridge has beyond the conformance suite, against its real broker.

mqtt: TLS with a client certificate (certificates made by the test), username/password,
QoS 0, line protocol to a fixed topic, MQTT 5 (the CONNECT on the wire says level 5).
amqp: TLS (amqps) with a client certificate, without one, and to a server the CA does not
vouch for; ``mandatory`` messages no queue is bound for come back and are counted.
kafka: ``enable_idempotence`` against tansu (which refuses InitProducerId) fails to connect
with a hint, gzip compression, one key per device.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from bridge_harness import Bridge, MqttBridge, Run, until
from bridge_servers import Certs, MosquittoServer

from plantbus.codecs import line_protocol

pytestmark = pytest.mark.timeout(120)


async def assert_refused(run: Run, text: str, *alternatives: str) -> None:
    """The sink cannot connect: the outlet reports it failing with ``text`` (or one of
    ``alternatives``: how a refusal surfaces can depend on timing), nothing goes."""
    run.start()
    await run.publish(reads=2, per_read=5)
    ch = run.outlet.channels[0]
    await until(lambda: ch.failing and ch.retries >= 2, 20, "the connect to fail")
    assert any(t in ch.last_error for t in (text, *alternatives)), ch.last_error
    await run.outlet.stop(0.5)
    await run._task  # type: ignore[misc]
    assert run.sink.records_out == 0
    assert run.metrics()["undelivered"] == len(run.records)


# -- mqtt ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bridge", ["mqtt"], indirect=True)
async def test_mqtt_tls_with_client_certificate(bridge: Bridge, certs: Certs) -> None:
    consumer = await bridge.consume()  # on the plain listener of the same broker
    tls = {"ca": str(certs.ca), "certificate": str(certs.client_cert)}
    tls["private_key"] = str(certs.client_key)
    run = Run(bridge, url=f"mqtts://127.0.0.1:{bridge.server.tls_port}", tls=tls)
    run.start()
    await run.publish(reads=5, per_read=10)
    await consumer.wait_for(run.uids)
    await run.stop()
    assert consumer.first_order() == run.order()


@pytest.mark.parametrize("bridge", ["mqtt"], indirect=True)
async def test_mqtt_tls_refused_without_client_certificate(bridge: Bridge, certs: Certs) -> None:
    run = Run(
        bridge,
        url=f"mqtts://127.0.0.1:{bridge.server.tls_port}",
        tls={"ca": str(certs.ca)},
        retry_max="50ms",
    )
    await assert_refused(run, "MQTT connection")


@pytest.mark.parametrize("bridge", ["mqtt"], indirect=True)
async def test_mqtt_tls_refuses_an_unknown_server(bridge: Bridge, tmp_path: Path) -> None:
    from bridge_servers import make_certs

    other = make_certs(tmp_path / "other")  # a CA that did not sign the broker's certificate
    run = Run(
        bridge,
        url=f"mqtts://127.0.0.1:{bridge.server.tls_port}",
        tls={"ca": str(other.ca)},
        retry_max="50ms",
    )
    await assert_refused(run, "CERTIFICATE_VERIFY_FAILED")


@pytest.fixture
def mosquitto_auth(tmp_path: Path) -> Iterator[MosquittoServer]:
    server = MosquittoServer(tmp_path / "mq", users={"plant": "s3cret", "reader": "r3ad"})
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_mqtt_username_password(mosquitto_auth: MosquittoServer) -> None:
    bridge = MqttBridge(mosquitto_auth)
    try:
        consumer = await bridge.consume(username="reader", password="r3ad")
        run = Run(bridge, username="plant", password="s3cret")
        run.start()
        await run.publish(reads=3, per_read=10)
        await consumer.wait_for(run.uids)
        await run.stop()
        wrong = Run(bridge, username="plant", password="wrong", retry_max="50ms")
        await assert_refused(wrong, "refused the connection")
    finally:
        await bridge.close()


@pytest.mark.parametrize("bridge", ["mqtt"], indirect=True)
async def test_mqtt_qos0_and_line_protocol_to_a_fixed_topic(bridge: Bridge) -> None:
    consumer = await bridge.consume(raw=True)
    topic = f"{bridge.prefix}/lp"
    run = Run(bridge, codec="line_protocol", topic=topic, qos=0)
    run.start()
    await run.publish(reads=4, per_read=10)
    want = set(run.uids)
    await until(
        lambda: all(
            f'uid="{u}"'.encode() in b"".join(m.raw for m in consumer.snapshot()) for u in want
        ),
        20,
        "the line-protocol records",
    )
    await run.stop()
    msgs = consumer.snapshot()
    assert {m.target for m in msgs} == {topic}
    # each message is a whole outlet batch of lines, as the line-protocol codec wrote it
    assert b"".join(m.raw for m in msgs) == line_protocol.encode(run.records)


async def _forward_and_capture(
    upstream_port: int, captured: list[bytes]
) -> tuple[asyncio.Server, int]:
    """A loopback forwarder to ``upstream_port`` that keeps what each client sends first."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        first = True

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, keep: bool) -> None:
            nonlocal first
            try:
                while data := await src.read(65536):
                    if keep and first:
                        captured.append(data)
                        first = False
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("bridge", ["mqtt"], indirect=True)
async def test_mqtt5_delivers_every_record(bridge: Bridge) -> None:
    consumer = await bridge.consume()  # a 3.1.1 subscriber: the broker translates
    captured: list[bytes] = []
    server, port = await _forward_and_capture(bridge.port, captured)
    try:
        run = Run(bridge, port=port, protocol="5")
        run.start()
        await run.publish(reads=5, per_read=10)
        await consumer.wait_for(run.uids)
        await run.stop()
    finally:
        server.close()
    assert consumer.first_order() == run.order()
    assert run.metrics()["records_out"] == len(run.records)
    # the sink spoke MQTT 5: CONNECT (0x10), remaining length (varint), "MQTT", level 5
    connect = captured[0]
    assert connect[0] == 0x10
    i = 1
    while connect[i] & 0x80:
        i += 1
    assert connect[i + 1 : i + 8] == b"\x00\x04MQTT\x05", connect[: i + 8]


# -- amqp ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bridge", ["amqp"], indirect=True)
async def test_amqp_tls_with_client_certificate(bridge: Bridge, certs: Certs) -> None:
    consumer = await bridge.consume()  # on the plain listener of the same broker
    tls = {"ca": str(certs.ca), "certificate": str(certs.client_cert)}
    tls["private_key"] = str(certs.client_key)
    run = Run(bridge, url=f"amqps://127.0.0.1:{bridge.server.tls_port}/", tls=tls)
    run.start()
    await run.publish(reads=5, per_read=10)
    await consumer.wait_for(run.uids)
    await run.stop()
    assert consumer.first_order() == run.order()
    assert run.sink.connects == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("bridge", ["amqp"], indirect=True)
async def test_amqp_tls_refused_without_client_certificate(bridge: Bridge, certs: Certs) -> None:
    run = Run(
        bridge,
        url=f"amqps://127.0.0.1:{bridge.server.tls_port}/",
        tls={"ca": str(certs.ca)},  # RabbitMQ: fail_if_no_peer_cert = true
        retry_max="50ms",
    )
    # RabbitMQ's TLS alert races its close: the client sees the alert or a reset
    await assert_refused(run, "certificate required", "Connection reset by peer")


@pytest.mark.parametrize("bridge", ["amqp"], indirect=True)
async def test_amqp_tls_refuses_an_unknown_server(bridge: Bridge, tmp_path: Path) -> None:
    from bridge_servers import make_certs

    other = make_certs(tmp_path / "other")  # a CA that did not sign the broker's certificate
    tls = {"ca": str(other.ca), "certificate": str(other.client_cert)}
    tls["private_key"] = str(other.client_key)
    url = f"amqps://127.0.0.1:{bridge.server.tls_port}/"
    run = Run(bridge, url=url, tls=tls, retry_max="50ms")
    await assert_refused(run, f"cannot connect to {url}")
    assert "CERTIFICATE_VERIFY_FAILED" in run.outlet.channels[0].last_error


@pytest.mark.parametrize("bridge", ["amqp"], indirect=True)
async def test_amqp_unroutable_messages_are_returned_and_counted(bridge: Bridge) -> None:
    consumer = await bridge.consume()  # bound to <prefix>.#
    run = Run(bridge, routing_key="nobody.{device}")
    run.start()
    await run.publish(reads=5, per_read=10)
    await run.stop()
    sink = run.sink
    assert sink.returned_records == len(run.records)  # type: ignore[attr-defined]
    assert sink.returned_messages >= 3  # type: ignore[attr-defined]
    # a returned message is not retried: nobody asked for it
    assert run.metrics()["records_out"] == len(run.records)
    assert run.metrics()["retries"] == 0
    assert consumer.snapshot() == []


@pytest.mark.parametrize("bridge", ["amqp"], indirect=True)
async def test_amqp_persistent_messages_with_ids(bridge: Bridge) -> None:
    import aio_pika

    conn = await aio_pika.connect(bridge.server.url)
    try:
        ch = await conn.channel()
        ex = await ch.declare_exchange(f"plantbus.{bridge.prefix}", "topic", durable=True)
        q = await ch.declare_queue(f"peek.{bridge.prefix}", exclusive=True)
        await q.bind(ex, routing_key=f"{bridge.prefix}.line1.dev1")
        run = Run(bridge)
        run.start()
        await run.publish(reads=2, per_read=10)
        await run.stop()
        msg = await q.get(timeout=5)
        assert msg.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert msg.content_type == "application/json"
        assert msg.message_id == f"{run.records[0].id}-1"  # <batch's first uid>-<index>
        await msg.ack()
    finally:
        await conn.close()


# -- kafka --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bridge", ["kafka"], indirect=True)
async def test_kafka_idempotence_refused_by_tansu_says_what_to_do(bridge: Bridge) -> None:
    run = Run(bridge, enable_idempotence=True, retry_max="100ms")
    await assert_refused(run, "set enable_idempotence = false")


@pytest.mark.parametrize("bridge", ["kafka"], indirect=True)
async def test_kafka_gzip_keyed_by_device(bridge: Bridge) -> None:
    consumer = await bridge.consume()
    run = Run(bridge, compression="gzip", acks="all")
    run.start()
    await run.publish(reads=10, per_read=10)
    await consumer.wait_for(run.uids)
    await run.stop()
    assert consumer.first_order() == run.order()
    for m in consumer.snapshot():
        assert {r["tags"]["device"] for r in m.records} == {m.key.decode()}  # type: ignore[union-attr]
