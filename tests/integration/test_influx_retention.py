"""Retention policies and downsampling (continuous queries) of the influxdb sink (1.x API),
against a real InfluxDB 1.6.7: what plantbus creates is read back with SHOW RETENTION
POLICIES / SHOW CONTINUOUS QUERIES, what exists and differs is reported and left alone, and a
continuous query is seen running (the test server's ``[continuous_queries] run-interval`` is
InfluxDB's default, 1s): its aggregates are compared with the same aggregates computed from
the points plantbus wrote.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from pydantic import ValidationError
from servers import InfluxServer, wait_until

from plantbus.broker.bus import Bus
from plantbus.broker.config import check_config
from plantbus.broker.connector import BuildContext
from plantbus.broker.ids import new_ids
from plantbus.broker.outlet import Outlet
from plantbus.broker.record import Record, Series
from plantbus.broker.sinks.influxdb import Config, InfluxDBSink, build, influxql_duration

PRESS = Series("plant/h1/press7", "press7", {"device": "press7", "line": "L1"})
WEEK = {"name": "week", "duration": "7d", "default": True}
YEAR = {"name": "year", "duration": "365d"}
LOGGER = "plantbus.broker.sinks.influxdb"


def sink_config(url: str, db: str, **kw: object) -> Config:
    kw.setdefault("name", "influx")
    kw.setdefault("retry_initial", "5ms")
    kw.setdefault("retry_max", "100ms")
    kw.setdefault("timeout", "10s")
    kw.setdefault("flush_interval", "50ms")
    return Config.model_validate({"url": url, "database": db, **kw})


def make_sink(cfg: Config, state_dir: Path) -> InfluxDBSink:
    return build(cfg, BuildContext(node_name="edge-07", node_tags={}, state_dir=state_dir))


async def connect_once(cfg: Config, state_dir: Path) -> InfluxDBSink:
    """A sink connected (its set-up done) and closed again: a daemon's start."""
    sink = make_sink(cfg, state_dir)
    await sink.connect()
    await sink.close()
    return sink


def policies(server: InfluxServer, db: str) -> dict[str, tuple[str, bool]]:
    rows = server.rows(f'SHOW RETENTION POLICIES ON "{db}"', db)
    return {r["name"]: (r["duration"], r["default"]) for r in rows}


def continuous_queries(server: InfluxServer, db: str) -> dict[str, str]:
    for series in server.query("SHOW CONTINUOUS QUERIES")["results"][0].get("series", []):
        if series["name"] == db:
            return {name: query for name, query in series.get("values", [])}
    return {}


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# -- retention policy ------------------------------------------------------------------------


async def test_a_differing_policy_is_reported_once_and_left_alone(
    influxdb, influx_db, tmp_path, caplog
):
    influxdb.query(f'CREATE RETENTION POLICY "week" ON "{influx_db}" DURATION 2h REPLICATION 1')
    cfg = sink_config(influxdb.url, influx_db, retention_policy=WEEK, batch_size=10)
    sink = make_sink(cfg, tmp_path)
    bus = Bus()
    outlet = Outlet("o", bus, [(cfg, sink)])
    with caplog.at_level(logging.INFO, LOGGER):
        task = asyncio.create_task(outlet.run())
        sent = [
            Record(PRESS, {"n": i}, time.time_ns() + i, uid) for i, uid in enumerate(new_ids(10))
        ]
        await bus.publish(sent)
        await outlet.stop(20.0)
        await task
        await connect_once(cfg, tmp_path)  # a second start reports it again (a new sink)
    assert policies(influxdb, influx_db)["week"] == ("2h0m0s", False)  # never altered
    reported = [e for e in errors(caplog) if "retention policy 'week'" in e]
    assert len(reported) == 2  # once per start
    assert (
        f"sink influx: retention policy 'week' on '{influx_db}' exists as DURATION 2h, the "
        "config says DURATION 1w DEFAULT: left as it is" in reported[0]
    )
    # the sink stays usable: the records are in the existing policy
    rows = influxdb.rows(f'SELECT count(n) FROM "{influx_db}"."week"."press7"', influx_db)
    assert rows[0]["count"] == 10
    m = outlet.metrics()
    assert (m["records_out"], m["influx.config_mismatches"]) == (10, 1)


async def test_a_policy_that_matches_is_quiet(influxdb, influx_db, tmp_path, caplog):
    cfg = sink_config(influxdb.url, influx_db, retention_policy=WEEK)
    with caplog.at_level(logging.INFO, LOGGER):
        await connect_once(cfg, tmp_path)
        sink = await connect_once(cfg, tmp_path)
    assert policies(influxdb, influx_db)["week"] == ("168h0m0s", True)
    assert errors(caplog) == []
    assert caplog.text.count("created retention policy 'week'") == 1
    assert sink.metrics()["config_mismatches"] == 0


