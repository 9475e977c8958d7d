"""Session-wide real servers and shared fixtures.

Servers start once per test session on free loopback ports and are stopped by PID at the end.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/servers.py, tests/faults.py

from servers import InfluxServer, VictoriaMetricsServer

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

_db_names = itertools.count()


@pytest.fixture(scope="session")
def influxdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxServer]:
    """A real InfluxDB 1.6.7 for the whole session."""
    server = InfluxServer(tmp_path_factory.mktemp("influxdb"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def victoriametrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetricsServer]:
    """A real VictoriaMetrics (its InfluxDB ``/api/v2/write``) for the whole session."""
    server = VictoriaMetricsServer(tmp_path_factory.mktemp("victoriametrics"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def influx_db(influxdb: InfluxServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty database for one test (dropped afterwards)."""
    name = f"t{next(_db_names)}_{request.node.name[:40]}"
    name = "".join(c if c.isalnum() else "_" for c in name)
    influxdb.query(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        influxdb.query(f'DROP DATABASE "{name}"')
