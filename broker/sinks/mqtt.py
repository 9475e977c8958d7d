"""The ``mqtt`` sink: encoded batches published to an MQTT broker (paho-mqtt 2.x).

With the ``json`` codec each batch is split by target (``topic`` template over the record's
topic, measurement and device) into messages of at most ``max_records`` records, each a JSON
array of records (``plantbus.codecs.json``); with ``line_protocol`` each batch is one message
to a fixed topic. See ``plantbus.broker.sinks.bridge`` for how a batch is split.

One paho client per sink, its network loop in paho's own thread; its callbacks hand results
to the event loop with ``call_soon_threadsafe``. A batch is written when the broker has
acknowledged every message of it (QoS 1: PUBACK; QoS 0: written to the socket). When the
connection drops, the messages not yet acknowledged fail the write with
``RetryableSinkError``; the next write builds a new client and connects again (paho's own
reconnect is off, so nothing is re-sent behind the outlet's back), and the messages the
broker had acknowledged are not sent again (``Delivery``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
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

__all__ = ["Config", "MqttSink", "build"]

log = logging.getLogger(__name__)

# MQTT 5 PUBACK reason codes that a later try may get past (the rest refuse the message)
_RETRYABLE_REASONS = {0x80, 0x83, 0x87, 0x97}  # unspecified, implementation, not authorized, quota


class Config(BridgeConfig):
    """``[[sinks.mqtt]]``: keys beyond those of every bridge.

    Attributes:
        url: ``mqtt://host:port`` (default port 1883) or ``mqtts://host:port`` (TLS, 8883).
        topic: the topic template: ``{topic}``, ``{measurement}``, ``{device}`` are the
            record's (``+``, ``#`` in them become ``_``).
        qos: 0 (at most once) or 1 (at least once: each message waits for its PUBACK).
        retain: publish with the retain flag (the broker keeps the last message per topic).
        client_id: default ``plantbus-<node>-<sink name>``.
        protocol: MQTT ``3.1.1`` or ``5``.
        keepalive: seconds between pings when idle.
    """

    url: str = "mqtt://127.0.0.1:1883"
    topic: str = "{topic}"
    qos: Literal[0, 1] = 1
    retain: bool = False
    client_id: str = ""
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    keepalive: int = Field(default=30, ge=5, le=65535)

    @field_validator("topic")
    @classmethod
    def _check_topic(cls, v: str) -> str:
        if not v or "+" in v or "#" in v or "\0" in v:
            raise ValueError("an MQTT topic to publish to is not empty and has no + # or NUL")
        return check_template(v)

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f'invalid url {v!r}: use "mqtt://host:port" or "mqtts://host:port"')
        if parts.path not in ("", "/") or parts.query or parts.username:
            raise ValueError(
                f"invalid url {v!r}: just scheme, host and port (credentials go in "
                "username/password)"
            )
        try:
            _ = parts.port
        except ValueError as e:
            raise ValueError(f"invalid url {v!r}: {e}") from None
        return v

    @model_validator(mode="after")
    def _check_tls(self) -> Config:
        if self.tls is not None and not self.url.startswith("mqtts:"):
            raise ValueError("tls is set but the url is not mqtts://")
        return self

    def templates(self) -> dict[str, str]:
        return {"topic": self.topic}

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)


def _mqtt_value(v: str) -> str:
    return v.replace("+", "_").replace("#", "_").replace("\0", "_")


class MqttSink(BridgeCounters):
    """Publishes encoded batches to one MQTT broker.

    Attributes:
        connects: successful connections (the first and every reconnect).
        messages_out / records_out / resent_records: see ``Delivery``.
    """

    def __init__(self, config: Config, name: str = "mqtt", client_id: str = "plantbus"):
        self.config = config
        self.name = name
        self.codec = config.codec
        self.client_id = config.client_id or client_id
        template = Template(config.topic)

        def target_of(rk: RecordKey) -> str:
            return template.render({k: _mqtt_value(v) for k, v in rk.values().items()})

        self._splitter: Splitter[str] = Splitter(
            config.codec,
            target_of,
            needs_device="device" in template.fields,
            max_records=config.max_records,
            max_bytes=config.max_message_bytes,
            fixed=config.topic if template.static else None,
            sealer=sealer_of(config.encrypt),
        )
        self._delivery = Delivery()
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lost: str | None = None  # why the current client's connection ended
        self._connack: asyncio.Future[Any] | None = None
        self._pending: dict[int, asyncio.Future[None]] = {}
        self.connects = 0

    # -- counters ------------------------------------------------------------------------------

    # -- paho callbacks (paho's thread) -> the event loop -----------------------------------

    def _to_loop(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(fn, *args)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self._to_loop(self._connected, client, rc)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self._to_loop(self._disconnected, client, str(rc))

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        self._to_loop(self._published, client, mid, rc)

    # -- on the event loop -------------------------------------------------------------------

    def _connected(self, client: Any, rc: Any) -> None:
        fut = self._connack
        if client is self._client and fut is not None and not fut.done():
            fut.set_result(rc)

    def _disconnected(self, client: Any, reason: str) -> None:
        if client is not self._client:
            return
        self._lost = reason or "connection closed"
        error = RetryableSinkError(f"MQTT connection to {self.config.url} lost: {self._lost}")
        fut = self._connack
        if fut is not None and not fut.done():
            fut.set_exception(error)
        pending, self._pending = self._pending, {}
        for f in pending.values():
            if not f.done():
                f.set_exception(error)

    def _published(self, client: Any, mid: int, rc: Any) -> None:
        if client is not self._client:
            return
        fut = self._pending.pop(mid, None)
        if fut is None or fut.done():
            return
        if getattr(rc, "is_failure", False):
            text = f"broker refused the message: {rc}"
            value = int(getattr(rc, "value", 0x80))
            error: Exception = (
                RetryableSinkError(text)
                if value in _RETRYABLE_REASONS
                else PermanentSinkError(text)
            )
            fut.set_exception(error)
        else:
            fut.set_result(None)

    # -- the Sink protocol -------------------------------------------------------------------

    def _new_client(self) -> Any:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        cfg = self.config
        v5 = cfg.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if v5 else True,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            reconnect_on_failure=False,  # the sink reconnects, so nothing is sent twice unseen
        )
        if cfg.username is not None:
            password = cfg.password.get_secret_value() if cfg.password is not None else None
            client.username_pw_set(cfg.username, password)
        if cfg.url.startswith("mqtts:"):
            if cfg.tls is not None:
                client.tls_set_context(ssl_context(cfg.tls))
                if not cfg.tls.verify:
                    client.tls_insecure_set(True)
            else:
                client.tls_set_context(None)  # the system's CAs
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    async def connect(self) -> None:
        """Connect a new client and wait for the broker's CONNACK."""
        import paho.mqtt.client as mqtt

        await self._teardown()
        cfg = self.config
        loop = self._loop = asyncio.get_running_loop()
        client = self._new_client()
        self._client = client
        self._lost = None
        self._connack = loop.create_future()
        # connect() resolves, opens the socket and does the TLS handshake: blocking work
        attempt = loop.run_in_executor(None, client.connect, cfg.host, cfg.port, cfg.keepalive)
        try:
            try:
                await asyncio.shield(attempt)
            except (OSError, ValueError) as e:
                raise RetryableSinkError(f"cannot connect to {cfg.url}: {describe(e)}") from e
            if client.loop_start() != mqtt.MQTT_ERR_SUCCESS:
                raise RetryableSinkError(f"cannot start the MQTT network loop for {cfg.url}")
            rc = await self._connack
        except BaseException:
            # a cancelled connect may still be running in its thread: end the client after it
            attempt.add_done_callback(lambda _: loop.run_in_executor(None, _stop_client, client))
            self._client = None
            raise
        if getattr(rc, "is_failure", False):
            await self._teardown()
            raise RetryableSinkError(
                f"{cfg.url} refused the connection: {rc} (check username, password, client "
                "certificate and the broker's ACL)"
            )
        self.connects += 1
        log.debug("sink %s: connected to %s as %s", self.name, cfg.url, self.client_id)

    async def write(self, batch: EncodedBatch) -> None:
        """Publish the messages of ``batch`` and wait until the broker acknowledged all."""
        todo = self._delivery.start(batch, self._splitter.split)
        if not todo:  # every message was acknowledged by an earlier attempt
            self._delivery.done()
            return
        if self._client is None or self._lost is not None:
            await self.connect()  # raises RetryableSinkError while the broker is away
        import paho.mqtt.client as mqtt

        client = self._client
        loop = asyncio.get_running_loop()
        messages = self._delivery.messages
        cfg = self.config
        waiting: list[tuple[int, asyncio.Future[None]]] = []
        try:
            for i in todo:
                m = messages[i]
                self._delivery.sent(i)
                # paho's loop thread sends it; its PUBACK comes back through call_soon_threadsafe
                # and so is handled after this loop has registered the future
                info = client.publish(m.target, m.payload, cfg.qos, cfg.retain)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    if info.rc == mqtt.MQTT_ERR_PAYLOAD_SIZE:
                        raise PermanentSinkError(
                            f"message of {len(m.payload)} bytes is too large for MQTT; lower "
                            "max_message_bytes"
                        )
                    self._lost = self._lost or mqtt.error_string(info.rc)
                    raise RetryableSinkError(
                        f"publishing to {cfg.url} failed: {mqtt.error_string(info.rc)}"
                    )
                fut: asyncio.Future[None] = loop.create_future()
                self._pending[info.mid] = fut
                waiting.append((i, fut))
            for i, fut in waiting:
                await fut
                self._delivery.acked(i)
        except BaseException:
            for i, fut in waiting:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._delivery.acked(i)
                elif not fut.done():
                    fut.cancel()
            raise
        self._delivery.done()

    async def _teardown(self) -> None:
        client, self._client = self._client, None
        self._pending = {}
        if client is not None:
            await asyncio.to_thread(_stop_client, client)

    async def close(self) -> None:
        """Disconnect cleanly (every written batch was acknowledged already)."""
        await self._teardown()

    def __repr__(self) -> str:
        return f"MqttSink({self.name!r}, {self.config.url!r}, topic={self.config.topic!r})"


def _stop_client(client: Any) -> None:
    """Send DISCONNECT if connected and end paho's network thread (blocking, quick)."""
    with contextlib.suppress(Exception):
        client.disconnect()
    if threading.current_thread() is not getattr(client, "_thread", None):
        with contextlib.suppress(Exception):
            client.loop_stop()


def build(config: Config, ctx: BuildContext) -> MqttSink:
    """Build the sink (nothing is contacted until the outlet connects it)."""
    name = config.name or "mqtt"
    return MqttSink(config, name, client_id=f"plantbus-{ctx.node_name}-{name}")
