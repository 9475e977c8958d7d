"""Store-and-forward through outages: a real `plantbus run` daemon, a real InfluxDB 1.6.7.

A `counter` sim at 20k records/s writes through an `influxdb` sink with a disk buffer.

* InfluxDB is SIGKILLed and restarted (same port, same data dir) three times, ~10 s down
  each: afterwards every counter value the device emitted is in InfluxDB exactly once
  (count == distinct == max + 1 == emitted). Replays after a lost answer are harmless: a
  point with the same series and timestamp overwrites.
* The daemon itself is SIGKILLed five times (InfluxDB down during two of those runs, so
  that a backlog waits on disk): each run carries its own node tag, and its counter in
  InfluxDB must be a hole-free prefix 0..N-1 with N at least what the buffer's ``synced``
  file said was durable just before the kill.
* SIGTERM while InfluxDB is down: the drain ends at once with everything the device emitted
  `persisted` on disk (the `drained:` line says so); the next start delivers all of it.

These tests own their InfluxDB (they kill it), separate from the session-wide one.
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

DB = "outage"

CONFIG = """
[node]
name = "outage"
state_dir = "state"
shutdown_timeout = "60s"
tags = {{ run = "{run}" }}

[api]
enabled = false

[[devices.sim]]
name = "counter"
topic = "test/outage/counter"
interval = "1ms"
batch = 20
points = [{{ name = "n", signal = "counter" }}]

