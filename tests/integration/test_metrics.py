"""The Prometheus collector on a real running runtime, scraped as Prometheus would.

A counter sim writes into a file sink and a Modbus device has no server (a device outage).
The scrape is the text exposition prometheus_client serves, parsed back with its own parser.
The HTTP route (``/metrics`` in ``broker/api.py``) is not part of this branch yet: this test
scrapes the collector through ``plantbus.broker.metrics.exposition`` directly.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from servers import free_port

from plantbus.broker.config import parse_config
from plantbus.broker.metrics import exposition, registry_for
from plantbus.broker.runtime import Runtime

CONFIG = """
[node]
name = "m"
state_dir = "state"
[api]
enabled = false

[[devices.sim]]
name = "count"
interval = "10ms"
points = [{{ name = "n", signal = "counter" }}]

[[devices.modbus]]
name = "absent"
host = "127.0.0.1"
port = {port}
interval = "100ms"
timeout = "200ms"
points = [{{ name = "v", area = "holding", address = 0, type = "int16" }}]

[[sinks.file]]
name = "lp"
path = "out.lp"
flush_interval = "20ms"
"""


def _scrape(runtime: Runtime) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = exposition(registry_for(runtime))
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        assert family.name.startswith("plantbus_"), family.name
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_scrape_reports_devices_sinks_and_bus(tmp_path: Path) -> None:
    config = parse_config(CONFIG.format(port=free_port()), tmp_path / "plantbus.toml")

    async def main() -> tuple[dict, dict, int]:  # type: ignore[type-arg]
        runtime = Runtime(config)
        await runtime.start()
        try:
            for _ in range(1200):  # up to 60 s
                if (
                    runtime.devices["absent"].supervisor.status.restarts >= 2
                    and runtime.devices["count"].emitted >= 50
                    and runtime.outlets["lp"].outlet.channels[0].records_out >= 50
                ):
                    break
                await asyncio.sleep(0.05)
            first = _scrape(runtime)
        finally:
            await runtime.shutdown()
        final = _scrape(runtime)
        return first, final, runtime.devices["count"].emitted

    first, final, emitted = asyncio.run(main())
    count = (("device", "count"),)
    absent = (("device", "absent"),)
    lp = (("sink", "lp"),)
    assert first[("plantbus_device_records_total", count)] >= 50
    assert first[("plantbus_device_reads_total", count)] >= 50  # one record per read
    assert first[("plantbus_device_last_success_timestamp_seconds", count)] > 1e9
    assert first[("plantbus_device_errors_total", absent)] >= 2
    assert first[("plantbus_device_last_success_timestamp_seconds", absent)] == 0
    assert first[("plantbus_device_errors_total", count)] == 0
    assert first[("plantbus_sink_records_out_total", lp)] >= 50
    # after the drain the scrape agrees with the file: every record in, out and on disk
    lines = (tmp_path / "out.lp").read_bytes().count(b"\n")
    assert final[("plantbus_device_records_total", count)] == emitted
    assert final[("plantbus_sink_records_in_total", lp)] == emitted == lines
    assert final[("plantbus_sink_records_out_total", lp)] == lines
    assert final[("plantbus_bus_published_records_total", ())] == emitted
    for reason in ("queue", "buffer", "invalid", "non_finite"):
        assert final[("plantbus_sink_dropped_records_total", (("reason", reason), *lp))] == 0
    assert final[("plantbus_sink_buffer_records", lp)] == 0
    # subscriptions close in the drain: the bus series are checked on the live scrape
    assert first[("plantbus_bus_dropped_records_total", (("subscription", "lp"),))] == 0
    assert first[("plantbus_bus_delivered_records_total", (("subscription", "lp"),))] >= 50
