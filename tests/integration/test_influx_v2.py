"""The influxdb sink's 2.x/3.x API (``bucket``, ``org``, ``token`` → ``/api/v2/write``).

The server is a real VictoriaMetrics, which takes InfluxDB's ``/api/v2/write``; values are
read back through its ``/api/v1/export``. VictoriaMetrics keeps numbers only, at millisecond
precision, so the records here are 1 ms apart and only numeric fields are compared (the
string ``uid`` field is dropped by it). A v2 error body (``{"code": …, "message": …}``) comes
from tests/faults.py in front of it: VictoriaMetrics never refuses a token.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from faults import FaultProxy
from pydantic import ValidationError
from servers import VictoriaMetricsServer

from plantbus.broker.bus import Bus
from plantbus.broker.connector import BuildContext
from plantbus.broker.ids import new_ids
from plantbus.broker.outlet import Outlet
from plantbus.broker.record import Record, Series
from plantbus.broker.sinks.influxdb import Config, InfluxDBSink, build

V2_WRITE = "/api/v2/write"


def press(run: str) -> Series:
    """A series of its own per test (VictoriaMetrics keeps every test's points)."""
    return Series(f"plant/h1/{run}", "press7", {"device": "press7", "run": run})


def make_records(n: int, series: Series) -> list[Record]:
    """``n`` records 1 ms apart (VictoriaMetrics keeps milliseconds)."""
    start = (time.time_ns() // 1_000_000) * 1_000_000
    ids = new_ids(n)
    return [
        Record(series, {"n": i, "temp": 20.0 + i / 8}, start + i * 1_000_000, ids[i])
        for i in range(n)
    ]


def v2_config(url: str, **kw: object) -> Config:
    kw.setdefault("name", "influx2")
    kw.setdefault("retry_initial", "5ms")
    kw.setdefault("retry_max", "50ms")
    kw.setdefault("timeout", "20s")
    kw.setdefault("flush_interval", "60s")
    kw.setdefault("batch_size", 1000)
    return Config.model_validate(
        {"url": url, "org": "plant", "bucket": "telemetry", "token": "s3cr3t-token", **kw}
    )


def make_sink(cfg: Config, state_dir: Path) -> InfluxDBSink:
    return build(cfg, BuildContext(node_name="edge-07", node_tags={}, state_dir=state_dir))


async def deliver(sink: InfluxDBSink, batches: list[list[Record]]) -> Outlet:
    bus = Bus()
    outlet = Outlet("o", bus, [(sink.config, sink)])
    task = asyncio.create_task(outlet.run())
    for batch in batches:
        await bus.publish(batch)
    await outlet.stop(60.0)
    await task
    return outlet


def read_back(vm: VictoriaMetricsServer, run: str, field: str, n: int) -> dict[int, float]:
    points = vm.points(f'press7_{field}{{run="{run}"}}', at_least=n)
    assert len(points) == 1, points
    ((labels, values),) = points.items()
    assert ("device", "press7") in labels
    return values


def expected(records: list[Record], field: str) -> dict[int, float]:
    return {r.time_ns // 1_000_000: float(r.fields[field]) for r in records}


# -- config ------------------------------------------------------------------------------------


def test_v1_and_v2_keys_exclude_each_other() -> None:
    with pytest.raises(ValidationError, match=r"database \(InfluxDB 1.x API\) and bucket"):
        Config.model_validate({"database": "plant", "bucket": "telemetry"})
    with pytest.raises(ValidationError, match=r"username, password \(InfluxDB 1.x API\)"):
        Config.model_validate({"bucket": "b", "username": "u", "password": "p"})
    with pytest.raises(
        ValidationError, match=r"create_database \(InfluxDB 1.x API\) and bucket, token"
    ):
        Config.model_validate({"create_database": False, "token": "t", "bucket": "b"})
    with pytest.raises(ValidationError, match="org, token set without bucket"):
        Config.model_validate({"org": "o", "token": "t"})
    with pytest.raises(ValidationError, match="database is required"):
        Config.model_validate({})
    cfg = Config.model_validate({"bucket": "telemetry"})  # org and token are optional
    assert cfg.v2 and cfg.database is None


def test_check_names_file_and_key_of_a_mixed_config(tmp_path: Path) -> None:
    (tmp_path / "plantbus.toml").write_text(
        textwrap.dedent(
            """
            [node]
            name = "edge"
            state_dir = "state"
            [api]
            enabled = false

            [[sinks.influxdb]]
            name = "tsdb"
            database = "plant"
            bucket = "telemetry"
            token = "t"
            """
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "plantbus.broker.cli", "check", "-c", "plantbus.toml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out
    assert "plantbus.toml: sinks.influxdb[0]" in out.stderr
    assert "database (InfluxDB 1.x API) and bucket, token (2.x/3.x API) exclude" in out.stderr
    assert "Traceback" not in out.stderr


# -- against VictoriaMetrics' /api/v2/write ----------------------------------------------------


async def test_batches_reach_api_v2_write_and_read_back(victoriametrics, tmp_path, request):
    run = f"v2w{time.time_ns()}"
    records = make_records(2500, press(run))
    async with FaultProxy(victoriametrics.url, paths=None, keep_bodies=True) as proxy:
        sink = make_sink(v2_config(proxy.url), tmp_path)
        outlet = await deliver(sink, [records[:1000], records[1000:2000], records[2000:]])
    m = outlet.metrics()
    assert (m["records_out"], m["rejected"]) == (2500, 0)
    # path, parameters and the token header of every write
    writes = proxy.matching(V2_WRITE)
    assert len(writes) == 3 and not proxy.matching("/write")
    for req in writes:
        assert req.method == "POST"
        assert req.query == {"org": "plant", "bucket": "telemetry", "precision": "ns"}
        assert req.headers["Authorization"] == "Token s3cr3t-token"
        assert req.outcome == "forwarded 204"
    # the bytes are the line protocol the 1.x path sends
    # (two batches in flight by default: they may arrive in either order)
    first = b"press7,device=press7,run=" + run.encode() + b" n=0i,temp=20.0,uid="
    assert sorted(r.body.count(b"\n") for r in writes) == [500, 1000, 1000]
    assert any(r.body.startswith(first) for r in writes)
    # every value is back, at millisecond precision
    assert read_back(victoriametrics, run, "n", len(records)) == expected(records, "n")
    assert read_back(victoriametrics, run, "temp", len(records)) == expected(records, "temp")


async def test_gzip_bodies_on_api_v2_write(victoriametrics, tmp_path):
    run = f"v2gz{time.time_ns()}"
    records = make_records(500, press(run))
    sink = make_sink(v2_config(victoriametrics.url, gzip=1), tmp_path)
    outlet = await deliver(sink, [records])
    assert outlet.metrics()["records_out"] == 500
    assert read_back(victoriametrics, run, "temp", len(records)) == expected(records, "temp")


async def test_a_v2_error_body_is_reported_and_the_batch_waits(victoriametrics, tmp_path, caplog):
    run = f"v2e{time.time_ns()}"
    records = make_records(300, press(run))
    body = '{"code":"unauthorized","message":"unauthorized access"}'
    async with FaultProxy(victoriametrics.url, paths=(V2_WRITE,)) as proxy:
        proxy.fail(401, body=body, times=3)
        proxy.fail(429, body='{"code":"too many requests","message":"slow down"}')
        sink = make_sink(v2_config(proxy.url, batch_size=300), tmp_path)
        with caplog.at_level(logging.WARNING, "plantbus.broker.outlet"):
            outlet = await deliver(sink, [records])
    outcomes = [r.outcome for r in proxy.matching(V2_WRITE)]
    assert outcomes == ["fault status 401"] * 3 + ["fault status 429", "forwarded 204"]
    # a refused token is a misconfiguration: an error saying why, logged once
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert "HTTP 401" in errors[0] and "unauthorized: unauthorized access" in errors[0]
    assert "check token and its write permission on bucket 'telemetry'" in errors[0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("HTTP 429: too many requests: slow down" in w for w in warnings), warnings
    # the batch waited and got through whole
    m = outlet.metrics()
    assert (m["records_out"], m["rejected"]) == (300, 0)
    assert outlet.channels[0].health == "ok"
    assert read_back(victoriametrics, run, "n", len(records)) == expected(records, "n")
