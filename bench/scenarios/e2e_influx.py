"""``e2e_influx``: sim devices → bus → influxdb + file sinks and a counting subscriber.

The real daemon pieces, built by ``plantbus.broker.runtime.Runtime`` from a config text:
``DEVICES`` ``sim`` devices producing the shape (one series each), an ``influxdb`` sink
writing to the runner's real InfluxDB 1.6.7 and a ``file`` sink, both with ``block``
queues and buffers so that nothing may be lost (they share one subscription and one
encoding, as the outlet groups sinks with the same subscription, codec and batching), plus
a counting subscriber on the bus that notes, per batch it takes, how old its oldest record
is (read time → a subscriber holding the batch). Two runs, each on a fresh runtime and
database:

1. **max**: the devices read flat out (``interval = "0s"``); back-pressure from the slowest
   consumer sets the rate. ``records_per_s`` is what InfluxDB acknowledged per second over
   ``BENCH_SECONDS`` (after a warm-up), ``cpu_us_per_record`` the daemon's process CPU
   (``getrusage``; influxd is another process) per acknowledged record.
2. **latency**: the devices read every 10 ms, offering 100k records/s (or 0.9 × the max
   run's rate if that is lower). ``p50_ms`` / ``p99_ms`` / ``max_ms`` come from this run,
   with ``influx_ack_*`` (record ID time → InfluxDB acknowledged its batch) beside them.

After each run the runtime drains (SIGTERM path) and every record is verified in InfluxDB:
per device ``count(n) == count(distinct(n)) == max(n) + 1`` with ``min(n) == 0`` (so no
counter value is missing or doubled), at least as many as the device emitted, and the file
sink holds the same number of lines.
"""

from __future__ import annotations

import asyncio
import gc
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
    env_baselines,
    influx_from_env,
    log,
    percentiles_ms,
    proc_cpu_seconds,
    report,
    run_loop,
    sim_points,
    system_busy_seconds,
)

WARMUP_S = 3.0
MAX_RUN_READ = 100  # records per read in the max run
LATENCY_OFFERED = 100_000
LATENCY_INTERVAL = 0.01
QUEUE = 100_000
GOAL_P99_MS = 5.0


def _toml_value(v: Any) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)  # strings, numbers and booleans are spelled alike in TOML and JSON


def influx_in_flight() -> int | None:
    """``BENCH_INFLUX_IN_FLIGHT``: the influxdb sink's ``max_in_flight`` (unset: its default)."""
    value = os.environ.get("BENCH_INFLUX_IN_FLIGHT", "")
    return int(value) if value else None


def config_text(url: str, db: str, state: Path, interval: str, batch: int) -> str:
    """The daemon config of one run (what a user would write in plantbus.toml + conf.d)."""
    in_flight = influx_in_flight()
    sink_common = (
        'subscribe = ["bench/#"]\n'
        "batch_size = 5000\n"
        f'queue = {{ size = {QUEUE}, policy = "block" }}\n'
        # a small buffer reaches steady state (back-pressure up to the devices) within the
        # warm-up, so the window's CPU is spent on the records it counts
        'buffer = { kind = "memory", max_size = "8MiB", when_full = "block" }\n'
    )
    text = (
        "[node]\n"
        'name = "bench"\n'
        f"tags = {_toml_value(NODE_TAGS)}\n"
        f"state_dir = {_toml_value(str(state))}\n"
        'shutdown_timeout = "120s"\n\n'
        "[[sinks.influxdb]]\n"
        'name = "influx"\n'
        f"url = {_toml_value(url)}\n"
        f"database = {_toml_value(db)}\n"
        + (f"max_in_flight = {in_flight}\n" if in_flight else "")
        + f"{sink_common}\n"
        "[[sinks.file]]\n"
        'name = "file"\n'
        f"path = {_toml_value(str(state / 'lp' / 'bench.lp'))}\n"
        'max_size = "256MiB"\n'
        "max_files = 1000\n"
        f"{sink_common}\n"
    )
    for i in range(DEVICES):
        text += (
            "[[devices.sim]]\n"
            f'name = "{device_name(i)}"\n'
            f'topic = "bench/{device_name(i)}"\n'
            f'measurement = "{MEASUREMENT}"\n'
            f"tags = {_toml_value(DEVICE_TAGS)}\n"
            f'interval = "{interval}"\n'
            f"batch = {batch}\n"
            f"points = {_toml_value(sim_points())}\n\n"
        )
    return text


