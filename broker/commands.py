"""Write-back: commands on ``$cmd/<device topic>`` written to devices, replies on ``$reply/…``.

A command is a record published on ``$cmd/<device topic>`` (through the API, by a punt-out
function, or by an ``mqtt`` device configured as a command source) whose fields name points
of that device and the values to write. The router takes every such record off the bus and:

1. finds the device whose topic follows ``$cmd/``;
2. checks each point: the device has it, it is ``writable = true``, the value is of the
   point's kind (boolean, integer, number, string) and within its ``write_limits``;
3. writes the points that passed through the device's connector (``write``), under
   ``COMMAND_TIMEOUT`` on top of the connector's own timeout;
4. publishes one reply record on ``$reply/<device topic>`` whose ``parent`` is the
   command's ``uid`` and whose fields hold, per point of the command, ``"ok"`` or the
   reason: ``refused: …``, ``out of range: …``, ``device error: …`` or ``timeout: …``;
   for a point written with ``read_back`` on, also ``<point>.read_back`` (the value the
   device holds after the write) or ``<point>.read_back_error`` (why reading it failed;
   the point stays ``"ok"``: it was written);
5. logs one line per command with its uid, the values and the outcome.

Commands to one device are written in the order they arrived, one at a time; commands to
different devices run side by side. A command that fails a check changes nothing on the
device for that point; the other points of the command are still written.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from plantbus.broker.bus import Bus, QueuePolicy, Subscription
from plantbus.broker.connector import WritableConnector, WritePoint, WriteResult
from plantbus.broker.ids import new_id
from plantbus.broker.record import FieldValue, Record, Series
from plantbus.broker.supervisor import describe_error

__all__ = [
    "CMD_PREFIX",
    "COMMAND_QUEUE",
    "COMMAND_TIMEOUT",
    "READ_BACK_ERROR_SUFFIX",
    "READ_BACK_SUFFIX",
    "REPLY_PREFIX",
    "CommandRouter",
    "DeviceLookup",
    "check_value",
]

log = logging.getLogger("plantbus.commands")

CMD_PREFIX = "$cmd/"
REPLY_PREFIX = "$reply/"
OK = "ok"
READ_BACK_SUFFIX = ".read_back"
"""Reply field ``<point>.read_back``: the value read back after the point was written."""
READ_BACK_ERROR_SUFFIX = ".read_back_error"
"""Reply field ``<point>.read_back_error``: why the read-back of a written point failed."""

COMMAND_TIMEOUT = 10.0
"""Seconds a device's ``write`` may take before its points are answered ``timeout``.

