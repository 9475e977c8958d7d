"""``outage``: replaying a 1M-record disk-buffer backlog alongside live traffic.

What a node does after an outage of its InfluxDB: the disk buffer of its ``influxdb`` sink
holds a backlog, and the devices keep reading. Two parts:

1. *backlog*: 1M records of the shape, in 5000-line batches (the bytes the codec writes,
   ``encode_tuples``, under measurement ``backlog``), appended to a ``DiskBuffer`` in the
   folder the runtime gives the sink (``<state_dir>/buffers/influxdb/influx``), then
   fsynced. ``append_records_per_s`` (appends + the final group commit),
   ``disk_bytes_per_record`` (segment bytes / records: the disk cost of a buffered record),
   ``payload_bytes_per_record`` and ``framing_bytes_per_record`` (the difference).
2. *replay*: a ``Runtime`` built from a config text (10 ``sim`` devices paced at
   ``LIVE_OFFERED`` records/s in total → bus → the ``influxdb`` sink with its disk buffer,
   ``block`` all the way) starts on that folder. The window runs from start until the
   sink has acknowledged the whole backlog: ``records_per_s`` = records InfluxDB
   acknowledged per second in it (backlog and live), ``backlog_replay_s``,
   ``live_published_per_s`` (what the devices got onto the bus meanwhile: the live traffic
   keeps flowing), ``cpu_us_per_record`` (this process's CPU per acknowledged record),
   ``influxd_cpu_pct``, ``others_cpu_pct``; ``catch_up_s``: until the live backlog built
   meanwhile is gone too; ``start_s``: building the runtime, the buffer's recovery scan of
   the backlog included. ``vs_r_db`` = ``records_per_s`` / ``r_db``. Latency = the sink's
   record-ID-to-acknowledgement of the live records after the catch-up.

Then the runtime drains and everything is verified in InfluxDB: ``count(uid)`` of the
backlog == 1M, and per live device ``count(n) == count(distinct(n)) == max(n) + 1`` with
``min(n) == 0`` and at least what the device emitted (``verified``, ``problems``).
``BENCH_SECONDS`` sets how long the live records run after the catch-up (for the latency).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import (
    DEVICE_TAGS,
    DEVICES,
    MEASUREMENT,
    NODE_TAGS,
    Window,
    bench_seconds,
    device_name,
    encode_tuples,
    influx_from_env,
    log,
    make_tuples,
    percentiles_ms,
    proc_cpu_seconds,
    report,
    run_loop,
    sim_points,
    system_busy_seconds,
)

BACKLOG = 1_000_000
BACKLOG_MEASUREMENT = "backlog"
LIVE_OFFERED = 50_000  # records/s over all devices: 10 devices x 50 records every 10 ms
LIVE_INTERVAL_S = 0.01


def _toml(v: Any) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return json.dumps(v)


def config_text(url: str, db: str, state: Path) -> str:
    per_read = int(LIVE_OFFERED * LIVE_INTERVAL_S / DEVICES)
    text = (
        "[node]\n"
        'name = "bench"\n'
        f"tags = {_toml(NODE_TAGS)}\n"
        f"state_dir = {_toml(str(state))}\n"
        'shutdown_timeout = "120s"\n\n'
        "[[sinks.influxdb]]\n"
        'name = "influx"\n'
        f"url = {_toml(url)}\n"
        f"database = {_toml(db)}\n"
        'subscribe = ["bench/#"]\n'
        "batch_size = 5000\n"
        'timeout = "60s"\n'
        'queue = { size = 100000, policy = "block" }\n'
        'buffer = { kind = "disk", max_size = "2GiB", when_full = "block", '
        'sync_interval = "1s" }\n\n'
    )
    for i in range(DEVICES):
        text += (
            "[[devices.sim]]\n"
            f'name = "{device_name(i)}"\n'
            f'topic = "bench/{device_name(i)}"\n'
            f'measurement = "{MEASUREMENT}"\n'
            f"tags = {_toml(DEVICE_TAGS)}\n"
            f'interval = "{int(LIVE_INTERVAL_S * 1000)}ms"\n'
            f"batch = {per_read}\n"
            f"points = {_toml(sim_points())}\n\n"
        )
    return text


def _query(url: str, db: str, q: str) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"db": db, "q": q, "epoch": "ns"})
    req = urllib.request.Request(f"{url}/query?{params}", method="POST")
    with urllib.request.urlopen(req, timeout=600) as r:
        res = json.load(r)["results"][0]
    if "error" in res:
        raise RuntimeError(f"{q}: {res['error']}")
    rows = []
    for s in res.get("series", []):
        for values in s["values"]:
            row = dict(zip(s["columns"], values, strict=True))
            row.update(s.get("tags", {}))
            rows.append(row)
    return rows


async def _fill_backlog(folder: Path) -> dict[str, Any]:
    """Part 1: the backlog on disk, as the outlet would have appended it during an outage."""
    from plantbus.broker.diskbuffer import DiskBuffer
    from plantbus.broker.sinks.base import EncodedBatch

    tuples = make_tuples(BACKLOG, seed=7)
    prefixes = [
        f"{BACKLOG_MEASUREMENT},device={device_name(i)},line=L1,site=ulm " for i in range(DEVICES)
    ]
    payloads = encode_tuples(tuples, prefixes)
    batches = []
    for i, body in enumerate(payloads):
        first, last = i * 5000, min(BACKLOG, (i + 1) * 5000) - 1
        batches.append(
            EncodedBatch(
                body + b"\n",
                last - first + 1,
                "line_protocol",
                seq=i + 1,
                first_id=tuples[first][6],
                last_id=tuples[last][6],
            )
        )
    del tuples, payloads
    buf = DiskBuffer(folder, 2 << 30, "block", sync_interval=1.0, name="influx")
    w = Window()
    for b in batches:
        await buf.append(b)
    await buf.sync()
    w.stop()
    payload = sum(len(b.payload) for b in batches)
    disk = buf.disk_bytes
    await buf.close()
    return {
        "append_records_per_s": round(BACKLOG / w.elapsed),
        "append_cpu_us_per_record": round(w.cpu / BACKLOG * 1e6, 3),
        "disk_bytes_per_record": round(disk / BACKLOG, 2),
        "payload_bytes_per_record": round(payload / BACKLOG, 2),
        "framing_bytes_per_record": round((disk - payload) / BACKLOG, 3),
        "backlog_disk_mb": round(disk / 1e6, 1),
    }


async def _until(predicate: Any, limit: float, what: str) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > limit:
            raise RuntimeError(f"outage: timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


async def _run() -> dict[str, Any]:
    found = influx_from_env()
    if found is None:
        raise SystemExit("outage needs the runner's influxd: `python -m bench outage`")
    url, influx_pid = found
    from plantbus.broker.config import parse_config
    from plantbus.broker.runtime import Runtime

    db = "bench_outage"
    state = Path(tempfile.mkdtemp(prefix="plantbus-bench-outage-"))
    try:
        log(f"outage: writing a {BACKLOG:,}-record backlog into a disk buffer")
        fill = await _fill_backlog(state / "buffers" / "influxdb" / "influx")
        config = parse_config(config_text(url, db, state), state / "plantbus.toml")
        t = time.perf_counter()
        rt = Runtime(config)
        await rt.start()
        start_s = time.perf_counter() - t
        (ch,) = [c for h in rt.outlets.values() for c in h.outlet.channels]
        log("outage: replaying the backlog alongside live traffic")
        i0, s0, p0 = proc_cpu_seconds(influx_pid), system_busy_seconds(), rt.bus.published
        w = Window()
        await _until(lambda: ch.records_out >= BACKLOG, 600, "the backlog replayed")
        w.stop()
        acked = ch.records_out
        live = rt.bus.published - p0
        influx_cpu = proc_cpu_seconds(influx_pid) - i0
        others = system_busy_seconds() - s0 - influx_cpu - w.cpu
        catch_up_s = w.elapsed + await _until(
            lambda: ch.buffer.records <= LIVE_OFFERED, 600, "the live backlog gone"
        )
        ch.latencies.clear()
        await asyncio.sleep(bench_seconds())
        latency = percentiles_ms(list(ch.latencies))
        await rt.shutdown()
        emitted = {name: d.emitted for name, d in rt.devices.items()}
        problems = await asyncio.to_thread(_verify, url, db, emitted)
        _query(url, db, f'DROP DATABASE "{db}"')
    finally:
        shutil.rmtree(state, ignore_errors=True)
    records_per_s = acked / w.elapsed
    r_db = float(os.environ.get("BENCH_R_DB", "nan"))
    return report(
        "outage",
        records_per_s=records_per_s,
        cpu_us_per_record=w.cpu / max(acked, 1) * 1e6,
        latency=latency,
        vs_r_db=round(records_per_s / r_db, 3) if r_db == r_db else None,
        backlog_records=BACKLOG,
        backlog_replay_s=round(w.elapsed, 2),
        live_offered_per_s=LIVE_OFFERED,
        live_published_per_s=round(live / w.elapsed),
        catch_up_s=round(catch_up_s, 2),
        start_s=round(start_s, 3),
        influxd_cpu_pct=round(influx_cpu / w.elapsed * 100, 1),
        others_cpu_pct=round(max(0.0, others / w.elapsed * 100), 1),
        **fill,
        verified=not problems,
        problems=problems,
    )


def _verify(url: str, db: str, emitted: dict[str, int]) -> list[str]:
    problems = []
    rows = _query(url, db, f'SELECT count("uid") FROM "{BACKLOG_MEASUREMENT}"')
    got = rows[0]["count"] if rows else 0
    if got != BACKLOG:
        problems.append(f"backlog: {got} in InfluxDB != {BACKLOG}")
    stats = {
        r["device"]: r
        for r in _query(
            url, db, f'SELECT count(n), min(n), max(n) FROM "{MEASUREMENT}" GROUP BY device'
        )
    }
    distinct = {
        r["device"]: r["count"]
        for r in _query(url, db, f'SELECT count(distinct(n)) FROM "{MEASUREMENT}" GROUP BY device')
    }
    for name, n in emitted.items():
        s = stats.get(name)
        if s is None:
            problems.append(f"{name}: no records")
            continue
        if not (s["min"] == 0 and s["count"] == distinct.get(name) == s["max"] + 1 >= n):
            problems.append(f"{name}: {s} distinct {distinct.get(name)} emitted {n}")
    return problems


def main() -> dict[str, Any]:
    return run_loop(_run())  # type: ignore[no-any-return]
