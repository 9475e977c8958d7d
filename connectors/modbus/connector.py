"""The ``modbus`` device: polls a unit over TCP, RTU or RTU-over-TCP on a fixed-rate schedule.

Each poll issues the planned reads (see ``planner``) on the device's shared link (see
``link``) and emits one record with one field per point. Points whose read failed are
marked Bad with the fault's StatusCode (``status``) and left out of the fields, so the
other points of the poll are still delivered.

* A Modbus exception marks the points of that read only. An "illegal data address" on a
  read that spans unused registers (``max_gap``) splits it into gap-free reads, at once
  and for every later poll: the device does not map everything between the points.
* A timeout or a broken connection ends the poll: its remaining points are marked with the
  same code (the link was torn down; see ``link``). The next poll reconnects. After
  ``SILENT_POLLS`` polls in a row without any reply, ``run`` raises, and the runtime's
  supervisor backs off before it polls again, so a dead unit does not hog a shared bus.
* When no connection can be made, ``run`` raises for the supervisor to back off (with
  jitter; the link itself also spaces its connection attempts), never a busy loop.

Commands (``write``) use the same link and take their turn on it like reads: one request
per point (function 5 for a coil, 6 for one register, 16 for several, 22 for one bit of a
register), each under the device's ``timeout``, which tears the connection down as a read
timeout does. With ``read_back`` the written points are then read again (touching points
in one request, function 1 or 3) and decoded as a poll decodes them (scale and offset
applied), so the reply holds what the unit keeps, which may differ from what was sent (a
unit that clamps or ignores a write).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from plantbus.broker.connector import BuildContext, Emit, WritePoint, WriteResult
from plantbus.broker.ids import new_id
from plantbus.broker.record import FieldValue, Quality, Record, Series
from plantbus.broker.schedule import FixedRate, PolledCounters
from plantbus.broker.topics import validate_topic
from plantbus.connectors.modbus.codec import EncodeError, Point, encode_registers, resolve_points
from plantbus.connectors.modbus.config import Config
from plantbus.connectors.modbus.link import (
    Link,
    LinkError,
    ModbusExceptionResponse,
    NotConnected,
    ReplyTimeout,
    link_for,
)
from plantbus.connectors.modbus.planner import Read, plan, split_gaps

__all__ = ["SILENT_POLLS", "DeviceSilent", "ModbusConnector", "build"]

log = logging.getLogger("plantbus.connectors.modbus")

SILENT_POLLS = 3
"""Polls in a row without any reply after which ``run`` raises (the supervisor backs off)."""

ILLEGAL_DATA_ADDRESS = 2


class DeviceSilent(Exception):
    """The unit answered none of the last ``SILENT_POLLS`` polls."""


class ModbusConnector(PolledCounters):
    """One Modbus unit, polled on a fixed-rate schedule.

    State that must survive a restart by the supervisor (the plan, the counters, the last
    timestamp) lives on this object.

    Attributes:
        name: the device name.
        series: the one Series all records of this device share.
        reads: the current plan (one entry per request each poll).
        link: the shared connection.
        polls: polls whose record was emitted.
        requests: requests this device sent.
        failed_reads: reads that got no data (exception, timeout, lost connection).
        overruns: polls that ended after the next one was due.
        missed: scheduled polls skipped because of overruns.
        splits: merged reads split after the device refused their unused registers.
    """

    def __init__(
        self,
        config: Config,
        ctx: BuildContext,
        *,
        link: Link | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        time_ns: Callable[[], int] = time.time_ns,
    ):
        """Build the device (no I/O).

        Args:
            config: the validated device config.
            ctx: node name and tags, for the topic, measurement and tags.
            link: the connection to use (default: the shared link of its endpoint).
            clock / sleep: monotonic seconds and the matching sleep, for the schedule.
            time_ns: wall-clock Unix ns for record timestamps.

        Raises:
            ValueError: the topic is invalid, or another device on the same serial port
                uses different line settings.
        """
        self.name = config.name
        self.config = config
        topic = ctx.topic(config)
        validate_topic(topic)
        self.series = Series(topic, ctx.measurement(config), ctx.series_tags(config))
        self.points = resolve_points(config)
        self._by_name = {p.name: p for p in self.points}
        self.write_points: dict[str, WritePoint] = {
            p.name: self._write_point(p) for p in self.points
        }
        self.reads: list[Read] = plan(
            self.points, max_registers=config.max_registers_per_request, max_gap=config.max_gap
        )
        self.link = link if link is not None else link_for(config)
        self.unit = config.unit
        self.timeout = float(config.timeout)
        self.frame_delay = config.effective_frame_delay()
        self.interval = float(config.interval)
        self._clock = clock
        self._sleep = sleep
        self._time_ns = time_ns
        self._last_ns = 0
        self._silent = 0
        self.polls = 0
        self.requests = 0
        self.failed_reads = 0
        self._ticks = FixedRate(self.interval, clock)
        self.splits = 0

    def _write_point(self, p: Point) -> WritePoint:
        cfg = self.config.points[p.index]
        return cfg.write_point(p.name, cfg.value_kind, device_read_back=self.config.read_back)

    async def write(self, points: Mapping[str, FieldValue]) -> WriteResult:
        """Write each point of ``points`` to the unit, in order (see the module doc).

        Returns:
            per point ``None`` (written) or the reason it was not; after a timeout or a
            lost connection the points not yet written get the same reason.
        """
        errors: dict[str, str | None] = {}
        fatal: str | None = None
        for name, value in points.items():
            if fatal is not None:
                errors[name] = fatal
                continue
            p = self._by_name.get(name)
            if p is None or not self.write_points[name].writable:
                errors[name] = f"refused: point {name!r} is not writable"
                continue
            try:
                await self._write_one(p, value)
            except EncodeError as exc:
                errors[name] = str(exc)
                continue
            except ModbusExceptionResponse as exc:
                errors[name] = f"device error: {exc}"
                continue
            except ReplyTimeout as exc:
                fatal = errors[name] = f"timeout: {exc}"
                continue
            except LinkError as exc:
                fatal = errors[name] = f"device error: {exc}"
                continue
            errors[name] = None
        wanted = [
            self._by_name[name]
            for name, why in errors.items()
            if why is None and self.write_points[name].read_back
        ]
        if not wanted:
            return WriteResult(errors)
        if fatal is not None:  # the connection is gone: nothing can be read back now
            return WriteResult(errors, read_back_errors={p.name: fatal for p in wanted})
        values, failed = await self._read_back(wanted)
        return WriteResult(errors, values, failed)

    async def _read_back(self, points: list[Point]) -> tuple[dict[str, FieldValue], dict[str, str]]:
        """Read ``points`` afresh (touching ones in one request) and decode them as a poll
        does: their values, and per point that could not be read the reason."""
        link, unit, timeout, delay = self.link, self.unit, self.timeout, self.frame_delay
        values: dict[str, object] = {}
        failed: dict[str, str] = {}
        fatal: str | None = None
        for read in plan(points, max_registers=self.config.max_registers_per_request):
            if fatal is None:
                self.requests += 1
                try:
                    data = await link.read(
                        self, unit, read.area, read.address, read.count, timeout, delay
                    )
                except ModbusExceptionResponse as exc:
                    failed.update((p.name, f"device error: {exc}") for p in read.points)
                    continue
                except ReplyTimeout as exc:
                    fatal = f"timeout: {exc}"
                except LinkError as exc:
                    fatal = f"device error: {exc}"
                else:
                    read.decode(data, values)
                    continue
            failed.update((p.name, fatal) for p in read.points)
        return values, failed  # type: ignore[return-value]

    async def _write_one(self, p: Point, value: FieldValue) -> None:
        link, unit, timeout, delay = self.link, self.unit, self.timeout, self.frame_delay
        self.requests += 1
        if p.area == "coil":
            if not isinstance(value, bool):
                raise EncodeError(f"refused: point {p.name!r} takes true or false, not {value!r}")
            await link.write(self, unit, "coil", p.address, [value], timeout, delay)
        elif p.type == "bool" and p.bit is not None:
            if not isinstance(value, bool):
                raise EncodeError(f"refused: point {p.name!r} takes true or false, not {value!r}")
            # the register as transmitted: a byte-swapped register's bit b is bit (b + 8) % 16
            bit = (p.bit + 8) % 16 if p.byte_order == "little" else p.bit
            mask = 1 << bit
            await link.mask_write(
                self, unit, p.address, 0xFFFF ^ mask, mask if value else 0, timeout, delay
            )
        else:
            registers = encode_registers(p, value)
            await link.write(self, unit, "holding", p.address, registers, timeout, delay)

    def plan_text(self) -> list[str]:
        """The current plan, one ``holding 0-9 (10): a, b`` line per read."""
        return [f"{r.describe()}: {', '.join(p.name for p in r.points)}" for r in self.reads]

    async def poll(self) -> Record:
        """Issue every read of the plan once and return the poll's record.

        Raises:
            NotConnected: no connection could be made before any point was read.
        """
        t = self._time_ns()
        if t <= self._last_ns:
            t = self._last_ns + 1
        self._last_ns = t
        fields: dict[str, object] = {}
        failed: list[tuple[Read, int]] = []
        fatal: LinkError | None = None
        answered = False
        link, unit, timeout, delay = self.link, self.unit, self.timeout, self.frame_delay
        reads = self.reads
        i = 0
        while i < len(reads):
            read = reads[i]
            i += 1
            if fatal is not None:
                failed.append((read, fatal.status))
                continue
            self.requests += 1
            try:
                data = await link.read(
                    self, unit, read.area, read.address, read.count, timeout, delay
                )
            except ModbusExceptionResponse as exc:
                answered = True
                if exc.exception_code == ILLEGAL_DATA_ADDRESS and read.unused:
                    parts = split_gaps(read, self.config.max_registers_per_request)
                    log.warning(
                        "device %s: %s refused a read spanning unused registers (%s); "
                        "reading %s instead",
                        self.name,
                        self.link.label,
                        read.describe(),
                        ", ".join(r.describe() for r in parts),
                    )
                    self.splits += 1
                    reads = self.reads = [*reads[: i - 1], *parts, *reads[i:]]
                    i -= 1  # read the parts now
                    continue
                failed.append((read, exc.status))
                continue
            except NotConnected as exc:
                if not answered:
                    raise
                fatal = exc
                failed.append((read, exc.status))
                continue
            except LinkError as exc:
                log.warning("device %s: %s", self.name, exc)
                fatal = exc
                failed.append((read, exc.status))
                continue
            answered = True
            read.decode(data, fields)
        record = Record(self.series, fields, t, new_id())  # type: ignore[arg-type]
        if failed:
            self.failed_reads += len(failed)
            for read, code in failed:
                for p in read.points:
                    record.mark(p.name, Quality.BAD, code)
        self._silent = 0 if answered else self._silent + 1
        return record

    async def run(self, emit: Emit) -> None:
        """Poll and emit one record per poll until cancelled.

        The schedule is fixed-rate on the monotonic clock, as the ``sim`` device's: poll k
        is due at ``start + k × interval``; a poll that ends after the next was due counts
        an overrun and the polls whose time has passed are skipped (``missed``). An
        interval of 0 polls as fast as the device answers.

        Raises:
            NotConnected: no connection (the supervisor backs off and calls ``run`` again).
            DeviceSilent: no reply in ``SILENT_POLLS`` polls in a row.
        """
        async with self.link.use():
            ticks = self._ticks
            ticks.restart()
            while True:
                record = await self.poll()
                await emit([record])
                self.polls += 1
                if self._silent >= SILENT_POLLS:
                    self._silent = 0
                    raise DeviceSilent(
                        f"{self.link.label} unit {self.unit} answered none of the last "
                        f"{SILENT_POLLS} polls"
                    )
                await self._sleep(ticks.next_pause() or 0)  # overdue: yield, then at once


def build(config: Config, ctx: BuildContext) -> ModbusConnector:
    """Build a ``modbus`` device from its config (no I/O; pymodbus is loaded on connect)."""
    return ModbusConnector(config, ctx)
