"""The ``amqp`` sink: encoded batches published to an AMQP 0-9-1 exchange (aio-pika).

With the ``json`` codec each batch is split by routing key (``routing_key`` template; in
``{topic}`` a ``/`` becomes ``.``, so ``plant/h1/press7`` is routed as ``plant.h1.press7``
and a queue bound with ``plant.*.press7`` or ``plant.#`` gets it) into messages of at most
``max_records`` records, each a JSON array of records. With ``line_protocol`` each batch is
one message with a fixed routing key.

Every message is persistent (delivery mode 2) and published with ``mandatory``, on a channel
with publisher confirms: a batch is written when the broker confirmed every message of it.
A message no queue is bound for comes back (``basic.return``): it is counted in
``returned_messages`` / ``returned_records`` and logged, not retried (nobody asked for it).
A ``basic.nack`` (the broker could not take it) and a lost connection fail the write with
``RetryableSinkError``; the next write connects again, and messages already confirmed are
not sent again (``Delivery``). Each message's ``message_id`` is ``<first uid of the
batch>-<index>``, the same when it is sent again, so a consumer can drop a repeat.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

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

__all__ = ["AmqpSink", "Config", "build"]

log = logging.getLogger(__name__)

_RETURN_LOG_INTERVAL = 60.0  # seconds between warnings about unroutable messages
_MAX_ROUTING_KEY = 255  # bytes (AMQP shortstr)


class Config(BridgeConfig):
    """``[[sinks.amqp]]``: keys beyond those of every bridge.

    Attributes:
        url: ``amqp://host:port/vhost`` or ``amqps://…`` (TLS); credentials go in
            ``username``/``password`` (RabbitMQ's default ``guest`` works on loopback only).
        exchange: the exchange to publish to.
        exchange_type: ``topic`` (default), ``direct`` or ``fanout``.
        declare: declare the exchange (durable) at connect; ``false``: it must exist.
        routing_key: template over ``{topic}`` (``/`` → ``.``), ``{measurement}``,
            ``{device}``.
        persistent: delivery mode 2 (survives a broker restart in a durable queue).
        mandatory: ask the broker to return messages no queue is bound for (counted).
    """

    url: str = "amqp://127.0.0.1:5672/"
    exchange: str = Field(default="plantbus", max_length=255)
    exchange_type: Literal["topic", "direct", "fanout"] = "topic"
    declare: bool = True
    routing_key: str = "{topic}"
    persistent: bool = True
    mandatory: bool = True

    @field_validator("routing_key")
    @classmethod
    def _check_key(cls, v: str) -> str:
        return check_template(v)

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ValueError(f'invalid url {v!r}: use "amqp://host:port/vhost" or "amqps://…"')
        if parts.username or parts.password:
            raise ValueError(f"invalid url {v!r}: credentials go in username/password")
        if parts.query or parts.fragment:
            raise ValueError(f"invalid url {v!r}: no query or fragment")
        try:
            _ = parts.port
        except ValueError as e:
            raise ValueError(f"invalid url {v!r}: {e}") from None
        return v

    @model_validator(mode="after")
    def _check_tls(self) -> Config:
        if self.tls is not None and not self.url.startswith("amqps:"):
            raise ValueError("tls is set but the url is not amqps://")
        return self

    def templates(self) -> dict[str, str]:
        return {"routing_key": self.routing_key}


def _routing_key(template: Template, rk: RecordKey) -> str:
    values = rk.values()
    values["topic"] = rk.topic.replace("/", ".")
    key = template.render(values)
    if len(key.encode("utf-8")) > _MAX_ROUTING_KEY:
        # AMQP cannot carry it; keep the start, which names the plant area
        key = key.encode("utf-8")[:_MAX_ROUTING_KEY].decode("utf-8", "ignore")
    return key


class AmqpSink(BridgeCounters):
    """Publishes encoded batches to one exchange of an AMQP 0-9-1 broker (RabbitMQ).

    Attributes:
        connects: successful connections.
        returned_messages / returned_records: sent back by the broker as unroutable.
        messages_out / records_out / resent_records: see ``Delivery``.
    """

    def __init__(self, config: Config, name: str = "amqp", connection_name: str = "plantbus"):
        self.config = config
        self.name = name
        self.codec = config.codec
        self.connection_name = connection_name
        template = Template(config.routing_key)
        self._splitter: Splitter[str] = Splitter(
            config.codec,
            lambda rk: _routing_key(template, rk),
            needs_device="device" in template.fields,
            max_records=config.max_records,
            max_bytes=config.max_message_bytes,
            fixed=config.routing_key if template.static else None,
            sealer=sealer_of(config.encrypt),
        )
        self._delivery = Delivery()
        self._content_type = (
            "application/octet-stream"  # a plantbus envelope (docs/encryption.md)
            if config.encrypt is not None
            else "application/json"
            if config.codec == "json"
            else "text/plain; charset=utf-8"
        )
        self._connection: Any = None
        self._channel: Any = None
        self._exchange: Any = None
        self.connects = 0
        self.returned_messages = 0
        self.returned_records = 0
        self._return_logged = -_RETURN_LOG_INTERVAL

    def _url(self) -> Any:
        from yarl import URL

        cfg = self.config
        url = URL(cfg.url)
        if cfg.username is not None:
            password = cfg.password.get_secret_value() if cfg.password is not None else ""
            url = url.with_user(cfg.username).with_password(password)
        return url.update_query(name=self.connection_name)

    async def connect(self) -> None:
        """Open a connection and a confirming channel; declare (or check) the exchange."""
        import aio_pika
        import aiormq

        await self._teardown()
        cfg = self.config
        kwargs: dict[str, Any] = {"timeout": cfg.timeout}
        if cfg.tls is not None:
            kwargs["ssl_context"] = ssl_context(cfg.tls)
        try:
            connection = await aio_pika.connect(self._url(), **kwargs)
        except (TimeoutError, aiormq.exceptions.AMQPError, OSError) as e:
            raise RetryableSinkError(f"cannot connect to {cfg.url}: {describe(e)}") from e
        self._connection = connection
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=False)
            if cfg.declare:
                exchange = await channel.declare_exchange(
                    cfg.exchange, aio_pika.ExchangeType(cfg.exchange_type), durable=True
                )
            else:
                exchange = await channel.get_exchange(cfg.exchange, ensure=True)
        except aiormq.exceptions.ChannelNotFoundEntity as e:
            await self._teardown()
            raise RetryableSinkError(
                f"exchange {cfg.exchange!r} does not exist on {cfg.url} (declare = false): "
                f"{describe(e)}"
            ) from e
        except (TimeoutError, aiormq.exceptions.AMQPError, OSError) as e:
            await self._teardown()
            raise RetryableSinkError(
                f"setting up exchange {cfg.exchange!r} on {cfg.url} failed: {describe(e)}"
            ) from e
        self._channel = channel
        self._exchange = exchange
        self.connects += 1
        log.debug("sink %s: connected to %s, exchange %r", self.name, cfg.url, cfg.exchange)

    def _usable(self) -> bool:
        return (
            self._exchange is not None
            and not self._connection.is_closed
            and not self._channel.is_closed
        )

    async def write(self, batch: EncodedBatch) -> None:
        """Publish the messages of ``batch`` and wait for the broker's confirms."""
        import aio_pika
        import aiormq
        from pamqp.commands import Basic

        todo = self._delivery.start(batch, self._splitter.split)
        if not todo:  # every message was acknowledged by an earlier attempt
            self._delivery.done()
            return
        if not self._usable():
            await self.connect()  # raises RetryableSinkError while the broker is away
        cfg = self.config
        exchange = self._exchange
        messages = self._delivery.messages
        mode = aio_pika.DeliveryMode.PERSISTENT if cfg.persistent else None
        prefix = batch.first_id or str(batch.seq)

        async def publish(i: int) -> Any:
            m = messages[i]
            message = aio_pika.Message(
                m.payload,
                delivery_mode=mode,
                content_type=self._content_type,
                message_id=f"{prefix}-{i}",
            )
            self._delivery.sent(i)
            return await exchange.publish(message, m.target, mandatory=cfg.mandatory)

        # one channel keeps publishes in the order they take its lock (FIFO), which is the
        # order these tasks start in; the confirms then come back in any order
        results = await asyncio.gather(*(publish(i) for i in todo), return_exceptions=True)
        failure: BaseException | None = None
        for i, result in zip(todo, results, strict=True):
            m = messages[i]
            if isinstance(result, Basic.Ack):
                self._delivery.acked(i)
            elif isinstance(result, aiormq.abc.DeliveredMessage):
                # basic.return: no queue is bound for this routing key
                self._delivery.acked(i)
                self.returned_messages += 1
                self.returned_records += m.records
                self._log_return(m.target)
            elif isinstance(result, BaseException):
                failure = failure or result
            else:  # confirms are on, so this is not expected; treat as not confirmed
                failure = failure or RetryableSinkError(f"unexpected publish result {result!r}")
        if failure is not None:
            raise self._error(failure)
        self._delivery.done()

    def _error(self, error: BaseException) -> BaseException:
        import aiormq

        if isinstance(error, RetryableSinkError | PermanentSinkError | asyncio.CancelledError):
            return error
        if isinstance(error, aiormq.exceptions.DeliveryError):
            # basic.nack: the broker is up but could not take it (e.g. a disk alarm)
            return RetryableSinkError(
                f"{self.config.url} refused a message (basic.nack): {describe(error)}"
            )
        if isinstance(error, aiormq.exceptions.ChannelNotFoundEntity):
            self._exchange = None  # connect again: the exchange is declared anew
            return RetryableSinkError(
                f"exchange {self.config.exchange!r} is gone: {describe(error)}"
            )
        if isinstance(error, aiormq.exceptions.AMQPError | OSError | asyncio.TimeoutError):
            self._exchange = None
            return RetryableSinkError(f"publishing to {self.config.url} failed: {describe(error)}")
        return error

    def _log_return(self, routing_key: str) -> None:
        now = time.monotonic()
        if now - self._return_logged >= _RETURN_LOG_INTERVAL:
            self._return_logged = now
            log.warning(
                "sink %s: exchange %r has no queue for routing key %r: message returned "
                "(%d messages, %d records so far); bind a queue to keep them",
                self.name,
                self.config.exchange,
                routing_key,
                self.returned_messages,
                self.returned_records,
            )

    async def _teardown(self) -> None:
        connection, self._connection = self._connection, None
        self._channel = self._exchange = None
        if connection is not None and not connection.is_closed:
            try:
                await connection.close()
            except Exception as e:  # closing a broken connection is best effort
                log.debug("sink %s: closing the connection: %s", self.name, describe(e))

    async def close(self) -> None:
        """Close the channel and connection (every written batch was confirmed already)."""
        await self._teardown()

    def __repr__(self) -> str:
        return f"AmqpSink({self.name!r}, {self.config.url!r}, exchange={self.config.exchange!r})"


def build(config: Config, ctx: BuildContext) -> AmqpSink:
    """Build the sink (nothing is contacted until the outlet connects it)."""
    name = config.name or "amqp"
    return AmqpSink(config, name, connection_name=f"plantbus {ctx.node_name} {name}")
