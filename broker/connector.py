"""The connector contract: a device is a long-running coroutine that emits record batches.

A connector module (``plantbus.connectors.<kind>``) exposes ``Config`` (a ``DeviceConfig``
subclass) and ``build(config, ctx) -> Connector``. Driver libraries are imported inside
``run``/``build``, never at module import, so ``plantbus check`` and unused kinds stay light.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import Field, field_validator, model_validator

from plantbus.broker.configtypes import Duration, StrictModel
from plantbus.broker.record import FieldValue, Record

__all__ = [
    "BuildContext",
    "Connector",
    "DeviceConfig",
    "DiscoverError",
    "Emit",
    "WritableConnector",
    "WritablePointConfig",
    "WritePoint",
    "WriteResult",
]

Emit = Callable[[list[Record]], Awaitable[None]]
"""Publish the records of one read (all of one topic). Awaiting it is back-pressure."""


class Connector(Protocol):
    """A device: ``run`` polls or listens until cancelled, calling ``emit`` per read.

    ``run`` raises on faults; the runtime's supervisor logs, backs off and restarts it.
    It must close its connection when cancelled.
    """

    name: str

    async def run(self, emit: Emit) -> None: ...


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What a write did: per point ``None`` when written, else the reason it was not.

    A reason starts with its class, which the command reply passes on: ``refused: …``
    (the connector will not write it), ``out of range: …`` (the value does not fit the
    point's type), ``device error: …`` (the device answered with an error) or
    ``timeout: …`` (no answer in time; the connection was torn down).

    Attributes:
        errors: per point of the write, ``None`` (written) or the reason.
        read_back: per written point with ``read_back`` on, the value the device holds
            after the write, read from it afresh (as a poll would decode it).
        read_back_errors: per written point with ``read_back`` on whose read failed, the
            reason (same classes as ``errors``). The write itself still counts as done.
    """

    errors: Mapping[str, str | None] = field(default_factory=dict)
    read_back: Mapping[str, FieldValue] = field(default_factory=dict)
    read_back_errors: Mapping[str, str] = field(default_factory=dict)


ValueKind = Literal["bool", "int", "float", "str"]
"""What a point accepts: a boolean, an integer, any number, or a string."""


@dataclass(frozen=True, slots=True)
class WritePoint:
    """What a command may do to one point of a writable device.

    Attributes:
        name: the point (field) name.
        writable: ``writable = true`` in its config.
        kind: the values it accepts (``None``: the device decides, e.g. an OPC UA variable
            whose type is only known from the server).
        limits: ``write_limits = [low, high]``: the inclusive range of numeric values.
        read_back: after a successful write the connector reads the point back and
            the reply carries the value the device holds (``read_back``).
    """

    name: str
    writable: bool
    kind: ValueKind | None = None
    limits: tuple[float, float] | None = None
    read_back: bool = False


@runtime_checkable
class WritableConnector(Protocol):
    """A connector that also accepts commands (write-back) to the device.

    ``write_points`` lists every point of the device (writable or not) so a command to a
    point can be told apart from a command to something the device does not have.
    ``write`` must interleave safely with ``run`` on the same connection and follow the
    connector's timeout rule (a timeout tears the connection down). For the written points
    whose ``WritePoint.read_back`` is on, it reads them back once all points of the write
    are done and reports the values (or why the read failed) in the ``WriteResult``.
    """

    name: str
    write_points: Mapping[str, WritePoint]

    async def run(self, emit: Emit) -> None: ...

    async def write(self, points: Mapping[str, FieldValue]) -> WriteResult: ...


class WritablePointConfig(StrictModel):
    """The write-back keys of a point; the point models of writable device kinds extend it.

    Attributes:
        writable: commands may write this point (default: they may not).
        write_limits: ``[low, high]``: a command value outside is refused (numeric points).
        read_back: read the point back after a successful write and put the value in the
            reply (default: the device's ``read_back``).
    """

    writable: bool = False
    write_limits: tuple[float, float] | None = None
    read_back: bool | None = None

    @field_validator("write_limits")
    @classmethod
    def _ordered_limits(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is None:
            return v
        low, high = v
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"write_limits must be finite numbers, not [{low}, {high}]")
        if low > high:
            raise ValueError(f"write_limits [{low:g}, {high:g}]: low is above high")
        return v

    @model_validator(mode="after")
    def _limits_need_writable(self) -> WritablePointConfig:
        if self.write_limits is not None and not self.writable:
            raise ValueError("write_limits is set but writable is not true")
        if self.read_back and not self.writable:
            raise ValueError("read_back is set but writable is not true")
        return self

    def write_point(
        self, name: str, kind: ValueKind | None, *, device_read_back: bool = False
    ) -> WritePoint:
        """The ``WritePoint`` of this point, whose values are of ``kind``.

        Args:
            name: the point name.
            kind: the values it takes.
            device_read_back: the device's ``read_back``, for a point that does not set it.

        Raises:
            ValueError: ``write_limits`` on a point that takes no numbers.
        """
        if self.write_limits is not None and kind in ("bool", "str"):
            raise ValueError(f"write_limits applies only to numbers, not to a {kind} point")
        read_back = device_read_back if self.read_back is None else self.read_back
        return WritePoint(name, self.writable, kind, self.write_limits, self.writable and read_back)


class DiscoverError(Exception):
    """``plantbus discover`` could not reach or read the device: a one-line reason (exit 1)."""


class DeviceConfig(StrictModel):
    """Keys common to every device kind."""

    name: str = Field(min_length=1)
    topic: str | None = None  # default: "<node name>/<device name>"
    measurement: str | None = None  # default: the device name
    tags: dict[str, str] = Field(default_factory=dict)
    interval: Duration = 1.0
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What a component needs from the node when it is built."""

    node_name: str
    node_tags: Mapping[str, str]
    state_dir: Path
    extra: Mapping[str, Any] = field(default_factory=dict)

    def series_tags(self, device: DeviceConfig) -> dict[str, str]:
        """Node tags + device tags + ``device=<name>`` (the line-protocol mapping)."""
        tags = dict(self.node_tags)
        tags.update(device.tags)
        tags["device"] = device.name
        return tags

    def topic(self, device: DeviceConfig) -> str:
        return device.topic or f"{self.node_name}/{device.name}"

    def measurement(self, device: DeviceConfig) -> str:
        return device.measurement or device.name
