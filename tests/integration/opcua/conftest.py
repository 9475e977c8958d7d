"""Real asyncua servers for the opcua connector's tests.

Each server is ``opcua_server.py`` in its own process on a free loopback port (see
``opcua_harness.UaServer``). The shared one lives for the whole session; tests that restart,
freeze or take apart a server get their own (``server_factory``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # opcua_harness

from opcua_harness import UaServer, base_variables


@pytest.fixture(scope="session")
def ua_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UaServer]:
    """The shared server (no security, MaxNodesPerRead published as 10000 by asyncua)."""
    with UaServer({"variables": base_variables()}, tmp_path_factory.mktemp("ua")) as server:
        yield server


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., UaServer]]:
    """Start servers of one's own (any spec); all are stopped when the test ends."""
    started: list[UaServer] = []

    def start(spec: dict[str, Any] | None = None, **keys: Any) -> UaServer:
        server = UaServer({"variables": base_variables(), **(spec or {}), **keys}, tmp_path)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