# -- downsampling --------------------------------------------------------------------------------


async def test_downsample_creates_policy_and_continuous_query_once(
    influxdb, influx_db, tmp_path, caplog
):
    downsample = [
        {"every": "1m", "functions": ["mean", "max"], "into": YEAR},
        {"every": "1h", "functions": ["min", "max", "count"], "into": YEAR, "resample_for": "2h"},
    ]
    cfg = sink_config(influxdb.url, influx_db, retention_policy=WEEK, downsample=downsample)
    with caplog.at_level(logging.INFO, LOGGER):
        await connect_once(cfg, tmp_path)
        first = continuous_queries(influxdb, influx_db)
        sink = await connect_once(cfg, tmp_path)  # a restart: nothing new, nothing reported
    assert policies(influxdb, influx_db)["year"] == ("8760h0m0s", False)
    db = influx_db  # InfluxDB writes identifiers back unquoted where it can
    assert first == {
        "plantbus_year_1m": (
            f"CREATE CONTINUOUS QUERY plantbus_year_1m ON {db} BEGIN SELECT mean(*), max(*) "
            f"INTO {db}.year.:MEASUREMENT FROM {db}.week./.*/ GROUP BY time(1m), * END"
        ),
        "plantbus_year_1h": (
            f"CREATE CONTINUOUS QUERY plantbus_year_1h ON {db} RESAMPLE FOR 2h BEGIN SELECT "
            f"min(*), max(*), count(*) INTO {db}.year.:MEASUREMENT FROM {db}.week./.*/ "
            "GROUP BY time(1h), * END"
        ),
    }
    assert continuous_queries(influxdb, influx_db) == first
    assert errors(caplog) == []
    assert caplog.text.count("created continuous query") == 2
    assert sink.metrics()["config_mismatches"] == 0


async def test_downsample_reads_the_default_policy_when_none_is_configured(
    influxdb, influx_db, tmp_path
):
    downsample = [{"every": "10m", "functions": ["mean"], "into": YEAR, "name": "ten_min"}]
    await connect_once(sink_config(influxdb.url, influx_db, downsample=downsample), tmp_path)
    (query,) = continuous_queries(influxdb, influx_db).values()
    assert f"FROM {influx_db}.autogen./.*/ GROUP BY time(10m), *" in query


async def test_a_differing_continuous_query_is_reported_and_kept(
    influxdb, influx_db, tmp_path, caplog
):
    db = influx_db
    influxdb.query(f'CREATE RETENTION POLICY "year" ON "{db}" DURATION 8760h REPLICATION 1')
    theirs = (
        f'CREATE CONTINUOUS QUERY "plantbus_year_1m" ON "{db}" BEGIN SELECT mean(*) INTO '
        f'"{db}"."year".:MEASUREMENT FROM "{db}"."autogen"./.*/ GROUP BY time(1m), * END'
    )
    influxdb.query(theirs)
    before = continuous_queries(influxdb, db)
    downsample = [{"every": "1m", "functions": ["mean", "max"], "into": YEAR}]
    cfg = sink_config(influxdb.url, db, retention_policy=WEEK, downsample=downsample)
    with caplog.at_level(logging.INFO, LOGGER):
        sink = make_sink(cfg, tmp_path)
        await sink.connect()
        await sink.connect()  # connect runs again after a failure: reported once
        await sink.close()
    assert continuous_queries(influxdb, db) == before  # never dropped or altered
    (report,) = [e for e in errors(caplog) if "continuous query" in e]
    assert (
        f"continuous query 'plantbus_year_1m' on '{db}' exists as [{before['plantbus_year_1m']}]"
        in report
    )
    assert "SELECT mean(*), max(*) INTO" in report and "left as it is" in report
    assert sink.metrics()["config_mismatches"] == 1


