"""``s7``: reads/s and values/s of one S7 connection against a local python-snap7 server.

The server is the test suite's PLC (``tests/integration/s7/s7_plc.py``) in its own process,
so this process's CPU is the client's alone: 38 points of every area (DB, M, I, Q) and
type (bool … lreal, string, wstring, date_and_time, dtl), granting PDU 480.

Three clients read the same points, each over one connection, for
``min(BENCH_SECONDS, 10) / 2`` s after a warm-up:

* the ``s7`` connector flat out (``interval = "0s"``, uvloop): its planned multi-variable
  reads, decoding, one record per read → ``reads_per_s`` (= ``records_per_s``),
  ``values_per_s``, ``requests_per_s``, ``cpu_us_per_record`` (process CPU per read) and
  ``p50_ms`` / ``p99_ms`` / ``max_ms`` (one read: poll start → its record emitted);
* ``raw_sync_*``: python-snap7's blocking ``Client.read_multi_vars`` (its own read
  optimizer; 20 items per call) on the same items, decoded with ``snap7.util`` getters;
* ``raw_async_*``: python-snap7's ``AsyncClient.read_multi_vars`` likewise (it sends one
  request per item).

``verified`` says every record of the connector held exactly the server's values.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    Window,
    bench_seconds,
    log,
    percentiles_ms,
    proc_cpu_seconds,
    report,
    run_loop,
)

sys.path.insert(0, str(REPO / "tests" / "integration" / "s7"))

from s7_plc import EXPECTED, POINTS, PlcProcess
from servers import free_port

WARMUP_READS = 200


def _items() -> list[tuple[Any, Any, Any]]:
    """Per point: (snap7 item dict, getter(buffer) -> value, name)."""
    from snap7 import util
    from snap7.type import Area

    from plantbus.connectors.s7.address import parse_address

    areas = {"DB": Area.DB, "M": Area.MK, "I": Area.PE, "Q": Area.PA}
    getters = {
        "byte": util.get_byte,
        "char": util.get_char,
        "sint": util.get_sint,
        "usint": util.get_usint,
        "word": util.get_word,
        "int": util.get_int,
        "uint": util.get_uint,
        "dword": util.get_dword,
        "dint": util.get_dint,
        "udint": util.get_udint,
        "real": util.get_real,
        "lreal": util.get_lreal,
        "lint": util.get_lint,
        "ulint": util.get_ulint,
        "lword": util.get_lword,
        "string": util.get_string,
        "wstring": util.get_wstring,
        "date_and_time": util.get_dt,
        "dtl": util.get_dtl,
    }
    out = []
    for p in POINTS:
        a = parse_address(p["address"], p.get("type"))
        item = {"area": areas[a.area], "db_number": a.db, "start": a.offset, "size": a.size}
        if a.type.base == "bool":
            bit = a.bit or 0
            out.append((item, lambda b, bit=bit: util.get_bool(b, 0, bit), p["name"]))
        else:
            getter = getters[a.type.base]
            out.append((item, lambda b, g=getter: g(b, 0), p["name"]))
    return out


def _raw_sync(port: int, seconds: float) -> tuple[int, float]:
    """Reads of every point per second with the blocking client; returns (reads, elapsed)."""
    from snap7.client import Client

    items = _items()
    chunks = [items[i : i + 20] for i in range(0, len(items), 20)]
    client = Client()
    client.connect("127.0.0.1", 0, 1, port)
    try:

        def read_all() -> dict[str, Any]:
            values = {}
            for chunk in chunks:
                _, datas = client.read_multi_vars([it for it, _, _ in chunk])
                for (_, get, name), data in zip(chunk, datas, strict=True):
                    values[name] = get(data)
            return values

        for _ in range(WARMUP_READS // 4):
            read_all()
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            read_all()
            n += 1
        return n, time.perf_counter() - t0
    finally:
        client.disconnect()


async def _raw_async(port: int, seconds: float) -> tuple[int, float]:
    from snap7 import AsyncClient

    items = _items()
    chunks = [items[i : i + 20] for i in range(0, len(items), 20)]
    client = AsyncClient()
    await client.connect("127.0.0.1", 0, 1, port)
    try:

        async def read_all() -> None:
            for chunk in chunks:
                _, datas = await client.read_multi_vars([it for it, _, _ in chunk])
                for (_, get, _name), data in zip(chunk, datas, strict=True):
                    get(data)

        for _ in range(10):
            await read_all()
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            await read_all()
            n += 1
        return n, time.perf_counter() - t0
    finally:
        await client.disconnect()


async def _connector(port: int, seconds: float, server_pid: int) -> dict[str, Any]:
    from plantbus.broker.connector import BuildContext
    from plantbus.connectors.s7 import Config, build

    config = Config.model_validate(
        {
            "name": "plc1",
            "topic": "bench/plc1",
            "host": "127.0.0.1",
            "port": port,
            "interval": "0s",
            "timeout": "5s",
            "points": POINTS,
        }
    )
    connector = build(config, BuildContext("bench", {"site": "ulm"}, Path("/nonexistent")))
    lat: list[float] = []
    wrong = 0
    measuring = False
    tns = time.time_ns

    async def emit(records: list[Any]) -> None:
        nonlocal wrong
        if measuring:
            now = tns()
            for r in records:
                lat.append((now - r.time_ns) / 1e9)
                if r.fields != EXPECTED or r.status is not None:
                    wrong += 1

    task = asyncio.create_task(connector.run(emit))
    try:
        while connector.polls < WARMUP_READS:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        p0, q0 = connector.polls, connector.requests
        s0 = proc_cpu_seconds(server_pid)
        measuring = True
        w = Window()
        await asyncio.sleep(seconds)
        w.stop()
        measuring = False
        reads, requests = connector.polls - p0, connector.requests - q0
        server_cpu = proc_cpu_seconds(server_pid) - s0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    plan = connector.plan
    assert plan is not None
    return {
        "reads": reads,
        "requests": requests,
        "window": w,
        "lat": lat,
        "wrong": wrong,
        "pdu_size": connector.pdu_size,
        "requests_per_read": len(plan.requests),
        "items_per_read": len(plan.items),
        "server_cpu_pct": round(100 * server_cpu / w.elapsed, 1),
    }


def main() -> dict[str, Any]:
    seconds = max(1.0, min(bench_seconds(), 10.0) / 2)
    port = free_port()
    n_points = len(POINTS)
    with PlcProcess(port) as plc:
        assert plc.proc is not None
        c = run_loop(_connector(port, seconds, plc.proc.pid))
        w: Window = c["window"]
        rate = c["reads"] / w.elapsed
        log(f"s7 connector: {rate:,.0f} reads/s, {rate * n_points:,.0f} values/s")
        sync_n, sync_t = _raw_sync(port, seconds)
        log(f"s7 raw sync client: {sync_n / sync_t:,.0f} reads/s")
        async_n, async_t = run_loop(_raw_async(port, seconds))
        log(f"s7 raw AsyncClient: {async_n / async_t:,.0f} reads/s")
    sync_rate, async_rate = sync_n / sync_t, async_n / async_t
    return report(
        "s7",
        records_per_s=rate,
        cpu_us_per_record=w.cpu / max(1, c["reads"]) * 1e6,
        latency=percentiles_ms(c["lat"]),
        reads_per_s=round(rate),
        values_per_s=round(rate * n_points),
        requests_per_s=round(c["requests"] / w.elapsed),
        points=n_points,
        pdu_size=c["pdu_size"],
        requests_per_read=c["requests_per_read"],
        items_per_read=c["items_per_read"],
        cpu_us_per_value=round(w.cpu / max(1, c["reads"] * n_points) * 1e6, 3),
        server_cpu_pct=c["server_cpu_pct"],
        raw_sync_reads_per_s=round(sync_rate),
        raw_sync_values_per_s=round(sync_rate * n_points),
        raw_async_reads_per_s=round(async_rate),
        raw_async_values_per_s=round(async_rate * n_points),
        vs_raw_sync=round(rate / sync_rate, 2),
        verified=c["wrong"] == 0 and c["reads"] > 0,
        records_wrong=c["wrong"],
    )
