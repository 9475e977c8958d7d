"""``influx_gzip``: what the influxdb sink's ``gzip`` level costs on loopback.

The same pre-encoded 5000-line batches of the shape (``encode_tuples``, the bytes the codec
writes) go through ``InfluxDBSink.write`` to the runner's InfluxDB, one batch at a time (as
``r_db``), once per level: off (the same-run baseline), 1, 6 and 9, each into a fresh
database that is then counted (``verified``: every line stored). One JSON line per level:

- ``records_per_s``: lines InfluxDB acknowledged per second; ``vs_off`` = / the off run's;
- ``cpu_us_per_record``: this process's CPU per line (compressing happens here); the
  ``cpu_vs_off`` ratio, and ``influxd_cpu_us_per_record`` (influxd decompresses);
- ``compress_us_per_record``: ``gzip.compress`` alone at that level over the same batches;
- ``bytes_ratio``: compressed / plain bytes (what crosses the network);
- ``p50_ms`` … : one ``write`` call (compress + request + answer).

Lines: ``min(500k, max(100k, 25k × BENCH_SECONDS))`` per level.
"""

from __future__ import annotations

import gzip
import time
from typing import Any

from bench.common import (
    DEVICES,
    Window,
    bench_seconds,
    encode_tuples,
    influx_from_env,
    log,
    make_tuples,
    percentiles_ms,
    proc_cpu_seconds,
    report,
    run_loop,
    series_prefix,
)

LEVELS = (0, 1, 6, 9)


async def _one_level(
    url: str, pid: int, level: int, batches: list[bytes], lines: int
) -> dict[str, Any]:
    import aiohttp

    from plantbus.broker.sinks.base import EncodedBatch
    from plantbus.broker.sinks.influxdb import Config, InfluxDBSink

    db = f"bench_gzip_{level}"
    cfg = Config.model_validate({"url": url, "database": db, "gzip": level, "timeout": "60s"})
    sink = InfluxDBSink(cfg, f"gzip{level}")
    encoded = [
        EncodedBatch(body, body.count(b"\n") + 1, "line_protocol", seq=i + 1)
        for i, body in enumerate(batches)
    ]
    await sink.connect()
    latencies: list[float] = []
    try:
        influxd0 = proc_cpu_seconds(pid)
        window = Window()
        for batch in encoded:
            t = time.perf_counter()
            await sink.write(batch)
            latencies.append(time.perf_counter() - t)
        window.stop()
        influxd_cpu = proc_cpu_seconds(pid) - influxd0
    finally:
        await sink.close()
    async with aiohttp.ClientSession() as s:
        q = f'SELECT count("uid") FROM "{db}".."bench"'
        async with s.get(f"{url}/query", params={"q": q}) as r:
            doc = await r.json()
        stored = doc["results"][0]["series"][0]["values"][0][1]
        async with s.post(f"{url}/query", params={"q": f'DROP DATABASE "{db}"'}) as r:
            await r.read()
    # outside the window: the compression alone, and the bytes it gives
    plain = sum(len(b) for b in batches)
    packed = 0
    t = time.process_time()
    if level:
        for body in batches:
            packed += len(gzip.compress(body, level))
    compress_s = time.process_time() - t
    return {
        "gzip_level": level,
        "records_per_s": lines / window.elapsed,
        "cpu_us_per_record": window.cpu / lines * 1e6,
        "influxd_cpu_us_per_record": round(influxd_cpu / lines * 1e6, 3),
        "compress_us_per_record": round(compress_s / lines * 1e6, 3),
        "bytes_ratio": round(packed / plain, 4) if level else 1.0,
        "latency": percentiles_ms(latencies),
        "verified": stored == lines,
        "records_stored": stored,
    }


async def _run() -> list[dict[str, Any]]:
    found = influx_from_env()
    if found is None:
        raise SystemExit("influx_gzip needs the runner's influxd: `python -m bench influx_gzip`")
    url, pid = found
    lines = int(min(500_000, max(100_000, 25_000 * bench_seconds())))
    batches = encode_tuples(make_tuples(lines, seed=3), [series_prefix(i) for i in range(DEVICES)])
    results = []
    for level in LEVELS:
        log(f"influx_gzip: level {level or 'off'}, {lines:,} lines in {len(batches)} batches")
        results.append(await _one_level(url, pid, level, batches, lines))
    off_rate, off_cpu = results[0]["records_per_s"], results[0]["cpu_us_per_record"]
    out = []
    for r in results:
        latency = r.pop("latency")
        rate, cpu = r.pop("records_per_s"), r.pop("cpu_us_per_record")
        out.append(
            report(
                "influx_gzip",
                records_per_s=rate,
                cpu_us_per_record=cpu,
                latency=latency,
                **r,
                vs_off=round(rate / off_rate, 3),
                cpu_vs_off=round(cpu / off_cpu, 3),
                lines=lines,
            )
        )
    return out


def main() -> list[dict[str, Any]]:
    return run_loop(_run())  # type: ignore[no-any-return]