class GcPauses:
    """Counts the interpreter's garbage collections and how long each held the loop."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.longest = 0.0
        self._t0 = 0.0

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._cb)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._cb)

    def _cb(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        d = time.perf_counter() - self._t0
        self.count += 1
        self.total += d
        self.longest = max(self.longest, d)


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


def verify(url: str, db: str, emitted: dict[str, int], lp_dir: Path) -> dict[str, Any]:
    """Check every record of a run in InfluxDB (and count the file sink's lines)."""
    stats = {
        r["device"]: r
        for r in _query(
            url,
            db,
            f"SELECT count(n), min(n), max(n), count(uid) FROM {MEASUREMENT} GROUP BY device",
        )
    }
    distinct = {
        r["device"]: r["count"]
        for r in _query(url, db, f"SELECT count(distinct(n)) FROM {MEASUREMENT} GROUP BY device")
    }
    problems = []
    written = 0
    for name, n_emitted in emitted.items():
        s = stats.get(name)
        if s is None:
            problems.append(f"{name}: no records")
            continue
        count = s["count"]
        written += count
        if not (s["min"] == 0 and count == distinct.get(name) == s["max"] + 1 == s["count_1"]):
            problems.append(
                f"{name}: count {count} distinct {distinct.get(name)} "
                f"min {s['min']} max {s['max']} uids {s['count_1']}"
            )
        if count < n_emitted:
            problems.append(f"{name}: {count} in InfluxDB < {n_emitted} emitted")
    file_lines = 0
    for f in lp_dir.iterdir():
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                file_lines += chunk.count(b"\n")
    if file_lines != written:
        problems.append(f"file sink holds {file_lines} lines, InfluxDB {written}")
    return {
        "written": written,
        "emitted": sum(emitted.values()),
        "file_lines": file_lines,
        "problems": problems,
    }


async def run_once(
    url: str, influx_pid: int, db: str, interval: str, batch: int, seconds: float
) -> dict[str, Any]:
    """One run on a fresh runtime; returns its measurements and verification."""
    from plantbus.broker.config import parse_config
    from plantbus.broker.runtime import Runtime

    state = Path(tempfile.mkdtemp(prefix="plantbus-bench-"))
    try:
        config = parse_config(config_text(url, db, state, interval, batch), state / "plantbus.toml")
        rt = Runtime(config)
        # subscribed before the devices start, so it sees every record
        sub = rt.bus.subscribe(["bench/#"], size=QUEUE, policy="block", name="count")
        lat: list[float] = []
        counted = 0

        async def count() -> None:
            nonlocal counted
            tns = time.time_ns
            while True:
                recs = await sub.get()
                if not recs:
                    return
                lat.append((tns() - recs[0].time_ns) / 1e9)
                counted += len(recs)

        counter = asyncio.create_task(count())
        await rt.start()
        apply_gc_env()  # after the runtime's own settings (``settle_gc``), to override them
        (influx,) = [
            ch for h in rt.outlets.values() for ch in h.outlet.channels if ch.name == "influx"
        ]
        in_flight = influx.config.max_in_flight
        await asyncio.sleep(WARMUP_S)

        lat.clear()
        influx.latencies.clear()
        acked0, emitted0 = influx.records_out, rt.bus.published
        i0 = proc_cpu_seconds(influx_pid)
        s0 = system_busy_seconds()
        w = Window()
        with GcPauses() as gcp:
            await asyncio.sleep(seconds)
        w.stop()
        acked = influx.records_out - acked0
        offered = rt.bus.published - emitted0
        influx_cpu = proc_cpu_seconds(influx_pid) - i0
        others_cpu = system_busy_seconds() - s0 - influx_cpu - w.cpu
        window_lat = list(lat)
        ack_lat = list(influx.latencies)
        overruns = sum(d.overruns or 0 for d in rt.devices.values())

        t = time.perf_counter()
        await rt.shutdown()
        drain_s = time.perf_counter() - t
        sub.close()
        await counter
        emitted = {name: d.emitted for name, d in rt.devices.items()}
        check = await asyncio.to_thread(verify, url, db, emitted, state / "lp")
        if counted < check["emitted"]:
            check["problems"].append(f"counting subscriber saw {counted} < {check['emitted']}")
        _query(url, db, f'DROP DATABASE "{db}"')
        return {
            "records_per_s": acked / w.elapsed,
            "published_per_s": offered / w.elapsed,
            "cpu_us_per_record": w.cpu / max(acked, 1) * 1e6,
            "cpu_pct": w.cpu / w.elapsed * 100,
            "influxd_cpu_pct": influx_cpu / w.elapsed * 100,
            "others_cpu_pct": max(0.0, others_cpu / w.elapsed * 100),
            "latency": percentiles_ms(window_lat),
            "ack": percentiles_ms(ack_lat),
            "overruns": overruns,
            "outlets": len(rt.outlets),
            "drain_s": drain_s,
            "in_flight": in_flight,
            "gc": {
                "collections": gcp.count,
                "total_ms": round(gcp.total * 1e3, 1),
                "longest_ms": round(gcp.longest * 1e3, 1),
            },
            **check,
        }
    finally:
        shutil.rmtree(state, ignore_errors=True)


def apply_gc_env() -> str:
    """``BENCH_GC``: try garbage-collector settings other than the runtime's.

    ``"700,10,10"`` sets ``gc.set_threshold``; a ``freeze`` item calls ``gc.freeze()``
    once the runtime is built, e.g. ``BENCH_GC=freeze,50000,20,100``; ``unfreeze`` undoes
    the runtime's freeze (``BENCH_GC=unfreeze,700,10,10``: the interpreter's defaults).
    Applied after the runtime started (which sets ``GC_THRESHOLDS`` and freezes what it
    built); unset: the runtime's settings.
    """
    spec = os.environ.get("BENCH_GC", "")
    items = [x.strip() for x in spec.split(",") if x.strip()]
    if "unfreeze" in items:
        gc.unfreeze()
    numbers = [int(x) for x in items if x not in ("freeze", "unfreeze")]
    if numbers:
        gc.set_threshold(*numbers)
    if "freeze" in items:
        gc.freeze()
    return spec


async def _run() -> dict[str, Any]:
    gc_spec = os.environ.get("BENCH_GC", "")
    found = influx_from_env()
    if found is None:
        raise SystemExit("e2e_influx needs the runner's influxd: run `python -m bench e2e_influx`")
    url, pid = found
    seconds = bench_seconds()

    log(f"e2e max run: {DEVICES} sim devices flat out, {seconds:g}s")
    top = await run_once(url, pid, "bench_max", "0s", MAX_RUN_READ, seconds)
    log(
        f"e2e max: {top['records_per_s']:,.0f} records/s acknowledged, "
        f"{top['cpu_us_per_record']:.2f} µs CPU/record, problems: {top['problems'] or 'none'}"
    )

    offered = min(LATENCY_OFFERED, 0.9 * top["records_per_s"])
    per_read = max(1, round(offered * LATENCY_INTERVAL / DEVICES))
    offered = per_read * DEVICES / LATENCY_INTERVAL
    log(f"e2e latency run: {offered:,.0f} records/s offered ({per_read} per read every 10ms)")
    low = await run_once(url, pid, "bench_latency", "10ms", per_read, seconds)
    log(f"e2e latency: p99 {low['latency']['p99_ms']} ms, problems: {low['problems'] or 'none'}")

    base = env_baselines()
    r_db, r_enc = base["r_db"], base["r_enc"]
    cpu_target = 4 * 1e6 / r_enc
    p99 = low["latency"]["p99_ms"]
    return report(
        "e2e_influx",
        records_per_s=top["records_per_s"],
        cpu_us_per_record=top["cpu_us_per_record"],
        latency=low["latency"],
        latency_offered_per_s=round(offered),
        latency_run_records_per_s=round(low["records_per_s"]),
        latency_run_cpu_us_per_record=round(low["cpu_us_per_record"], 3),
        latency_run_overruns=low["overruns"],
        latency_run_gc=low["gc"],
        max_run_gc=top["gc"],
        max_run_published_per_s=round(top["published_per_s"]),
        **{f"influx_ack_{k}": v for k, v in low["ack"].items()},
        **{f"max_run_{k}": v for k, v in top["latency"].items()},
        **{f"max_run_influx_ack_{k}": v for k, v in top["ack"].items()},
        daemon_cpu_pct=round(top["cpu_pct"]),
        influxd_cpu_pct=round(top["influxd_cpu_pct"]),
        others_cpu_pct=round(top["others_cpu_pct"]),
        latency_run_others_cpu_pct=round(low["others_cpu_pct"]),
        devices=DEVICES,
        outlets=top["outlets"],
        influx_max_in_flight=top["in_flight"],
        seconds=seconds,
        gc_threshold=list(gc.get_threshold()),
        bench_gc=gc_spec or None,
        records_verified=top["written"] + low["written"],
        verified=not top["problems"] and not low["problems"],
        problems=top["problems"] + low["problems"],
        goals={
            "records_per_s >= 0.75 r_db": top["records_per_s"] >= 0.75 * r_db,
            "cpu_us_per_record <= 4 / r_enc": top["cpu_us_per_record"] <= cpu_target,
            "p99_ms <= 5": p99 is not None and p99 <= GOAL_P99_MS,
        },
        goal_records_per_s=round(0.75 * r_db),
        goal_cpu_us_per_record=round(cpu_target, 3),
    )


def main() -> dict[str, Any]:
    return run_loop(_run())
