"""``opcua``: values/s and CPU per value of the ``opcua`` connector against a local server.

A real asyncua ``Server`` runs in its own process (``tests/integration/opcua/opcua_server.py``,
so its CPU is not counted here) with ``BENCH_OPCUA_POINTS`` Double variables (default 1000).
Three parts of ``BENCH_SECONDS / 2`` each, after a warm-up:

1. **raw**: asyncua's ``Client.read_values`` over all the nodes in a loop, one connection:
   the baseline (values/s, CPU µs per value).
2. **poll**: the connector with ``interval = "0s"`` (back to back), ``timestamp = "source"``
   (the values share one source time, as a device's sample does: one record per poll),
   emitting into a counter. ``p50_ms`` … is one poll (request → records emitted).
3. **subscribe**: the server changes every value every ``SUBSCRIBE_PERIOD`` (one source time
   per round), the connector subscribes with that publishing interval. ``values_per_s`` is
   what arrived; ``offered_values_per_s`` what the server wrote; ``p50_ms`` … the age of a
   round's values when emitted (server write → records emitted).

``BENCH_OPCUA_CONNECTIONS`` (default 1) runs the connector with ``connections = N``: the
point list spread over N sessions. One JSON line per mode; ``vs_raw`` is the mode's
values/s over the raw loop's, ``goal_met`` whether it is at least ``GOAL`` of it.
"""

from __future__ import annotations

import asyncio
import os
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
    report,
    run_loop,
)

sys.path.insert(0, str(REPO / "tests" / "integration" / "opcua"))

from opcua_harness import UaServer

GOAL = 0.8
WARMUP_S = 2.0
SUBSCRIBE_PERIOD = float(os.environ.get("BENCH_OPCUA_PERIOD", "0.05"))
"""Seconds between two rounds of changes on the server (subscribe mode)."""


def _points() -> int:
    return int(os.environ.get("BENCH_OPCUA_POINTS", "1000"))


def _connections() -> int:
    return int(os.environ.get("BENCH_OPCUA_CONNECTIONS", "1"))


def _spec(n: int) -> dict[str, Any]:
    return {
        "variables": [
            {
                "node": f"s=B.v{i}",
                "name": f"v{i}",
                "parent": "B",
                "type": "Double",
                "value": 0.5 + i,
            }
            for i in range(n)
        ]
    }


async def _raw(server: UaServer, n: int, seconds: float) -> dict[str, Any]:
    from asyncua import Client

    async with Client(server.url, timeout=10) as client:
        nodes = [client.get_node(server.node(f"s=B.v{i}")) for i in range(n)]
        deadline = time.monotonic() + WARMUP_S
        while time.monotonic() < deadline:
            await client.read_values(nodes)
        calls: list[float] = []
        w = Window()
        end = w.t0 + seconds
        while True:
            t = time.perf_counter()
            values = await client.read_values(nodes)
            calls.append(time.perf_counter() - t)
            if t >= end:
                break
        w.stop()
    assert len(values) == n
    count = n * len(calls)
    return {
        "values_per_s": count / w.elapsed,
        "cpu_us_per_value": w.cpu / count * 1e6,
        "latency": percentiles_ms(calls),
    }


class _Counter:
    """The connector's ``emit``: counts records and values, notes each batch's timing."""

    def __init__(self) -> None:
        self.records = 0
        self.values = 0
        self.batches = 0
        self.ages: list[float] = []  # subscribe: record time -> emitted
        self.last_emit = time.perf_counter()
        self.durations: list[float] = []  # poll: emit to emit

    async def emit(self, records: list[Any]) -> None:
        now = time.perf_counter()
        self.durations.append(now - self.last_emit)
        self.last_emit = now
        self.batches += 1
        self.records += len(records)
        for r in records:
            self.values += len(r.fields)
        if records:
            self.ages.append((time.time_ns() - records[0].time_ns) / 1e9)

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


