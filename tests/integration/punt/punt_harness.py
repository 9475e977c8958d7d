"""For the punt tests: the function container process and the in-process daemon with taps.

The function is ``zscore_function.py`` as a real process. The daemon side runs in-process
(``Runtime`` from a config text), so a test can subscribe to the bus beside the punt sink and
see every source record and every result by uid.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from servers import free_port

from plantbus.broker.bus import Subscription
from plantbus.broker.config import parse_config
from plantbus.broker.record import Record
from plantbus.broker.runtime import Runtime

HERE = Path(__file__).resolve().parent


class FunctionServer:
    """``zscore_function.py`` on a free port, stopped by PID (SIGTERM, then SIGKILL)."""

    def __init__(self, folder: Path, *args: str):
        self.port = free_port()
        self.args = args
        self.log = folder / f"function-{self.port}.log"  # its stderr, for a failing test
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/score"

    def start(self) -> FunctionServer:
        with self.log.open("w") as err:  # the child keeps its own copy of the descriptor
            self.proc = self._spawn(err)
        assert self.proc.stdout is not None
        # the script prints one line once it listens; it ends the line (EOF) if it dies
        line = self.proc.stdout.readline()
        if not line.startswith("listening"):
            self.stop()
            raise RuntimeError(f"the function did not start: {line!r}, {self.log.read_text()}")
        return self

    def _spawn(self, err: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(HERE / "zscore_function.py"), str(self.port), *self.args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def _call(self, method: str, path: str, data: bytes | None = None) -> bytes:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, method=method
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.read()  # type: ignore[no-any-return]

    async def set_mode(self, mode: str) -> None:
        """``ok``, ``fail``, ``hang`` or ``garbage`` (see zscore_function.py)."""
        await asyncio.to_thread(self._call, "POST", "/mode", mode.encode())

    async def stats(self) -> dict[str, Any]:
        return json.loads(await asyncio.to_thread(self._call, "GET", "/stats"))  # type: ignore[no-any-return]


class Tap:
    """A subscription on the runtime's bus beside the sinks; ``take()`` collects what came."""

    def __init__(self, sub: Subscription):
        self.sub = sub
        self.records: list[Record] = []

    def take(self) -> list[Record]:
        self.records.extend(self.sub.get_nowait())
        return self.records


class PuntRun:
    """A runtime built from ``config``, with taps on the source and result topics."""

    def __init__(self, runtime: Runtime, sources: Tap, results: Tap):
        self.runtime = runtime
        self.sources = sources
        self.results = results

    def sink_metrics(self, sink: str = "scorer") -> dict[str, float]:
        for outlet in self.runtime.outlets.values():
            m = outlet.outlet.metrics()
            if f"{sink}.records_out" in m:
                return {k[len(sink) + 1 :]: v for k, v in m.items() if k.startswith(sink + ".")}
        raise KeyError(sink)

    async def until(self, predicate: Callable[[], object], limit: float = 30.0) -> None:
        """Wait for ``predicate()`` (state with no event to wait on), ``limit`` s at most."""
        async with asyncio.timeout(limit):
            while not predicate():
                self.sources.take()
                self.results.take()
                await asyncio.sleep(0.005)


@asynccontextmanager
async def punt_run(
    tmp_path: Path, config: str, source_filter: str, result_filter: str
) -> AsyncIterator[PuntRun]:
    """Run ``config`` in-process; on exit drain it (SIGTERM's path) and collect the taps."""
    rt = Runtime(parse_config(config, tmp_path / "plantbus.toml"))
    # never full, so never back-pressure: the taps only watch
    sources = Tap(rt.bus.subscribe([source_filter], size=10**8, name="test:sources"))
    results = Tap(rt.bus.subscribe([result_filter], size=10**8, name="test:results"))
    run = PuntRun(rt, sources, results)
    await rt.start()
    try:
        yield run
    finally:
        await rt.shutdown()
        sources.take()
        results.take()
