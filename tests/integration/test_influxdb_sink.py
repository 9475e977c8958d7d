"""The influxdb sink behind an Outlet, against a real InfluxDB 1.6.7.

Faults a real server cannot produce on demand (503, 429 with Retry-After, a hang, a cut
connection) come from tests/faults.py in front of the real server; every record is then
read back from InfluxDB by its ID.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults import FaultProxy
from pydantic import ValidationError
from servers import InfluxServer, free_port

from plantbus.broker.bus import Bus
from plantbus.broker.connector import BuildContext
from plantbus.broker.ids import new_ids
from plantbus.broker.outlet import Outlet
from plantbus.broker.record import Record, Series
from plantbus.broker.registry import load_sink_module
from plantbus.broker.sinks.base import RetryableSinkError
from plantbus.broker.sinks.influxdb import Config, InfluxDBSink

CTX = BuildContext(node_name="edge-07", node_tags={}, state_dir=Path("/nonexistent"))
PRESS = Series("plant/h1/press7", "press7", {"device": "press7", "line": "L1"})


def make_records(n: int, series: Series = PRESS, **fields: float) -> list[Record]:
    now = time.time_ns()
    ids = new_ids(n)
    return [
        Record(series, {"n": i, "temp": 20.0 + i / 8, **fields}, now + i * 1000, ids[i])
        for i in range(n)
    ]


def sink_config(url: str, db: str, **kw: object) -> Config:
    kw.setdefault("name", "influx")
    kw.setdefault("retry_initial", "5ms")
    kw.setdefault("retry_max", "100ms")
    kw.setdefault("timeout", "5s")
    return Config.model_validate({"url": url, "database": db, **kw})


def build(cfg: Config) -> InfluxDBSink:
    module = load_sink_module("influxdb")
    sink = module.build(cfg, CTX)
    assert isinstance(sink, InfluxDBSink)
    return sink


async def until(predicate, limit: float = 15.0, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)


async def deliver(cfg: Config, batches: list[list[Record]], **outlet_kw: object) -> Outlet:
    """Publish ``batches`` through an outlet into the sink and stop it (draining)."""
    bus = Bus()
    outlet = Outlet("o", bus, [(cfg, build(cfg))], **outlet_kw)  # type: ignore[arg-type]
    task = asyncio.create_task(outlet.run())
    for b in batches:
        await bus.publish(b)
    await outlet.stop(20.0)
    await task
    return outlet


def stored_uids(influxdb: InfluxServer, db: str, measurement: str = "press7") -> list[str]:
    return [row["uid"] for row in influxdb.rows(f'SELECT uid FROM "{measurement}"', db)]


def assert_all_once(influxdb: InfluxServer, db: str, sent: list[Record], m: str = "press7"):
    got = stored_uids(influxdb, db, m)
    assert len(got) == len(sent)
    assert sorted(got) == sorted(r.id for r in sent)


# -- the normal path ---------------------------------------------------------------------------


async def test_every_record_arrives_once_with_its_values(influxdb, influx_db):
    sent = make_records(2500)
    cfg = sink_config(influxdb.url, influx_db, batch_size=1000, flush_interval="50ms")
    outlet = await deliver(cfg, [sent[i : i + 100] for i in range(0, 2500, 100)])
    assert_all_once(influxdb, influx_db, sent)
    rows = influxdb.rows(f"SELECT * FROM press7 WHERE uid = '{sent[77].id}'", influx_db)
    assert rows == [
        {
            "time": sent[77].time_ns,
            "n": 77,
            "temp": 20.0 + 77 / 8,
            "uid": sent[77].id,
            "device": "press7",
            "line": "L1",
        }
    ]
    m = outlet.metrics()
    assert m["records_out"] == 2500 and m["batches_out"] == 3
    assert m["retries"] == 0 and m["rejected"] == 0


async def test_database_is_created_and_recreated_when_dropped(influxdb, influx_db):
    influxdb.query(f'DROP DATABASE "{influx_db}"')
    cfg = sink_config(influxdb.url, influx_db, batch_size=10, flush_interval="20ms")
    sink = build(cfg)
    bus = Bus()
    outlet = Outlet("o", bus, [(cfg, sink)])
    task = asyncio.create_task(outlet.run())
    first, second = make_records(10), make_records(10)
    await bus.publish(first)
    await until(lambda: outlet.metrics()["records_out"] == 10)
    influxdb.query(f'DROP DATABASE "{influx_db}"')  # e.g. an operator's mistake
    await bus.publish(second)
    await outlet.stop(10.0)
    await task
    assert_all_once(influxdb, influx_db, second)
    assert sink.recreated == 1
    assert outlet.metrics()["rejected"] == 0


async def test_retention_policy_is_created_and_written_to(influxdb, influx_db):
    rp = {"name": "week", "duration": "7d", "default": True}
    cfg = sink_config(influxdb.url, influx_db, retention_policy=rp, batch_size=100)
    sent = make_records(50)
    await deliver(cfg, [sent])
    rps = influxdb.rows(f'SHOW RETENTION POLICIES ON "{influx_db}"', influx_db)
    week = next(r for r in rps if r["name"] == "week")
    assert (week["duration"], week["default"]) == ("168h0m0s", True)
    rows = influxdb.rows(f'SELECT count(uid) FROM "{influx_db}"."week"."press7"', influx_db)
    assert rows[0]["count"] == 50


async def test_an_existing_retention_policy_is_left_as_it_is(influxdb, influx_db, caplog):
    influxdb.query(f'CREATE RETENTION POLICY "week" ON "{influx_db}" DURATION 2h REPLICATION 1')
    rp = {"name": "week", "duration": "7d", "default": True}
    cfg = sink_config(influxdb.url, influx_db, retention_policy=rp)
    sent = make_records(5)
    with caplog.at_level(logging.INFO, "plantbus.broker.sinks.influxdb"):
        await deliver(cfg, [sent])
    rps = influxdb.rows(f'SHOW RETENTION POLICIES ON "{influx_db}"', influx_db)
    week = next(r for r in rps if r["name"] == "week")
    assert (week["duration"], week["default"]) == ("2h0m0s", False)
    assert "left as it is" in caplog.text
    rows = influxdb.rows(f'SELECT count(uid) FROM "{influx_db}"."week"."press7"', influx_db)
    assert rows[0]["count"] == 5


async def test_gzip_bodies_are_accepted(influxdb, influx_db):
    sent = make_records(300)
    async with FaultProxy(influxdb.url) as proxy:
        cfg = sink_config(proxy.url, influx_db, gzip=True, batch_size=100)
        await deliver(cfg, [sent])
    assert_all_once(influxdb, influx_db, sent)
    writes = proxy.matching("/write")
    assert len(writes) == 3
    assert all(r.headers.get("Content-Encoding") == "gzip" for r in writes)
    assert writes[0].query == {"db": influx_db, "precision": "ns"}


# -- faults ------------------------------------------------------------------------------------


async def test_503_three_times_then_every_record_arrives_once(influxdb, influx_db):
    sent = make_records(200)
    async with FaultProxy(influxdb.url) as proxy:
        proxy.fail(503, times=3)
        cfg = sink_config(proxy.url, influx_db, batch_size=100)
        outlet = await deliver(cfg, [sent[:100], sent[100:]])
    assert_all_once(influxdb, influx_db, sent)
    assert proxy.faults_served == 3 and proxy.forwarded >= 2
    m = outlet.metrics()
    assert m["retries"] == 3 and m["records_out"] == 200 and m["rejected"] == 0
    assert "HTTP 503" in outlet.channels[0].last_error


async def test_429_retry_after_is_honoured(influxdb, influx_db):
    sent = make_records(20)
    async with FaultProxy(influxdb.url) as proxy:
        proxy.fail(429, retry_after="1")
        cfg = sink_config(proxy.url, influx_db, retry_initial="1ms", retry_max="5s")
        outlet = await deliver(cfg, [sent])
    assert_all_once(influxdb, influx_db, sent)
    first, second = proxy.matching("/write")[:2]
    assert first.outcome == "fault status 429" and second.outcome == "forwarded 204"
    assert second.time - first.time >= 0.95
    assert outlet.metrics()["retries"] == 1


async def test_a_hung_request_times_out_and_is_retried(influxdb, influx_db):
    sent = make_records(20)
    async with FaultProxy(influxdb.url) as proxy:
        proxy.hang()
        cfg = sink_config(proxy.url, influx_db, timeout="300ms")
        outlet = await deliver(cfg, [sent])
    assert_all_once(influxdb, influx_db, sent)
    assert [r.outcome for r in proxy.matching("/write")] == ["fault hang", "forwarded 204"]
    assert outlet.channels[0].last_error == "TimeoutError: write timed out after 0.3s"


async def test_a_cut_connection_is_retried(influxdb, influx_db):
    sent = make_records(20)
    async with FaultProxy(influxdb.url) as proxy:
        proxy.cut(times=2)
        cfg = sink_config(proxy.url, influx_db)
        outlet = await deliver(cfg, [sent])
    assert_all_once(influxdb, influx_db, sent)
    assert outlet.metrics()["retries"] == 2
    assert "ServerDisconnectedError" in outlet.channels[0].last_error


async def test_two_batches_in_flight_the_next_ones_arrive_while_one_hangs(influxdb, influx_db):
    sent = make_records(40)
    async with FaultProxy(influxdb.url) as proxy:
        proxy.hang(seconds=1.0)  # then cut: the batch is retried
        cfg = sink_config(proxy.url, influx_db, batch_size=10, flush_interval="60s")
        assert cfg.max_in_flight == 2  # the influxdb default
        outlet = await deliver(cfg, [sent[i : i + 10] for i in range(0, 40, 10)])
    assert_all_once(influxdb, influx_db, sent)
    writes = proxy.matching("/write")
    assert writes[0].outcome == "fault hang"
    # batches 2-4 went through the second slot while batch 1 hung; then batch 1's retry
    during = [w for w in writes[1:] if w.time < writes[0].time + 0.9]
    assert [w.outcome for w in during] == ["forwarded 204"] * 3
    assert [w.outcome for w in writes[4:]] == ["forwarded 204"]
    m = outlet.metrics()
    assert (m["records_out"], m["batches_out"], m["retries"], m["undelivered"]) == (40, 4, 1, 0)


async def test_one_batch_in_flight_writes_in_order(influxdb, influx_db):
    sent = make_records(40)
    async with FaultProxy(influxdb.url, keep_bodies=True) as proxy:
        proxy.hang(seconds=0.3)
        cfg = sink_config(
            proxy.url, influx_db, batch_size=10, flush_interval="60s", max_in_flight=1
        )
        outlet = await deliver(cfg, [sent[i : i + 10] for i in range(0, 40, 10)])
    assert_all_once(influxdb, influx_db, sent)
    writes = proxy.matching("/write")
    assert [w.outcome for w in writes] == ["fault hang"] + ["forwarded 204"] * 4
    assert writes[1].time >= writes[0].time + 0.29  # nothing passed the hung batch
    bodies = b"".join(w.body for w in writes[1:])
    assert [line.split(b'uid="')[1][:36].decode() for line in bodies.splitlines()] == [
        r.id for r in sent
    ]
    assert outlet.metrics()["retries"] == 1


async def test_gzip_with_batches_in_flight_retries_the_right_body(influxdb, influx_db):
    sent = make_records(60)
    async with FaultProxy(influxdb.url) as proxy:
        proxy.fail(503, times=4)
        cfg = sink_config(
            proxy.url, influx_db, gzip=True, batch_size=10, flush_interval="60s", max_in_flight=3
        )
        outlet = await deliver(cfg, [sent[i : i + 10] for i in range(0, 60, 10)])
    assert_all_once(influxdb, influx_db, sent)
    m = outlet.metrics()
    assert (m["records_out"], m["batches_out"], m["retries"]) == (60, 6, 4)


async def test_401_is_retried_with_a_clear_message(influxdb, influx_db):
    sent = make_records(10)
    async with FaultProxy(influxdb.url) as proxy:
        proxy.fail(401, body='{"error":"authorization failed"}', times=2)
        cfg = sink_config(proxy.url, influx_db)
        outlet = await deliver(cfg, [sent])
    assert_all_once(influxdb, influx_db, sent)
    assert outlet.metrics()["retries"] == 2
    assert "check username, password" in outlet.channels[0].last_error


async def test_unreachable_influxdb_is_retryable():
    cfg = sink_config(f"http://127.0.0.1:{free_port()}", "x")
    sink = build(cfg)
    try:
        with pytest.raises(RetryableSinkError, match="cannot reach InfluxDB"):
            await sink.connect()
    finally:
        await sink.close()


async def test_outlet_waits_for_influxdb_to_come_up(tmp_path):
    server = InfluxServer(tmp_path / "late")
    server.start()  # to learn its ports; a restart keeps them
    server.stop()
    cfg = sink_config(server.url, "late", retry_max="200ms", batch_size=10)
    bus = Bus()
    outlet = Outlet("o", bus, [(cfg, build(cfg))])
    task = asyncio.create_task(outlet.run())
    sent = make_records(10)
    await bus.publish(sent)
    try:
        await until(lambda: outlet.metrics()["retries"] >= 2, what="failed connects")
        assert outlet.status()["influx"]["connected"] is False
        await asyncio.to_thread(server.start)
        await until(lambda: outlet.metrics()["records_out"] == 10, what="delivery")
        await outlet.stop(5.0)
        await task
        assert_all_once(server, "late", sent)
    finally:
        server.stop()


# -- authentication ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_influxdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxServer]:
    """A second influxd with auth-enabled and an admin user 'admin' / 's3cret'."""
    server = InfluxServer(tmp_path_factory.mktemp("influx-auth"), auth=True)
    server.start()
    try:
        # with no user yet, InfluxDB lets anyone create the first admin
        server.query("CREATE USER admin WITH PASSWORD 's3cret' WITH ALL PRIVILEGES")
        server.set_credentials("admin", "s3cret")
        yield server
    finally:
        server.stop()


async def test_username_and_password_are_used(auth_influxdb):
    sent = make_records(40)
    cfg = sink_config(auth_influxdb.url, "secured", username="admin", password="s3cret")
    await deliver(cfg, [sent])
    assert_all_once(auth_influxdb, "secured", sent)


async def test_wrong_password_is_reported_and_retried(auth_influxdb):
    cfg = sink_config(
        auth_influxdb.url, "secured2", username="admin", password="wrong", retry_max="50ms"
    )
    bus = Bus()
    outlet = Outlet("o", bus, [(cfg, build(cfg))])
    task = asyncio.create_task(outlet.run())
    await bus.publish(make_records(5))
    await until(lambda: outlet.metrics()["retries"] >= 3, what="failed connects")
    await outlet.stop(0.1)
    await task
    m = outlet.metrics()
    assert m["records_out"] == 0 and m["undelivered"] == 5
    assert "refused the credentials (HTTP 401: authorization failed)" in (
        outlet.channels[0].last_error
    )
    assert "check username/password" in outlet.channels[0].last_error


# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"url": "ftp://x"}, "invalid url"),
        ({"url": "http://x:8086?db=a"}, "no query"),
        ({"username": "u"}, "username and password go together"),
        ({"retention_policy": {"name": "r", "duration": "10m"}}, 'at least "1h"'),
        ({"codec": "json"}, "line_protocol"),
        ({"tls": {"verify": False}}, "not https"),
        ({"databse": "typo"}, "Extra inputs are not permitted"),
    ],
)
def test_config_errors(kw, message):
    with pytest.raises(ValidationError, match=message):
        Config.model_validate({"database": "d", **kw})


def test_config_infinite_retention():
    cfg = Config.model_validate(
        {"database": "d", "retention_policy": {"name": "forever", "duration": "INF"}}
    )
    assert cfg.retention_policy is not None
    assert cfg.retention_policy.influxql_duration == "INF"
    assert cfg.url == "http://127.0.0.1:8086"


async def test_a_write_only_user_writes_and_waits_for_a_lost_database(auth_influxdb, caplog):
    auth_influxdb.query('CREATE DATABASE "limited"')
    auth_influxdb.query("CREATE USER writer WITH PASSWORD 'w'")
    auth_influxdb.query('GRANT WRITE ON "limited" TO writer')
    cfg = sink_config(auth_influxdb.url, "limited", username="writer", password="w", batch_size=10)
    bus = Bus()
    outlet = Outlet("o", bus, [(cfg, build(cfg))])
    task = asyncio.create_task(outlet.run())
    first, second = make_records(10), make_records(10)
    with caplog.at_level(logging.WARNING, "plantbus.broker.sinks.influxdb"):
        await bus.publish(first)
        await until(lambda: outlet.metrics()["records_out"] == 10, what="the first batch")
        assert caplog.text.count("may not create database 'limited'") == 1
        auth_influxdb.query('DROP DATABASE "limited"')
        await bus.publish(second)
        await until(lambda: outlet.metrics()["retries"] >= 2, what="retries of the lost db")
    assert caplog.text.count("may not create database 'limited'") == 1  # not once per retry
    error = outlet.channels[0].last_error
    assert "HTTP 404: database not found" in error and "give the user admin rights" in error
    # the operator fixes it (dropping a database drops its grants too)
    auth_influxdb.query('CREATE DATABASE "limited"')
    auth_influxdb.query('GRANT WRITE ON "limited" TO writer')
    await outlet.stop(10.0)
    await task
    assert_all_once(auth_influxdb, "limited", second)
    assert outlet.metrics()["rejected"] == 0