async def _connector(
    server: UaServer, mode: str, n: int, connections: int, seconds: float
) -> dict[str, Any]:
    from plantbus.broker.connector import BuildContext
    from plantbus.connectors.opcua import Config, build

    config = Config.model_validate(
        {
            "name": "bench",
            "url": server.url,
            "mode": mode,
            "interval": "0s" if mode == "poll" else f"{SUBSCRIBE_PERIOD}s",
            # subscribe: a queue of 4 per item, so a late publish loses no change
            **({"sampling_interval": f"{SUBSCRIBE_PERIOD / 4}s"} if mode == "subscribe" else {}),
            "timeout": "10s",
            "connections": connections,
            "points": [{"name": f"v{i}", "node": server.node(f"s=B.v{i}")} for i in range(n)],
        }
    )
    ctx = BuildContext(node_name="bench", node_tags={}, state_dir=Path("."))
    connector = build(config, ctx)
    counter = _Counter()
    task = asyncio.create_task(connector.run(counter.emit))
    try:
        await asyncio.sleep(WARMUP_S)
        if connector.last_error:
            raise RuntimeError(f"the connector failed: {connector.last_error}")
        stats0 = await server.acall("stats")
        counter.reset()
        w = Window()
        await asyncio.sleep(seconds)
        w.stop()
        stats1 = await server.acall("stats")
        got = (counter.records, counter.values, counter.batches)
        ages, durations = list(counter.ages), list(counter.durations[1:])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    records, values, batches = got
    offered = (stats1["written"] - stats0["written"]) / w.elapsed
    return {
        "records_per_s": records / w.elapsed,
        "values_per_s": values / w.elapsed,
        "cpu_us_per_value": w.cpu / max(values, 1) * 1e6,
        "cpu_us_per_record": w.cpu / max(records, 1) * 1e6,
        "latency": percentiles_ms(ages if mode == "subscribe" else durations),
        "batches": batches,
        "offered": offered,
        "server_cpu_pct": (stats1["cpu"] - stats0["cpu"]) / w.elapsed * 100,
        "reconnects": connector.connects - 1,
    }


async def _main() -> list[dict[str, Any]]:
    from plantbus.connectors.opcua.session import quiet_library_logs

    quiet_library_logs()  # asyncua's warnings would land between the JSON lines' progress
    n, connections = _points(), _connections()
    seconds = bench_seconds() / 2
    server = UaServer(_spec(n))
    await asyncio.to_thread(server.start)
    lines = []
    try:
        # one source time for all values, as one sample of a device
        items = [{"node": f"s=B.v{i}", "type": "Double", "value": 0.5 + i} for i in range(n)]
        await server.acall("write_many", items=items)
        log(f"opcua: {n} points, raw read_values loop for {seconds:g}s")
        raw = await _raw(server, n, seconds)
        log(f"opcua: raw {raw['values_per_s']:,.0f} values/s")
        for mode in ("poll", "subscribe"):
            if mode == "subscribe":
                await server.acall("writer", period=SUBSCRIBE_PERIOD, count=n)
            log(f"opcua: {mode}, {connections} connection(s), {seconds:g}s")
            res = await _connector(server, mode, n, connections, seconds)
            if mode == "subscribe":
                await server.acall("writer", period=0, count=0)
            vs_raw = res["values_per_s"] / raw["values_per_s"]
            extra: dict[str, Any] = {
                "mode": mode,
                "points": n,
                "connections": connections,
                "values_per_s": round(res["values_per_s"]),
                "cpu_us_per_value": round(res["cpu_us_per_value"], 3),
                "raw_values_per_s": round(raw["values_per_s"]),
                "raw_cpu_us_per_value": round(raw["cpu_us_per_value"], 3),
                "raw_p50_ms": raw["latency"]["p50_ms"],
                "vs_raw": round(vs_raw, 3),
                "goal_met": vs_raw >= GOAL,
                "batches": res["batches"],
                "server_cpu_pct": round(res["server_cpu_pct"], 1),
                "reconnects": res["reconnects"],
            }
            if mode == "subscribe":
                extra["offered_values_per_s"] = round(res["offered"])
                extra["vs_offered"] = round(res["values_per_s"] / max(res["offered"], 1), 3)
            lines.append(
                report(
                    "opcua",
                    records_per_s=res["records_per_s"],
                    cpu_us_per_record=res["cpu_us_per_record"],
                    latency=res["latency"],
                    **extra,
                )
            )
    finally:
        await asyncio.to_thread(server.stop)
    return lines


def main() -> list[dict[str, Any]]:
    return run_loop(_main())  # type: ignore[no-any-return]


if __name__ == "__main__":
    main()
