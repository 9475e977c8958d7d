"""Helpers of the s7 tests: the device under test run by a real supervisor, its config,
and waiting on outcomes with a deadline (never a sleep as synchronisation)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s7_plc import POINTS

from plantbus.broker.backoff import Backoff
from plantbus.broker.connector import BuildContext
from plantbus.broker.record import Record
from plantbus.broker.supervisor import Supervisor
from plantbus.connectors.s7 import Config, S7Connector, build

__all__ = ["CTX", "PlcServer", "Running", "running", "s7_config", "wait_for"]

CTX = BuildContext(node_name="edge", node_tags={"site": "ulm"}, state_dir=Path("/nonexistent"))


@dataclass
class PlcServer:
    """An in-process python-snap7 server and its memory (change it to change the PLC)."""

    server: Any
    areas: dict[tuple[str, int], bytearray]

    @property
    def port(self) -> int:
        return int(self.server.server_socket.getsockname()[1])


def s7_config(port: int, **kw: Any) -> Config:
    """A device config reading every known point from 127.0.0.1:``port``."""
    kw.setdefault("name", "plc1")
    kw.setdefault("topic", "plant/h1/plc1")
    kw.setdefault("interval", "50ms")
    kw.setdefault("timeout", "1s")
    kw.setdefault("points", POINTS)
    return Config.model_validate({"host": "127.0.0.1", "port": port, **kw})


async def wait_for(predicate: Callable[[], Any], what: str, limit: float = 10.0) -> Any:
    """Poll ``predicate`` on the event loop until it is truthy (at most ``limit`` s)."""
    deadline = time.monotonic() + limit
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit}s waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class Running:
    """A device run by a real ``Supervisor`` (restart with backoff), and what it emitted."""

    connector: S7Connector
    supervisor: Supervisor
    records: list[Record] = field(default_factory=list)

    def good(self) -> list[Record]:
        return [r for r in self.records if r.status is None]

    async def next_records(self, n: int, limit: float = 10.0) -> list[Record]:
        """Wait for ``n`` records beyond those seen so far and return them."""
        start = len(self.records)
        await wait_for(lambda: len(self.records) >= start + n, f"{n} more records", limit)
        return self.records[start : start + n]


@contextlib.asynccontextmanager
async def running(config: Config, backoff: Backoff | None = None) -> AsyncIterator[Running]:
    """Build the device from ``config`` and run it under a supervisor until the block ends."""
    connector = build(config, CTX)
    records: list[Record] = []

    async def emit(batch: list[Record]) -> None:
        records.extend(batch)

    supervisor = Supervisor(
        config.name,
        lambda: connector.run(emit),
        backoff or Backoff(0.05, 0.2, jitter="equal"),
    )
    task = asyncio.create_task(supervisor.run())
    try:
        yield Running(connector, supervisor, records)
    finally:
        task.cancel()
        # as a drain does: the device must end soon after it is cancelled
        done, _ = await asyncio.wait({task}, timeout=5)
        if not done:
            raise AssertionError(f"device {config.name} still running 5 s after its cancel")
        with contextlib.suppress(asyncio.CancelledError):
            task.result()
