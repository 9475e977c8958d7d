"""The ``kafka`` sink: encoded batches produced to Kafka (aiokafka).

With the ``json`` codec each batch is split by Kafka topic and key (the ``topic`` and
``key`` templates; the key defaults to the record's device, so one device's records stay in
one partition, in order) into messages of at most ``max_records`` records, each a JSON array
of records carrying their ``uid``. With ``line_protocol`` each batch is one message with a
fixed topic and key.

``acks = "all"`` by default: a batch is written when the partition leader and its in-sync
replicas have every message of it. ``compression`` compresses per producer batch (``gzip``
always works; ``snappy``, ``lz4``, ``zstd`` need their Python packages).
``enable_idempotence`` (default on, as in Kafka's own clients) makes the broker drop the
duplicates a producer's internal retry would write; it needs the InitProducerId API, which
some Kafka-compatible brokers lack (tansu answers it with an error): set it to ``false``
there, and the few records of a request whose answer was lost may then arrive twice.

aiokafka reconnects and retries produce requests on its own. The sink counts the records
that may therefore reach a consumer twice: those of messages in flight when a produce request
failed, and those sent again after a failed write (``resent_records``, see ``Delivery``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from plantbus.broker.configtypes import Duration, Size
from plantbus.broker.connector import BuildContext
from plantbus.broker.sinks.base import EncodedBatch, PermanentSinkError, RetryableSinkError
from plantbus.broker.sinks.bridge import (
    BridgeConfig,
    BridgeCounters,
    Delivery,
    RecordKey,
    Splitter,
    Template,
    check_template,
    describe,
    sealer_of,
    ssl_context,
)

__all__ = ["Config", "KafkaSink", "build"]

log = logging.getLogger(__name__)

_TOPIC_BAD = re.compile(r"[^a-zA-Z0-9._-]")
_MAX_TOPIC = 249
_REQUEST_OVERHEAD = 64 * 1024  # room for the record batch and request headers around a message
_COMPRESSION_MODULES = {"snappy": "cramjam", "lz4": "cramjam", "zstd": "cramjam"}


class Config(BridgeConfig):
    """``[[sinks.kafka]]``: keys beyond those of every bridge.

    Attributes:
        bootstrap_servers: ``host:port`` of one or more brokers.
        topic: Kafka topic template (in ``{topic}`` ``/`` becomes ``.``; characters Kafka
            does not allow become ``_``).
        key: message key template, default ``{device}``; ``""`` sends no key.
        acks: ``"all"`` (default), ``1`` or ``0``.
        compression: ``none``, ``gzip``, ``snappy``, ``lz4`` or ``zstd``.
        enable_idempotence: exactly-once writes per partition (needs ``acks = "all"`` and a
            broker with InitProducerId; off for tansu).
        linger: how long the producer waits to fill a request (messages are batches already).
        sasl_mechanism: with ``username``/``password``: ``PLAIN``, ``SCRAM-SHA-256`` or
            ``SCRAM-SHA-512``.
        client_id: default ``plantbus-<node>-<sink name>``.
    """

    bootstrap_servers: list[str] = Field(default_factory=lambda: ["127.0.0.1:9092"], min_length=1)
    topic: str = "plantbus"
    key: str = "{device}"
    acks: Literal["all", 0, 1] = "all"
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    enable_idempotence: bool = True
    linger: Duration = 0.0
    max_message_bytes: Size = Field(default=900 * 1024, ge=1024)
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    client_id: str = ""

    @field_validator("topic")
    @classmethod
    def _check_topic(cls, v: str) -> str:
        Template(v)
        if Template(v).static and (not v or _TOPIC_BAD.search(v) or len(v) > _MAX_TOPIC):
            raise ValueError(
                f"invalid Kafka topic {v!r}: 1 to 249 of letters, digits, '.', '_' and '-'"
            )
        return v

    @field_validator("key")
    @classmethod
    def _check_key(cls, v: str) -> str:
        return check_template(v)

    @field_validator("bootstrap_servers")
    @classmethod
    def _check_servers(cls, v: list[str]) -> list[str]:
        for s in v:
            host, _, port = s.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"invalid bootstrap server {s!r}: use 'host:port'")
        return v

    @model_validator(mode="after")
    def _check_kafka(self) -> Config:
        if self.enable_idempotence and self.acks != "all":
            raise ValueError('enable_idempotence needs acks = "all"')
        module = _COMPRESSION_MODULES.get(self.compression)
        if module is not None and importlib.util.find_spec(module) is None:
            raise ValueError(
                f"compression {self.compression!r} needs the Python package {module!r}; "
                "install it or use 'gzip'"
            )
        return self

    def templates(self) -> dict[str, str]:
        return {"topic": self.topic, "key": self.key}


def _kafka_topic(template: Template, rk: RecordKey) -> str:
    values = rk.values()
    values["topic"] = rk.topic.replace("/", ".")
    topic = _TOPIC_BAD.sub("_", template.render(values))[:_MAX_TOPIC]
    return topic or "_"


class KafkaSink(BridgeCounters):
    """Produces encoded batches to Kafka.

    Attributes:
        connects: producers started.
        failed_requests: produce requests that failed and were retried by the client.
        messages_out / records_out / resent_records: see ``Delivery``.
    """

    def __init__(self, config: Config, name: str = "kafka", client_id: str = "plantbus"):
        self.config = config
        self.name = name
        self.codec = config.codec
        self.client_id = config.client_id or client_id
        topic = Template(config.topic)
        key = Template(config.key)

        def target_of(rk: RecordKey) -> tuple[str, bytes | None]:
            k = key.render(rk.values()) if key.text else ""
            return _kafka_topic(topic, rk), k.encode("utf-8") if k else None

        fixed: tuple[str, bytes | None] | None = None
        if topic.static and key.static:
            fixed = (config.topic, config.key.encode("utf-8") if config.key else None)
        self._splitter: Splitter[tuple[str, bytes | None]] = Splitter(
            config.codec,
            target_of,
            needs_device="device" in topic.fields + key.fields,
            max_records=config.max_records,
            max_bytes=config.max_message_bytes,
            fixed=fixed,
            sealer=sealer_of(config.encrypt),
        )
        self._delivery = Delivery()
        self._producer: Any = None
        self.connects = 0
        self.failed_requests = 0

    def _new_producer(self) -> Any:
        from aiokafka import AIOKafkaProducer

        cfg = self.config
        kwargs: dict[str, Any] = {}
        if cfg.tls is not None:
            kwargs["ssl_context"] = ssl_context(cfg.tls)
        if cfg.username is not None:
            kwargs["security_protocol"] = "SASL_SSL" if cfg.tls is not None else "SASL_PLAINTEXT"
            kwargs["sasl_mechanism"] = cfg.sasl_mechanism
            kwargs["sasl_plain_username"] = cfg.username
            kwargs["sasl_plain_password"] = (
                cfg.password.get_secret_value() if cfg.password is not None else ""
            )
        elif cfg.tls is not None:
            kwargs["security_protocol"] = "SSL"
        request_size = cfg.max_message_bytes + _REQUEST_OVERHEAD
        return AIOKafkaProducer(
            bootstrap_servers=cfg.bootstrap_servers,
            client_id=self.client_id,
            acks=cfg.acks,
            compression_type=None if cfg.compression == "none" else cfg.compression,
            enable_idempotence=cfg.enable_idempotence,
            linger_ms=int(cfg.linger * 1000),
            max_request_size=request_size,
            max_batch_size=request_size,
            request_timeout_ms=max(1000, int(cfg.timeout * 1000)),
            retry_backoff_ms=100,
            **kwargs,
        )

    def _watch_requests(self, producer: Any) -> None:
        """Count produce requests that fail: the client sends them again on its own.

        aiokafka has no hook for this; its sender calls ``producer.client.send`` for each
        request, so the sink wraps that method of its own producer's client.
        """
        client = producer.client
        send = client.send

        async def watched_send(node_id: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return await send(node_id, request, *args, **kwargs)
            except Exception:
                if type(request).__name__.startswith("ProduceRequest"):
                    self._request_failed()
                raise

        client.send = watched_send

    def _request_failed(self) -> None:
        self.failed_requests += 1
        # the broker may have written what was in flight before the answer was lost
        for i in self._delivery.unacked_sent():
            self._delivery.sent(i)

    async def connect(self) -> None:
        """Start a producer (bootstrap, metadata; InitProducerId with idempotence)."""
        from aiokafka.errors import KafkaError

        await self._teardown()
        cfg = self.config
        producer = self._new_producer()
        try:
            await producer.start()
        except BaseException as e:
            await _stop_quietly(producer)
            if isinstance(e, KafkaError | OSError):
                hint = ""
                if cfg.enable_idempotence:
                    hint = (
                        " (if the broker does not support idempotent producers, as tansu, "
                        "set enable_idempotence = false)"
                    )
                raise RetryableSinkError(
                    f"cannot start a producer for {','.join(cfg.bootstrap_servers)}: "
                    f"{describe(e)}{hint}"
                ) from e
            raise
        self._watch_requests(producer)
        self._producer = producer
        self.connects += 1
        log.debug("sink %s: producing to %s", self.name, ",".join(cfg.bootstrap_servers))

    async def write(self, batch: EncodedBatch) -> None:
        """Send the messages of ``batch`` and wait until Kafka acknowledged all."""
        from aiokafka.errors import KafkaError

        todo = self._delivery.start(batch, self._splitter.split)
        if not todo:  # every message was acknowledged by an earlier attempt
            self._delivery.done()
            return
        if self._producer is None:
            await self.connect()
        producer = self._producer
        messages = self._delivery.messages
        waiting: list[tuple[int, asyncio.Future[Any]]] = []
        try:
            for i in todo:
                m = messages[i]
                topic, key = m.target
                self._delivery.sent(i)
                waiting.append((i, await producer.send(topic, m.payload, key=key)))
            for i, fut in waiting:
                # shielded: a write the outlet times out leaves the client's future alone
                await asyncio.shield(fut)
                self._delivery.acked(i)
        except KafkaError as e:
            for i, fut in waiting:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._delivery.acked(i)
            raise self._error(e) from e
        self._delivery.done()

    def _error(self, error: Exception) -> Exception:
        from aiokafka import errors

        what = f"producing to {','.join(self.config.bootstrap_servers)} failed: {describe(error)}"
        if isinstance(error, errors.MessageSizeTooLargeError | errors.RecordListTooLargeError):
            return PermanentSinkError(f"{what} (lower max_message_bytes or max_records)")
        if isinstance(error, errors.InvalidTopicError | errors.CorruptRecordError):
            return PermanentSinkError(what)
        if isinstance(error, errors.TopicAuthorizationFailedError):
            return RetryableSinkError(f"{what} (check the user's WRITE ACL on the topic)")
        return RetryableSinkError(what)

    async def _teardown(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await _stop_quietly(producer)

    async def close(self) -> None:
        """Stop the producer (every written batch was acknowledged already)."""
        await self._teardown()

    def __repr__(self) -> str:
        return f"KafkaSink({self.name!r}, {self.config.bootstrap_servers!r})"


async def _stop_quietly(producer: Any) -> None:
    try:
        await producer.stop()
    except Exception as e:  # stopping a producer that never started is best effort
        log.debug("stopping a Kafka producer: %s", describe(e))


def build(config: Config, ctx: BuildContext) -> KafkaSink:
    """Build the sink (nothing is contacted until the outlet connects it)."""
    name = config.name or "kafka"
    return KafkaSink(config, name, client_id=f"plantbus-{ctx.node_name}-{name}")
