"""Shared building blocks of every config model (node, devices, sinks, API).

Each component's config is a pydantic model derived from ``StrictModel`` (unknown keys are
errors) and lives next to the component it builds. Durations are parsed into seconds
(float) and sizes into bytes (int).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, field_validator

from plantbus.broker.units import format_duration, parse_duration, parse_size

__all__ = [
    "BufferConfig",
    "Duration",
    "QueueConfig",
    "Size",
    "StrictModel",
    "TlsConfig",
]


class StrictModel(BaseModel):
    """Base of all config models: unknown keys are errors, values are not coerced loosely."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, populate_by_name=True)


def _duration(v: object) -> float:
    if isinstance(v, bool):
        raise ValueError('a duration must be a string such as "100ms"')
    if isinstance(v, float | int):
        # numbers are seconds, as a convenience for programmatic configs (TOML users write "5s")
        if v < 0:
            raise ValueError("a duration cannot be negative")
        return float(v)
    return parse_duration(v)  # type: ignore[arg-type]


def _size(v: object) -> int:
    return parse_size(v)  # type: ignore[arg-type]


Duration = Annotated[float, BeforeValidator(_duration), PlainSerializer(format_duration)]
"""Seconds, written in config as a string: "100ms", "5s"."""

Size = Annotated[int, BeforeValidator(_size)]
"""Bytes, written in config as a string: "512MiB"."""


class QueueConfig(StrictModel):
    """``queue = { size, policy }``: a subscription's bounded queue, counted in records."""

    size: int = Field(default=100_000, ge=1)
    policy: Literal["block", "drop_oldest", "drop_newest"] = "block"


class BufferConfig(StrictModel):
    """``buffer = { kind, max_size, when_full, sync_interval, path }``: where a sink's batches wait.

    ``kind = "disk"`` keeps them in segment files (``plantbus.broker.diskbuffer``) under
    ``path``, by default ``<node.state_dir>/buffers/<sink kind>/<sink name>``; they survive
    an outage and a restart and replay in order. ``sync_interval`` is the disk buffer's
    group commit (``"0s"``: fsync every batch); a memory buffer ignores it and ``path``.
    """

    kind: Literal["memory", "disk"] = "memory"
    max_size: Size = 64 * 1024 * 1024
    when_full: Literal["block", "drop_oldest", "drop_newest"] = "drop_oldest"
    sync_interval: Duration = 1.0
    path: Path | None = None

    @field_validator("max_size")
    @classmethod
    def _at_least_one_byte(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1 byte")
        return v


class TlsConfig(StrictModel):
    """The one TLS table every client and server takes."""

    secret_paths: ClassVar[tuple[str, ...]] = ("private_key",)  # `check` warns if world-readable

    ca: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None
    verify: bool = True
