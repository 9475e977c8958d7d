"""Real consumers for the bridge tests: what a remote app subscribed to the broker receives.

Each consumer records every message it gets (target, the JSON records in it, whether the
broker marked it as a redelivery to this consumer) and can wait until a set of record IDs
has arrived. ``Bridge`` ties a sink kind to its broker and consumer so that one test module
runs the same checks against every bridge.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge_servers import TcpProxy

from plantbus.broker.bus import Bus
from plantbus.broker.connector import BuildContext
from plantbus.broker.ids import new_ids
from plantbus.broker.outlet import Outlet
from plantbus.broker.record import Record, Series
from plantbus.broker.registry import load_sink_module

__all__ = [
    "BRIDGES",
    "MAX_RECORDS",
    "Bridge",
    "Consumer",
    "Received",
    "Run",
    "proxy_for",
    "until",
]

BRIDGES = ("mqtt", "amqp", "kafka")

CTX = BuildContext(node_name="edge-07", node_tags={}, state_dir=Path("/nonexistent"))
DEVICES = 3
MAX_RECORDS = 30

_ids = itertools.count()


async def until(predicate: Callable[[], object], limit: float = 30.0, what: str = "") -> None:
    """Poll ``predicate`` on the loop until it is true (fails the test after ``limit`` s)."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit}s waiting for {what or predicate}")
        await asyncio.sleep(0.02)


@dataclass
class Received:
    """One message as the consumer got it."""

    target: str
    records: list[dict[str, Any]]
    redelivered: bool  # the broker re-sent it to this consumer (consumer-side at-least-once)
    key: bytes | None = None
    raw: bytes = b""


@dataclass
class Consumer:
    """Messages received, in arrival order (appended from any thread)."""

    messages: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    decode: bool = True  # payloads are JSON records (else kept raw only)

    def add(self, target: str, payload: bytes, redelivered: bool, key: bytes | None = None) -> None:
        records = json.loads(payload) if self.decode else []
        with self._lock:
            self.messages.append(Received(target, records, redelivered, key, bytes(payload)))

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.messages)

    def uids(self) -> set[str]:
        return {r["uid"] for m in self.snapshot() for r in m.records}

    async def wait_for(self, uids: Iterable[str], limit: float = 60.0) -> None:
        want = set(uids)
        await until(
            lambda: want <= self.uids(), limit, f"{len(want - self.uids())} of {len(want)} records"
        )

    def duplicates(self) -> int:
        """Records received more than once, leaving out the broker's own redeliveries."""
        seen: set[str] = set()
        dups = 0
        for m in self.snapshot():
            for r in m.records:
                if r["uid"] in seen:
                    dups += 0 if m.redelivered else 1
                seen.add(r["uid"])
        return dups

    def first_order(self) -> dict[str, list[str]]:
        """Per record topic, the record IDs in the order they first arrived."""
        seen: set[str] = set()
        out: dict[str, list[str]] = {}
        for m in self.snapshot():
            for r in m.records:
                if r["uid"] not in seen:
                    seen.add(r["uid"])
                    out.setdefault(r["topic"], []).append(r["uid"])
        return out


class Bridge:
    """A sink kind against its real broker: config, consumer, broker restart.

    Subclasses know their broker. ``prefix`` is unique per test, so a test's consumer only
    sees its own records (topics ``<prefix>/…``).
    """

    kind = ""
    restartable = False

    def __init__(self, server: Any):
        self.server = server
        self.prefix = f"ct{next(_ids)}x{int(time.time() * 1000) % 100000}"

    @property
    def port(self) -> int:
        """The broker port a TcpProxy goes in front of."""
        return int(self.server.port)

    def config(self, port: int | None = None, **kw: Any) -> dict[str, Any]:
        raise NotImplementedError

    async def consume(self) -> Consumer:
        """Start a consumer of everything under ``prefix`` (ready when this returns)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Stop the consumer."""

    def restart_broker(self) -> None:
        raise NotImplementedError


class MqttBridge(Bridge):
    """Mosquitto; a durable subscriber (clean session off, QoS 1), paho in its own thread."""

    kind = "mqtt"
    restartable = True

    def __init__(self, server: Any):
        super().__init__(server)
        self._client: Any = None

    def config(self, port: int | None = None, **kw: Any) -> dict[str, Any]:
        return {"url": f"mqtt://127.0.0.1:{port or self.server.port}", **kw}

    async def consume(
        self, *, raw: bool = False, username: str | None = None, password: str | None = None
    ) -> Consumer:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        consumer = Consumer(decode=not raw)
        subscribed = threading.Event()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-{self.prefix}",
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        client.reconnect_delay_set(0.05, 0.5)
        if username is not None:
            client.username_pw_set(username, password)

        def on_connect(c: Any, u: Any, flags: Any, rc: Any, p: Any) -> None:
            c.subscribe(f"{self.prefix}/#", qos=1)

        def on_subscribe(c: Any, u: Any, mid: Any, rcs: Any, p: Any) -> None:
            subscribed.set()

        def on_message(c: Any, u: Any, msg: Any) -> None:
            consumer.add(msg.topic, msg.payload, bool(msg.dup))

        client.on_connect, client.on_subscribe = on_connect, on_subscribe
        client.on_message = on_message
        client.connect("127.0.0.1", self.server.port, keepalive=10)
        client.loop_start()
        self._client = client
        await until(subscribed.is_set, 10, "the MQTT subscription")
        return consumer

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(_paho_stop, client)

    def restart_broker(self) -> None:
        self.server.restart()


