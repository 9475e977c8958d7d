"""How the influxdb sink answers InfluxDB's refusals, against a real InfluxDB 1.6.7.

400 (bad lines among good ones) is isolated by bisection: every good line is read back from
InfluxDB by its ID, the bad ones are in the dead-letter file with InfluxDB's reason. 413
comes from a real influxd with a small ``max-body-size``; 401 / 403 from a real influxd with
auth enabled. A 413 on a server without that limit comes from tests/faults.py.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults import FaultProxy
from pydantic import ValidationError
from servers import InfluxServer

from plantbus.broker.bus import Bus
from plantbus.broker.connector import BuildContext
from plantbus.broker.ids import new_ids
from plantbus.broker.outlet import Outlet
from plantbus.broker.record import Record, Series
from plantbus.broker.sinks.base import EncodedBatch, PartialWriteError
from plantbus.broker.sinks.influxdb import ISOLATE_MAX_REQUESTS, Config, InfluxDBSink, build

PRESS = Series("plant/h1/press7", "press7", {"device": "press7", "line": "L1"})
CONFLICT = Series("plant/h1/c", "conflict", {"device": "c"})


def make_records(n: int, series: Series = PRESS, **fields: float | str) -> list[Record]:
    now = time.time_ns()
    ids = new_ids(n)
    return [
        Record(series, {"n": i, "temp": 20.0 + i / 8, **fields}, now + i * 1000, ids[i])
        for i in range(n)
    ]


def sink_config(url: str, db: str, **kw: object) -> Config:
    kw.setdefault("name", "influx")
    kw.setdefault("retry_initial", "5ms")
    kw.setdefault("retry_max", "50ms")
    kw.setdefault("timeout", "20s")
    kw.setdefault("batch_size", 20_000)
    kw.setdefault("batch_bytes", "64MiB")
    kw.setdefault("flush_interval", "60s")
    return Config.model_validate({"url": url, "database": db, **kw})


def make_sink(cfg: Config, state_dir: Path) -> InfluxDBSink:
    ctx = BuildContext(node_name="edge-07", node_tags={}, state_dir=state_dir)
    return build(cfg, ctx)


async def until(predicate, limit: float = 20.0, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)


async def deliver(sink: InfluxDBSink, records: list[Record]) -> Outlet:
    """Publish ``records`` as one batch through an outlet into ``sink`` and stop (draining)."""
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
    """(comment, uid) of each dead-lettered line, in file order."""
    lines = path.read_text().splitlines()
    assert len(lines) % 2 == 0, lines
    out = []
    for comment, line in zip(lines[::2], lines[1::2], strict=True):
        assert comment.startswith("# ") and not line.startswith("#")
        out.append((comment, line.split('uid="')[1][:36] if 'uid="' in line else line))
    return out


def conflict_first(server: InfluxServer, db: str) -> None:
    """Make ``temp`` an integer field of ``conflict``: a float temp is then a type conflict."""
    status, text = server.write(db, f"conflict temp=1i {time.time_ns() - 10**9}".encode())
    assert status == 204, text


# -- 400: bad lines among good ones ------------------------------------------------------------


@pytest.mark.parametrize("gzip", [False, 6])
async def test_a_few_bad_lines_among_thousands_go_to_the_dead_letter_file(
    influxdb, influx_db, tmp_path, gzip
):
    conflict_first(influxdb, influx_db)
    good = make_records(5000)
    bad = make_records(5, CONFLICT)
    batch = list(good)
    for at, rec in zip([4999, 2501, 2500, 1234, 10], bad, strict=True):
        batch.insert(at, rec)
    async with FaultProxy(influxdb.url) as proxy:
        sink = make_sink(sink_config(proxy.url, influx_db, gzip=gzip), tmp_path)
        outlet = await deliver(sink, batch)
    # every good line is in InfluxDB exactly once, none of the bad ones
    got = stored_uids(influxdb, influx_db)
    assert len(got) == 5000 and set(got) == {r.id for r in good}
    assert len(stored_uids(influxdb, influx_db, "conflict")) == 0
    # the bad ones are in the dead-letter file, in batch order, each with InfluxDB's reason
    path = tmp_path / "deadletter" / "influx.lp"
    letters = dead_letters(path)
    assert [uid for _, uid in letters] == [r.id for r in sorted(bad, key=batch.index)]
    for comment, _ in letters:
        assert "sink=influx batch=1 HTTP 400: partial write: field type conflict" in comment
        assert 'input field "temp" on measurement "conflict" is type float' in comment
    m = outlet.metrics()
    assert (m["records_out"], m["rejected"], m["rejected_records"]) == (5000, 1, 5)
    assert (m["influx.dead_lettered"], m["influx.dead_letter_dropped"]) == (5, 0)
    error = outlet.channels[0].last_error
    assert error.startswith("PartialWriteError: InfluxDB refused 5 of 5005 lines of batch 1")
    assert str(path) in error
    # the cost: about 2 requests per bad line and halving (log2 5005 < 13)
    writes = len(proxy.matching("/write"))
    assert writes == 1 + m["influx.isolate_requests"]
    assert m["influx.isolate_requests"] <= 2 * 5 * math.ceil(math.log2(5005))


async def test_a_batch_whose_every_line_is_refused_costs_one_request(influxdb, influx_db, tmp_path):
    conflict_first(influxdb, influx_db)
    bad = make_records(10, CONFLICT)
    good = make_records(30)
    async with FaultProxy(influxdb.url) as proxy:
        cfg = sink_config(proxy.url, influx_db, batch_size=10, dead_letter=str(tmp_path / "x.lp"))
        sink = make_sink(cfg, tmp_path / "unused")
        bus = Bus()
        outlet = Outlet("o", bus, [(cfg, sink)])
        task = asyncio.create_task(outlet.run())
        for part in (bad, good[:10], good[10:20], good[20:]):
            await bus.publish(part)
        await outlet.stop(20.0)
        await task
    assert sorted(stored_uids(influxdb, influx_db)) == sorted(r.id for r in good)
    assert [uid for _, uid in dead_letters(tmp_path / "x.lp")] == [r.id for r in bad]
    m = outlet.metrics()
    assert (m["rejected"], m["rejected_records"], m["records_out"]) == (1, 10, 30)
    # "dropped=10" of 10 lines: nothing to bisect
    assert len(proxy.matching("/write")) == 4 and m["influx.isolate_requests"] == 0


async def test_unparsable_and_too_old_lines_are_dead_lettered_with_their_reasons(
    influxdb, influx_db, tmp_path
):
    cfg = sink_config(influxdb.url, influx_db, retention_policy={"name": "h", "duration": "1h"})
    sink = make_sink(cfg, tmp_path)
    now = time.time_ns()
    good = [f'press7,device=p n={i}i,uid="good-{i}" {now + i}\n'.encode() for i in range(100)]
    wrong = [b"garbage line\n", b"press7,device=p n=\n", b'press7,device=p n=1i,uid="old" 1000\n']
    lines = [*good[:50], wrong[0], *good[50:70], *wrong[1:], *good[70:]]
    batch = EncodedBatch(b"".join(lines), records=len(lines), codec="line_protocol", seq=7)
    await sink.connect()
    try:
        with pytest.raises(PartialWriteError, match="refused 3 of 103 lines") as e:
            await sink.write(batch)
    finally:
        await sink.close()
    assert e.value.rejected_records == 3
    rows = influxdb.rows('SELECT uid FROM "h"."press7"', influx_db)
    assert sorted(r["uid"] for r in rows) == sorted(f"good-{i}" for i in range(100))
    text = (tmp_path / "deadletter" / "influx.lp").read_text()
    entries = text.split("# ")[1:]
    assert len(entries) == 3
    assert entries[0].endswith("\ngarbage line\n")
    assert "batch=7 HTTP 400: unable to parse: invalid field format" in entries[0]
    assert entries[1].endswith("\npress7,device=p n=\n")
    assert "unable to parse: missing field value" in entries[1]
    assert entries[2].endswith('\npress7,device=p n=1i,uid="old" 1000\n')
    assert "partial write: points beyond retention policy dropped=1" in entries[2]


async def test_isolation_stops_at_its_budget_and_loses_no_good_line(influxdb, influx_db, tmp_path):
    conflict_first(influxdb, influx_db)
    good, bad = make_records(600), make_records(600, CONFLICT)
    batch = [r for pair in zip(good, bad, strict=True) for r in pair]  # every other line bad
    # a long timeout: the request budget, not half of it, is what this test stops at
    sink = make_sink(sink_config(influxdb.url, influx_db, timeout="120s"), tmp_path)
    outlet = await deliver(sink, batch)
    got = stored_uids(influxdb, influx_db)
    assert len(got) == 600 and set(got) == {r.id for r in good}
    letters = dead_letters(tmp_path / "deadletter" / "influx.lp")
    bad_ids = {r.id for r in bad}
    assert bad_ids <= {uid for _, uid in letters}
    not_isolated = [uid for comment, uid in letters if "not isolated (budget spent)" in comment]
    # good lines in a part left whole are marked so (InfluxDB has them: see above)
    assert not_isolated and {uid for _, uid in letters} - bad_ids <= set(not_isolated)
    m = outlet.metrics()
    assert m["rejected_records"] == len(letters) and m["records_out"] == 1200 - len(letters)
    # the budget, plus the last pair of requests that crossed it
    assert ISOLATE_MAX_REQUESTS <= m["influx.isolate_requests"] <= ISOLATE_MAX_REQUESTS + 2


# -- 413: too large ----------------------------------------------------------------------------


class SmallBodyInflux(InfluxServer):
    """influxd with ``max-body-size`` set to ``limit`` bytes."""

    def __init__(self, base: Path, limit: int):
        super().__init__(base)
        self.limit = limit

    def _config(self) -> str:
        text = super()._config()
        assert "max-body-size = 25000000" in text
        return text.replace("max-body-size = 25000000", f"max-body-size = {self.limit}")


@pytest.fixture(scope="module")
def small_body_influxdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxServer]:
    server = SmallBodyInflux(tmp_path_factory.mktemp("influx-small-body"), 16_384)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_413_splits_the_batch_until_it_fits(small_body_influxdb, tmp_path):
    server = small_body_influxdb
    server.query('CREATE DATABASE "small"')
    sent = make_records(1000)
    huge = make_records(1, note="x" * 20_000)  # one line larger than max-body-size
    async with FaultProxy(server.url) as proxy:
        sink = make_sink(sink_config(proxy.url, "small"), tmp_path)
        outlet = await deliver(sink, sent[:600] + huge + sent[600:])
    got = stored_uids(server, "small")
    assert len(got) == 1000 and set(got) == {r.id for r in sent}
    writes = proxy.matching("/write")
    assert writes[0].outcome == "forwarded 413"  # the real server's answer
    letters = dead_letters(tmp_path / "deadletter" / "influx.lp")
    assert [uid for _, uid in letters] == [huge[0].id]
    assert "HTTP 413" in letters[0][0]
    m = outlet.metrics()
    assert (m["records_out"], m["rejected_records"]) == (1000, 1)
    # ~135 KB in parts of at most 16 KB: at least 9 parts, each split costs 2 requests
    assert 16 <= m["influx.isolate_requests"] == len(writes) - 1


async def test_413_from_a_proxy_is_split_and_nothing_is_lost(influxdb, influx_db, tmp_path):
    sent = make_records(20)
    async with FaultProxy(influxdb.url) as proxy:
        proxy.fail(413, body='{"error":"Request Entity Too Large"}')
        sink = make_sink(sink_config(proxy.url, influx_db, gzip=True), tmp_path)
        outlet = await deliver(sink, sent)
    assert sorted(stored_uids(influxdb, influx_db)) == sorted(r.id for r in sent)
    assert [w.outcome for w in proxy.matching("/write")] == [
        "fault status 413",
        "forwarded 204",
        "forwarded 204",
    ]
    m = outlet.metrics()
    assert (m["records_out"], m["rejected"], m["batches_out"]) == (20, 0, 1)
    assert not (tmp_path / "deadletter").exists()


# -- 401 / 403: unhealthy, nothing lost ----------------------------------------------------------


@pytest.fixture(scope="module")
def auth_influxdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxServer]:
    """influxd with auth-enabled and an admin 'admin' / 's3cret'."""
    server = InfluxServer(tmp_path_factory.mktemp("influx-auth-answers"), auth=True)
    server.start()
    try:
        server.query("CREATE USER admin WITH PASSWORD 's3cret' WITH ALL PRIVILEGES")
        server.set_credentials("admin", "s3cret")
        yield server
    finally:
        server.stop()


async def _run_until_unhealthy(cfg: Config, tmp_path: Path, records: list[Record]):  # type: ignore[no-untyped-def]
    bus = Bus()
    outlet = Outlet("o", bus, [(cfg, make_sink(cfg, tmp_path))])
    task = asyncio.create_task(outlet.run())
    await bus.publish(records)
    await until(lambda: outlet.metrics()["retries"] >= 5, what="retries")
    return bus, outlet, task


async def test_401_marks_the_sink_unhealthy_logs_once_and_keeps_the_records(
    auth_influxdb, tmp_path, caplog
):
    cfg = sink_config(auth_influxdb.url, "late", username="late", password="pw", batch_size=5)
    sent = make_records(5)
    with caplog.at_level(logging.WARNING, "plantbus.broker.outlet"):
        _, outlet, task = await _run_until_unhealthy(cfg, tmp_path, sent)
        status = outlet.status()["influx"]
        assert status["health"] == "unhealthy"
        assert "HTTP 401: authorization failed" in status["last_error"]
        m = outlet.metrics()
        assert (m["influx.unhealthy"], m["buffer_records"], m["records_out"]) == (1, 5, 0)
        errors = [r for r in caplog.records if "refused the credentials" in r.getMessage()]
        assert [r.levelno for r in errors] == [logging.ERROR]  # once, not per retry
        # the operator creates the user: the records waiting in the buffer arrive
        auth_influxdb.query("CREATE USER late WITH PASSWORD 'pw' WITH ALL PRIVILEGES")
        await until(lambda: outlet.metrics()["records_out"] == 5, what="delivery")
    assert outlet.status()["influx"]["health"] == "ok"
    await outlet.stop(10.0)
    await task
    assert sorted(stored_uids(auth_influxdb, "late")) == sorted(r.id for r in sent)


async def test_403_without_write_privilege_is_unhealthy_until_granted(
    auth_influxdb, tmp_path, caplog
):
    auth_influxdb.query('CREATE DATABASE "ro"')
    auth_influxdb.query("CREATE USER reader WITH PASSWORD 'r'")
    auth_influxdb.query('GRANT READ ON "ro" TO reader')
    cfg = sink_config(auth_influxdb.url, "ro", username="reader", password="r", batch_size=5)
    sent = make_records(5)
    with caplog.at_level(logging.WARNING, "plantbus.broker.outlet"):
        _, outlet, task = await _run_until_unhealthy(cfg, tmp_path, sent)
        assert outlet.status()["influx"]["health"] == "unhealthy"
        error = outlet.channels[0].last_error
        assert error.startswith("MisconfiguredSinkError: InfluxDB answered HTTP 403")
        assert "WRITE privilege on 'ro'" in error
        assert outlet.metrics()["buffer_records"] == 5
        assert sum(r.levelno == logging.ERROR for r in caplog.records) == 1
        auth_influxdb.query('GRANT WRITE ON "ro" TO reader')
        await until(lambda: outlet.metrics()["records_out"] == 5, what="delivery")
    await outlet.stop(10.0)
    await task
    assert outlet.status()["influx"]["health"] == "ok"
    assert sorted(stored_uids(auth_influxdb, "ro")) == sorted(r.id for r in sent)


async def test_a_401_from_a_proxy_is_retried_until_it_passes(influxdb, influx_db, tmp_path):
    sent = make_records(10)
    async with FaultProxy(influxdb.url) as proxy:
        proxy.fail(401, body='{"error":"authorization failed"}', times=3)
        sink = make_sink(sink_config(proxy.url, influx_db), tmp_path)
        outlet = await deliver(sink, sent)
    assert sorted(stored_uids(influxdb, influx_db)) == sorted(r.id for r in sent)
    m = outlet.metrics()
    assert (m["retries"], m["rejected"], m["influx.unhealthy"]) == (3, 0, 0)
    assert outlet.status()["influx"]["health"] == "ok"


# -- 404: create_database ----------------------------------------------------------------------


async def test_404_without_create_database_says_so_and_waits(influxdb, influx_db, tmp_path):
    influxdb.query(f'DROP DATABASE "{influx_db}"')
    cfg = sink_config(influxdb.url, influx_db, create_database=False, batch_size=5)
    sent = make_records(5)
    _, outlet, task = await _run_until_unhealthy(cfg, tmp_path, sent)
    error = outlet.channels[0].last_error
    assert "HTTP 404: database not found" in error
    assert f"create_database = false: create the database {influx_db!r} in InfluxDB" in error
    assert outlet.status()["influx"]["health"] == "unhealthy"
    databases = influxdb.query("SHOW DATABASES")["results"][0]["series"][0].get("values", [])
    assert [influx_db] not in databases  # plantbus created nothing
    influxdb.query(f'CREATE DATABASE "{influx_db}"')
    await until(lambda: outlet.metrics()["records_out"] == 5, what="delivery")
    await outlet.stop(10.0)
    await task
    assert sorted(stored_uids(influxdb, influx_db)) == sorted(r.id for r in sent)
    assert outlet.channels[0].sink.recreated == 0  # type: ignore[attr-defined]


# -- gzip levels -------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "level"), [(True, 1), (False, 0), (0, 0), (1, 1), (9, 9)])
def test_gzip_takes_a_level_or_true_and_false(value, level):
    assert Config.model_validate({"database": "d", "gzip": value}).gzip == level


@pytest.mark.parametrize("value", [10, -1, "fast", 1.5])
def test_gzip_refuses_other_values(value):
    with pytest.raises(ValidationError, match="gzip is a level 1-9"):
        Config.model_validate({"database": "d", "gzip": value})


async def test_gzip_level_9_bodies_are_accepted(influxdb, influx_db, tmp_path):
    sent = make_records(300)
    async with FaultProxy(influxdb.url) as proxy:
        sink = make_sink(sink_config(proxy.url, influx_db, gzip=9, batch_size=100), tmp_path)
        bus = Bus()
        outlet = Outlet("o", bus, [(sink.config, sink)])
        task = asyncio.create_task(outlet.run())
        await bus.publish(sent)
        await outlet.stop(20.0)
        await task
    assert sorted(stored_uids(influxdb, influx_db)) == sorted(r.id for r in sent)
    writes = proxy.matching("/write")
    assert len(writes) == 3 and all(w.headers.get("Content-Encoding") == "gzip" for w in writes)
    assert outlet.metrics()["bytes_out"] > sum(int(w.headers["Content-Length"]) for w in writes)
