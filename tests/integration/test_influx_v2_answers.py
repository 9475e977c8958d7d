"""How the influxdb sink answers InfluxDB 2.x's refusals on ``/api/v2/write``.

VictoriaMetrics (the real server of test_influx_v2.py) never refuses a line, so InfluxDB
2.x's refusals come from tests/standins.py's ``InfluxV2Facade`` in front of a real InfluxDB
1.6.7: a body with an unparsable line refused whole (400, nothing written), a 422 partial
write of a field type conflict, 413, 401 / 403 for tokens, 404 for a missing bucket, each
in 2.x's error JSON. The real InfluxDB decides what is written; every good record is read
back from it by its ID. 503 with Retry-After comes from tests/faults.py in front of a real
VictoriaMetrics, whose values are read back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from faults import FaultProxy
from servers import InfluxServer
from standins import InfluxV2Facade

from plantbus.broker.bus import Bus
from plantbus.broker.connector import BuildContext
from plantbus.broker.ids import new_ids
from plantbus.broker.outlet import Outlet
from plantbus.broker.record import Record, Series
from plantbus.broker.sinks.base import EncodedBatch, PartialWriteError
from plantbus.broker.sinks.influxdb import Config, InfluxDBSink, _error_message, build

TOKEN = "s3cr3t-token"
PRESS = Series("plant/h1/press7", "press7", {"device": "press7"})
CONFLICT = Series("plant/h1/c", "conflict", {"device": "c"})


def make_records(n: int, series: Series = PRESS) -> list[Record]:
    start = (time.time_ns() // 1_000_000) * 1_000_000  # whole ms: VictoriaMetrics keeps ms
    ids = new_ids(n)
    return [
        Record(series, {"n": i, "temp": 20.0 + i / 8}, start + i * 1_000_000, ids[i])
        for i in range(n)
    ]


def v2_config(url: str, bucket: str, **kw: object) -> Config:
    kw.setdefault("name", "influx2")
    kw.setdefault("org", "plant")
    kw.setdefault("token", TOKEN)
    kw.setdefault("retry_initial", "5ms")
    kw.setdefault("retry_max", "50ms")
    kw.setdefault("timeout", "20s")
    kw.setdefault("batch_size", 20_000)
    kw.setdefault("flush_interval", "60s")
    return Config.model_validate({"url": url, "bucket": bucket, **kw})


def make_sink(cfg: Config, state_dir: Path) -> InfluxDBSink:
    return build(cfg, BuildContext(node_name="edge-07", node_tags={}, state_dir=state_dir))


async def until(predicate, limit: float = 20.0, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)


async def deliver(sink: InfluxDBSink, records: list[Record]) -> Outlet:
    bus = Bus()
    outlet = Outlet("o", bus, [(sink.config, sink)])
    task = asyncio.create_task(outlet.run())
    await bus.publish(records)
    await outlet.stop(60.0)
    await task
    return outlet


def stored_uids(server: InfluxServer, db: str, measurement: str = "press7") -> list[str]:
    return [row["uid"] for row in server.rows(f'SELECT uid FROM "{measurement}"', db)]


def dead_letters(path: Path) -> list[tuple[str, str]]:
    """(comment, uid or line) of each dead-lettered line, in file order."""
    lines = path.read_text().splitlines()
    return [
        (comment, line.split('uid="')[1][:36] if 'uid="' in line else line)
        for comment, line in zip(lines[::2], lines[1::2], strict=True)
    ]


# -- 400 / 422: bad lines among good ones ------------------------------------------------------


@pytest.mark.parametrize("gzip", [0, 1])
async def test_unparsable_lines_refused_whole_by_2x_are_isolated(
    influxdb, influx_db, tmp_path, gzip
):
    now = time.time_ns()
    good = [f'press7,device=p n={i}i,uid="good-{i}" {now + i}\n'.encode() for i in range(200)]
    wrong = [b"garbage line\n", b"press7,device=p n=\n"]
    lines = [*good[:60], wrong[0], *good[60:150], wrong[1], *good[150:]]
    batch = EncodedBatch(b"".join(lines), records=len(lines), codec="line_protocol", seq=3)
    async with InfluxV2Facade(influxdb.url) as facade:
        sink = make_sink(v2_config(facade.url, influx_db, gzip=gzip), tmp_path)
        await sink.connect()
        try:
            with pytest.raises(PartialWriteError, match="refused 2 of 202 lines") as e:
                await sink.write(batch)
        finally:
            await sink.close()
    assert e.value.rejected_records == 2
    # 2.x wrote nothing of the first body: the halves got every good line in
    assert facade.writes()[0].status == 400
    assert sorted(stored_uids(influxdb, influx_db)) == sorted(f"good-{i}" for i in range(200))
    letters = dead_letters(tmp_path / "deadletter" / "influx2.lp")
    assert [line for _, line in letters] == ["garbage line", "press7,device=p n="]
    for comment, _ in letters:
        assert "batch=3 HTTP 400: unable to parse:" in comment  # each line's own reason


async def test_a_422_partial_write_is_isolated(influxdb, influx_db, tmp_path):
    status, text = influxdb.write(influx_db, f"conflict temp=1i {time.time_ns() - 10**9}".encode())
    assert status == 204, text  # temp is an integer field of "conflict": a float conflicts
    good, bad = make_records(2000), make_records(3, CONFLICT)
    batch = good[:100] + bad[:1] + good[100:1500] + bad[1:] + good[1500:]
    async with InfluxV2Facade(influxdb.url) as facade:
        outlet = await deliver(make_sink(v2_config(facade.url, influx_db), tmp_path), batch)
    got = stored_uids(influxdb, influx_db)
    assert len(got) == 2000 and set(got) == {r.id for r in good}
    assert facade.writes()[0].status == 422
    letters = dead_letters(tmp_path / "deadletter" / "influx2.lp")
    assert [uid for _, uid in letters] == [r.id for r in bad]
    for comment, _ in letters:
        assert "HTTP 422: unprocessable entity: failure writing points to database: " in comment
        assert "partial write: field type conflict" in comment
    m = outlet.metrics()
    assert (m["records_out"], m["rejected_records"], m["influx2.dead_lettered"]) == (2000, 3, 3)


# -- 413 ---------------------------------------------------------------------------------------


async def test_413_from_2x_is_split_and_nothing_is_lost(influxdb, influx_db, tmp_path):
    sent = make_records(500)
    async with InfluxV2Facade(influxdb.url, max_body=20_000) as facade:
        outlet = await deliver(make_sink(v2_config(facade.url, influx_db), tmp_path), sent)
    assert sorted(stored_uids(influxdb, influx_db)) == sorted(r.id for r in sent)
    statuses = [w.status for w in facade.writes()]
    assert statuses[0] == 413 and statuses.count(204) >= 4
    m = outlet.metrics()
    assert (m["records_out"], m["rejected"]) == (500, 0)
    assert m["influx2.isolate_requests"] == len(statuses) - 1


# -- 401 / 403 / 404: unhealthy, nothing lost -----------------------------------------------------


@pytest.mark.parametrize(
    ("token", "says"),
    [
        ("wrong", "HTTP 401 (authentication/authorization; check token"),
        ("read-only", "HTTP 403 (authentication/authorization; check token"),
    ],
)
async def test_401_403_unhealthy_until_the_token_works(
    influxdb, influx_db, tmp_path, caplog, token, says
):
    sent = make_records(20)
    async with InfluxV2Facade(influxdb.url, read_token="read-only") as facade:
        cfg = v2_config(facade.url, influx_db, token=token, batch_size=20)
        bus = Bus()
        outlet = Outlet("o", bus, [(cfg, make_sink(cfg, tmp_path))])
        task = asyncio.create_task(outlet.run())
        with caplog.at_level(logging.WARNING, "plantbus.broker.outlet"):
            await bus.publish(sent)
            await until(lambda: outlet.metrics()["retries"] >= 4, what="retries")
        state = outlet.status()["influx2"]
        assert state["health"] == "unhealthy"
        assert says in state["last_error"]
        assert f"write permission on bucket {influx_db!r}" in state["last_error"]
        assert outlet.metrics()["buffer_records"] == 20
        assert sum(r.levelno == logging.ERROR for r in caplog.records) == 1  # once
        facade.token = token  # the operator gives the token its permission
        await until(lambda: outlet.metrics()["records_out"] == 20, what="delivery")
        await outlet.stop(10.0)
        await task
    assert outlet.status()["influx2"]["health"] == "ok"
    assert sorted(stored_uids(influxdb, influx_db)) == sorted(r.id for r in sent)


async def test_404_bucket_not_found_waits_for_the_bucket(influxdb, tmp_path):
    bucket = "v2_bucket_made_later"
    sent = make_records(10)
    async with InfluxV2Facade(influxdb.url) as facade:
        cfg = v2_config(facade.url, bucket, batch_size=10)
        bus = Bus()
        outlet = Outlet("o", bus, [(cfg, make_sink(cfg, tmp_path))])
        task = asyncio.create_task(outlet.run())
        await bus.publish(sent)
        await until(lambda: outlet.metrics()["retries"] >= 3, what="retries")
        error = outlet.channels[0].last_error
        assert error.startswith("MisconfiguredSinkError: InfluxDB answered HTTP 404: not found")
        assert f"create the bucket {bucket!r} in InfluxDB, or check org" in error
        assert outlet.status()["influx2"]["health"] == "unhealthy"
        influxdb.query(f'CREATE DATABASE "{bucket}"')  # the operator creates the bucket
        try:
            await until(lambda: outlet.metrics()["records_out"] == 10, what="delivery")
            await outlet.stop(10.0)
            await task
            assert sorted(stored_uids(influxdb, bucket)) == sorted(r.id for r in sent)
        finally:
            influxdb.query(f'DROP DATABASE "{bucket}"')


# -- 503 with Retry-After, against VictoriaMetrics -----------------------------------------------


async def test_503_retry_after_is_honoured_then_every_value_arrives(victoriametrics, tmp_path):
    run = f"v2r{time.time_ns()}"
    sent = make_records(100, Series(f"plant/h1/{run}", "press7", {"device": "p", "run": run}))
    async with FaultProxy(victoriametrics.url, paths=("/api/v2/write",)) as proxy:
        proxy.fail(503, retry_after="1", body='{"code":"unavailable","message":"too busy"}')
        cfg = v2_config(proxy.url, "telemetry", retry_initial="1ms", retry_max="5s")
        outlet = await deliver(make_sink(cfg, tmp_path), sent)
    first, second = proxy.matching("/api/v2/write")
    assert (first.outcome, second.outcome) == ("fault status 503", "forwarded 204")
    assert second.time - first.time >= 0.95
    assert "HTTP 503: unavailable: too busy" in outlet.channels[0].last_error
    points = victoriametrics.points(f'press7_temp{{run="{run}"}}', at_least=100)
    assert list(points.values()) == [{r.time_ns // 10**6: r.fields["temp"] for r in sent}]


# -- error bodies --------------------------------------------------------------------------------


def test_error_bodies_of_each_api_version():
    assert _error_message('{"error":"database not found: \\"x\\""}') == 'database not found: "x"'
    assert _error_message('{"code":"invalid","message":"unable to parse \'x\': bad"}') == (
        "invalid: unable to parse 'x': bad"
    )
    v3 = (
        '{"error":"partial write of line protocol occurred","data":['
        '{"original_line":"m v=","line_number":2,"error_message":"missing field value"},'
        '{"original_line":"x","line_number":5,"error_message":"invalid line"}]}'
    )
    assert _error_message(v3) == (
        "partial write of line protocol occurred\n"
        "unable to parse 'm v=': missing field value\n"
        "unable to parse 'x': invalid line"
    )
    assert _error_message("<html>bad gateway</html>") == "<html>bad gateway</html>"
