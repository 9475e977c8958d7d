"""``modbus``: requests/s and registers/s of one Modbus TCP connection, beside raw pymodbus.

The server is the test suite's pymodbus ``ModbusTcpServer``
(``tests/integration/modbus/modbus_servers.py``) in its own process, so this process's CPU
is the client's alone; it holds registers 0-999 of units 1-3.

In the same run, alternating, best of two each, ``min(BENCH_SECONDS, 10) / 4`` s per run
after a warm-up:

* ``raw_*``: a raw pymodbus loop, ``AsyncModbusTcpClient.read_holding_registers(0,
  count=125)`` awaited back to back on one connection (no decoding, no records);
* the ``modbus`` connector reading the same 125 registers as 125 ``uint16`` points (one
  planned request per poll) flat out (``interval = "0s"``): requests, decoding into one
  record per poll, UUIDv7, emit → ``requests_per_s``, ``registers_per_s``,
  ``records_per_s`` (= polls/s), ``cpu_us_per_record`` (process CPU per poll) and
  ``p50_ms`` / ``p99_ms`` / ``max_ms`` (poll start → its record emitted).

``vs_raw`` is the connector's requests/s over the raw loop's (goal ≥ 0.8: ``goal_met``).
``shared_*``: units 1-3 as three devices sharing the one connection (round-robin turns),
all flat out. ``verified`` says every record held exactly the server's registers.
"""

from __future__ import annotations

import asyncio
import subprocess
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

SERVER = REPO / "tests" / "integration" / "modbus" / "modbus_servers.py"
COUNT = 125
UNITS = 3
WARMUP = 0.5  # seconds before each measured run
EXPECTED = [(i * 7) & 0xFFFF for i in range(COUNT)]  # what modbus_servers.py --registers holds


class Server:
    """The pymodbus server in its own process; stopped by closing its stdin, then by PID."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER), "--registers", "1000", "--units", str(UNITS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


async def raw_loop(port: int, seconds: float) -> dict[str, float]:
    """Back-to-back reads of 125 registers on one raw pymodbus connection."""
    from pymodbus.client import AsyncModbusTcpClient

    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=3, retries=0)
    assert await client.connect()
    try:
        deadline = time.perf_counter() + WARMUP
        while time.perf_counter() < deadline:
            await client.read_holding_registers(0, count=COUNT, device_id=1)
        n = 0
        w = Window()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            rr = await client.read_holding_registers(0, count=COUNT, device_id=1)
            if rr.isError():
                raise RuntimeError(f"raw read failed: {rr}")
            n += 1
        w.stop()
    finally:
        client.close()
    return {"requests_per_s": n / w.elapsed, "cpu_us_per_request": w.cpu / n * 1e6}


def _device(port: int, unit: int, name: str) -> Any:
    from plantbus.broker.connector import BuildContext
    from plantbus.connectors.modbus import Config, build

    config = Config.model_validate(
        {
            "name": name,
            "topic": f"bench/{name}",
            "host": "127.0.0.1",
            "port": port,
            "unit": unit,
            "interval": "0s",
            "timeout": "3s",
            "points": [{"name": f"r{i}", "address": i} for i in range(COUNT)],
        }
    )
    ctx = BuildContext(node_name="bench", node_tags={"site": "ulm"}, state_dir=Path("/nonexistent"))
    return build(config, ctx)


async def connector_run(port: int, seconds: float, units: int = 1) -> dict[str, Any]:
    """``units`` devices sharing one connection, flat out; what they did in ``seconds``."""
    devices = [_device(port, u, f"mb{u}") for u in range(1, units + 1)]
    link = devices[0].link
    connects0 = link.connects
    latencies: list[float] = []
    state = {"measuring": False, "records": 0, "wrong": 0}

    async def emit(records: list[Any]) -> None:
        if not state["measuring"]:
            return
        now = time.time_ns()
        for r in records:
            latencies.append((now - r.time_ns) / 1e9)
            if r.status is not None or list(r.fields.values()) != EXPECTED:
                state["wrong"] += 1
        state["records"] += len(records)

    tasks = [asyncio.create_task(d.run(emit)) for d in devices]
    try:
        await asyncio.sleep(WARMUP)
        for t in tasks:
            if t.done():
                t.result()  # raise what stopped a device
        requests0 = sum(d.requests for d in devices)
        state["measuring"] = True
        w = Window()
        await asyncio.sleep(seconds)
        w.stop()
        state["measuring"] = False
        requests = sum(d.requests for d in devices) - requests0
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "requests_per_s": requests / w.elapsed,
        "records_per_s": state["records"] / w.elapsed,
        "cpu_us_per_record": w.cpu / max(1, state["records"]) * 1e6,
        "latency": percentiles_ms(latencies),
        "records": state["records"],
        "wrong": state["wrong"],
        "connections": link.connects - connects0,
    }


async def _main(port: int, seconds: float) -> dict[str, Any]:
    raws, runs = [], []
    for i in range(2):
        log(f"raw pymodbus loop, run {i + 1}")
        raws.append(await raw_loop(port, seconds))
        log(f"modbus connector, run {i + 1}")
        runs.append(await connector_run(port, seconds))
    log(f"modbus connector, {UNITS} units sharing one connection")
    shared = await connector_run(port, seconds, UNITS)
    return {
        "raw": max(raws, key=lambda r: r["requests_per_s"]),
        "run": max(runs, key=lambda r: r["requests_per_s"]),
        "shared": shared,
        "all_runs": runs,
    }


def main() -> dict[str, Any]:
    seconds = min(bench_seconds(), 10.0) / 4
    server = Server()
    log(f"pymodbus server pid {server.proc.pid} on 127.0.0.1:{server.port}")
    try:
        s0 = proc_cpu_seconds(server.proc.pid)
        t0 = time.perf_counter()
        res = run_loop(_main(server.port, seconds))
        server_cpu = (proc_cpu_seconds(server.proc.pid) - s0) / (time.perf_counter() - t0)
    finally:
        server.stop()
    raw, run, shared = res["raw"], res["run"], res["shared"]
    vs_raw = run["requests_per_s"] / raw["requests_per_s"]
    verified = all(r["wrong"] == 0 and r["records"] > 0 for r in [*res["all_runs"], shared])
    return report(
        "modbus",
        records_per_s=run["records_per_s"],
        cpu_us_per_record=run["cpu_us_per_record"],
        latency=run["latency"],
        registers_per_request=COUNT,
        requests_per_s=round(run["requests_per_s"]),
        registers_per_s=round(run["requests_per_s"] * COUNT),
        raw_requests_per_s=round(raw["requests_per_s"]),
        raw_registers_per_s=round(raw["requests_per_s"] * COUNT),
        raw_cpu_us_per_request=round(raw["cpu_us_per_request"], 1),
        vs_raw=round(vs_raw, 3),
        goal_vs_raw=0.8,
        goal_met=vs_raw >= 0.8,
        connections=run["connections"],
        shared_units=UNITS,
        shared_connections=shared["connections"],
        shared_requests_per_s=round(shared["requests_per_s"]),
        shared_registers_per_s=round(shared["requests_per_s"] * COUNT),
        shared_p99_ms=shared["latency"]["p99_ms"],
        server_cpu_pct=round(100 * server_cpu, 1),
        verified=verified,
    )
