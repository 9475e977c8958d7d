"""What every scenario shares: the record shape, the baselines, measuring and reporting.

The record shape (one for all scenarios and both baselines): measurement ``bench``, 3 tags
(``site`` from the node, ``line`` from the device, ``device``), 5 fields (3 float, 1 int,
1 bool), a ``uid`` string field and ns timestamps, spread over ``DEVICES`` series.

The baselines are measured in the same run as the scenarios, on the same machine:

* ``r_enc``: a raw loop that encodes pre-built tuples of the shape to line protocol with
  f-strings and a pre-escaped series prefix, joined into 5000-line payloads (lines/s);
* ``r_db``: a real InfluxDB 1.6.7 ingesting pre-encoded 5000-line batches of the shape,
  one writer, aiohttp on uvloop (lines/s).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# tests/servers.py starts influxd on free ports in a temp dir (shared with the test suite)
sys.path.insert(0, str(REPO / "tests"))

from servers import InfluxServer  # noqa: E402

__all__ = [
    "BATCH_LINES",
    "DEVICES",
    "MEASUREMENT",
    "InfluxServer",
    "Window",
    "bench_seconds",
    "cpu_seconds",
    "enc_baseline",
    "encode_tuples",
    "env_baselines",
    "influx_from_env",
    "make_series",
    "make_tuples",
    "percentiles_ms",
    "proc_cpu_seconds",
    "report",
    "rss_mb",
    "series_prefix",
    "sim_points",
    "system_busy_seconds",
]

MEASUREMENT = "bench"
DEVICES = 10
BATCH_LINES = 5000
NODE_TAGS = {"site": "ulm"}
DEVICE_TAGS = {"line": "L1"}

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def bench_seconds() -> float:
    """``BENCH_SECONDS`` (default 20): how long the timed part of a scenario runs."""
    return float(os.environ.get("BENCH_SECONDS", "20"))


def sim_points() -> list[dict[str, Any]]:
    """The ``points`` of a ``sim`` device producing the shape's 5 fields.

    ``n`` (int) is a counter, so every record can be verified at the far end.
    """
    return [
        {"name": "temp", "signal": "sine", "min": 20.0, "max": 80.0, "period": "60s"},
        {"name": "pressure", "signal": "random_walk", "min": 0.9, "max": 1.1, "step": 0.002},
        {"name": "level", "signal": "ramp", "min": 0.0, "max": 100.0, "period": "30s"},
        {"name": "n", "signal": "counter"},
        {"name": "running", "signal": "step", "min": 0, "max": 1, "period": "5s", "type": "bool"},
    ]


def device_name(i: int) -> str:
    return f"sim{i}"


def make_series() -> list[Any]:
    """One plantbus Series per bench device, tagged like the sim devices' records."""
    from plantbus.broker.record import Series

    out = []
    for i in range(DEVICES):
        tags = {**NODE_TAGS, **DEVICE_TAGS, "device": device_name(i)}
        out.append(Series(f"bench/{device_name(i)}", MEASUREMENT, tags))
    return out


def series_prefix(i: int) -> str:
    # the names and values of the shape need no escaping
    return f"{MEASUREMENT},device={device_name(i)},line=L1,site=ulm "


def make_tuples(
    n: int, seed: int = 1
) -> list[tuple[int, float, float, float, int, bool, str, int]]:
    """``n`` pre-built records of the shape: (series, temp, pressure, level, n, running, uid, ns).

    Floats have full-length reprs like real measurements; UIDs are real UUIDv7 strings;
    timestamps are distinct per series (an hour ago onwards) so InfluxDB overwrites nothing.
    """
    from plantbus.broker.ids import new_ids

    rnd = random.Random(seed).random
    ids = new_ids(n)
    t0 = time.time_ns() - 3600 * 10**9
    return [
        (
            i % DEVICES,
            20.0 + 60.0 * rnd(),
            0.9 + 0.2 * rnd(),
            100.0 * rnd(),
            i,
            i % 3 == 0,
            ids[i],
            t0 + i,
        )
        for i in range(n)
    ]


def encode_tuples(tuples: Sequence[tuple[Any, ...]], prefixes: Sequence[str]) -> list[bytes]:
    """The raw baseline encoder: f-strings, cached prefix, 5000-line payloads."""
    out = []
    for b in range(0, len(tuples), BATCH_LINES):
        lines = [
            f"{prefixes[s]}temp={a!r},pressure={p!r},level={lv!r},n={c}i,"
            f'running={"true" if ok else "false"},uid="{uid}" {ts}'
            for s, a, p, lv, c, ok, uid, ts in tuples[b : b + BATCH_LINES]
        ]
        out.append("\n".join(lines).encode())
    return out


