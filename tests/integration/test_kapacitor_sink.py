"""The kapacitor sink. Kapacitor cannot be installed here, so:

* the path, parameters and headers go to tests/standins.py's ``KapacitorStandIn``, which
  stands in for Kapacitor: it records every write, answers 204, and refuses a body with an
  unparsable line whole as Kapacitor does;
* the payload is checked against a real InfluxDB 1.6.7: what the stand-in took is written to
  InfluxDB's ``/write`` (the same line protocol, the same db / rp / precision parameters) and
  every record is read back by its ID with its values and ns timestamp.

A kapacitor sink beside an influxdb sink on the same subscription sits in the same outlet of
a real runtime (a sim device feeding both): each batch is encoded once and both sinks get
the same bytes, each through its own buffer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from faults import FaultProxy
from servers import InfluxServer
from standins import KapacitorStandIn

import plantbus.codecs.line_protocol as line_protocol
from plantbus.broker.bus import Bus
from plantbus.broker.config import check_config, parse_config
from plantbus.broker.connector import BuildContext
from plantbus.broker.ids import new_ids
from plantbus.broker.outlet import Outlet, group_sinks
from plantbus.broker.record import Record, Series
from plantbus.broker.registry import load_sink_module
from plantbus.broker.runtime import Runtime
from plantbus.broker.sinks.kapacitor import Config, KapacitorSink

PRESS = Series("plant/h1/press7", "press7", {"device": "press7", "line": "L1"})
WRITE = "/kapacitor/v1/write"


def make_records(n: int, series: Series = PRESS) -> list[Record]:
    now = time.time_ns()
    ids = new_ids(n)
    return [
        Record(series, {"n": i, "temp": 20.0 + i / 8, "ok": i % 2 == 0, "state": f"s{i % 3}"},
               now + i * 1000, ids[i])
        for i in range(n)
    ]  # fmt: skip


def kapacitor_config(url: str, **kw: object) -> Config:
    kw.setdefault("name", "kap")
    kw.setdefault("database", "plant")
    kw.setdefault("retry_initial", "5ms")
    kw.setdefault("retry_max", "50ms")
    kw.setdefault("timeout", "10s")
    kw.setdefault("flush_interval", "60s")
    return Config.model_validate({"url": url, **kw})


def make_sink(cfg: Config, state_dir: Path) -> KapacitorSink:
    module = load_sink_module("kapacitor")
    sink = module.build(cfg, BuildContext(node_name="edge-07", node_tags={}, state_dir=state_dir))
    assert isinstance(sink, KapacitorSink)
    return sink


async def until(predicate, limit: float = 20.0, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)


async def deliver(sink: KapacitorSink, batches: list[list[Record]]) -> Outlet:
    bus = Bus()
    outlet = Outlet("o", bus, [(sink.config, sink)])
    task = asyncio.create_task(outlet.run())
    for b in batches:
        await bus.publish(b)
    await outlet.stop(30.0)
    await task
    return outlet


def replay_into_influxdb(server: InfluxServer, kapacitor: KapacitorStandIn) -> None:
    """Write what the stand-in took to InfluxDB's /write with the same parameters."""
    for posted in kapacitor.writes():
        if posted.status != 204:
            continue
        q = posted.query
        assert q["precision"] == "ns"
        status, text = server.write(q["db"], posted.body, rp=q["rp"])
        assert status == 204, text


# -- path, parameters, payload -------------------------------------------------------------------


@pytest.mark.parametrize("gzip", [0, 1])
async def test_batches_go_to_kapacitor_write_and_read_back_from_influxdb(
    influxdb, influx_db, tmp_path, gzip
):
    influxdb.query(f'CREATE RETENTION POLICY "week" ON "{influx_db}" DURATION 7d REPLICATION 1')
    sent = make_records(1200)
    async with KapacitorStandIn(username="feeder", password="pw") as kapacitor:
        cfg = kapacitor_config(
            kapacitor.url,
            database=influx_db,
            retention_policy="week",
            username="feeder",
            password="pw",
            gzip=gzip,
            batch_size=500,
        )
        outlet = await deliver(
            make_sink(cfg, tmp_path), [sent[i : i + 300] for i in range(0, 1200, 300)]
        )
    writes = kapacitor.writes()
    assert [w.path for w in writes] == [WRITE] * 3
    assert all(w.query == {"db": influx_db, "rp": "week", "precision": "ns"} for w in writes)
    assert all(w.headers["Authorization"].startswith("Basic ") for w in writes)
    assert all(w.headers.get("Content-Encoding") == ("gzip" if gzip else None) for w in writes)
    m = outlet.metrics()
    assert (m["records_out"], m["batches_out"], m["retries"], m["rejected"]) == (1200, 3, 0, 0)
    # the payload: InfluxDB takes it as it is, every record with its values and ns time
    replay_into_influxdb(influxdb, kapacitor)
    rows = influxdb.rows(f'SELECT * FROM "{influx_db}"."week"."press7"', influx_db)
    assert len(rows) == 1200
    by_uid = {r["uid"]: r for r in rows}
    for rec in sent:
        row = by_uid[rec.id]
        assert row["time"] == rec.time_ns
        assert (row["n"], row["temp"], row["ok"], row["state"]) == (
            rec.fields["n"],
            rec.fields["temp"],
            rec.fields["ok"],
            rec.fields["state"],
        )
        assert (row["device"], row["line"]) == ("press7", "L1")


