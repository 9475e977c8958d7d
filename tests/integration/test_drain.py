"""SIGTERM / SIGINT drain of a real `plantbus run` process into a real InfluxDB 1.6.7.

A `counter` sim publishes as fast as back-pressure lets it (1 ms ticks of 100 records). After
the signal the process must stop the device, flush everything to InfluxDB and exit 0, and
InfluxDB must then hold exactly the records the device emitted: counter values 0..N-1, none
missing and none doubled, where N is what the process itself reports in its `drained:` line.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from servers import InfluxServer, wait_until

pytestmark = pytest.mark.slow

CONFIG = """
[node]
name = "drain"
state_dir = "state"
shutdown_timeout = "30s"

[api]
enabled = false

[[devices.sim]]
name = "fast"
topic = "test/drain/fast"
interval = "1ms"
batch = 100
points = [
  {{ name = "n", signal = "counter" }},
  {{ name = "v", signal = "sine", min = 0.0, max = 1.0, period = "1s" }},
]

[[sinks.influxdb]]
name = "influx"
url = "{url}"
database = "{db}"
subscribe = ["test/#"]
batch_size = 5000
flush_interval = "100ms"
# block all the way: nothing may be dropped, the sim is slowed down instead. The bounds keep
# the backlog at the signal small enough to drain well within the shutdown timeout.
queue = {{ size = 20000, policy = "block" }}
buffer = {{ kind = "memory", max_size = "8MiB", when_full = "block" }}
"""

DRAINED_DEVICE = re.compile(r"drained: device fast emitted=(\d+)")
DRAINED_SINK = re.compile(
    r"drained: sink influx delivered=(\d+) undelivered=(\d+) dropped=(\d+) rejected=(\d+)"
)


def _start(tmp_path: Path, influxdb: InfluxServer, db: str) -> subprocess.Popen[str]:
    config = tmp_path / "plantbus.toml"
    config.write_text(CONFIG.format(url=influxdb.url, db=db))
    return subprocess.Popen(
        [sys.executable, "-m", "plantbus.broker.cli", "run", "-c", str(config)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(proc: subprocess.Popen[str], sig: signal.Signals) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"plantbus did not exit after {sig.name}:\n{err[-4000:]}")
    return proc.returncode, err


def _aggregate(influxdb: InfluxServer, db: str) -> dict[str, int]:
    rows = influxdb.rows(
        'SELECT count("n") AS c, count(distinct("n")) AS d, min("n") AS lo, max("n") AS hi '
        'FROM "fast"',
        db,
    )
    if not rows:
        return {"c": 0, "d": 0, "lo": -1, "hi": -1}
    return {k: int(rows[0][k]) for k in ("c", "d", "lo", "hi")}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_drain_delivers_exactly_what_was_emitted(
    tmp_path: Path, influxdb: InfluxServer, influx_db: str, sig: signal.Signals
) -> None:
    proc = _start(tmp_path, influxdb, influx_db)
    try:
        # running and writing: wait until InfluxDB has a good share of records, so that the
        # signal arrives with batches queued, encoded, buffered and in flight
        def enough() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"plantbus exited early:\n{proc.stderr.read()[-4000:]}")  # type: ignore[union-attr]
            return influxdb.count(influx_db, "fast", "n") >= 20_000

        wait_until(enough, 60, "records in InfluxDB", interval=0.2)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    t0 = time.monotonic()
    rc, err = _stop(proc, sig)
    took = time.monotonic() - t0
    assert rc == 0, err[-4000:]
    assert "Traceback" not in err

    m = DRAINED_DEVICE.search(err)
    assert m, err[-4000:]
    emitted = int(m.group(1))
    s = DRAINED_SINK.search(err)
    assert s, err[-4000:]
    delivered, undelivered, dropped, rejected = map(int, s.groups())
    assert (undelivered, dropped, rejected) == (0, 0, 0), s.group(0)
    assert delivered == emitted, (delivered, emitted)
    assert emitted >= 20_000

    agg = _aggregate(influxdb, influx_db)
    # N distinct integers in [0, N-1] are exactly 0..N-1; count == distinct: none doubled
    assert agg == {"c": emitted, "d": emitted, "lo": 0, "hi": emitted - 1}, (agg, emitted)
    assert took < 30, f"drain took {took:.1f}s"