def _paho_stop(client: Any) -> None:
    client.disconnect()
    client.loop_stop()


class AmqpBridge(Bridge):
    """RabbitMQ; a durable queue bound with ``<prefix>.#``, a robust aio-pika consumer."""

    kind = "amqp"
    restartable = True

    def __init__(self, server: Any):
        super().__init__(server)
        self._connection: Any = None

    def config(self, port: int | None = None, **kw: Any) -> dict[str, Any]:
        kw.setdefault("exchange", f"plantbus.{self.prefix}")
        return {"url": f"amqp://127.0.0.1:{port or self.server.port}/", **kw}

    async def consume(self, exchange: str | None = None) -> Consumer:
        import aio_pika

        consumer = Consumer()
        connection = await aio_pika.connect_robust(self.server.url, reconnect_interval=0.2)
        self._connection = connection
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=100)
        ex = await channel.declare_exchange(
            exchange or f"plantbus.{self.prefix}", aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(f"q.{self.prefix}", durable=True)
        await queue.bind(ex, routing_key=f"{self.prefix}.#")

        async def on_message(message: Any) -> None:
            consumer.add(message.routing_key, message.body, bool(message.redelivered))
            await message.ack()

        await queue.consume(on_message)
        return consumer

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    def restart_broker(self) -> None:
        self.server.restart()


class KafkaBridge(Bridge):
    """tansu behind the session's TcpProxy (it advertises the proxy); a partition consumer."""

    kind = "kafka"
    restartable = False  # tansu keeps topics in memory only: connections are cut instead

    def __init__(self, server: Any, proxy: Any):
        super().__init__(server)
        self.proxy = proxy
        self.topic = f"plantbus.{self.prefix}"
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return int(self.server.port)

    def config(self, port: int | None = None, **kw: Any) -> dict[str, Any]:
        # clients always reach tansu through the proxy it advertises (port is ignored)
        kw.setdefault("topic", self.topic)
        kw.setdefault("enable_idempotence", False)  # tansu refuses InitProducerId
        return {"bootstrap_servers": [self.server.bootstrap], **kw}

    async def consume(self, partitions: int = 3) -> Consumer:
        from aiokafka import AIOKafkaConsumer, TopicPartition
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=self.server.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(self.topic, partitions, 1)])
        finally:
            await admin.close()
        consumer = Consumer()
        kc = AIOKafkaConsumer(
            bootstrap_servers=self.server.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            retry_backoff_ms=50,
        )
        await kc.start()
        kc.assign([TopicPartition(self.topic, p) for p in range(partitions)])
        await kc.seek_to_beginning()
        self._consumer = kc

        async def pump() -> None:
            while True:
                got = await kc.getmany(timeout_ms=200)
                for records in got.values():
                    for r in records:
                        consumer.add(self.topic, r.value, False, r.key)

        self._task = asyncio.create_task(pump())
        return consumer

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        kc, self._consumer = self._consumer, None
        if kc is not None:
            await kc.stop()


class Run:
    """Bus → outlet → the bridge's sink, and a publisher of numbered records per device."""

    def __init__(self, bridge: Bridge, port: int | None = None, **config: Any):
        self.bridge = bridge
        table = {
            "name": f"{bridge.kind}-ct",
            "subscribe": [f"{bridge.prefix}/#"],
            "batch_size": 100,
            "flush_interval": "20ms",
            "max_records": MAX_RECORDS,
            "retry_initial": "10ms",
            "retry_max": "200ms",
            "timeout": "3s",
            **config,
        }
        module = load_sink_module(bridge.kind)
        self.config = module.Config.model_validate(bridge.config(port, **table))
        self.sink = module.build(self.config, CTX)
        self.bus = Bus()
        self.outlet = Outlet("o", self.bus, [(self.config, self.sink)])
        self.series = [
            Series(f"{bridge.prefix}/line1/dev{i}", f"dev{i}", {"device": f"dev{i}", "line": "L1"})
            for i in range(DEVICES)
        ]
        self.records: list[Record] = []
        self._n = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.outlet.run())

    async def publish(self, reads: int, per_read: int = 10, pause: float = 0.0) -> None:
        """``reads`` reads of ``per_read`` records per device, as devices would publish."""
        for _ in range(reads):
            for s in self.series:
                ids = new_ids(per_read)
                now = time.time_ns()
                batch = [
                    Record(s, {"n": self._n + j, "temp": 20.5 + j}, now + j, ids[j])
                    for j in range(per_read)
                ]
                self._n += per_read
                self.records += batch
                await self.bus.publish(batch)
            if pause:
                await asyncio.sleep(pause)  # a stream paced like devices, not a sync point

    async def stream(self, until_set: asyncio.Event, per_read: int = 5) -> None:
        """Publish reads paced like devices until ``until_set`` is set."""
        while not until_set.is_set():
            await self.publish(1, per_read, pause=0.005)

    async def stop(self) -> None:
        await self.outlet.stop(30.0)
        assert self._task is not None
        await self._task

    @property
    def uids(self) -> list[str]:
        return [r.id for r in self.records]

    def order(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for r in self.records:
            out.setdefault(r.series.topic, []).append(r.id)
        return out

    def metrics(self) -> dict[str, Any]:
        return self.outlet.metrics()


def proxy_for(bridge: Bridge) -> Any:
    """A TcpProxy in front of the bridge's broker (for Kafka: the session one)."""
    if isinstance(bridge, KafkaBridge):
        return bridge.proxy
    return TcpProxy(bridge.port).start()
