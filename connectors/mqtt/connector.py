"""The ``mqtt`` device: subscribe to a broker, decode each message, emit records per burst.

paho-mqtt runs its network loop on its own thread. The bridge into asyncio is one deque and one
event: paho's ``on_message`` appends the message and wakes the event loop only when it is not
already woken (one ``call_soon_threadsafe`` per burst, not per message); the device's task
takes everything waiting, decodes it, and emits one batch per plantbus topic. paho's thread
never waits for the event loop, so back-pressure from the bus cannot deadlock it:

* QoS 1/2 messages are acknowledged (``manual_ack``) only once their records are on the bus.
  Until then the broker's flow control (its in-flight window) holds back further QoS 1/2
  messages, and with a persistent session, what was not acknowledged before a crash or a lost
  connection is delivered again (at least once).
* QoS 0 messages have no flow control: beyond ``max_pending`` waiting messages they are
  dropped and counted (``dropped``).

A lost connection, a refused CONNECT or SUBSCRIBE, or no CONNACK within ``connect_timeout``
raises: the runtime's supervisor logs it, backs off and calls ``run`` again with a new client.
Decoding state (Sparkplug births, caches) lives on the connector and survives that.

Malformed payloads (``PayloadError``) and undecodable values are counted and logged once per
burst (at most every ``LOG_EVERY`` seconds, with the count since the last line); they never
stop the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from typing import Any

from plantbus.broker.commands import CMD_PREFIX
from plantbus.broker.connector import BuildContext, Emit
from plantbus.broker.ids import new_ids
from plantbus.broker.record import FieldValue, Quality, Record, Series
from plantbus.broker.topics import matches, validate_topic
from plantbus.codecs.payload import PayloadError, Row, preview
from plantbus.connectors.mqtt.config import Config, Subscription, Template

__all__ = ["BURST_MAX", "LOG_EVERY", "MqttConnector", "build", "ssl_context"]

log = logging.getLogger("plantbus.connectors.mqtt")

BURST_MAX = 20_000
"""Messages decoded per turn at most; the rest wait for the next turn (keeps latency flat)."""
LOG_EVERY = 5.0
"""Seconds between two log lines about malformed payloads of one device."""
_CACHE_MAX = 10_000  # routes (per MQTT topic) and series kept per subscription
_SPARKPLUG_TAGS = ("group_id", "edge_node_id", "device_id")


def ssl_context(cfg: Config) -> ssl.SSLContext:
    """The TLS client context of the device's ``tls`` table (system CAs without one)."""
    tls = cfg.tls
    ctx = ssl.create_default_context(cafile=str(tls.ca) if tls and tls.ca else None)
    if tls is not None and tls.certificate:
        ctx.load_cert_chain(str(tls.certificate), str(tls.private_key) if tls.private_key else None)
    if tls is not None and not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _quality(code: int) -> Quality:
    severity = code & 0xC0000000
    if severity == 0x80000000 or severity == 0xC0000000:
        return Quality.BAD
    return Quality.UNCERTAIN if severity == 0x40000000 else Quality.GOOD


class _Route:
    """Where the messages of one MQTT topic (or Sparkplug entity) go."""

    __slots__ = ("field", "measurement", "series", "tags", "topic")

    def __init__(self, topic: str, measurement: str, tags: dict[str, str], field: str):
        self.topic = topic
        self.measurement = measurement
        self.tags = tags
        self.field = field
        self.series = Series(topic, measurement, tags)


