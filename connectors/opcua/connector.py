"""The ``opcua`` device: polls or subscribes to variables of an OPC UA server (asyncua).

One ``run`` holds the connection for the device's life: it connects (``connections``
sessions), reads or subscribes until something fails, then drops the connection and connects
afresh after a jittered backoff (``reconnect_initial`` … ``reconnect_max``). Every fault,
a timeout included, ends with a new connection and new subscriptions, so a late answer is
never taken for a newer request and a restarted server gets its monitored items back.

Poll mode reads all points on a fixed-rate schedule with batched Read requests of
DataValues, chunked by the server's ``MaxNodesPerRead`` (else ``chunk_size``), and emits the
records of one read at once. Subscribe mode creates one subscription per session with one
monitored item per point and emits the records of each publish response at once.

Write-back (``write``): the points of a command go out in one Write request on the first
session of the current connection, each value in a Variant of the variable's own DataType
(read from the server once per connection and kept). A Bad status of a point is that
point's ``device error: <status name>``; no answer within ``timeout`` answers every point
``timeout: …`` and tears the connection down, as any other timeout does. With
``read_back`` the written variables' Values are then read in one Read request (MaxAge 0:
from the device, not a cache) and decoded as a poll decodes them; a Bad status is that
point's read-back error, not a failed write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol

from asyncua import Client, ua
from asyncua.ua.uaerrors import UaStatusCodeError

from plantbus.broker.backoff import Backoff
from plantbus.broker.cancel import raise_if_cancelling
from plantbus.broker.connector import BuildContext, Emit, WritePoint, WriteResult
from plantbus.broker.ids import new_id
from plantbus.broker.record import FieldValue, Record, Series
from plantbus.broker.schedule import FixedRate, PolledCounters
from plantbus.broker.supervisor import describe_error
from plantbus.broker.topics import validate_topic
from plantbus.connectors.opcua import session
from plantbus.connectors.opcua.config import Config, NodeRef
from plantbus.connectors.opcua.decode import (
    BAD_NOT_CONNECTED,
    BAD_TIMEOUT,
    Decoder,
    Unsupported,
    field_value,
    quality_of,
)
from plantbus.connectors.opcua.security import ClientIdentity, SecurityError, load_identity

__all__ = ["OpcUaConnector", "PublishHandler"]

log = logging.getLogger("plantbus.opcua")

BAD_SECURITY_CHECKS_FAILED = 0x80130000
READ_WAVE = 16
"""Read requests one session keeps in flight at most (chunks beyond wait their turn)."""
SUBSCRIPTION_QUEUE = 64
"""Publish responses decoded but not yet emitted; beyond, the publish loop waits (back-pressure)."""
MIN_LIFETIME = 60.0
"""Seconds a subscription outlives a silent client (e.g. held up by back-pressure)."""

_NODE_TYPES = {
    "i": ua.NodeIdType.Numeric,
    "s": ua.NodeIdType.String,
    "g": ua.NodeIdType.Guid,
    "b": ua.NodeIdType.ByteString,
}
_INTEGER_RANGES = {
    ua.VariantType.SByte: (-(2**7), 2**7 - 1),
    ua.VariantType.Byte: (0, 2**8 - 1),
    ua.VariantType.Int16: (-(2**15), 2**15 - 1),
    ua.VariantType.UInt16: (0, 2**16 - 1),
    ua.VariantType.Int32: (-(2**31), 2**31 - 1),
    ua.VariantType.UInt32: (0, 2**32 - 1),
    ua.VariantType.Int64: (-(2**63), 2**63 - 1),
    ua.VariantType.UInt64: (0, 2**64 - 1),
}
_FLOAT_MAX = 3.4028234663852886e38
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_UNKNOWN_NAMESPACE = 65535  # no server has it, so a point with an unknown URI reads as Bad
_TIMESTAMPS = {
    "source": ua.TimestampsToReturn.Both,  # source, falling back to the server's
    "server": ua.TimestampsToReturn.Server,
    "read": ua.TimestampsToReturn.Neither,
}


class PublishHandler(Protocol):
    """Receives every publish response of one subscription (data changes or keep-alives)."""

    async def on_publish(self, result: ua.PublishResult) -> None: ...


class _Link:
    """One session of the device and the slice of points it serves.

    ``lost`` is shared by the sessions of one connection: any of them failing ends all.
    """

    def __init__(self, client: Client, points: range, lost: asyncio.Event):
        self.client = client
        self.points = points
        self.reason = ""
        self.lost = lost
        self.requests: list[ua.ReadParameters] = []  # poll mode: the Read of its points

    def lose(self, reason: str) -> None:
        if not self.reason:
            self.reason = reason
        self.lost.set()

    def check(self) -> None:
        if self.reason:
            raise ConnectionError(self.reason)

    async def read(self, requests: list[ua.ReadParameters], expected: int) -> list[ua.DataValue]:
        """The results of ``requests`` (the chunks of one read), concatenated in order."""
        read = self.client.uaclient.read
        if len(requests) == 1:
            out = await read(requests[0])
        else:
            out = []
            for w in range(0, len(requests), READ_WAVE):
                parts = await asyncio.gather(*(read(r) for r in requests[w : w + READ_WAVE]))
                for part in parts:
                    out.extend(part)
        if len(out) != expected:
            raise ConnectionError(f"the server answered {len(out)} values for {expected} nodes")
        return out


class _Subscriber:
    """The ``PublishHandler`` of one session: decodes each response into one batch of records.

    The batches go through a bounded queue to ``run``, which emits them; while the queue is
    full this handler waits, and so does asyncua's publish loop (back-pressure up to the
    server's queues). ``waiting`` tells the silence check that the quiet is ours.
    """

    def __init__(
        self,
        link: _Link,
        names: Sequence[str],
        decoder: Decoder,
        queue: asyncio.Queue[tuple[list[Record], int]],
        clock: Callable[[], float],
        time_ns: Callable[[], int],
    ):
        self.link = link
        self.names = names
        self.decoder = decoder
        self.queue = queue
        self.clock = clock
        self.time_ns = time_ns
        self.last = clock()
        self.silence = math.inf  # set from the revised publishing interval and keep-alive
        self.waiting = False
        self.responses = 0
        self.subscription_id = 0
        self.items: dict[int, int] = {}  # point index -> MonitoredItemId

    async def on_publish(self, result: ua.PublishResult) -> None:
        self.last = self.clock()
        self.responses += 1
        data = result.NotificationMessage.NotificationData
        if not data:
            return  # a keep-alive
        try:
            items: list[ua.MonitoredItemNotification] = []
            for n in data:
                if isinstance(n, ua.DataChangeNotification):
                    items += n.MonitoredItems
                elif isinstance(n, ua.StatusChangeNotification) and n.Status.value >= 0x80000000:
                    self.link.lose(f"the subscription ended: {session.status_name(n.Status.value)}")
                    return
            if not items:
                return
            names = self.names
            records = self.decoder.records(
                ((names[it.ClientHandle], it.Value) for it in items), self.time_ns()
            )
        except Exception as e:  # never let asyncua swallow it: reconnect and say why
            self.link.lose(f"cannot decode a publish response: {describe_error(e)}")
            return
        self.waiting = True
        try:
            await self.queue.put((records, len(items)))
        finally:
            self.waiting = False
            self.last = self.clock()

    def check(self) -> None:
        if not self.waiting and self.clock() - self.last > self.silence:
            raise TimeoutError(f"no publish response (data or keep-alive) for {self.silence:.1f}s")


class OpcUaConnector(PolledCounters):
    """Reads the configured points of one OPC UA server (see the module doc).

    Attributes:
        name: the device name.
        series: the one Series of all its records.
        point_names: field names, in config order.
        connected: a session is up and serving.
        connects: connections established (the first one included).
        last_error: the latest fault, ``"Type: message"``.
        polls: reads completed (poll mode) or publish responses with data emitted
            (subscribe mode).
        emitted: records whose emit returned.
        values: point values received (Good or not).
        overruns: polls that ended after the next one was due; ``missed``: polls skipped.
        publishing_interval: subscribe mode: the publishing interval the server granted
            (``RevisedPublishingInterval``, seconds) for the last subscription created.
    """

    def __init__(
        self,
        config: Config,
        ctx: BuildContext,
        *,
        clock: Callable[[], float] = time.monotonic,
        time_ns: Callable[[], int] = time.time_ns,
    ):
        """Build the device; reads the security files now, so their faults stop the start.

        Raises:
            SecurityError: a certificate, key or trust file cannot be used.
        """
        self.name = config.name
        self.config = config
        topic = ctx.topic(config)
        validate_topic(topic)
        self.series = Series(topic, ctx.measurement(config), ctx.series_tags(config))
        self.point_names: tuple[str, ...] = tuple(p.name for p in config.points)
        self.refs: tuple[NodeRef, ...] = tuple(p.ref for p in config.points)
        self.identity: ClientIdentity | None = (
            load_identity(config.security) if config.security is not None else None
        )
        self.decoder = Decoder(self.series, config.timestamp)
        self.interval = float(config.interval)
        self.timeout = float(config.timeout)
        self._clock = clock
        self._time_ns = time_ns
        self._split = self._slices(len(self.point_names), config.connections)
        self._node_ids: list[ua.NodeId] = []  # resolved on each connect (nsu= lookups)
        self._limits = (0, 0)  # the server's MaxNodesPerRead, MaxMonitoredItemsPerCall
        self._index = {name: i for i, name in enumerate(self.point_names)}
        self.write_points: dict[str, WritePoint] = {
            p.name: p.write_point(p.name, None, device_read_back=config.read_back)
            for p in config.points
        }
        self._links: list[_Link] = []  # the current connection's sessions (for write)
        self._types: dict[int, ua.VariantType] = {}  # point index -> its DataType, per connection
        self.writes = 0
        self.connected = False
        self.connects = 0
        self.last_error: str | None = None
        self.polls = 0
        self.emitted = 0
        self.values = 0
        self._ticks = FixedRate(self.interval, self._clock)
        self.publishing_interval: float | None = None  # seconds, as the server revised it
        session.quiet_library_logs()

    @staticmethod
    def _slices(n: int, parts: int) -> list[range]:
        size, extra = divmod(n, parts)
        out, start = [], 0
        for i in range(parts):
            end = start + size + (1 if i < extra else 0)
            out.append(range(start, end))
            start = end
        return out

    # -- the life of the device ----------------------------------------------------------------

    async def run(self, emit: Emit) -> None:
        """Connect, read or subscribe, and reconnect after any fault, until cancelled."""
        cfg = self.config
        backoff = Backoff(cfg.reconnect_initial, cfg.reconnect_max, jitter="equal")
        reported_down = False  # one all-Bad record per outage, not one per attempt
        healthy = False

        def on_healthy() -> None:
            nonlocal healthy, reported_down
            if not healthy:
                healthy = True
                reported_down = False
                backoff.reset()

        while True:
            links: list[_Link] = []
            healthy = False
            try:
                links = await self._connect()
                self._types.clear()
                self._links = links
                self.connected = True
                self.connects += 1
                if cfg.mode == "poll":
                    await self._poll(links, emit, on_healthy)
                else:
                    await self._subscribe(links, emit, on_healthy)
            except asyncio.CancelledError:
                self.connected = False
                self._links = []
                await asyncio.gather(
                    *(session.close(link.client, min(self.timeout, 2.0)) for link in links)
                )
                raise
            except Exception as exc:
                was_connected = self.connected
                self.connected = False
                self._links = []
                self.last_error = describe_error(exc)
                await asyncio.gather(*(session.drop(link.client) for link in links))
                delay = backoff.next()
                what = "lost the connection" if was_connected else "cannot connect"
                log.warning(
                    "opcua %s: %s to %s: %s; reconnecting in %.1fs",
                    self.name,
                    what,
                    cfg.url,
                    self.last_error,
                    delay,
                )
                if not reported_down:
                    reported_down = True
                    await emit(
                        [self.decoder.all_bad(self.point_names, _fault_code(exc), self._time_ns())]
                    )
                await asyncio.sleep(delay)

    async def _connect(self) -> list[_Link]:
        """Open every session (in parallel) and prepare it; all or none."""
        cfg = self.config
        links: list[_Link] = []
        lost = asyncio.Event()

        async def one(points: range) -> None:
            link: _Link | None = None

            async def on_lost(exc: Exception) -> None:
                if link is not None:
                    link.lose(f"connection lost: {describe_error(exc)}")

            client = await session.open_session(
                cfg.url,
                request_timeout=self.timeout,
                client_name=f"plantbus {self.name}",
                username=cfg.username,
                password=cfg.password.get_secret_value() if cfg.password else None,
                identity=self.identity,
                on_lost=on_lost,
            )
            link = _Link(client, points, lost)
            links.append(link)

        try:
            # gather, not a TaskGroup: on Python 3.11 a TaskGroup whose child fails while it
            # waits leaves a cancellation counted on this task, which would later read as a
            # request to stop (see broker/cancel.py)
            results = await asyncio.gather(
                *(one(points) for points in self._split), return_exceptions=True
            )
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                raise failed[0]  # the sessions fail alike (same server, same settings)
            links.sort(key=lambda link: link.points.start)
            first = links[0].client
            self._node_ids = await self._resolve(first)
            self._limits = await self._operation_limits(first)
        except BaseException:
            await asyncio.gather(*(session.drop(link.client) for link in links))
            raise
        security = f"{self.identity.policy}/{self.identity.mode}" if self.identity else "None"
        log.info(
            "opcua %s: connected to %s (security %s, %d session%s, MaxNodesPerRead %s)",
            self.name,
            cfg.url,
            security,
            len(links),
            "" if len(links) == 1 else "s",
            self._limits[0] or "not published",
        )
        return links

    async def _resolve(self, client: Client) -> list[ua.NodeId]:
        """The points' NodeIds; ``nsu=`` URIs looked up in the server's namespace array."""
        uris = {r.namespace for r in self.refs if isinstance(r.namespace, str)}
        index: dict[str, int] = {}
        if uris:
            array = await client.get_namespace_array()
            for uri in sorted(uris):
                if uri in array:
                    index[uri] = array.index(uri)
                else:
                    index[uri] = _UNKNOWN_NAMESPACE
                    log.warning(
                        "opcua %s: the server has no namespace %r; its points read as Bad",
                        self.name,
                        uri,
                    )
        out = []
        for r in self.refs:
            ns = index[r.namespace] if isinstance(r.namespace, str) else r.namespace
            out.append(ua.NodeId(r.value, ns, _NODE_TYPES[r.kind]))
        return out

    async def _operation_limits(self, client: Client) -> tuple[int, int]:
        """(MaxNodesPerRead, MaxMonitoredItemsPerCall) as the server publishes them, else 0."""
        ids = (
            ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
            ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall,
        )
        params = ua.ReadParameters(
            NodesToRead=[
                ua.ReadValueId(NodeId=ua.NodeId(i), AttributeId=ua.AttributeIds.Value) for i in ids
            ]
        )
        values = await client.uaclient.read(params)
        out = []
        for dv in values:
            v = dv.Value.Value if dv.Value is not None else None
            good = dv.StatusCode is None or dv.StatusCode.value < 0x40000000
            out.append(v if good and type(v) is int and v > 0 else 0)
        return out[0], out[1]

    def _chunk(self, server_limit: int) -> int:
        return server_limit or self.config.chunk_size

    def _read_requests(
        self, ids: list[ua.NodeId], attribute: int, timestamps: int
    ) -> list[ua.ReadParameters]:
        """Read requests of ``attribute`` of ``ids``, chunked by MaxNodesPerRead (else
        ``chunk_size``); built once per connection and sent as they are on every poll."""
        chunk = self._chunk(self._limits[0])
        return [
            ua.ReadParameters(
                MaxAge=0,
                TimestampsToReturn=timestamps,
                NodesToRead=[ua.ReadValueId(NodeId=n, AttributeId=attribute) for n in part],
            )
            for part in (ids[c : c + chunk] for c in range(0, len(ids), chunk))
        ]

    # -- write-back ---------------------------------------------------------------------------

    async def write(self, points: Mapping[str, FieldValue]) -> WriteResult:
        """Write ``points`` in one Write request (see the module doc).

        Returns:
            per point ``None`` (the server took it) or the reason it did not.
        """
        errors: dict[str, str | None] = {}
        link = self._links[0] if self._links else None
        if link is None or link.reason:
            why = f"device error: not connected to {self.config.url}"
            return WriteResult(dict.fromkeys(points, why))
        wanted: list[tuple[str, int, FieldValue]] = []
        for name, value in points.items():
            i = self._index.get(name)
            if i is None or not self.write_points[name].writable:
                errors[name] = f"refused: point {name!r} is not writable"
            else:
                wanted.append((name, i, value))
        if not wanted:
            return WriteResult(errors)
        sent: list[tuple[str, ua.WriteValue]] = []
        try:
            async with asyncio.timeout(self.timeout):
                await self._read_types(link, [i for _, i, _ in wanted if i not in self._types])
                for name, i, value in wanted:
                    vt = self._types.get(i)
                    if vt is None:
                        errors[name] = f"device error: cannot read the DataType of {self.refs[i]}"
                        continue
                    variant = _variant(name, value, vt)
                    if isinstance(variant, str):
                        errors[name] = variant
                        continue
                    sent.append(
                        (
                            name,
                            ua.WriteValue(
                                NodeId=self._node_ids[i],
                                AttributeId=ua.AttributeIds.Value,
                                Value=ua.DataValue(variant),
                            ),
                        )
                    )
                if not sent:
                    return WriteResult(errors)
                self.writes += 1
                codes = await link.client.uaclient.write(
                    ua.WriteParameters(NodesToWrite=[w for _, w in sent])
                )
        except TimeoutError:
            why = f"timeout: no answer to a write within {self.timeout:g}s"
            link.lose(why)  # as after any timeout: a new connection, never a late answer
            for name, _, _ in wanted:
                errors.setdefault(name, why)
            return WriteResult(errors)
        except UaStatusCodeError as exc:
            why = f"device error: {session.status_name(int(exc.code))}"
            for name, _, _ in wanted:
                errors.setdefault(name, why)
            return WriteResult(errors)
        except (OSError, ConnectionError, ua.UaError) as exc:
            why = f"device error: {describe_error(exc)}"
            link.lose(why)
            for name, _, _ in wanted:
                errors.setdefault(name, why)
            return WriteResult(errors)
        if len(codes) != len(sent):
            why = f"device error: the server answered {len(codes)} results for {len(sent)} writes"
            for name, _ in sent:
                errors[name] = why
            return WriteResult(errors)
        for (name, _), code in zip(sent, codes, strict=True):
            value = code.value if code is not None else 0
            errors[name] = (
                f"device error: {session.status_name(value)}" if value >= 0x80000000 else None
            )
        back = [
            (name, i)
            for name, i, _ in wanted
            if errors.get(name, "") is None and self.write_points[name].read_back
        ]
        if not back:
            return WriteResult(errors)
        values, failed = await self._read_back(link, back)
        return WriteResult(errors, values, failed)

    async def _read_back(
        self, link: _Link, points: list[tuple[str, int]]
    ) -> tuple[dict[str, FieldValue], dict[str, str]]:
        """Read the Value of ``points`` (name, index) afresh (MaxAge 0, one Read request as
        chunked by MaxNodesPerRead): their values decoded as a poll decodes them, and per
        point that could not be read the reason."""
        values: dict[str, FieldValue] = {}
        failed: dict[str, str] = {}
        ids = [self._node_ids[i] for _, i in points]
        requests = self._read_requests(ids, ua.AttributeIds.Value, ua.TimestampsToReturn.Neither)
        try:
            async with asyncio.timeout(self.timeout):
                results = await link.read(requests, len(ids))
        except TimeoutError:
            why = f"timeout: no answer to the read-back within {self.timeout:g}s"
            link.lose(why)
            return values, {name: why for name, _ in points}
        except UaStatusCodeError as exc:
            why = f"device error: {session.status_name(int(exc.code))}"
            return values, {name: why for name, _ in points}
        except (OSError, ConnectionError, ua.UaError) as exc:
            why = f"device error: {describe_error(exc)}"
            link.lose(why)
            return values, {name: why for name, _ in points}
        for (name, _), dv in zip(points, results, strict=True):
            code = dv.StatusCode.value if dv.StatusCode is not None else 0
            if code >= 0x80000000:
                failed[name] = f"device error: {session.status_name(code)}"
                continue
            try:
                values[name] = field_value(dv.Value.Value if dv.Value is not None else None)
            except Unsupported as exc:
                failed[name] = f"device error: {session.status_name(exc.code)}: {exc}"
        return values, failed

    async def _read_types(self, link: _Link, indices: list[int]) -> None:
        """Learn the VariantType each of ``indices`` is written with (kept per connection).

        The DataType attribute names a built-in type directly for most variables; for a
        subtype (an enumeration, UtcTime, Duration, …) or an abstract one (BaseDataType,
        Number) the type of the value the variable holds now is the one to send.
        """
        if not indices:
            return
        ids = [self._node_ids[i] for i in indices]
        types = await link.read(
            self._read_requests(ids, ua.AttributeIds.DataType, ua.TimestampsToReturn.Neither),
            len(ids),
        )
        unknown = []
        for i, dv in zip(indices, types, strict=True):
            node = dv.Value.Value if dv.Value is not None else None
            vt = _builtin_type(node) if isinstance(node, ua.NodeId) else None
            if vt is None:
                unknown.append(i)
            else:
                self._types[i] = vt
        if unknown:
            ids = [self._node_ids[i] for i in unknown]
            values = await link.read(
                self._read_requests(ids, ua.AttributeIds.Value, ua.TimestampsToReturn.Neither),
                len(ids),
            )
            for i, dv in zip(unknown, values, strict=True):
                if dv.Value is not None and dv.Value.VariantType != ua.VariantType.Null:
                    self._types[i] = dv.Value.VariantType

    # -- poll ---------------------------------------------------------------------------------

    async def _poll(self, links: list[_Link], emit: Emit, healthy: Callable[[], None]) -> None:
        ts = _TIMESTAMPS[self.config.timestamp]
        for link in links:
            ids = [self._node_ids[i] for i in link.points]
            link.requests = self._read_requests(ids, ua.AttributeIds.Value, ts)
        names = self.point_names
        decoder, time_ns, ticks = self.decoder, self._time_ns, self._ticks
        lost = links[0].lost
        single = links[0] if len(links) == 1 else None
        me = asyncio.current_task()
        ticks.restart()
        while True:
            raise_if_cancelling(me)
            for link in links:
                link.check()
            read_ns = time_ns()
            if single is not None:
                values = await single.read(single.requests, len(single.points))
            else:
                values = []
                reads = (link.read(link.requests, len(link.points)) for link in links)
                for part in await asyncio.gather(*reads):
                    values.extend(part)
            records = decoder.records(zip(names, values, strict=True), read_ns)
            await emit(records)
            self.polls += 1
            self.emitted += len(records)
            self.values += len(values)
            healthy()
            pause = ticks.next_pause()
            if not pause:  # flat out, or overdue: yield, then at once
                await asyncio.sleep(0)
                continue
            # a connection found broken (asyncua's watchdog) ends the wait at once.
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that arrives as its awaitable completes, and the device would not stop
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await lost.wait()

    # -- subscribe ----------------------------------------------------------------------------

    async def _subscribe(self, links: list[_Link], emit: Emit, healthy: Callable[[], None]) -> None:
        queue: asyncio.Queue[tuple[list[Record], int]] = asyncio.Queue(SUBSCRIPTION_QUEUE)
        subscribers = []
        gone: dict[int, int] = {}  # point index -> Bad code: nodes without a monitored item
        for link in links:
            sub = _Subscriber(
                link, self.point_names, self.decoder, queue, self._clock, self._time_ns
            )
            await self._create_subscription(sub)
            gone.update(await self._add_items(sub, link.points))
            subscribers.append(sub)
        if gone:
            await emit(self._marked_bad(gone, "the server refused"))
        verify_every = self.config.verify_interval
        next_verify = self._clock() + verify_every
        period = min(1.0, self.timeout / 2)  # how often the silence of the server is checked
        if verify_every > 0:
            period = min(period, verify_every)
        me = asyncio.current_task()
        while True:
            raise_if_cancelling(me)
            try:
                async with asyncio.timeout(period):  # not wait_for: see _poll
                    records, count = await queue.get()
            except TimeoutError:
                records, count = [], 0
            for link in links:
                link.check()
            for sub in subscribers:
                sub.check()
            if records:
                await emit(records)
                self.polls += 1
                self.emitted += len(records)
                self.values += count
                healthy()
            elif any(s.responses for s in subscribers):
                healthy()
            if verify_every > 0 and self._clock() >= next_verify:
                await self._verify(subscribers, gone, emit)
                next_verify = self._clock() + verify_every

    async def _create_subscription(self, sub: _Subscriber) -> None:
        # the server sends a keep-alive after this many empty publishing intervals, so a
        # silence longer than keep-alive + timeout means the server stopped answering
        keepalive = max(1, math.ceil(self.timeout / 2 / self.interval))
        lifetime = max(3 * keepalive, math.ceil(MIN_LIFETIME / self.interval))
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=self.interval * 1000,
            RequestedLifetimeCount=lifetime,
            RequestedMaxKeepAliveCount=keepalive,
            MaxNotificationsPerPublish=0,
            PublishingEnabled=True,
            Priority=0,
        )
        handler: PublishHandler = sub
        result = await sub.link.client.uaclient.create_subscription(params, handler.on_publish)
        sub.subscription_id = result.SubscriptionId
        self.publishing_interval = result.RevisedPublishingInterval / 1000
        revised = max(result.RevisedPublishingInterval, 1.0) / 1000
        sub.silence = revised * max(result.RevisedMaxKeepAliveCount, 1) + self.timeout
        sub.last = self._clock()

    async def _add_items(self, sub: _Subscriber, indices: Sequence[int]) -> dict[int, int]:
        """Create the monitored items of ``indices``; returns {index: code} of the refused."""
        ts = _TIMESTAMPS[self.config.timestamp]
        items = [self._item(i) for i in indices]
        chunk = self._chunk(self._limits[1])
        refused = {}
        for c in range(0, len(items), chunk):
            batch = items[c : c + chunk]
            created = await sub.link.client.uaclient.create_monitored_items(
                ua.CreateMonitoredItemsParameters(
                    SubscriptionId=sub.subscription_id,
                    TimestampsToReturn=ts,
                    ItemsToCreate=batch,
                )
            )
            for item, res in zip(batch, created, strict=True):
                index = item.RequestedParameters.ClientHandle
                if res.StatusCode.value >= 0x80000000:
                    refused[index] = res.StatusCode.value
                else:
                    sub.items[index] = res.MonitoredItemId
        return refused

    async def _verify(
        self, subscribers: list[_Subscriber], gone: dict[int, int], emit: Emit
    ) -> None:
        """Check that every monitored node still exists, and follow the address space.

        A server should report a deleted node on its monitored item, but not every one does
        (asyncua's own server drops the notification), which would leave the point silently
        stale. One Read of every node's NodeClass tells: a node that is gone is marked Bad; a
        node that is back (or appeared since its item was refused) gets a new monitored item.
        """
        lost: dict[int, int] = {}
        for sub in subscribers:
            link = sub.link
            indices = list(link.points)
            requests = self._read_requests(
                [self._node_ids[i] for i in indices],
                ua.AttributeIds.NodeClass,
                ua.TimestampsToReturn.Neither,
            )
            values = await link.read(requests, len(indices))
            back = []
            for i, dv in zip(indices, values, strict=True):
                code = dv.StatusCode.value if dv.StatusCode is not None else 0
                if code >= 0x80000000:
                    if i not in gone:
                        lost[i] = gone[i] = code
                elif i in gone:
                    back.append(i)
            if back:
                stale = [sub.items.pop(i) for i in back if i in sub.items]
                if stale:
                    await link.client.uaclient.delete_monitored_items(
                        ua.DeleteMonitoredItemsParameters(
                            SubscriptionId=sub.subscription_id, MonitoredItemIds=stale
                        )
                    )
                refused = await self._add_items(sub, back)
                for i in back:
                    if i not in refused:
                        del gone[i]
                log.info(
                    "opcua %s: monitoring again: %s",
                    self.name,
                    ", ".join(self.point_names[i] for i in back if i not in refused),
                )
        if lost:
            await emit(self._marked_bad(lost, "nodes are gone from the server:"))

    def _item(self, index: int) -> ua.MonitoredItemCreateRequest:
        cfg = self.config
        point = cfg.points[index]
        sampling = point.sampling_interval
        if sampling is None:
            sampling = cfg.sampling_interval if cfg.sampling_interval is not None else self.interval
        queue = point.queue_size or cfg.queue_size
        if queue is None:
            # enough to keep every sample taken between two publishes
            queue = max(1, min(10_000, math.ceil(self.interval / sampling))) if sampling else 1
        flt = None
        if point.deadband is not None:
            flt = ua.DataChangeFilter(
                Trigger=ua.DataChangeTrigger.StatusValue,
                DeadbandType=ua.DeadbandType.Absolute,
                DeadbandValue=point.deadband,
            )
        return ua.MonitoredItemCreateRequest(
            ItemToMonitor=ua.ReadValueId(
                NodeId=self._node_ids[index], AttributeId=ua.AttributeIds.Value
            ),
            MonitoringMode=ua.MonitoringMode.Reporting,
            RequestedParameters=ua.MonitoringParameters(
                ClientHandle=index,
                SamplingInterval=sampling * 1000,
                Filter=flt,
                QueueSize=queue,
                DiscardOldest=True,
            ),
        )

    def _marked_bad(self, codes: dict[int, int], why: str) -> list[Record]:
        """One record (no fields) marking the points of ``codes`` Bad, and a log line."""
        shown = list(codes.items())[:10]
        names = ", ".join(f"{self.point_names[i]} ({session.status_name(c)})" for i, c in shown)
        more = f" and {len(codes) - 10} more" if len(codes) > 10 else ""
        log.warning("opcua %s: %s %s%s", self.name, why, names, more)
        record = Record(self.series, {}, self._time_ns(), new_id())
        for i, code in codes.items():
            record.mark(self.point_names[i], quality_of(code), code)
        return [record]


def _builtin_type(data_type: ua.NodeId) -> ua.VariantType | None:
    """The VariantType of a built-in DataType node id (ns=0;i=1 … i=25), else ``None``."""
    ident = data_type.Identifier
    if data_type.NamespaceIndex != 0 or type(ident) is not int or not 1 <= ident <= 25:
        return None
    vt = ua.VariantType(ident)
    return vt if vt in _WRITABLE_TYPES else None


_WRITABLE_TYPES = frozenset(
    {
        ua.VariantType.Boolean,
        *_INTEGER_RANGES,
        ua.VariantType.Float,
        ua.VariantType.Double,
        ua.VariantType.String,
        ua.VariantType.DateTime,
    }
)


def _variant(name: str, value: FieldValue, vt: ua.VariantType) -> ua.Variant | str:
    """``value`` as a Variant of ``vt``, or why it cannot be one (refused / out of range)."""
    is_bool = isinstance(value, bool)
    is_number = isinstance(value, int | float) and not is_bool
    if vt == ua.VariantType.Boolean:
        if not is_bool:
            return f"refused: point {name!r} is a Boolean and takes true or false, not {value!r}"
        return ua.Variant(value, vt)
    if vt == ua.VariantType.String:
        if not isinstance(value, str):
            return f"refused: point {name!r} is a String and takes a string, not {value!r}"
        return ua.Variant(value, vt)
    if not is_number:
        return f"refused: point {name!r} is a {vt.name} and takes a number, not {value!r}"
    assert isinstance(value, int | float)
    if not math.isfinite(value):
        return f"refused: {value!r} is not a finite number"
    span = _INTEGER_RANGES.get(vt)
    if span is not None:
        if isinstance(value, float) and not value.is_integer():
            return f"refused: point {name!r} is an {vt.name} and takes an integer, not {value!r}"
        low, high = span
        if not low <= value <= high:
            return f"out of range: {value!r} does not fit {vt.name} [{low}, {high}]"
        return ua.Variant(int(value), vt)
    if vt == ua.VariantType.Float:
        if abs(value) > _FLOAT_MAX:
            return f"out of range: {value!r} does not fit a Float"
        return ua.Variant(float(value), vt)
    if vt == ua.VariantType.Double:
        return ua.Variant(float(value), vt)
    if vt == ua.VariantType.DateTime:
        if isinstance(value, float) and not value.is_integer():
            return f"refused: point {name!r} is a DateTime and takes Unix nanoseconds (an integer)"
        try:
            return ua.Variant(_EPOCH + timedelta(microseconds=int(value) // 1000), vt)
        except OverflowError:
            return f"out of range: {value!r} ns is not a date a DateTime can hold"
    return f"refused: point {name!r} is a {vt.name}, which commands cannot write"


def _fault_code(exc: BaseException) -> int:
    """The status code an outage marks every point with."""
    if isinstance(exc, SecurityError):
        return BAD_SECURITY_CHECKS_FAILED
    if isinstance(exc, UaStatusCodeError) and exc.code >= 0x80000000:
        return int(exc.code)
    if isinstance(exc, TimeoutError):
        return BAD_TIMEOUT
    return BAD_NOT_CONNECTED
