"""What a running runtime is doing, for people: a live terminal view and a summary line.

Both read the runtime's own counters (records each device published, what each sink
acknowledged) rather than subscribing to the bus, so watching costs nothing per record and
the numbers are exactly the ones the drain reports.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from plantbus.broker.record import FieldValue, Record
from plantbus.broker.runtime import DeviceHandle, OutletHandle, Runtime
from plantbus.broker.supervisor import Phase

__all__ = ["LiveView", "RateMeter", "format_fields", "format_rate"]

RATE_WINDOW = 3.0
"""Seconds of samples a rate is computed over: smooth, yet quick to show a stall."""


class RateMeter:
    """Per-second rate of a growing counter over the last ``window`` seconds.

    Args:
        window: seconds of samples kept.
        clock: monotonic seconds.
    """

    def __init__(self, window: float = RATE_WINDOW, clock: Callable[[], float] = time.monotonic):
        self._window = window
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque()

    def update(self, total: int) -> float:
        """Record the counter's current ``total``; return the rate over the window."""
        now = self._clock()
        samples = self._samples
        samples.append((now, total))
        while len(samples) > 2 and now - samples[1][0] >= self._window:
            samples.popleft()
        t0, n0 = samples[0]
        if now - t0 <= 0:
            return 0.0
        return max(0, total - n0) / (now - t0)


def format_rate(rate: float) -> str:
    if rate >= 10_000:
        return f"{rate / 1000:,.0f}k/s"
    if rate >= 100:
        return f"{rate:,.0f}/s"
    return f"{rate:,.1f}/s"