class _Sub:
    """A subscription with its templates, decoder and caches."""

    def __init__(self, index: int, cfg: Subscription, conn: MqttConnector):
        self.index = index
        self.cfg = cfg
        self.codec = cfg.codec
        flt = cfg.filter
        if flt.startswith("$share/"):
            flt = flt.split("/", 2)[2]
        self.match_filter = flt
        sp = cfg.codec == "sparkplug_b"
        names = _SPARKPLUG_TAGS if sp else ()
        self.topic = Template(cfg.topic, names) if cfg.topic is not None else None
        self.measurement = Template(cfg.measurement, names) if cfg.measurement is not None else None
        self.tags = {k: Template(v, names) for k, v in cfg.tags.items()}
        self.field = Template(cfg.field)
        self.routes: dict[Any, _Route] = {}
        self.decoder: Any = None
        if cfg.codec == "json":
            from plantbus.codecs.json_fields import JsonFieldsDecoder
            from plantbus.codecs.payload import TimeSpec

            self.decoder = JsonFieldsDecoder(
                cfg.json_fields(), cfg.time, TimeSpec(cfg.time_format, cfg.timezone)
            )
        elif cfg.codec == "sparkplug_b":
            from plantbus.codecs.sparkplug import SparkplugDecoder

            self.decoder = SparkplugDecoder()
        elif cfg.codec == "line_protocol":
            from plantbus.codecs.payload import TIME_UNITS

            self.precision = TIME_UNITS[cfg.precision]
        self.conn = conn

    def route(self, topic: str, extra: dict[str, str] | None = None, key: Any = None) -> _Route:
        """The route of an MQTT topic (Sparkplug: of an entity), cached.

        Raises:
            LookupError: a template names a level the topic does not have.
            ValueError: the rendered plantbus topic is not a valid topic.
        """
        key = topic if key is None else key
        r = self.routes.get(key)
        if r is not None:
            return r
        conn = self.conn
        levels = topic.split("/")
        if self.topic is not None:
            plant_topic = self.topic.render(levels, topic, extra).rstrip("/")
        elif extra is not None:  # Sparkplug default: device topic / group / node [/ device]
            parts = [conn.topic, extra["group_id"], extra["edge_node_id"], extra["device_id"]]
            plant_topic = "/".join(p for p in parts if p)
        else:
            plant_topic = conn.topic
        validate_topic(plant_topic)
        if plant_topic.startswith("$"):
            raise ValueError(f"topic {plant_topic!r} would be a system topic ($...)")
        if self.cfg.commands:
            # the device's command topic: the command router writes these records
            plant_topic = CMD_PREFIX + plant_topic
        measurement = (
            self.measurement.render(levels, topic, extra)
            if self.measurement is not None
            else conn.measurement
        )
        tags = dict(conn.base_tags)
        if extra is not None:
            tags.update(extra)
        for k, t in self.tags.items():
            tags[k] = t.render(levels, topic, extra)
        tags["device"] = conn.name
        field = self.field.render(levels, topic, extra) if self.codec == "number" else ""
        if len(self.routes) >= _CACHE_MAX:
            self.routes.clear()
        r = self.routes[key] = _Route(plant_topic, measurement, tags, field)
        return r


class _Burst:
    """What one turn of decoding noticed, for counters and one log line per kind."""

    __slots__ = ("malformed", "malformed_first", "problem_first", "problems", "unmapped")

    def __init__(self) -> None:
        self.malformed = 0
        self.malformed_first = ""
        self.problems = 0
        self.problem_first = ""
        self.unmapped = 0


