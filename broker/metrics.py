"""Prometheus metrics of a running runtime (``/metrics``); the names are a contract.

A custom ``Collector`` reads ``Runtime.metrics()`` and ``ConsumerApi.metrics()`` (the
counters every component keeps anyway) when scraped, so nothing runs on the record path for
Prometheus. The names and labels are documented in ``docs/metrics.md``; once shipped they are
extended, never renamed.

``add_route(api)`` serves it on the consumer API as ``GET /metrics`` (what ``plantbus run``
does), with the API's access rules: any valid token, or without tokens any local client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from plantbus.broker.api import ConsumerApi
    from plantbus.broker.runtime import Runtime

__all__ = ["METRICS_PATH", "RuntimeCollector", "add_route", "exposition", "registry_for"]

METRICS_PATH = "/metrics"

API_SUBSCRIPTION_PREFIX = "api:"
"""Bus subscriptions of WebSocket clients (``api:<n>``) are left out of the bus series.

Each client gets a new number, so per-subscription series for them would grow without bound
as apps reconnect; the ``plantbus_api_*`` series count them together instead.
"""

# per sink: (metric suffix, key in the channel's metrics(), help, counter?)
_SINK_SERIES: tuple[tuple[str, str, str, bool], ...] = (
    ("records_out", "records_out", "Records the sink's server acknowledged.", True),
    ("batches", "batches_out", "Batches the sink delivered.", True),
    ("bytes_out", "bytes_out", "Payload bytes the sink delivered.", True),
    ("retries", "retries", "Delivery attempts that failed and were retried.", True),
    ("rejected_records", "rejected_records", "Records the server refused as invalid.", True),
    ("buffer_records", "buffer_records", "Records waiting in the sink's buffer.", False),
    ("buffer_bytes", "buffer_bytes", "Bytes waiting in the sink's buffer.", False),
    ("dead_letters", "dead_lettered", "Records written to the sink's dead-letter file.", True),
    ("failing", "failing", "1 while the sink's deliveries fail.", False),
    ("connected", "connected", "1 while the sink is connected to its server.", False),
)


class RuntimeCollector(Collector):
    """Yields the ``plantbus_*`` metric families from a runtime's snapshot on each scrape."""

    def __init__(self, runtime: Runtime, api: ConsumerApi | None = None):
        self._runtime = runtime
        self._api = api

    def collect(self) -> Iterator[Metric]:
        snap: dict[str, Any] = self._runtime.metrics()
        yield GaugeMetricFamily(
            "plantbus_uptime_seconds", "Seconds since the runtime started.", snap["uptime_s"]
        )
        yield from self._bus(snap["bus"])
        yield from self._devices(snap["devices"])
        yield from self._sinks()
        if self._api is not None:
            yield from self._api_series(self._api.metrics())

    def _bus(self, bus: dict[str, Any]) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "plantbus_bus_published_records", "Records published on the bus.", bus["published"]
        )
        yield CounterMetricFamily(
            "plantbus_bus_unrouted_records",
            "Records published that no subscription took.",
            bus["unrouted"],
        )
        received = CounterMetricFamily(
            "plantbus_bus_delivered_records",
            "Records the bus put into a subscription's queue.",
            labels=["subscription"],
        )
        dropped = CounterMetricFamily(
            "plantbus_bus_dropped_records",
            "Records a subscription's queue policy dropped.",
            labels=["subscription"],
        )
        queued = GaugeMetricFamily(
            "plantbus_bus_queued_records",
            "Records waiting in a subscription's queue.",
            labels=["subscription"],
        )
        for name, sub in bus["subscriptions"].items():
            if name.startswith(API_SUBSCRIPTION_PREFIX):
                continue
            received.add_metric([name], sub["received"])
            dropped.add_metric([name], sub["dropped"])
            queued.add_metric([name], sub["queued"])
        yield from (received, dropped, queued)

    def _devices(self, devices: dict[str, dict[str, Any]]) -> Iterator[Metric]:
        reads = CounterMetricFamily(
            "plantbus_device_reads", "Reads that published records.", labels=["device"]
        )
        records = CounterMetricFamily(
            "plantbus_device_records", "Records the device published.", labels=["device"]
        )
        errors = CounterMetricFamily(
            "plantbus_device_errors",
            "Faults that ended a device's run (each is followed by a restart).",
            labels=["device"],
        )
        overruns = CounterMetricFamily(
            "plantbus_device_overruns",
            "Polls that ended after the next one was due.",
            labels=["device"],
        )
        latency = CounterMetricFamily(
            "plantbus_device_publish_seconds",
            "Time reads waited for the bus to accept their records (back-pressure).",
            labels=["device"],
        )
        last = GaugeMetricFamily(
            "plantbus_device_last_success_timestamp_seconds",
            "Unix time of the device's last read that published records (0: none yet).",
            labels=["device"],
        )
        up = GaugeMetricFamily(
            "plantbus_device_up",
            "1 while the device runs, 0 while it backs off.",
            labels=["device"],
        )
        for name, d in devices.items():
            reads.add_metric([name], d.get("reads", 0))
            records.add_metric([name], d["emitted"])
            errors.add_metric([name], d["restarts"])
            if "overruns" in d:
                overruns.add_metric([name], d["overruns"])
            latency.add_metric([name], d.get("publish_seconds", 0.0))
            last.add_metric([name], d.get("last_success") or 0.0)
            up.add_metric([name], 1 if d["state"] == "running" else 0)
        yield from (reads, records, errors, overruns, latency, last, up)

    def _sinks(self) -> Iterator[Metric]:
        records_in = CounterMetricFamily(
            "plantbus_sink_records_in",
            "Records the sink's outlet took from the bus.",
            labels=["sink"],
        )
        drops = CounterMetricFamily(
            "plantbus_sink_dropped_records",
            "Records a sink lost, by reason: queue (bus queue policy), buffer (buffer full), "
            "invalid (could not be encoded), non_finite (NaN/Inf value).",
            labels=["sink", "reason"],
        )
        families = {
            suffix: (CounterMetricFamily if counter else GaugeMetricFamily)(
                f"plantbus_sink_{suffix}", text, labels=["sink"]
            )
            for suffix, _, text, counter in _SINK_SERIES
        }
        for handle in list(self._runtime.outlets.values()):
            outlet = handle.outlet.metrics()
            for ch in handle.outlet.channels:
                sink = ch.metrics()
                # outlet-level counts belong to every sink of the group (they share the queue)
                records_in.add_metric([ch.name], outlet["records_in"])
                drops.add_metric([ch.name, "queue"], outlet["queue_dropped"])
                drops.add_metric([ch.name, "buffer"], sink["dropped"])
                drops.add_metric([ch.name, "invalid"], outlet["encode_invalid"])
                drops.add_metric([ch.name, "non_finite"], outlet["encode_non_finite"])
                for suffix, key, _, _ in _SINK_SERIES:
                    if key in sink:
                        families[suffix].add_metric([ch.name], sink[key])
        yield records_in
        yield drops
        yield from families.values()

    def _api_series(self, api: dict[str, Any]) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "plantbus_api_clients", "WebSocket clients subscribed now.", api["clients"]
        )
        yield CounterMetricFamily(
            "plantbus_api_sent_records", "Records sent to WebSocket clients.", api["records_sent"]
        )
        yield CounterMetricFamily(
            "plantbus_api_sent_frames",
            "WebSocket frames of records sent to clients.",
            api["frames_sent"],
        )
        dropped = CounterMetricFamily(
            "plantbus_api_dropped_records",
            "Records WebSocket clients did not get, by reason: queue (the client read too "
            "slowly), invalid (could not be encoded as JSON).",
            labels=["reason"],
        )
        dropped.add_metric(["queue"], api["dropped"])
        dropped.add_metric(["invalid"], api["encode_invalid"])
        yield dropped
        yield CounterMetricFamily(
            "plantbus_api_published_records",
            "Records consumer apps published onto the bus.",
            api["published"],
        )
        yield CounterMetricFamily(
            "plantbus_api_publishes",
            "Publish requests (HTTP or WebSocket) that succeeded.",
            api["publishes"],
        )
        refused = CounterMetricFamily(
            "plantbus_api_refused_requests",
            "Requests and WebSocket publishes the API refused, by HTTP status code.",
            labels=["status"],
        )
        for status, n in sorted(api["refused"].items()):
            refused.add_metric([str(status)], n)
        yield refused