def _format_value(value: FieldValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"
    if isinstance(value, str):
        return repr(value) if len(value) <= 24 else repr(value[:23] + "…")
    return str(value)


def format_fields(record: Record, limit: int = 8) -> str:
    """``temp=21.53 running=true n=42`` for the first ``limit`` fields, then ``…``."""
    items = list(record.fields.items())
    text = " ".join(f"{k}={_format_value(v)}" for k, v in items[:limit])
    if len(items) > limit:
        text += f" … (+{len(items) - limit})"
    if record.status:
        text += " " + " ".join(f"[{k}:{code}]" for k, code in record.status.items())
    return text


def _state_text(status_phase: Phase, restarts: int, retry_in: float | None) -> Text:
    if status_phase is Phase.RUNNING:
        text = Text("running", style="green")
    elif status_phase is Phase.BACKING_OFF:
        text = Text(f"retry in {retry_in or 0:.1f}s", style="yellow")
    elif status_phase is Phase.STARTING:
        text = Text("starting", style="cyan")
    else:
        text = Text(status_phase.value, style="dim")
    if restarts:
        text.append(f" ({restarts} restarts)", style="yellow")
    return text


class LiveView:
    """Renders a runtime's devices and sinks; keeps the rate meters between frames.

    Args:
        runtime: the runtime to show.
        title: the first line of the view.
        notes: short lines shown under the tables (where the data goes, how to stop).
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        title: str = "plantbus",
        notes: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ):
        self.runtime = runtime
        self.title = title
        self.notes = list(notes)
        self._clock = clock
        self._rates: dict[str, RateMeter] = {}
        self._bus_rate = RateMeter(clock=clock)

    def _rate(self, key: str, total: int) -> float:
        meter = self._rates.get(key)
        if meter is None:
            meter = self._rates[key] = RateMeter(clock=self._clock)
        return meter.update(total)

    # -- the rows ----------------------------------------------------------------------------

    def _device_row(self, d: DeviceHandle) -> list[RenderableType]:
        status = d.supervisor.status
        rate = self._rate(f"device:{d.name}", d.emitted)
        topic = d.last.series.topic if d.last is not None else "-"
        last = format_fields(d.last) if d.last is not None else ""
        if status.phase is Phase.BACKING_OFF and status.last_error:
            last = status.last_error
        overruns = d.overruns
        return [
            topic,
            d.name,
            _state_text(status.phase, status.restarts, status.retry_in),
            format_rate(rate),
            f"{d.emitted:,}",
            "-" if overruns is None else f"{overruns:,}",
            Text(last, overflow="ellipsis", no_wrap=True),
        ]

    def _sink_rows(self, o: OutletHandle) -> list[list[RenderableType]]:
        om: dict[str, Any] = dict(o.outlet.metrics())
        waiting = int(om.get("queue_records", 0)) + int(om.get("pending_records", 0))
        rows: list[list[RenderableType]] = []
        for ch in o.outlet.channels:
            cm = ch.metrics()
            delivered = int(cm["records_out"])
            rate = self._rate(f"sink:{o.name}:{ch.name}", delivered)
            if o.supervisor.status.phase in (Phase.FINISHED, Phase.STOPPED):
                state = Text("closed", style="dim")
            elif ch.failing:
                state = Text("failing", style="red")
            elif ch.connected:
                state = Text("connected", style="green")
            else:
                state = Text("connecting", style="cyan")
            if o.supervisor.status.phase is Phase.BACKING_OFF:
                state = _state_text(
                    o.supervisor.status.phase,
                    o.supervisor.status.restarts,
                    o.supervisor.status.retry_in,
                )
            rows.append(
                [
                    ch.name,
                    state,
                    format_rate(rate),
                    f"{delivered:,}",
                    f"{waiting + int(cm['buffer_records']):,}",
                    f"{int(cm['dropped']) + int(cm['rejected_records']):,}",
                    f"{int(cm['retries']):,}",
                    Text(ch.last_error or "", overflow="ellipsis", no_wrap=True, style="red"),
                ]
            )
        return rows

    # -- whole frames ------------------------------------------------------------------------

    def render(self) -> RenderableType:
        """One frame: a header line, the topics table, the sinks table and the notes."""
        rt = self.runtime
        published = rt.bus.published
        bus_rate = self._bus_rate.update(published)
        uptime = 0.0 if rt.started_at is None else self._clock() - rt.started_at
        header = Text.assemble(
            (self.title, "bold"),
            f"   up {uptime:,.0f}s   {published:,} records   {format_rate(bus_rate)}",
        )

        topics = Table(title="topics", title_justify="left", expand=True, pad_edge=False)
        topics.add_column("topic", no_wrap=True)
        topics.add_column("device", no_wrap=True)
        topics.add_column("state", no_wrap=True)
        topics.add_column("rate", justify="right", no_wrap=True)
        topics.add_column("records", justify="right", no_wrap=True)
        topics.add_column("overruns", justify="right", no_wrap=True)
        topics.add_column("last values", ratio=1, no_wrap=True, overflow="ellipsis")
        for d in sorted(rt.devices.values(), key=lambda d: (d.last is None, _topic(d), d.name)):
            topics.add_row(*self._device_row(d))

        sinks = Table(title="sinks", title_justify="left", expand=True, pad_edge=False)
        sinks.add_column("sink", no_wrap=True)
        sinks.add_column("state", no_wrap=True)
        sinks.add_column("rate", justify="right", no_wrap=True)
        sinks.add_column("delivered", justify="right", no_wrap=True)
        sinks.add_column("queued", justify="right", no_wrap=True)
        sinks.add_column("lost", justify="right", no_wrap=True)
        sinks.add_column("retries", justify="right", no_wrap=True)
        sinks.add_column("last error", ratio=1, no_wrap=True, overflow="ellipsis")
        for o in rt.outlets.values():
            for row in self._sink_rows(o):
                sinks.add_row(*row)

        parts: list[RenderableType] = [header, topics, sinks]
        parts.extend(Text(n, style="dim") for n in self.notes)
        return Group(*parts)

    def sample(self) -> float:
        """Feed the bus rate meter without rendering; returns the current rate."""
        return self._bus_rate.update(self.runtime.bus.published)

    def summary_line(self, *, final: bool = False) -> str:
        """One line for logs and non-terminal output: totals, rates and per-sink delivery.

        Args:
            final: after the drain: leave out the rate and the devices still running.
        """
        rt = self.runtime
        published = rt.bus.published
        rate = self.sample()
        uptime = 0.0 if rt.started_at is None else self._clock() - rt.started_at
        running = sum(1 for d in rt.devices.values() if d.supervisor.status.phase is Phase.RUNNING)
        if final:
            head = f"{published} records in {uptime:.0f}s from {len(rt.devices)} devices; "
        else:
            head = (
                f"up {uptime:.0f}s: {published} records ({format_rate(rate)}) from "
                f"{running}/{len(rt.devices)} devices; "
            )
        sinks = []
        for o in rt.outlets.values():
            om = o.outlet.metrics()
            waiting = int(om.get("queue_records", 0)) + int(om.get("pending_records", 0))
            for ch in o.outlet.channels:
                cm = ch.metrics()
                queued = waiting + int(cm["buffer_records"])
                state = " FAILING" if ch.failing else ""
                sinks.append(f"{ch.name} delivered={int(cm['records_out'])} queued={queued}{state}")
        return head + ("; ".join(sinks) or "no sinks")


def _topic(d: DeviceHandle) -> str:
    return d.last.series.topic if d.last is not None else ""