class MqttConnector:
    """An MQTT subscriber device (see the module doc).

    Attributes:
        name: the device name.
        received: messages taken from the broker.
        emitted: records whose emit returned.
        malformed: payloads that could not be decoded at all.
        problems: values that could not be decoded (wrong type, unknown Sparkplug alias, …),
            the rest of their payload kept.
        unmapped: messages whose topic did not fit the topic / tag templates.
        dropped: QoS 0 messages dropped because ``max_pending`` were waiting.
        bursts: turns of decoding (messages / bursts is the batch size handed to emit).
        connected: connected and subscribed; ``ready`` is the same as an ``asyncio.Event``.
    """

    def __init__(self, config: Config, ctx: BuildContext):
        self.name = config.name
        self.config = config
        self.topic = ctx.topic(config)
        validate_topic(self.topic)
        self.measurement = ctx.measurement(config)
        self.base_tags = ctx.series_tags(config)
        self.client_id = config.client_id or f"plantbus-{ctx.node_name}-{config.name}"
        self.subs = [_Sub(i, s, self) for i, s in enumerate(config.subscriptions)]
        self._match_cache: dict[str, _Sub | None] = {}
        self._series: dict[tuple[Any, ...], Series] = {}
        self._last_ns = 0
        self._last_log = {"malformed": -LOG_EVERY, "problems": -LOG_EVERY}
        self._since_log = {"malformed": 0, "problems": 0}
        self.received = 0
        self.emitted = 0
        self.malformed = 0
        self.problems = 0
        self.unmapped = 0
        self.dropped = 0
        self.bursts = 0
        self.connected = False
        self.ready = asyncio.Event()  # set while connected and subscribed (tests, metrics)

    # -- decoding (no I/O: the tests drive it directly too) ----------------------------------

    def _sub_for(self, topic: str) -> _Sub | None:
        sub = self._match_cache.get(topic, False)
        if sub is False:
            sub = next((s for s in self.subs if matches(s.match_filter, topic)), None)
            if len(self._match_cache) >= _CACHE_MAX:
                self._match_cache.clear()
            self._match_cache[topic] = sub
        return sub  # type: ignore[return-value]

    def decode(
        self, messages: list[tuple[str, bytes, int]], burst: _Burst | None = None
    ) -> list[list[Record]]:
        """Records of a burst of ``(mqtt topic, payload, receive ns)``, one list per topic."""
        burst = burst or _Burst()
        items: list[tuple[Series, dict[str, FieldValue], int, dict[str, int] | None]] = []
        add = items.append
        for topic, payload, recv_ns in messages:
            sub = self._sub_for(topic)
            if sub is None:
                burst.unmapped += 1
                continue
            try:
                if sub.codec == "sparkplug_b":
                    pairs, problems = sub.decoder.decode(topic, payload, recv_ns)
                    for entity, row in pairs:
                        extra = dict(zip(_SPARKPLUG_TAGS, entity, strict=True))
                        route = sub.route(topic, extra, key=entity)
                        add((route.series, row.fields, row.time_ns or recv_ns, row.status))
                else:
                    route = sub.route(topic)
                    problems = []
                    if sub.codec == "json":
                        rows, problems = sub.decoder.decode(payload)
                    elif sub.codec == "number":
                        from plantbus.codecs.payload import decode_number

                        rows = [Row({route.field: decode_number(payload, sub.cfg.type)})]
                    else:
                        rows = self._lp_rows(sub, payload, recv_ns)
                    for i, row in enumerate(rows):
                        series = route.series
                        if row.tags is not None or (
                            row.measurement is not None and sub.measurement is None
                        ):
                            series = self._lp_series(route, row, sub)
                        # rows without a source time get the receive time, 1 ns apart
                        t = row.time_ns if row.time_ns is not None else recv_ns + i
                        add((series, row.fields, t, row.status))
            except PayloadError as e:
                burst.malformed += 1
                if not burst.malformed_first:
                    burst.malformed_first = (
                        f"topic {topic!r} ({sub.codec}): {e}; payload {preview(payload)}"
                    )
                continue
            except (LookupError, ValueError) as e:
                burst.unmapped += 1
                if not burst.malformed_first:
                    burst.malformed_first = f"topic {topic!r}: {e}"
                continue
            if problems:
                burst.problems += len(problems)
                if not burst.problem_first:
                    burst.problem_first = f"topic {topic!r}: {problems[0]}"
        return self._records(items)

    def _lp_rows(self, sub: _Sub, payload: bytes, recv_ns: int) -> list[Row]:
        from plantbus.codecs.line_protocol_decoder import decode

        return [
            Row(dict(p.fields), p.time_ns, p.measurement, p.tags or None)
            for p in decode(payload, sub.precision, recv_ns)
        ]

    def _lp_series(self, route: _Route, row: Row, sub: _Sub) -> Series:
        measurement = route.measurement if sub.measurement is not None else row.measurement
        key = (route.topic, measurement, route.series.tags, row.tags)
        s = self._series.get(key)
        if s is None:
            tags = dict(row.tags or ())
            tags.update(route.tags)  # configured tags and `device` win over the payload's
            if len(self._series) >= _CACHE_MAX:
                self._series.clear()
            s = self._series[key] = Series(route.topic, measurement or route.measurement, tags)
        return s

    def _records(
        self, items: list[tuple[Series, dict[str, FieldValue], int, dict[str, int] | None]]
    ) -> list[list[Record]]:
        if not items:
            return []
        ids = new_ids(len(items))
        out: dict[str, list[Record]] = {}
        for (series, fields, t, status), uid in zip(items, ids, strict=True):
            rec = Record(series, fields, t, uid)
            if status:
                for point, code in status.items():
                    rec.mark(point, _quality(code), code)
            batch = out.get(series.topic)
            if batch is None:
                batch = out[series.topic] = []
            batch.append(rec)
        return list(out.values())

    def _report(self, burst: _Burst) -> None:
        """Count a burst's troubles and log them: one line per kind, at most every LOG_EVERY."""
        self.malformed += burst.malformed
        self.unmapped += burst.unmapped
        self.problems += burst.problems
        now = time.monotonic()
        bad = burst.malformed + burst.unmapped
        if bad:
            self._since_log["malformed"] += bad
            if now - self._last_log["malformed"] >= LOG_EVERY:
                n = self._since_log["malformed"]
                log.warning(
                    "mqtt device %s: %d payload%s could not be decoded; first: %s",
                    self.name,
                    n,
                    "" if n == 1 else "s",
                    burst.malformed_first,
                )
                self._last_log["malformed"] = now
                self._since_log["malformed"] = 0
        if burst.problems:
            self._since_log["problems"] += burst.problems
            if now - self._last_log["problems"] >= LOG_EVERY:
                n = self._since_log["problems"]
                log.warning(
                    "mqtt device %s: %d value%s could not be decoded; first: %s",
                    self.name,
                    n,
                    "" if n == 1 else "s",
                    burst.problem_first,
                )
                self._last_log["problems"] = now
                self._since_log["problems"] = 0

    # -- the connection ------------------------------------------------------------------------

    async def run(self, emit: Emit) -> None:
        """Connect, subscribe, and emit the records of every burst of messages until cancelled.

        Raises:
            ConnectionError: the broker refused the connection or a subscription, did not
                answer within ``connect_timeout``, or the connection was lost.
            OSError: the broker could not be reached.
        """
        session = _Session(self, asyncio.get_running_loop())
        try:
            await session.connect()
            await session.subscribe()
            self.connected = True
            self.ready.set()
            log.info(
                "mqtt device %s: connected to %s, %d subscription%s",
                self.name,
                self.config.url,
                len(self.subs),
                "" if len(self.subs) == 1 else "s",
            )
            while True:
                await session.wake.wait()
                await self._turn(session, emit)
                if session.lost is not None and not session.inbox:
                    raise ConnectionError(
                        f"mqtt connection to {self.config.url} lost: {session.lost}"
                    )
        finally:
            self.connected = False
            self.ready.clear()
            await session.close()

    async def _turn(self, session: _Session, emit: Emit) -> None:
        session.wake.clear()
        session.woken = False  # before draining: a message appended after this wakes us again
        inbox = session.inbox
        n = min(len(inbox), BURST_MAX)
        if n == 0:
            return
        if n < len(inbox):
            session.wake.set()  # more than one turn's worth: come back at once
        popleft = inbox.popleft
        taken = [popleft() for _ in range(n)]
        self.received += n
        self.bursts += 1
        burst = _Burst()
        batches = self.decode([(t, p, r) for t, p, _, _, r in taken], burst)
        for records in batches:
            await emit(records)
            self.emitted += len(records)
        # acknowledged only now that the records are on the bus (MQTT wants acks in order)
        for _, _, qos, mid, _ in taken:
            if qos:
                session.ack(mid, qos)
        self._report(burst)


