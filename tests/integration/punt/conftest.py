"""The punt tests' function container: ``zscore_function.py`` as a real process per test."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # punt_harness, zscore_function

from punt_harness import FunctionServer


@pytest.fixture
def function_server(tmp_path: Path) -> Iterator[Callable[..., FunctionServer]]:
    """Start ``zscore_function.py`` with the given arguments; stopped after the test."""
    started: list[FunctionServer] = []

    def start(*args: str) -> FunctionServer:
        server = FunctionServer(tmp_path, *args).start()
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
