"""Prometheus metrics of a running runtime (``/metrics``); the names are a contract.

A custom ``Collector`` reads ``Runtime.metrics()`` (the counters every component keeps
anyway) when scraped, so nothing runs on the record path for Prometheus. The names and
labels are documented in ``docs/metrics.md``; once shipped they are extended, never renamed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from plantbus.broker.runtime import Runtime

__all__ = ["RuntimeCollector", "exposition", "registry_for"]

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

    def __init__(self, runtime: Runtime):
        self._runtime = runtime

    def collect(self) -> Iterator[Metric]:
        snap: dict[str, Any] = self._runtime.metrics()
        yield GaugeMetricFamily(
            "plantbus_uptime_seconds", "Seconds since the runtime started.", snap["uptime_s"]
        )
        yield from self._bus(snap["bus"])
        yield from self._devices(snap["devices"])
        yield from self._sinks()

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


def registry_for(runtime: Runtime) -> CollectorRegistry:
    """A registry holding only the runtime's collector (no process metrics of the client)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RuntimeCollector(runtime))
    return registry


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The text exposition of ``registry`` and its content type, for a ``/metrics`` route."""
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry), CONTENT_TYPE_LATEST
