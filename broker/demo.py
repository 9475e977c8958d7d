"""``plantbus demo``: the embedded demo config, run with a live terminal view.

The config is ``plantbus/broker/demo.toml``, package data kept identical to the repository's
``config/demo.toml`` (a test checks it), so ``plantbus demo`` works from an installed wheel
as well as from a checkout. The demo writes only under its work folder (default
``var/demo``, git-ignored): its file sinks and state directory are moved there, whatever
paths the config names. ``--influx URL`` adds an ``influxdb`` sink writing to the database
``plantbus``.

Protocol simulators join the demo through ``registry.DEMO_SIMULATORS``: each is a real
protocol server run in-process (on a free loopback port) and read by that kind's real
connector, so the demo shows the drivers at work. A simulator whose driver library is not
installed (an optional extra) is left out with a note.

In a terminal it shows a live view of topics, rates and last values (about 4 Hz); with
``--no-view`` or when stdout is not a terminal it prints a summary line every few seconds.
Ctrl-C drains (the devices stop, the sinks flush) and exits 0; a second Ctrl-C forces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import json
import logging
import sys
from importlib import resources
from pathlib import Path
from typing import Protocol

from plantbus.broker.config import PlantbusConfig, SinkEntry, parse_config
from plantbus.broker.liveview import LiveView
from plantbus.broker.runtime import Runtime

__all__ = [
    "DEMO_DATABASE",
    "Demo",
    "DemoSimulator",
    "demo_config",
    "demo_config_text",
    "load_simulators",
]

log = logging.getLogger("plantbus.demo")

DEMO_DATABASE = "plantbus"
DEFAULT_WORKDIR = Path("var/demo")
VIEW_INTERVAL = 0.25  # seconds between frames of the live view (~4 Hz)
SUMMARY_EVERY = 5  # seconds between summary lines without the view


class DemoSimulator(Protocol):
    """An in-process protocol server for the demo and the device tables that read it.

    Built by ``<module>.demo_simulator()``; it picks its free loopback port when built, so
    its ``device_config`` is known before it starts.
    """

    name: str

    def device_config(self) -> str:
        """TOML ``[[devices.<kind>]]`` tables (topics under ``demo/``) reading this server."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def load_simulators() -> tuple[list[DemoSimulator], list[str]]:
    """Build every registered demo simulator; returns them and notes on the ones left out."""
    from plantbus.broker.registry import DEMO_SIMULATORS

    sims: list[DemoSimulator] = []
    notes: list[str] = []
    for kind, module in sorted(DEMO_SIMULATORS.items()):
        try:
            sims.append(importlib.import_module(module).demo_simulator())
        except ImportError as exc:
            notes.append(f"{kind} simulator left out: {exc} (install plantbus[{kind}])")
    return sims, notes


def demo_config_text() -> str:
    """The embedded demo config (``plantbus/broker/demo.toml``)."""
    return resources.files("plantbus.broker").joinpath("demo.toml").read_text(encoding="utf-8")


