"""``bridges``: sim devices → bus → an mqtt, amqp or kafka sink, against the real broker.

For each bridge a fresh ``Runtime`` is built from a config text, as the daemon would be:
``DEVICES`` ``sim`` devices reading flat out (100 records per read) → bus → the bridge sink
(``block`` queue and buffer, so nothing may be lost; JSON codec; 5000-record batches split
into one message per device of at most 500 records). After a 3 s warm-up, over
``BENCH_SECONDS``: ``records_per_s`` = records the broker acknowledged per second (PUBACK,
publisher confirm, Kafka ``acks=all``), ``cpu_us_per_record`` = the daemon process's CPU per
acknowledged record (the broker is another process: ``broker_cpu_pct``), and the latency
from a record's ID (read time) to the broker's acknowledgement of its batch.

Beside it, measured in the same run: ``raw_json_us_per_record``, a raw loop that only
JSON-encodes the same record shape (dicts built from pre-made tuples, ``json`` with compact
separators) in 5000-record batches. The goal is ``cpu_us_per_record ≤ 2 × raw``.

The brokers: Mosquitto (QoS 1, no subscriber: it acknowledges and drops), RabbitMQ
(persistent messages, publisher confirms, a durable queue bound to the exchange and capped at
10,000 messages so it cannot grow without bound), tansu (memory storage, ``acks = "all"``,
idempotence off as tansu lacks it). Each prints one JSON line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    DEVICE_TAGS,
    DEVICES,
    MEASUREMENT,
    NODE_TAGS,
    REPO,
    Window,
    bench_seconds,
    device_name,
    log,
    make_series,
    make_tuples,
    percentiles_ms,
    proc_cpu_seconds,
    report,
    run_loop,
    sim_points,
)

sys.path.insert(0, str(REPO / "tests" / "integration" / "bridges"))

WARMUP_S = 3.0
READ = 100  # records per sim read
BATCH = 5000
MAX_RECORDS = 500
QUEUE = 100_000
RAW_N = 200_000
BRIDGES = ("mqtt", "amqp", "kafka")


def raw_json_us_per_record(n: int = RAW_N, repeat: int = 3) -> float:
    """The raw loop: JSON-encode ``n`` records of the shape in 5000-record batches (best of 3)."""
    tuples = make_tuples(n, seed=3)
    series = make_series()
    topics = [s.topic for s in series]
    tags = [dict(s.tags) for s in series]
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for b in range(0, n, BATCH):
            docs = [
                {
                    "uid": uid,
                    "topic": topics[s],
                    "measurement": MEASUREMENT,
                    "time": ts,
                    "tags": tags[s],
                    "fields": {"temp": a, "pressure": p, "level": lv, "n": c, "running": ok},
                    "quality": "good",
                }
                for s, a, p, lv, c, ok, uid, ts in tuples[b : b + BATCH]
            ]
            dumps(docs).encode("utf-8")
        best = min(best, time.perf_counter() - t)
    return best / n * 1e6


def _toml(v: Any) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return json.dumps(v)


def config_text(kind: str, sink: dict[str, Any], state: Path) -> str:
    table = {
        "name": "bridge",
        "subscribe": ["bench/#"],
        "codec": "json",
        "batch_size": BATCH,
        "max_records": MAX_RECORDS,
        "queue": {"size": QUEUE, "policy": "block"},
        "buffer": {"kind": "memory", "max_size": "8MiB", "when_full": "block"},
        **sink,
    }
    text = (
        f'[node]\nname = "bench"\ntags = {_toml(NODE_TAGS)}\nstate_dir = {_toml(str(state))}\n'
        f'shutdown_timeout = "60s"\n\n[[sinks.{kind}]]\n'
    )
    text += "".join(f"{k} = {_toml(v)}\n" for k, v in table.items()) + "\n"
    for i in range(DEVICES):
        text += (
            "[[devices.sim]]\n"
            f'name = "{device_name(i)}"\ntopic = "bench/{device_name(i)}"\n'
            f'measurement = "{MEASUREMENT}"\ntags = {_toml(DEVICE_TAGS)}\n'
            f'interval = "0s"\nbatch = {READ}\npoints = {_toml(sim_points())}\n\n'
        )
    return text


def _tree_cpu(pid: int) -> float:
    """CPU of ``pid`` and its children (RabbitMQ's wrapper script runs the Erlang VM)."""
    total = proc_cpu_seconds(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return total
    for child in children:
        with contextlib.suppress(OSError, ValueError):
            total += _tree_cpu(int(child))
    return total


async def run_bridge(kind: str, sink: dict[str, Any], broker_pid: int) -> dict[str, Any]:
    from plantbus.broker.config import parse_config
    from plantbus.broker.runtime import Runtime

    state = Path(tempfile.mkdtemp(prefix="plantbus-bench-bridges-"))
    try:
        config = parse_config(config_text(kind, sink, state), state / "plantbus.toml")
        rt = Runtime(config)
        await rt.start()
        (ch,) = [c for h in rt.outlets.values() for c in h.outlet.channels]
        await asyncio.sleep(WARMUP_S)
        ch.latencies.clear()
        acked0 = ch.records_out
        messages0 = ch.sink.messages_out  # type: ignore[attr-defined]
        b0 = _tree_cpu(broker_pid)
        w = Window()
        await asyncio.sleep(bench_seconds())
        w.stop()
        acked = ch.records_out - acked0
        messages = ch.sink.messages_out - messages0  # type: ignore[attr-defined]
        broker_cpu = _tree_cpu(broker_pid) - b0
        latencies = list(ch.latencies)
        await rt.shutdown()
        emitted = sum(d.emitted for d in rt.devices.values())
        problems = []
        if ch.records_out != emitted:
            problems.append(f"broker acknowledged {ch.records_out} of {emitted} records")
        if ch.sink.resent_records:  # type: ignore[attr-defined]
            problems.append(f"{ch.sink.resent_records} records sent twice")  # type: ignore[attr-defined]
        return {
            "records_per_s": acked / w.elapsed,
            "cpu_us_per_record": w.cpu / max(acked, 1) * 1e6,
            "daemon_cpu_pct": round(w.cpu / w.elapsed * 100),
            "broker_cpu_pct": round(broker_cpu / w.elapsed * 100),
            "records_per_message": round(acked / max(messages, 1), 1),
            "latency": percentiles_ms(latencies),
            "records_verified": ch.records_out,
            "problems": problems,
        }
    finally:
        shutil.rmtree(state, ignore_errors=True)


async def _bind_capped_queue(url: str, exchange: str) -> None:
    import aio_pika

    conn = await aio_pika.connect(url)
    async with conn:
        ch = await conn.channel()
        ex = await ch.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        q = await ch.declare_queue(
            "bench.bridges", durable=True, arguments={"x-max-length": 10_000}
        )
        await q.bind(ex, routing_key="bench.#")


async def _run() -> list[dict[str, Any]]:
    from bridge_servers import MosquittoServer, RabbitServer, TansuServer

    raw = raw_json_us_per_record()
    log(f"raw JSON encode loop: {raw:.3f} µs/record")
    seconds = bench_seconds()
    base = Path(tempfile.mkdtemp(prefix="plantbus-bench-brokers-"))
    lines = []
    try:
        for kind in BRIDGES:
            if kind == "mqtt":
                server: Any = MosquittoServer(base / "mosquitto").start()
                sink = {"url": f"mqtt://127.0.0.1:{server.port}", "qos": 1}
                stop = server.stop
            elif kind == "amqp":
                server = RabbitServer(base / "rabbitmq").start()
                await _bind_capped_queue(server.url, "plantbus")
                sink = {"url": f"amqp://127.0.0.1:{server.port}/", "exchange": "plantbus"}
                stop = server.close
            else:
                server = TansuServer(base / "tansu").start()
                sink = {
                    "bootstrap_servers": [server.bootstrap],
                    "topic": "plantbus",
                    "enable_idempotence": False,
                    "acks": "all",
                }
                stop = server.stop
            try:
                log(f"bridges {kind}: {DEVICES} sim devices flat out, {seconds:g}s")
                r = await run_bridge(kind, sink, server.pid)
            finally:
                stop()
            log(
                f"bridges {kind}: {r['records_per_s']:,.0f} records/s, "
                f"{r['cpu_us_per_record']:.2f} µs CPU/record, problems: {r['problems'] or 'none'}"
            )
            goal = 2 * raw
            lines.append(
                report(
                    "bridges",
                    records_per_s=r["records_per_s"],
                    cpu_us_per_record=r["cpu_us_per_record"],
                    latency=r["latency"],
                    bridge=kind,
                    raw_json_us_per_record=round(raw, 3),
                    vs_raw=round(r["cpu_us_per_record"] / raw, 2),
                    goal_cpu_us_per_record=round(goal, 3),
                    goal_met=r["cpu_us_per_record"] <= goal,
                    records_per_message=r["records_per_message"],
                    daemon_cpu_pct=r["daemon_cpu_pct"],
                    broker_cpu_pct=r["broker_cpu_pct"],
                    devices=DEVICES,
                    seconds=seconds,
                    records_verified=r["records_verified"],
                    verified=not r["problems"],
                    problems=r["problems"],
                )
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return lines


def main() -> list[dict[str, Any]]:
    return run_loop(_run())  # type: ignore[no-any-return]