def enc_baseline(n: int = 500_000, repeat: int = 3) -> float:
    """``r_enc``: lines/s of the raw encoder over ``n`` pre-built tuples (best of ``repeat``)."""
    tuples = make_tuples(n)
    prefixes = [series_prefix(i) for i in range(DEVICES)]
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        encode_tuples(tuples, prefixes)
        best = min(best, time.perf_counter() - t)
    return n / best


async def _db_baseline(url: str, n: int) -> float:
    import aiohttp

    tuples = make_tuples(n, seed=2)
    batches = encode_tuples(tuples, [series_prefix(i) for i in range(DEVICES)])
    db = f"r_db_{os.getpid()}"
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/query", params={"q": f'CREATE DATABASE "{db}"'}) as r:
            await r.read()
        params = {"db": db, "precision": "ns"}
        t = time.perf_counter()
        for body in batches:
            async with s.post(f"{url}/write", params=params, data=body) as r:
                if r.status != 204:
                    raise RuntimeError(f"r_db write failed: {r.status} {await r.text()}")
        elapsed = time.perf_counter() - t
        async with s.post(f"{url}/query", params={"q": f'DROP DATABASE "{db}"'}) as r:
            await r.read()
    return n / elapsed


def db_baseline(url: str, n: int) -> float:
    """``r_db``: lines/s InfluxDB ingests of pre-encoded 5000-line batches, one writer."""
    import uvloop

    return uvloop.run(_db_baseline(url, n))


def influx_from_env() -> tuple[str, int] | None:
    """(url, pid) of the influxd the bench runner started, if any."""
    url = os.environ.get("BENCH_INFLUX_URL")
    if not url:
        return None
    return url, int(os.environ["BENCH_INFLUX_PID"])


def env_baselines() -> dict[str, float]:
    return {
        "r_enc": round(float(os.environ.get("BENCH_R_ENC", "nan"))),
        "r_db": round(float(os.environ.get("BENCH_R_DB", "nan"))),
    }


def cpu_seconds() -> float:
    """CPU (user + system) of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_cpu_seconds(pid: int) -> float:
    """CPU (user + system) of another process, e.g. influxd."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def system_busy_seconds() -> float:
    """CPU seconds every process of the machine spent (``/proc/stat``, all cores).

    Less this process and influxd over a window: what other programs took from the cores
    the scenario shares (``others_cpu_pct``), so a noisy run can be told from a slow one.
    """
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / _CLK_TCK


def rss_mb() -> float:
    """Peak resident memory of this process in MB.

    From ``VmHWM``, not ``ru_maxrss``: Linux carries ``ru_maxrss`` over ``exec``, so a
    scenario process would report its parent's peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def percentiles_ms(samples_s: Sequence[float]) -> dict[str, float | None]:
    """p50 / p99 / max of latencies given in seconds, in ms."""
    if not samples_s:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    s = sorted(samples_s)
    n = len(s)
    return {
        "p50_ms": round(s[n // 2] * 1e3, 3),
        "p99_ms": round(s[min(n - 1, (n * 99) // 100)] * 1e3, 3),
        "max_ms": round(s[-1] * 1e3, 3),
    }


class Window:
    """Wall time and process CPU over a measured window."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.c0 = cpu_seconds()
        self.elapsed = 0.0
        self.cpu = 0.0

    def stop(self) -> Window:
        self.elapsed = time.perf_counter() - self.t0
        self.cpu = cpu_seconds() - self.c0
        return self


def report(
    scenario: str,
    *,
    records_per_s: float,
    cpu_us_per_record: float,
    latency: dict[str, float | None],
    **extra: Any,
) -> dict[str, Any]:
    """Print the scenario's one JSON line (the keys every scenario has first)."""
    line: dict[str, Any] = {
        "scenario": scenario,
        "records_per_s": round(records_per_s),
        "cpu_us_per_record": round(cpu_us_per_record, 3),
        **latency,
        "rss_mb": rss_mb(),
        **env_baselines(),
        **extra,
    }
    print(json.dumps(line), flush=True)
    return line


def run_loop(coro: Any) -> Any:
    """Run a scenario coroutine on uvloop (as the daemon does)."""
    import uvloop

    return uvloop.run(coro)


def log(msg: str) -> None:
    """Progress on stderr; stdout carries only the JSON lines."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def gather_cancel(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and wait until they have ended."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
