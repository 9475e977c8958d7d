"""Fixtures of the s7 tests: real python-snap7 servers, in-process (session-wide, read
only; or one test's own, to change its memory). The child-process PLC for power-off tests
is ``s7_plc.PlcProcess``."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # s7_plc, s7_proxy, s7_harness

from s7_harness import PlcServer
from s7_plc import build_areas, start_server


@pytest.fixture(scope="session")
def plc() -> Iterator[PlcServer]:
    """A server holding the known values of ``s7_plc`` for the whole session (read only)."""
    areas = build_areas()
    server = start_server(areas)
    try:
        yield PlcServer(server, areas)
    finally:
        server.stop()


@pytest.fixture
def own_plc() -> Iterator[PlcServer]:
    """A server of one test's own, whose memory the test may change."""
    areas = build_areas()
    server = start_server(areas)
    try:
        yield PlcServer(server, areas)
    finally:
        server.stop()
