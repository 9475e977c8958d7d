"""``/metrics``: the Prometheus collector on a real runtime, and scraped from a real daemon.

First an in-process runtime: a counter sim writes into a file sink and a Modbus device has
no server (a device outage); its scrape is parsed back with prometheus_client's own parser.
Then a real ``plantbus run`` with its consumer API: a counter sim into a file sink and an
InfluxDB sink whose InfluxDB (real, behind a fault proxy) answers 503 until the outage is
ended. ``GET /metrics`` is scraped over HTTP as Prometheus would, with a token that has no
topic lists, while a consumer app subscribes and publishes.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from faults import FaultProxy
from prometheus_client.parser import text_string_to_metric_families
from servers import InfluxServer, free_port

from plantbus.broker.config import parse_config
from plantbus.broker.metrics import exposition, registry_for
from plantbus.broker.runtime import Runtime

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cli import Daemon, emitted

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

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


def _parse(text: str) -> Samples:
    out = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("plantbus_"), family.name
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _scrape(runtime: Runtime) -> Samples:
    body, content_type = exposition(registry_for(runtime))
    assert content_type.startswith("text/plain")
    return _parse(body.decode())


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


# -- a real daemon, scraped over HTTP ---------------------------------------------------------

DAEMON = """
[node]
name = "m"
state_dir = "state"

[api]
listen = "127.0.0.1:{port}"

[[api.tokens]]
name = "prometheus"
token = "scrape-secret"  # no topic lists: /metrics and /healthz only

[[api.tokens]]
name = "app"
token = "app-secret"
subscribe = ["m/#"]
publish = ["app/#"]

[[devices.sim]]
name = "count"
interval = "10ms"
points = [{{ name = "n", signal = "counter" }}]

[[sinks.file]]
name = "lp"
path = "out.lp"
subscribe = ["m/#"]  # the device's records only, not the app's
flush_interval = "300ms"

[[sinks.influxdb]]
name = "db"
url = "{influx}"
database = "{db}"
subscribe = ["m/#"]
flush_interval = "200ms"
retry_initial = "50ms"
retry_max = "200ms"
"""

SCRAPER = {"Authorization": "Bearer scrape-secret"}
APP = {"Authorization": "Bearer app-secret"}
# what Prometheus 2.x sends; it is answered in OpenMetrics
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
COUNT = (("device", "count"),)
LP = (("sink", "lp"),)
DB = (("sink", "db"),)


async def _eventually(check, within: float, what: str):  # type: ignore[no-untyped-def]
    """Await ``check()`` until it returns something truthy (the loop keeps serving meanwhile)."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines() if path.exists() else []


def _counter_values(lines: list[bytes]) -> list[int]:
    return [int(re.search(rb" n=(\d+)i", ln).group(1)) for ln in lines]  # type: ignore[union-attr]


