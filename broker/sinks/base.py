"""The sink contract: connect, write one encoded batch (or raise), close. Sinks never buffer.

A sink module (``plantbus.broker.sinks.<kind>``) exposes ``Config`` (a ``SinkConfig``
subclass) and ``build(config, ctx) -> Sink``. The Outlet in front of it owns batching,
encoding, buffering, retries and metrics.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol, runtime_checkable

from pydantic import Field, field_validator

from plantbus.broker.configtypes import BufferConfig, Duration, QueueConfig, Size, StrictModel

__all__ = [
    "EncodedBatch",
    "MisconfiguredSinkError",
    "PartialWriteError",
    "PermanentSinkError",
    "RetryableSinkError",
    "Sink",
    "SinkConfig",
    "SinkMetrics",
]


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """One encoded batch, shared by every sink of an outlet group.

    Attributes:
        payload: the encoded bytes (e.g. newline-separated line protocol).
        records: records in the batch (for counting; records dropped by the codec excluded).
        codec: the codec name that produced ``payload``.
        seq: the outlet's sequence number, increasing, for ordering and logs.
        first_id / last_id: the record IDs at the ends of the batch.
    """

    payload: bytes
    records: int
    codec: str
    seq: int = 0
    first_id: str = ""
    last_id: str = ""


class RetryableSinkError(Exception):
    """The upstream could not take the batch now (connection, timeout, 5xx, 429): retry it.

    Args:
        retry_after: seconds the upstream asked us to wait (e.g. a Retry-After header).
    """

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from an HTTP ``Retry-After`` header (delta-seconds or an HTTP date).

    None when there is none or it cannot be read; a date in the past is 0.
    """
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class MisconfiguredSinkError(RetryableSinkError):
    """The upstream refuses us for a reason only an operator can fix: retry, but say so.

    Credentials, privileges, a database the sink may not create. The batches wait in the
    buffer and are retried like after any ``RetryableSinkError``; the outlet also marks the
    sink ``unhealthy`` (its ``health`` in status and metrics) and logs the error once at
    ERROR level rather than a warning, until a write or connect succeeds again.
    """


class PermanentSinkError(Exception):
    """The upstream refused the batch itself (e.g. HTTP 400): retrying cannot help.

    The outlet counts and logs the batch as rejected and moves on.
    """


class PartialWriteError(PermanentSinkError):
    """The upstream took part of the batch and refused the rest for good.

    The outlet counts the refused records as rejected and the others as delivered.

    Args:
        rejected_records: records of the batch the upstream refused (the sink has put them
            aside, e.g. in a dead-letter file, and says where in the message).
    """

    def __init__(self, message: str, *, rejected_records: int):
        super().__init__(message)
        self.rejected_records = rejected_records


class Sink(Protocol):
    name: str
    codec: str  # which codec's payload this sink writes, e.g. "line_protocol"

    async def connect(self) -> None: ...

    async def write(self, batch: EncodedBatch) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class SinkMetrics(Protocol):
    """A sink that keeps counters of its own; the outlet adds them to the sink's metrics."""

    def metrics(self) -> dict[str, int | float]: ...


class SinkConfig(StrictModel):
    """Keys common to every sink: what it subscribes to and how its outlet batches.

    ``max_in_flight`` is how many batches the outlet may be writing to the sink at once
    (each retried on its own). With more than one, batches may reach the upstream out of
    order, so a sink kind allows it only where that is harmless and its ``write`` may run
    concurrently: it raises ``MAX_IN_FLIGHT_LIMIT`` (and usually the default) in its
    ``Config``. For the others 1 is the only value.
    """

    MAX_IN_FLIGHT_LIMIT: ClassVar[int] = 1
    """The largest ``max_in_flight`` this sink kind takes (1: order matters to it)."""

    name: str = ""  # default: "<kind>" or "<kind>-<index>"
    subscribe: list[str] = Field(default_factory=lambda: ["#"], min_length=1)
    codec: Literal["line_protocol", "json"] = "line_protocol"
    batch_size: int = Field(default=5000, ge=1)  # records
    batch_bytes: Size = 4 * 1024 * 1024  # flush before a batch's payload would pass this
    flush_interval: Duration = 1.0  # linger: the longest a record waits for its batch
    queue: QueueConfig = QueueConfig()
    buffer: BufferConfig = BufferConfig()
    retry_initial: Duration = 0.1
    retry_max: Duration = 30.0
    timeout: Duration = 10.0
    max_in_flight: int = Field(default=1, ge=1)  # batches written at once
    enabled: bool = True

    @field_validator("max_in_flight")
    @classmethod
    def _check_max_in_flight(cls, v: int) -> int:
        limit = cls.MAX_IN_FLIGHT_LIMIT
        if v > limit:
            if limit == 1:
                raise ValueError(
                    "this sink kind writes one batch at a time, in order: max_in_flight must be 1"
                )
            raise ValueError(f"this sink kind takes at most {limit} batches in flight")
        return v