def _influx_table(url: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes, so any URL text stays one value
    return (
        "\n\n# added by `plantbus demo --influx`\n"
        "[[sinks.influxdb]]\n"
        'name = "influxdb"\n'
        f"url = {json.dumps(url)}\n"
        f'database = "{DEMO_DATABASE}"\n'
        'subscribe = ["#"]\n'
    )


def demo_config(
    workdir: Path = DEFAULT_WORKDIR,
    influx: str | None = None,
    simulators: list[DemoSimulator] | None = None,
) -> PlantbusConfig:
    """The demo's config, relocated into ``workdir``, plus an InfluxDB sink for ``influx``
    and the device tables of ``simulators``.

    Raises:
        ConfigError: e.g. an invalid ``--influx`` URL (messages name ``demo.toml``).
    """
    workdir = workdir.absolute()
    text = demo_config_text()
    for sim in simulators or ():
        text += f"\n\n# added by the {sim.name} demo simulator\n{sim.device_config()}\n"
    if influx is not None:
        text += _influx_table(influx)
    config = parse_config(text, workdir / "demo.toml")
    sinks = [_relocate(s, workdir) for s in config.sinks]
    node = config.node.model_copy(update={"state_dir": workdir / "state"})
    return dataclasses.replace(config, node=node, sinks=sinks)


def _relocate(entry: SinkEntry, workdir: Path) -> SinkEntry:
    path = getattr(entry.config, "path", None)
    if entry.kind != "file" or not isinstance(path, Path):
        return entry
    config = entry.config.model_copy(update={"path": workdir / path.name})
    return dataclasses.replace(entry, config=config)


class Demo:
    """The demo: a runtime with the demo config and a way to watch it.

    Args:
        influx: also write to the InfluxDB 1.x at this URL (database ``plantbus``).
        duration: stop by itself after this many seconds (drain included).
        view: show the live view (only when stdout is a terminal).
        workdir: where the demo's files go.
        simulators: run these protocol simulators (default: every registered one).

    Raises:
        ConfigError: the demo config (with ``--influx``) is invalid.
    """

    def __init__(
        self,
        *,
        influx: str | None = None,
        duration: float | None = None,
        view: bool = True,
        workdir: Path = DEFAULT_WORKDIR,
        simulators: list[DemoSimulator] | None = None,
    ):
        if simulators is None:
            simulators, self._left_out = load_simulators()
        else:
            self._left_out = []
        self.simulators = simulators
        self.config = demo_config(workdir, influx, simulators)
        self.influx = influx
        self.duration = duration
        self.view = view and sys.stdout.isatty()
        self.workdir = workdir
        self.runtime = Runtime(self.config, handle_signals=True)
        self._console = None
        if self.view:
            from rich.console import Console

            self._console = Console()

    def notes(self) -> list[str]:
        out = []
        for s in self.config.sinks:
            path = getattr(s.config, "path", None)
            if s.kind == "file" and path is not None:
                out.append(f"sink {s.name}: line protocol in {_shown(path)}")
        if self.influx:
            out.append(f"sink influxdb: {self.influx} database {DEMO_DATABASE!r}")
        if self.duration:
            out.append(f"stops by itself after {self.duration:g}s")
        out.extend(f"simulator: {sim.name}" for sim in self.simulators)
        out.extend(self._left_out)
        out.append("Ctrl-C to stop (drains the sinks first)")
        return out

    def setup_logging(self, level: str) -> None:
        """Log lines go above the live view (rich) or to stderr (plain)."""
        if self._console is None:
            from plantbus.broker.cli import setup_logging

            setup_logging(level)
            return
        from rich.logging import RichHandler

        handler = RichHandler(
            console=self._console, show_path=False, rich_tracebacks=False, markup=False
        )
        logging.basicConfig(
            level=level.upper(), format="%(name)s: %(message)s", handlers=[handler], force=True
        )

    async def main(self) -> None:
        """Run until Ctrl-C, SIGTERM or ``duration``, then drain (raises what run raises)."""
        runtime = self.runtime
        view = LiveView(runtime, title="plantbus demo", notes=self.notes())
        loop = asyncio.get_running_loop()
        timer = None
        watcher = asyncio.create_task(self._watch(view), name="demo:view")
        try:
            async with contextlib.AsyncExitStack() as stack:
                for sim in self.simulators:
                    await sim.start()
                    stack.push_async_callback(sim.stop)
                # counted from here: a protocol simulator can take a second to come up on a
                # busy machine, and `--duration` promises that long of data
                if self.duration:
                    timer = loop.call_later(
                        self.duration, runtime.request_stop, f"demo ran {self.duration:g}s"
                    )
                # simulators stop after the drain: the devices reading them stop first
                await runtime.run()
        finally:
            if timer is not None:
                timer.cancel()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        print(f"demo stopped: {view.summary_line(final=True)}", flush=True)

    async def _watch(self, view: LiveView) -> None:
        if self._console is None:
            # sample every second so the printed rate covers the recent seconds
            ticks = 0
            while True:
                await asyncio.sleep(1.0)
                ticks += 1
                if ticks % SUMMARY_EVERY:
                    view.sample()
                else:
                    print(view.summary_line(), flush=True)
        from rich.live import Live

        # refreshed from this task, not rich's thread, so the runtime's state is read on
        # the event loop between its own steps
        with Live(
            view.render(), console=self._console, auto_refresh=False, transient=False
        ) as live:
            try:
                while True:
                    await asyncio.sleep(VIEW_INTERVAL)
                    live.update(view.render(), refresh=True)
            finally:
                # leave the final state on screen: stopped devices, what each sink delivered
                live.update(view.render(), refresh=True)


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