class _Session:
    """One broker connection: a paho client on its own network thread, bridged to asyncio."""

    def __init__(self, conn: MqttConnector, loop: asyncio.AbstractEventLoop):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        cfg = conn.config
        self.conn = conn
        self.loop = loop
        self.v5 = cfg.protocol == "5"
        self.inbox: deque[tuple[str, bytes, int, int, int]] = deque()
        self.wake = asyncio.Event()
        self.woken = False
        self.lost: str | None = None
        self.connack: asyncio.Future[Any] = loop.create_future()
        self.suback: asyncio.Future[Any] = loop.create_future()
        self._started = False
        kwargs: dict[str, Any] = {
            "callback_api_version": CallbackAPIVersion.VERSION2,
            "client_id": conn.client_id,
            "protocol": mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            "manual_ack": True,
            # a lost connection ends this session; the supervisor builds the next one
            "reconnect_on_failure": False,
        }
        if not self.v5:
            kwargs["clean_session"] = not cfg.persistent_session
        client = mqtt.Client(**kwargs)
        if cfg.username is not None:
            password = cfg.password.get_secret_value() if cfg.password is not None else None
            client.username_pw_set(cfg.username, password)
        if cfg.use_tls:
            client.tls_set_context(ssl_context(cfg))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self.client = client
        self._max_pending = cfg.max_pending

    # paho's thread ------------------------------------------------------------------------

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        qos = msg.qos
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            # MQTT topics are UTF-8; a broker that lets another through gets it counted
            self.conn.malformed += 1
            if qos:
                self.loop.call_soon_threadsafe(self.ack, msg.mid, qos)
            return
        if not qos and len(self.inbox) >= self._max_pending:
            self.conn.dropped += 1
            return
        self.inbox.append((topic, msg.payload, qos, msg.mid, time.time_ns()))
        if not self.woken:
            self.woken = True
            self.loop.call_soon_threadsafe(self.wake.set)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.loop.call_soon_threadsafe(_resolve, self.connack, rc)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        self.loop.call_soon_threadsafe(_resolve, self.suback, list(codes))

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.loop.call_soon_threadsafe(self._lost, str(rc))

    # the event loop -------------------------------------------------------------------------

    def _lost(self, reason: str) -> None:
        self.lost = reason
        if not self.connack.done():
            self.connack.set_exception(ConnectionError(f"disconnected before CONNACK: {reason}"))
        if not self.suback.done():
            self.suback.set_exception(ConnectionError(f"disconnected before SUBACK: {reason}"))
        self.wake.set()

    def ack(self, mid: int, qos: int) -> None:
        if self.lost is None:
            self.client.ack(mid, qos)

    async def connect(self) -> None:
        cfg = self.conn.config
        kwargs: dict[str, Any] = {}
        if self.v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            if cfg.persistent_session:
                props.SessionExpiryInterval = min(int(cfg.session_expiry), 0xFFFFFFFF)
            kwargs = {"clean_start": not cfg.persistent_session, "properties": props}
        # connect() resolves the name, opens the socket and does the TLS handshake: blocking
        await self.loop.run_in_executor(
            None,
            lambda: self.client.connect(cfg.host, cfg.port, round(cfg.keepalive), **kwargs),
        )
        self.client.loop_start()
        self._started = True
        try:
            rc = await asyncio.wait_for(self.connack, cfg.connect_timeout)
        except TimeoutError:
            raise ConnectionError(
                f"no CONNACK from {cfg.url} within {cfg.connect_timeout:g}s"
            ) from None
        if rc.is_failure:
            raise ConnectionError(f"broker {cfg.url} refused the connection: {rc}")

    async def subscribe(self) -> None:
        cfg = self.conn.config
        subs = []
        for s in self.conn.subs:
            qos = s.cfg.qos if s.cfg.qos is not None else cfg.qos
            if self.v5:
                from paho.mqtt.subscribeoptions import SubscribeOptions

                subs.append((s.cfg.filter, SubscribeOptions(qos=qos)))
            else:
                subs.append((s.cfg.filter, qos))
        self.client.subscribe(subs)
        try:
            codes = await asyncio.wait_for(self.suback, cfg.connect_timeout)
        except TimeoutError:
            raise ConnectionError(
                f"no SUBACK from {cfg.url} within {cfg.connect_timeout:g}s"
            ) from None
        refused = [
            f"{flt!r} ({code})"
            for (flt, _), code in zip(subs, codes, strict=False)
            if getattr(code, "is_failure", False) or getattr(code, "value", 0) >= 0x80
        ]
        if refused:
            raise ConnectionError(
                f"broker {cfg.url} refused the subscription to {', '.join(refused)}"
            )

    async def close(self) -> None:
        client = self.client
        with contextlib.suppress(Exception):
            client.disconnect()
        if self._started:
            # loop_stop joins paho's thread: off the event loop
            await asyncio.shield(self.loop.run_in_executor(None, client.loop_stop))


def _resolve(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def build(config: Config, ctx: BuildContext) -> MqttConnector:
    """Build an ``mqtt`` device from its config."""
    return MqttConnector(config, ctx)
