"""The connector contract: a device is a long-running coroutine that emits record batches.

A connector module (``plantbus.connectors.<kind>``) exposes ``Config`` (a ``DeviceConfig``
subclass) and ``build(config, ctx) -> Connector``. Driver libraries are imported inside
``run``/``build``, never at module import, so ``plantbus check`` and unused kinds stay light.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pydantic import Field

from plantbus.broker.configtypes import Duration, StrictModel
from plantbus.broker.record import FieldValue, Record

__all__ = [
    "BuildContext",
    "Connector",
    "DeviceConfig",
    "DiscoverError",
    "Emit",
    "WritableConnector",
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
    """Per point: ``None`` when written, else the reason it was refused."""

    errors: Mapping[str, str | None] = field(default_factory=dict)


@runtime_checkable
class WritableConnector(Protocol):
    """A connector that also accepts commands (write-back) to the device."""

    name: str

    async def run(self, emit: Emit) -> None: ...

    async def write(self, points: Mapping[str, FieldValue]) -> WriteResult: ...


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