[[sinks.influxdb]]
name = "influx"
url = "{url}"
database = "{db}"
subscribe = ["test/#"]
batch_size = 5000
flush_interval = "100ms"
retry_initial = "100ms"
retry_max = "1s"
timeout = "5s"
queue = {{ size = 50000, policy = "block" }}
buffer = {{ kind = "disk", max_size = "1GiB", when_full = "block", sync_interval = "200ms" }}
"""

DRAINED_DEVICE = re.compile(r"drained: device counter emitted=(\d+)")
DRAINED_SINK = re.compile(
    r"drained: sink influx delivered=(\d+) undelivered=(\d+) dropped=(\d+) rejected=(\d+) "
    r"retries=(\d+) persisted=(\d+)"
)
SYNCED = re.compile(rb"synced_records=(\d+) pid=(\d+)")


class Daemon:
    """One `plantbus run` process in ``folder`` (its state dir persists across instances)."""

    def __init__(self, folder: Path, influx: InfluxServer, run: str):
        self.folder = folder
        config = folder / "plantbus.toml"
        config.write_text(CONFIG.format(url=influx.url, db=DB, run=run))
        self.log = folder / f"plantbus-{run}.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "plantbus.broker.cli", "run", "-c", str(config)],
                cwd=folder,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    @property
    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"plantbus exited early:\n{self.stderr[-4000:]}")
        return True

    def synced_records(self) -> int:
        """Records this instance appended that its disk buffer says are durable."""
        try:
            m = SYNCED.search((self.folder / "state/buffers/influxdb/influx/synced").read_bytes())
        except FileNotFoundError:
            return 0
        # the file is rewritten when a buffer opens: only this process's own line counts
        return int(m.group(1)) if m and int(m.group(2)) == self.proc.pid else 0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def terminate(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"plantbus did not exit after SIGTERM:\n{self.stderr[-4000:]}")
        assert self.proc.returncode == 0, self.stderr[-4000:]
        return self.stderr


@pytest.fixture
def influx(tmp_path: Path):
    server = InfluxServer(tmp_path / "influx").start()
    try:
        yield server
    finally:
        server.stop(signal.SIGKILL)


def _runs(influx: InfluxServer) -> dict[str, dict[str, int]]:
    """Per run tag: count, distinct count, min and max of the counter."""
    rows = influx.rows(
        'SELECT count("n") AS c, count(distinct("n")) AS d, min("n") AS lo, max("n") AS hi '
        'FROM "counter" GROUP BY "run"',
        DB,
    )
    # a group whose points are being written can answer null aggregates for a moment
    return {r["run"]: {k: int(r[k] or 0) for k in ("c", "d", "lo", "hi")} for r in rows}


def _count(influx: InfluxServer, run: str) -> int:
    try:
        return _runs(influx).get(run, {}).get("c", 0)
    except (OSError, RuntimeError):
        return 0  # database not created yet


def test_influxdb_killed_three_times_every_value_arrives_once(
    tmp_path: Path, influx: InfluxServer
) -> None:
    daemon = Daemon(tmp_path, influx, "outages")
    outages: list[tuple[float, int, int]] = []  # (seconds down, backlog grown, count after)
    try:
        wait_until(
            lambda: daemon.alive() and _count(influx, "outages") >= 20_000, 60, "first records"
        )
        for _ in range(3):
            before = daemon.synced_records()
            influx.stop(signal.SIGKILL)
            down = time.monotonic()
            # the outage lasts 10 s (the scenario, not a synchronisation); the device must
            # keep going meanwhile, into the disk buffer
            time.sleep(10)
            daemon.alive()
            grown = daemon.synced_records() - before
            assert grown >= 20_000, f"the buffer took only {grown} records in 10 s"
            influx.start()
            seconds = time.monotonic() - down
            target = before + grown
            wait_until(
                lambda target=target: daemon.alive() and _count(influx, "outages") >= target,
                120,
                "the backlog replayed",
                interval=0.5,
            )
            outages.append((seconds, grown, _count(influx, "outages")))
    except BaseException:
        daemon.kill()
        raise
    err = daemon.terminate()
    assert "Traceback" not in err
    emitted = int(DRAINED_DEVICE.search(err).group(1))  # type: ignore[union-attr]
    s = DRAINED_SINK.search(err)
    assert s, err[-4000:]
    _, undelivered, dropped, rejected, retries, persisted = map(int, s.groups())
    assert (undelivered, dropped, rejected, persisted) == (0, 0, 0, 0), s.group(0)
    assert retries >= 3
    agg = _runs(influx)["outages"]
    print(f"\noutages (s down, records buffered, count after): {outages}")
    print(f"emitted={emitted} influx={agg} drained: {s.group(0)}")
    # N distinct integers in [0, N-1] are exactly 0..N-1; count == distinct: none doubled
    assert agg == {"c": emitted, "d": emitted, "lo": 0, "hi": emitted - 1}, (agg, emitted)


def test_daemon_killed_five_times_every_synced_record_arrives(
    tmp_path: Path, influx: InfluxServer
) -> None:
    synced: dict[str, int] = {}
    for i in range(5):
        run = f"kill{i}"
        influx_down = i in (1, 3)  # a backlog waits on disk when the daemon dies
        if influx_down:
            influx.stop(signal.SIGKILL)
        daemon = Daemon(tmp_path, influx, run)
        try:
            wait_until(
                lambda d=daemon: d.alive() and d.synced_records() >= 40_000,
                60,
                f"{run}: records synced",
                interval=0.1,
            )
            synced[run] = daemon.synced_records()  # a lower bound of what is durable now
        finally:
            daemon.kill()
        if influx_down:
            influx.start()
    # a last run that ends with a drain: every backlog left by the killed runs replays
    final = Daemon(tmp_path, influx, "final")
    try:
        wait_until(lambda: final.alive() and _count(influx, "final") >= 20_000, 60, "final run")
    except BaseException:
        final.kill()
        raise
    err = final.terminate()
    s = DRAINED_SINK.search(err)
    assert s, err[-4000:]
    assert s.group(2) == "0", s.group(0)  # undelivered
    runs = _runs(influx)
    print(f"\nsynced before each kill: {synced}")
    print(f"in InfluxDB per run: {runs}")
    for run, durable in synced.items():
        agg = runs.get(run)
        assert agg is not None, f"{run}: nothing arrived (synced {durable})"
        # a hole-free prefix 0..N-1, none doubled, covering everything that was synced
        assert agg["lo"] == 0 and agg["c"] == agg["d"] == agg["hi"] + 1, (run, agg)
        assert agg["c"] >= durable, (run, agg, durable)


def test_sigterm_with_influxdb_down_keeps_everything_on_disk_for_the_next_start(
    tmp_path: Path, influx: InfluxServer
) -> None:
    influx.stop(signal.SIGKILL)  # down from the start (its port stays reserved for it)
    first = Daemon(tmp_path, influx, "term1")
    try:
        wait_until(lambda: first.alive() and first.synced_records() >= 40_000, 60, "buffered")
    except BaseException:
        first.kill()
        raise
    t0 = time.monotonic()
    err = first.terminate()
    took = time.monotonic() - t0
    emitted = int(DRAINED_DEVICE.search(err).group(1))  # type: ignore[union-attr]
    s = DRAINED_SINK.search(err)
    assert s, err[-4000:]
    delivered, undelivered, dropped, rejected, _, persisted = map(int, s.groups())
    # nothing lost: everything the device emitted is on disk, and the drain said so
    assert (delivered, dropped, rejected) == (0, 0, 0), s.group(0)
    assert undelivered == persisted == emitted, s.group(0)
    # the upstream was away and everything was on disk: no waiting out shutdown_timeout
    assert took < 30, f"drain took {took:.1f}s"

    influx.start()
    second = Daemon(tmp_path, influx, "term2")
    try:
        wait_until(
            lambda: (
                second.alive()
                and _count(influx, "term1") >= emitted
                and _count(influx, "term2") >= 20_000
            ),
            120,
            "backlog and live records",
            interval=0.5,
        )
    except BaseException:
        second.kill()
        raise
    err = second.terminate()
    emitted2 = int(DRAINED_DEVICE.search(err).group(1))  # type: ignore[union-attr]
    runs = _runs(influx)
    print(f"\nSIGTERM with InfluxDB down: {s.group(0)} (drain {took:.1f}s); then {runs}")
    assert runs["term1"] == {"c": emitted, "d": emitted, "lo": 0, "hi": emitted - 1}
    assert runs["term2"] == {"c": emitted2, "d": emitted2, "lo": 0, "hi": emitted2 - 1}