async def test_the_default_retention_policy_is_autogen(tmp_path):
    async with KapacitorStandIn() as kapacitor:
        await deliver(make_sink(kapacitor_config(kapacitor.url), tmp_path), [make_records(5)])
    (write,) = kapacitor.writes()
    assert write.query == {"db": "plant", "rp": "autogen", "precision": "ns"}
    assert "Authorization" not in write.headers


# -- answers ---------------------------------------------------------------------------------------


async def test_unparsable_lines_refused_whole_are_isolated_and_no_good_line_lost(tmp_path):
    # Kapacitor refuses a body with one bad line whole, in the words InfluxDB 1.x uses for a
    # body it parsed nothing of: the sink must cut further, not dead-letter the part
    from plantbus.broker.sinks.base import EncodedBatch, PartialWriteError

    now = time.time_ns()
    good = [f'press7,device=p n={i}i,uid="good-{i}" {now + i}\n'.encode() for i in range(300)]
    lines = [*good[:100], b"garbage line\n", *good[100:250], b"press7 n=\n", *good[250:]]
    batch = EncodedBatch(b"".join(lines), records=len(lines), codec="line_protocol", seq=9)
    async with KapacitorStandIn() as kapacitor:
        sink = make_sink(kapacitor_config(kapacitor.url), tmp_path)
        await sink.connect()
        try:
            with pytest.raises(PartialWriteError, match="Kapacitor refused 2 of 302 lines"):
                await sink.write(batch)
        finally:
            await sink.close()
    taken = [line for body in kapacitor.bodies() for line in body.splitlines(keepends=True)]
    assert sorted(taken) == sorted(good)  # every good line once, in bodies Kapacitor took
    letters = (tmp_path / "deadletter" / "kap.lp").read_text().split("# ")[1:]
    assert [x.splitlines()[1] for x in letters] == ["garbage line", "press7 n="]
    assert all("batch=9 HTTP 400: unable to parse:" in x for x in letters)


async def test_401_is_unhealthy_until_the_password_is_right(tmp_path, caplog):
    sent = make_records(10)
    async with KapacitorStandIn(username="feeder", password="new") as kapacitor:
        cfg = kapacitor_config(kapacitor.url, username="feeder", password="old", batch_size=10)
        bus = Bus()
        outlet = Outlet("o", bus, [(cfg, make_sink(cfg, tmp_path))])
        task = asyncio.create_task(outlet.run())
        with caplog.at_level(logging.WARNING, "plantbus.broker.outlet"):
            await bus.publish(sent)
            await until(lambda: outlet.metrics()["retries"] >= 3, what="retries")
        state = outlet.status()["kap"]
        assert state["health"] == "unhealthy"
        assert "Kapacitor answered HTTP 401" in state["last_error"]
        assert "check username and password" in state["last_error"]
        assert sum(r.levelno == logging.ERROR for r in caplog.records) == 1
        kapacitor.password = "old"  # the operator fixes Kapacitor's user
        await until(lambda: outlet.metrics()["records_out"] == 10, what="delivery")
        await outlet.stop(10.0)
        await task
    assert outlet.status()["kap"]["health"] == "ok"
    assert len(kapacitor.bodies()[0].splitlines()) == 10