Not a config key: each connector's own ``timeout`` ends a write it cannot finish much
sooner (and tears the connection down); this only bounds a connector that never returns.
"""

COMMAND_QUEUE = 10_000
"""Commands waiting for the router at most; beyond, new ones are dropped and counted."""


class DeviceLookup(Protocol):
    """Finds the device that owns a topic (the runtime's devices change on reload)."""

    def __call__(self, topic: str) -> object | None: ...


def check_value(point: WritePoint | None, name: str, value: FieldValue) -> str | None:
    """Why ``value`` may not be written to ``point``, or ``None`` when it may.

    Args:
        point: the device's point of that name, ``None`` when it has none.
        name: the point name of the command.
        value: the value of the command.
    """
    if point is None:
        return f"refused: the device has no point {name!r}"
    if not point.writable:
        return f"refused: point {name!r} is not writable"
    kind = point.kind
    is_bool = isinstance(value, bool)
    is_number = isinstance(value, int | float) and not is_bool
    if kind == "bool" and not is_bool:
        return f"refused: point {name!r} takes true or false, not {value!r}"
    if kind == "str" and not isinstance(value, str):
        return f"refused: point {name!r} takes a string, not {value!r}"
    if kind in ("int", "float") and not is_number:
        return f"refused: point {name!r} takes a number, not {value!r}"
    if kind == "int" and isinstance(value, float) and not value.is_integer():
        return f"refused: point {name!r} takes an integer, not {value!r}"
    if is_number and not math.isfinite(value):
        return f"refused: {value!r} is not a finite number"
    if point.limits is not None:
        low, high = point.limits
        if not is_number:
            return f"refused: point {name!r} has write_limits and takes a number, not {value!r}"
        if not low <= value <= high:
            return f"out of range: {value!r} is outside write_limits [{low:g}, {high:g}]"
    return None


class CommandRouter:
    """Takes commands off the bus, writes them to their devices and publishes the replies.

    Args:
        bus: the bus to subscribe ``$cmd/#`` on and publish replies to.
        lookup: device topic -> its connector (``None``: no such device).
        timeout: seconds a write may take (``COMMAND_TIMEOUT``).
        time_ns: wall-clock Unix ns for reply timestamps.

    Attributes:
        commands: commands handled (a reply was published).
        points_ok / points_failed: points written / not written, over all commands.
        subscription: the ``$cmd/#`` subscription (its ``dropped`` counts lost commands).
    """

    def __init__(
        self,
        bus: Bus,
        lookup: DeviceLookup,
        *,
        timeout: float = COMMAND_TIMEOUT,
        time_ns: Callable[[], int] = time.time_ns,
    ):
        self.bus = bus
        self.lookup = lookup
        self.timeout = timeout
        self._time_ns = time_ns
        self._locks: dict[str, asyncio.Lock] = {}
        self._reply_series: dict[str, Series] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.subscription: Subscription = bus.subscribe(
            ["$cmd/#"], size=COMMAND_QUEUE, policy=QueuePolicy.DROP_NEWEST, name="commands"
        )
        self.commands = 0
        self.points_ok = 0
        self.points_failed = 0

    async def run(self) -> None:
        """Handle commands until cancelled (then the commands in flight are cancelled too)."""
        sub = self.subscription
        try:
            while True:
                batch = await sub.get()
                if not batch and sub.closed:
                    return
                for record in batch:
                    task = asyncio.create_task(self.handle(record), name="command")
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            sub.close()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks))

    async def handle(self, command: Record) -> Record:
        """Check and write one command, publish its reply and return it."""
        topic = command.series.topic[len(CMD_PREFIX) :]
        started = time.monotonic()
        lock = self._locks.get(topic)
        if lock is None:
            lock = self._locks[topic] = asyncio.Lock()
        device = self.lookup(topic)
        async with lock:
            outcome, read_back = await self._execute(topic, device, command.fields)
        fields: dict[str, FieldValue] = dict(outcome)
        if read_back:
            fields.update(read_back)
        reply = Record(
            self._series(topic, device, command.series),
            fields,
            self._time_ns(),
            new_id(),
            parent=command.id,
        )
        await self.bus.publish([reply])
        self.commands += 1
        ok = sum(1 for v in outcome.values() if v == OK)
        self.points_ok += ok
        self.points_failed += len(outcome) - ok
        log.info(
            "command %s to %s: %s (%.1f ms)",
            command.id,
            topic,
            "; ".join(
                f"{k}={command.fields.get(k)!r} {v}{_read_back_note(k, read_back)}"
                for k, v in outcome.items()
            )
            or "no points",
            (time.monotonic() - started) * 1000,
        )
        return reply

    async def _execute(
        self, topic: str, device: object | None, values: Mapping[str, FieldValue]
    ) -> tuple[dict[str, str], dict[str, FieldValue]]:
        """Per point of the command ``"ok"`` or the reason it was not written, and the
        read-back fields of the written points (``<point>.read_back`` / ``…_error``)."""
        read_back: dict[str, FieldValue] = {}
        if device is None:
            return {k: f"refused: no device has topic {topic!r}" for k in values}, read_back
        if not isinstance(device, WritableConnector):
            name = getattr(device, "name", topic)
            why = f"refused: device {name!r} does not take commands"
            return dict.fromkeys(values, why), read_back
        outcome: dict[str, str] = {}
        points = device.write_points
        accepted: dict[str, FieldValue] = {}
        for name, value in values.items():
            reason = check_value(points.get(name), name, value)
            if reason is None:
                accepted[name] = value
                outcome[name] = OK
            else:
                outcome[name] = reason
        if not accepted:
            return outcome, read_back
        try:
            async with asyncio.timeout(self.timeout):
                result: WriteResult = await device.write(accepted)
        except TimeoutError:
            for name in accepted:
                outcome[name] = f"timeout: no answer within {self.timeout:g}s"
            return outcome, read_back
        except Exception as exc:
            log.debug("write to %s failed", device.name, exc_info=exc)
            for name in accepted:
                outcome[name] = f"device error: {describe_error(exc)}"
            return outcome, read_back
        for name in accepted:
            reason = result.errors.get(name)
            if reason is not None:
                outcome[name] = reason
                continue
            if name in result.read_back:
                read_back[name + READ_BACK_SUFFIX] = result.read_back[name]
            elif name in result.read_back_errors:
                read_back[name + READ_BACK_ERROR_SUFFIX] = result.read_back_errors[name]
        return outcome, read_back

    def _series(self, topic: str, device: object | None, command: Series) -> Series:
        """The reply's series: the device's measurement and tags on ``$reply/<topic>``."""
        own = getattr(device, "series", None)
        base = own if isinstance(own, Series) else command
        series = self._reply_series.get(topic)
        if series is None or series.measurement != base.measurement or series.tags != base.tags:
            series = Series(REPLY_PREFIX + topic, base.measurement, base.tag_dict)
            self._reply_series[topic] = series
        return series


def _read_back_note(name: str, read_back: Mapping[str, FieldValue]) -> str:
    """`` (read back 42.5)`` / `` (read back failed: …)`` for the log line, else ``""``."""
    if not read_back:
        return ""
    value = read_back.get(name + READ_BACK_SUFFIX)
    if value is not None:
        return f" (read back {value!r})"
    why = read_back.get(name + READ_BACK_ERROR_SUFFIX)
    return f" (read back failed: {why})" if why is not None else ""