@pytest.mark.slow
async def test_daemon_serves_metrics_of_devices_sinks_bus_and_api(
    tmp_path: Path, influxdb: InfluxServer, influx_db: str
) -> None:
    port = free_port()
    out = tmp_path / "out.lp"
    async with FaultProxy(influxdb.url) as proxy, aiohttp.ClientSession() as http:
        proxy.fail(503, times=1_000_000)  # InfluxDB "down" until proxy.clear()
        config = tmp_path / "plantbus.toml"
        config.write_text(DAEMON.format(port=port, influx=proxy.url, db=influx_db))
        d = Daemon(config, tmp_path)
        url = f"http://127.0.0.1:{port}"

        async def scrape(headers: dict[str, str] = SCRAPER) -> Samples:
            async with http.get(f"{url}/metrics", headers=headers) as r:
                assert r.status == 200, await r.text()
                assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                return _parse(await r.text())

        async def health() -> tuple[int, dict]:  # type: ignore[type-arg]
            async with http.get(f"{url}/healthz", headers=SCRAPER) as r:
                return r.status, await r.json()

        try:

            async def started() -> bool:
                if d.proc.poll() is not None:
                    raise AssertionError(f"plantbus exited:\n{d.text}")
                return "running: 1 device" in d.text

            await _eventually(started, 30, "the daemon to start")

            # access: the API's rules; any valid token reads /metrics, whatever its topics
            async with http.get(f"{url}/metrics") as r:
                assert r.status == 401
            async with http.get(f"{url}/metrics", headers={"Authorization": "Bearer x"}) as r:
                assert r.status == 401
            assert (await scrape(APP))[("plantbus_device_up", COUNT)] == 1
            # Prometheus negotiates OpenMetrics: same names, `# EOF` at the end
            async with http.get(
                f"{url}/metrics", headers={**SCRAPER, "Accept": PROMETHEUS_ACCEPT}
            ) as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("application/openmetrics-text")
                om = await r.text()
            assert om.endswith("# EOF\n")
            assert 'plantbus_device_records_total{device="count"}' in om

            # a consumer app: subscribed over WebSocket, publishes 3 records, is refused once
            ws = await http.ws_connect(f"{url}/v1/subscribe?filter=m/%23", headers=APP)
            hello = json.loads((await ws.receive(timeout=30)).data)
            assert hello["subscribed"] == ["m/#"]
            records = [{"fields": {"x": i}} for i in range(3)]
            async with http.post(f"{url}/v1/publish?topic=app/x", json=records, headers=APP) as r:
                assert r.status == 200, await r.text()
            async with http.post(f"{url}/v1/publish?topic=m/x", json=records, headers=APP) as r:
                assert r.status == 403
            got = 0
            while got < 20:  # the app reads what the device publishes
                got += len(json.loads((await ws.receive(timeout=30)).data))

            # InfluxDB answers 503: the sink retries and /healthz says 503 naming it
            async def db_failing() -> Samples | None:
                m = await scrape()
                ok = m[("plantbus_sink_retries_total", DB)] >= 3
                ok = ok and m[("plantbus_sink_records_out_total", LP)] > 0  # lp delivers
                return m if ok and m[("plantbus_sink_failing", DB)] == 1 else None

            failing = await _eventually(db_failing, 30, "the db sink to retry, lp to deliver")
            status, doc = await health()
            assert (status, doc["status"], doc["failing"]) == (503, "failing", ["db"])
            assert failing[("plantbus_sink_records_out_total", DB)] == 0
            assert failing[("plantbus_sink_buffer_records", DB)] > 0  # kept for later
            assert failing[("plantbus_sink_failing", LP)] == 0
            # the device: one record per read, no errors, a recent success
            m = failing
            assert m[("plantbus_device_reads_total", COUNT)] > 0
            assert (
                m[("plantbus_device_reads_total", COUNT)]
                == m[("plantbus_device_records_total", COUNT)]
            )
            assert m[("plantbus_device_errors_total", COUNT)] == 0
            assert m[("plantbus_device_up", COUNT)] == 1
            last = m[("plantbus_device_last_success_timestamp_seconds", COUNT)]
            assert abs(time.time() - last) < 60
            # the API: one client, what it was sent, the publish and the refusals
            assert m[("plantbus_api_clients", ())] == 1
            assert m[("plantbus_api_sent_records_total", ())] >= got
            assert m[("plantbus_api_publishes_total", ())] == 1
            assert m[("plantbus_api_published_records_total", ())] == 3
            assert m[("plantbus_api_dropped_records_total", (("reason", "queue"),))] == 0
            assert m[("plantbus_api_refused_requests_total", (("status", "401"),))] == 2
            assert m[("plantbus_api_refused_requests_total", (("status", "403"),))] == 1
            # the app's records went to no subscription (the sinks and the app take m/#)
            assert m[("plantbus_bus_unrouted_records_total", ())] == 3
            # a client's subscription is counted in plantbus_api_*, not as a bus series
            subs = {dict(k[1]).get("subscription") for k in m if k[0].startswith("plantbus_bus")}
            assert subs == {None, "lp", "db", "commands"}, subs

            # reads go on, and every record the device publishes is on the bus
            reads = m[("plantbus_device_reads_total", COUNT)]

            async def bus_agrees() -> bool:
                m2 = await scrape()
                published = m2[("plantbus_bus_published_records_total", ())]
                device = m2[("plantbus_device_records_total", COUNT)]
                more = m2[("plantbus_device_reads_total", COUNT)] > reads
                return more and published == device + 3

            await _eventually(bus_agrees, 30, "more reads, bus publishes = device records + 3")

            # the file sink's records out are the lines in its file (read on both sides of a
            # scrape, between two of its flushes)
            async def file_agrees() -> tuple[float, int] | None:
                before = len(_lines(out))
                m3 = await scrape()
                after = _lines(out)
                n = m3[("plantbus_sink_records_out_total", LP)]
                return (n, len(after)) if before == len(after) == n else None

            await _eventually(file_agrees, 30, "records_out{sink=lp} = lines in the file")

            # the outage ends: the sink catches up and /healthz is 200 again
            assert proxy.clear() > 0
            assert await _eventually(
                lambda: _healthy(health), 30, "/healthz 200 after InfluxDB came back"
            )
            recovered = await scrape()
            assert recovered[("plantbus_sink_failing", DB)] == 0
            assert recovered[("plantbus_sink_records_out_total", DB)] > 0
            assert recovered[("plantbus_sink_retries_total", DB)] >= 3
            assert recovered[("plantbus_sink_dead_letters_total", DB)] == 0

            # records out of the InfluxDB sink are the points InfluxDB holds
            async def influx_agrees() -> bool:
                n = (await scrape())[("plantbus_sink_records_out_total", DB)]
                return n == await asyncio.to_thread(influxdb.count, influx_db, "count")

            await _eventually(influx_agrees, 30, "records_out{sink=db} = points in InfluxDB")
            await ws.close()

            d.signal(signal.SIGTERM)
            assert await asyncio.to_thread(d.wait, 60) == 0, d.text
        finally:
            d.kill()
    # after the drain: every record the device emitted is in the file and in InfluxDB, once
    n = emitted(d.text, "count")
    assert _counter_values(_lines(out)) == list(range(n))
    assert influxdb.count(influx_db, "count") == n


async def _healthy(health) -> bool:  # type: ignore[no-untyped-def]
    status, doc = await health()
    return status == 200 and doc["status"] == "ok"