async def test_a_continuous_query_runs_and_its_aggregates_match_the_points(
    influxdb, influx_db, tmp_path
):
    # every second, recomputing the last 5 s: late points are aggregated too, so the result
    # settles on the aggregates of every point written
    downsample = [{"every": "1s", "functions": ["mean", "max"], "into": YEAR, "resample_for": "5s"}]
    cfg = sink_config(
        influxdb.url, influx_db, retention_policy=WEEK, downsample=downsample, batch_size=500
    )
    now = time.time_ns()
    ids = new_ids(400)
    # 400 points over the last 2 s (InfluxDB's CQ covers the intervals up to now)
    sent = [
        Record(
            PRESS, {"n": i, "temp": 20.0 + (i % 17) / 4}, now - 2 * 10**9 + i * 5 * 10**6, ids[i]
        )
        for i in range(400)
    ]
    bus = Bus()
    outlet = Outlet("o", bus, [(cfg, make_sink(cfg, tmp_path))])
    task = asyncio.create_task(outlet.run())
    await bus.publish(sent)
    await outlet.stop(20.0)
    await task
    assert outlet.metrics()["records_out"] == 400
    lo, hi = (now // 10**9 - 3) * 10**9, (now // 10**9 + 1) * 10**9
    where = f"WHERE time >= {lo} AND time < {hi}"
    wanted = influxdb.rows(
        f'SELECT mean(n), max(n), mean(temp), max(temp) FROM "{influx_db}"."week"."press7" '
        f"{where} GROUP BY time(1s), *",
        influx_db,
    )
    wanted = [r for r in wanted if r["mean"] is not None]
    assert sum(1 for _ in wanted) >= 2  # the points span at least two seconds

    def downsampled() -> list[dict] | None:  # type: ignore[type-arg]
        rows = influxdb.rows(
            f'SELECT mean_n, max_n, mean_temp, max_temp FROM "{influx_db}"."year"."press7" '
            f"{where} GROUP BY *",
            influx_db,
        )
        got = [
            {
                "time": r["time"],
                "mean": r["mean_n"],
                "max": r["max_n"],
                "mean_1": r["mean_temp"],
                "max_1": r["max_temp"],
                "device": r["device"],
                "line": r["line"],
            }
            for r in rows
        ]
        return got if got == wanted else None

    try:
        wait_until(downsampled, 30.0, "the continuous query's aggregates", interval=0.25)
    except TimeoutError:
        got = influxdb.rows(f'SELECT * FROM "{influx_db}"."year"."press7" GROUP BY *', influx_db)
        raise AssertionError(f"downsampled {got}\nwanted {wanted}") from None


# -- config --------------------------------------------------------------------------------------


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "plantbus.toml"
    path.write_text(f'[node]\nstate_dir = "{tmp_path}"\n\n[[sinks.influxdb]]\n{body}\n')
    return path


_YEAR = 'into = { name = "year", duration = "365d" }'


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        (
            f'downsample = [{{ every = "1m", functions = ["mean", "avg"], {_YEAR} }}]',
            "downsample[0].functions[1]",
            "'avg' is not an InfluxQL aggregate taking a wildcard (count, first, integral,",
        ),
        (
            f'downsample = [{{ every = "1m", functions = ["mean", "mean"], {_YEAR} }}]',
            "downsample[0].functions",
            "names a function twice",
        ),
        (
            f'downsample = [{{ every = "500ms", functions = ["mean"], {_YEAR} }}]',
            "downsample[0].every",
            'must be at least "1s"',
        ),
        (
            f'downsample = [{{ every = "1m", functions = ["max"], {_YEAR}, '
            'resample_for = "30s" }]',
            "downsample[0].resample_for",
            "must be at least every",
        ),
        (
            'retention_policy = { name = "week", duration = "7d" }\n'
            'downsample = [{ every = "1m", functions = ["max"], into = { name = "week", '
            'duration = "365d" } }]',
            "downsample[0].into.name",
            "must differ from retention_policy.name",
        ),
        (
            f'downsample = [{{ every = "1m", functions = ["max"], {_YEAR} }}, '
            f'{{ every = "1m", functions = ["min"], {_YEAR} }}]',
            "downsample[1].name",
            "continuous query 'plantbus_year_1m' is also downsample[0]'s: give one a name",
        ),
        (
            f'downsample = [{{ every = "1m", functions = ["max"], {_YEAR} }}, '
            '{ every = "1h", functions = ["min"], into = { name = "year", duration = "30d" } }]',
            "downsample[1].into",
            "policy 'year' is also downsample[0].into, differently",
        ),
        (
            "create_database = false\n"
            f'downsample = [{{ every = "1m", functions = ["max"], {_YEAR} }}]',
            "downsample",
            "needs create_database = true",
        ),
        (
            f'downsample = [{{ every = "1m", functions = ["max"], {_YEAR}, fill = 0 }}]',
            "downsample[0].fill",
            "unknown key",
        ),
    ],
)
def test_check_names_the_downsample_key(tmp_path, body, key, message):
    errors = check_config(write_config(tmp_path, f'database = "plant"\n{body}'))
    assert len(errors) == 1, errors
    assert f"plantbus.toml: sinks.influxdb[0].{key}: " in errors[0], errors[0]
    assert message in errors[0], errors[0]


def test_downsample_is_a_1x_key():
    with pytest.raises(ValidationError, match="exclude each other"):
        Config.model_validate(
            {
                "bucket": "b",
                "downsample": [{"every": "1m", "functions": ["max"], "into": YEAR}],
            }
        )


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (60, "1m"),
        (90, "90s"),
        (604800, "1w"),
        (86400, "1d"),
        (7200, "2h"),
        (1.5, "1500ms"),
        (0, "0s"),
    ],
)
def test_durations_are_written_as_influxdb_writes_them_back(seconds, text):
    assert influxql_duration(seconds) == text