def registry_for(runtime: Runtime, api: ConsumerApi | None = None) -> CollectorRegistry:
    """A registry holding only the runtime's collector (no process metrics of the client).

    Args:
        runtime: whose bus, devices and sinks are reported.
        api: the consumer API whose ``plantbus_api_*`` series are added (None: no API).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RuntimeCollector(runtime, api))
    return registry


class _Snapshot(Collector):
    """Metric families collected already, to be formatted off the event loop."""

    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def exposition(registry: Collector, accept: str = "") -> tuple[bytes, str]:
    """The exposition of ``registry`` and its content type, for a ``/metrics`` route.

    Args:
        registry: a ``CollectorRegistry`` (``registry_for``) or any collector.
        accept: the scraper's ``Accept`` header: OpenMetrics or the 1.0.0 text format when it
            asks for them (as Prometheus does), else the 0.0.4 text format every scraper reads.
    """
    from prometheus_client.exposition import choose_encoder

    encode, content_type = choose_encoder(accept)
    return encode(registry), content_type


def add_route(api: ConsumerApi) -> None:
    """Serve ``GET /metrics`` on ``api`` (before it starts): its runtime's and its own series.

    The route is not public: the API's access rules apply as to ``/healthz`` (any valid
    token, whatever its topic lists; without tokens, local clients). The exposition names
    components and counts records, never a record's values, so no role of its own guards it.
    """
    registry = registry_for(api.runtime, api)

    async def handler(request: web.Request) -> web.Response:
        # the families are collected on the loop (a consistent snapshot of the counters,
        # about 6 ms for 500 devices), the text is formatted in a thread: formatting is the
        # larger part (about 22 ms for 500 devices) and would otherwise stall every device
        snapshot = _Snapshot(list(registry.collect()))
        accept = request.headers.get("Accept", "")
        body, content_type = await asyncio.to_thread(exposition, snapshot, accept)
        return web.Response(body=body, headers={"Content-Type": content_type})

    api.add_route("GET", METRICS_PATH, handler)