async def test_503_retry_after_and_413_split(tmp_path):
    sent = make_records(40)
    async with KapacitorStandIn() as kapacitor:
        kapacitor.faults = [
            (503, {"error": "busy"}, {"Retry-After": "1"}),
            (413, {"error": "Request Entity Too Large"}, {}),
        ]
        cfg = kapacitor_config(kapacitor.url, retry_initial="1ms", retry_max="5s")
        outlet = await deliver(make_sink(cfg, tmp_path), [sent])
    writes = kapacitor.writes()
    assert [w.status for w in writes] == [503, 413, 204, 204]
    m = outlet.metrics()
    assert (m["records_out"], m["retries"], m["rejected"], m["kap.isolate_requests"]) == (
        40,
        1,
        0,
        2,
    )
    taken = [line for body in kapacitor.bodies() for line in body.splitlines()]
    assert len(taken) == 40 and len(set(taken)) == 40


# -- beside an influxdb sink: one encoding, own buffers ---------------------------------------


def node_config(tmp_path: Path, influx_url: str, db: str, kapacitor_url: str) -> str:
    return f"""
[node]
name = "edge-07"
state_dir = "{tmp_path / "state"}"

[[devices.sim]]
name = "press7"
topic = "plant/h1/press7"
interval = "5ms"
batch = 20
points = [{{ name = "n", signal = "counter" }}]

[[sinks.influxdb]]
name = "local"
url = "{influx_url}"
database = "{db}"
subscribe = ["plant/#"]
batch_size = 200
flush_interval = "50ms"
retry_initial = "5ms"
retry_max = "50ms"

[[sinks.kapacitor]]
name = "kap"
url = "{kapacitor_url}"
database = "{db}"
subscribe = ["plant/#"]
batch_size = 200
flush_interval = "50ms"
retry_initial = "5ms"
retry_max = "50ms"
"""


async def test_a_shared_subscription_is_encoded_once_for_influxdb_and_kapacitor(
    influxdb, influx_db, tmp_path, monkeypatch
):
    encoded: list[bytes] = []
    real_encode = line_protocol.encode

    def counting_encode(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = real_encode(*args, **kwargs)
        encoded.append(out)
        return out

    monkeypatch.setattr(line_protocol, "encode", counting_encode)
    async with KapacitorStandIn() as kapacitor, FaultProxy(influxdb.url, keep_bodies=True) as proxy:
        # Kapacitor is away for a while: its batches wait in its own buffer, InfluxDB's don't
        kapacitor.faults = [(503, {"error": "starting"}, {})] * 5
        text = node_config(tmp_path, proxy.url, influx_db, kapacitor.url)
        cfg = parse_config(text, tmp_path / "plantbus.toml")
        groups = group_sinks([(e.config, e) for e in cfg.sinks])
        assert [[e.name for _, e in g] for g in groups] == [["local", "kap"]]
        rt = Runtime(cfg)
        await rt.start()
        (handle,) = rt.outlets.values()
        assert handle.name == "local+kap"
        outlet = handle.outlet
        await until(lambda: rt.devices["press7"].emitted >= 2000, what="2000 records")
        await rt.shutdown()
    emitted = rt.devices["press7"].emitted
    m = outlet.metrics()
    assert (m["local.records_out"], m["kap.records_out"], m["undelivered"]) == (
        emitted,
        emitted,
        0,
    )
    assert (m["local.retries"], m["kap.retries"]) == (0, 5)
    # encoded once: as many lines encoded as records emitted, not twice as many
    assert sum(part.count(b"\n") for part in encoded) == emitted
    assert m["batches"] == len(encoded)  # batches of 200 are encoded in one piece
    # and both got the same bytes, batch for batch
    to_influx = [w.body for w in proxy.matching("/write") if w.outcome == "forwarded 204"]
    assert kapacitor.bodies() == encoded  # one batch in flight: in order
    assert sorted(to_influx) == sorted(encoded)  # two in flight: in any order
    assert influxdb.count(influx_db, "press7", "n") == emitted


def test_check_refuses_bad_kapacitor_configs(tmp_path):
    path = tmp_path / "plantbus.toml"
    path.write_text(
        f'[node]\nstate_dir = "{tmp_path}"\n\n'
        '[[sinks.kapacitor]]\nurl = "http://127.0.0.1:9092"\nmax_in_flight = 2\n'
        'retention_policy = { name = "week", duration = "7d" }\n'
    )
    errors = check_config(path)
    assert any("sinks.kapacitor[0].database: missing required key" in e for e in errors), errors
    assert any(
        "sinks.kapacitor[0].max_in_flight: this sink kind writes one batch at a time" in e
        for e in errors
    ), errors
    assert any("sinks.kapacitor[0].retention_policy: must be a string" in e for e in errors), errors
