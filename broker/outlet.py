"""The Outlet: from a bus subscription to one or more sinks, with batching, retry and metrics.

One outlet serves a group of sinks that share subscription filters, codec and batch settings
(see ``group_sinks``), so their records are read and encoded once and every sink of the group
gets the same ``EncodedBatch`` (InfluxDB + Kapacitor). Per sink it keeps a buffer and a sender
task::

    Subscription --batch by count / bytes / linger--> encode once --+--> buffer -> sender -> sink
                                                                    +--> buffer -> sender -> sink

A sender writes up to ``max_in_flight`` batches at once (a sink config key; 1, the default,
writes one batch and acknowledges it before it takes the next, so the sink gets its batches
in order). Each batch in flight is retried on its own, and the buffer releases batches in
order whatever order their acknowledgements come in. Retryable failures
(``RetryableSinkError``, connection errors, timeouts) are retried with jittered, capped
exponential backoff, honouring ``retry_after``; a ``PermanentSinkError`` counts the batch as
rejected and moves on. Sinks are connected by the outlet, retried with the same backoff, so
a sink that is down at start-up just waits.

A batch is encoded in chunks of ``ENCODE_CHUNK`` records with a yield to the event loop
between them (codecs whose payload is one line per record), so a large batch never holds
the loop for long; the chunks are joined into the batch's one payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

from plantbus.broker.backoff import Backoff
from plantbus.broker.buffer import Buffer, MemoryBuffer
from plantbus.broker.bus import Bus, Subscription
from plantbus.broker.cancel import raise_if_cancelling
from plantbus.broker.ids import id_time_ms
from plantbus.broker.record import Record
from plantbus.broker.sinks.base import (
    EncodedBatch,
    MisconfiguredSinkError,
    PartialWriteError,
    PermanentSinkError,
    RetryableSinkError,
    Sink,
    SinkConfig,
    SinkMetrics,
)

__all__ = ["Outlet", "SinkChannel", "buffer_dir", "group_key", "group_sinks", "make_buffer"]

log = logging.getLogger(__name__)

_FIRST_LINE_ESTIMATE = 256.0
"""Bytes per record assumed until a batch has been measured (then the measured average)."""

_LATENCY_SAMPLES = 1024
_MIN_RETRY = 0.001  # seconds: the shortest first retry delay
_CLOSE_TIMEOUT = 5.0  # seconds a sink may take to close at stop
_INVALID_LOG_INTERVAL = 60.0  # seconds between warnings about records the codec refused

ENCODE_CHUNK = 250
"""Records encoded between two yields to the event loop.

Encoding a 5000-record batch in one go held the loop 11-14 ms on a 2-core edge PC (longer
than a 10 ms poll interval). 250 records take about 0.5 ms; the yields cost nothing
measurable (2.1 us/record at 5000, 1000, 500 or 250 per chunk). Bench ``e2e_influx``'s
latency run (100k records/s offered, quiet machine): loop stalls over 2 ms of our own work
~620 / ~240 / ~17 per 10 s and read-to-subscriber p99 3.1-3.7 / 3.2-3.6 / 2.1-2.4 ms with
1000 / 500 / 250 records per chunk. The chunks' payloads are joined into the batch's one
payload, so the sinks still get one write per batch and the bytes are those of a single
``encode`` call.
"""

_CONCATENATING_CODECS = frozenset({"line_protocol"})
"""Codecs whose batch payload is the concatenation of its records' payloads (one line each),
so a batch can be encoded in chunks. A JSON batch is one array: it is encoded in one go."""


BufferFactory = Callable[[SinkConfig, str], Buffer]


def buffer_dir(state_dir: Path, kind: str, name: str) -> Path:
    """The default folder of a sink's disk buffer: ``<state_dir>/buffers/<kind>/<name>``.

    Sink names are unique per kind and hold no ``/`` (``check`` says so), so the folder is
    stable across restarts as long as the sink keeps its name.
    """
    return Path(state_dir) / "buffers" / kind / name


def make_buffer(config: SinkConfig, name: str, *, directory: Path | None = None) -> Buffer:
    """The buffer a sink's ``buffer = {...}`` table asks for.

    Args:
        config: the sink's config.
        name: for logs and metrics.
        directory: a disk buffer's folder when ``buffer.path`` is not set (the runtime
            passes ``buffer_dir(state_dir, kind, name)``).

    Raises:
        ValueError: a disk buffer without a folder.
        OSError: the disk buffer's folder cannot be created or read.
    """
    b = config.buffer
    if b.kind == "memory":
        return MemoryBuffer(b.max_size, b.when_full, name=name)
    if b.kind == "disk":
        path = b.path or directory
        if path is None:
            raise ValueError(f"sink {name!r}: a disk buffer needs a folder (buffer.path)")
        # imported here: a node with memory buffers only never loads it
        from plantbus.broker.diskbuffer import DiskBuffer

        return DiskBuffer(path, b.max_size, b.when_full, sync_interval=b.sync_interval, name=name)
    raise ValueError(f"sink {name!r}: buffer kind {b.kind!r} is not available in this build")


def group_key(config: SinkConfig) -> Hashable:
    """What sinks must share to be served by one outlet (one subscription, one encoding)."""
    return (
        tuple(sorted(set(config.subscribe))),
        config.codec,
        config.batch_size,
        config.batch_bytes,
        config.flush_interval,
        config.queue,
        getattr(config, "uid_field", "uid"),
    )


def group_sinks(
    entries: Sequence[tuple[SinkConfig, Sink]],
) -> list[list[tuple[SinkConfig, Sink]]]:
    """Group sinks that can share one outlet; groups and their members keep config order.

    Sinks share an outlet when they have the same subscribe filters (as a set), codec,
    ``batch_size``, ``batch_bytes``, ``flush_interval``, ``queue`` and ``uid_field``.
    Buffers, retries and timeouts stay per sink.
    """
    groups: dict[Hashable, list[tuple[SinkConfig, Sink]]] = {}
    for config, sink in entries:
        groups.setdefault(group_key(config), []).append((config, sink))
    return list(groups.values())


class _Codec:
    """A codec module bound to its options.

    ``encode(records)`` returns the payload, the number of records written into it and the
    codec's ``EncodeStats`` (records it left out are counted there, never raised).
    ``encode_part`` and ``result`` do the same in pieces, for codecs whose batch payload is the
    concatenation of its records' payloads (``concatenates``).
    """

    def __init__(self, name: str, uid_field: str):
        self.name = name
        self._module = importlib.import_module(f"plantbus.codecs.{name}")
        stats_type = getattr(self._module, "EncodeStats", None)
        if stats_type is None:
            stats_type = importlib.import_module("plantbus.codecs.line_protocol").EncodeStats
        self._stats_type = stats_type
        self._uid_field = uid_field
        self.concatenates = name in _CONCATENATING_CODECS

    def new_stats(self) -> Any:
        return self._stats_type()

    def encode_part(self, records: Sequence[Record], stats: Any) -> bytes:
        """Encode ``records``, adding to ``stats``."""
        if self.name == "line_protocol":
            return self._module.encode(records, stats, uid_field=self._uid_field)  # type: ignore[no-any-return]
        return self._module.encode(records, stats)  # type: ignore[no-any-return]

    def result(self, payload: bytes, records: int, stats: Any) -> tuple[bytes, int, Any]:
        """(payload, records written into it, stats) of a batch of ``records`` records."""
        if not payload:
            return b"", 0, stats
        written = int(getattr(stats, "lines", 0))
        if not written:
            # a codec without a line count (one JSON array per batch): what it did not drop
            left_out = int(getattr(stats, "invalid", 0)) + int(getattr(stats, "empty", 0))
            written = records - left_out
        return payload, written, stats

    def encode(self, records: Sequence[Record]) -> tuple[bytes, int, Any]:
        stats = self.new_stats()
        return self.result(self.encode_part(records, stats), len(records), stats)


class SinkChannel:
    """One sink behind an outlet: its buffer, backoff, state and counters.

    Attributes:
        records_out / batches_out / bytes_out: acknowledged by the sink.
        retries: failed attempts (writes and connects) that were retried.
        rejected / rejected_records: batches the sink refused for good in whole or in part
            (``PartialWriteError``), and the records it refused.
        undelivered_records: held in the buffer when the outlet stopped.
        persisted_records: of those, kept in a disk buffer (they replay at the next start).
        last_error: the most recent failure, for status pages ("" when none yet).
        connected: the sink's ``connect()`` succeeded.
        failing: the latest attempt failed (cleared by the next success).
        unhealthy: the latest attempt failed for a reason only an operator can fix
            (``MisconfiguredSinkError``: credentials, privileges, ...; cleared by the next
            success).
    """

    def __init__(self, config: SinkConfig, sink: Sink, buffer: Buffer, name: str):
        self.config = config
        self.sink = sink
        self.buffer = buffer
        self.name = name
        # "0s" in config means "retry at once"; a floor keeps a dead upstream from a busy loop
        initial = max(config.retry_initial, _MIN_RETRY)
        self.backoff = Backoff(initial, max(config.retry_max, initial))
        # one retry schedule per batch in flight (the first one also paces connecting)
        self.backoffs = [self.backoff] + [
            Backoff(initial, max(config.retry_max, initial))
            for _ in range(getattr(config, "max_in_flight", 1) - 1)
        ]
        self.connected = False
        self.failing = False
        self.unhealthy = False
        self.records_out = 0
        self.batches_out = 0
        self.bytes_out = 0
        self.retries = 0
        self.rejected = 0
        self.rejected_records = 0
        self.undelivered_records = 0
        self.persisted_records = 0  # of the undelivered: kept in a disk buffer for next start
        self.incoming = 0  # records of a batch not yet appended to this buffer
        self.last_error = ""
        self.last_error_time = 0.0
        # seconds from record ID stamping (read time) to acknowledgement, of each batch's oldest
        self.latencies: deque[float] = deque(maxlen=_LATENCY_SAMPLES)

    @property
    def health(self) -> str:
        """``ok``, ``retrying`` (a failure that may pass) or ``unhealthy`` (needs an operator)."""
        if self.unhealthy:
            return "unhealthy"
        return "retrying" if self.failing else "ok"

    def metrics(self) -> dict[str, float | int]:
        m: dict[str, float | int] = {
            "records_out": self.records_out,
            "batches_out": self.batches_out,
            "bytes_out": self.bytes_out,
            "retries": self.retries,
            "rejected": self.rejected,
            "rejected_records": self.rejected_records,
            "dropped": self.buffer.dropped_records,
            "dropped_batches": self.buffer.dropped_batches,
            "buffer_records": self.buffer.records,
            "buffer_bytes": self.buffer.bytes,
            "buffer_batches": self.buffer.undelivered_batches,
            "undelivered": self.undelivered_records,
            "persisted": self.persisted_records,
            "connected": int(self.connected),
            "failing": int(self.failing),
            "unhealthy": int(self.unhealthy),
        }
        synced = getattr(self.buffer, "synced_records", None)
        if synced is not None:  # a disk buffer: what is on disk and what is durable
            buffer = self.buffer
            m["buffer_disk_bytes"] = getattr(buffer, "disk_bytes", 0)
            m["buffer_synced_records"] = synced
            m["buffer_synced_position"] = getattr(buffer, "synced_position", 0)
            m["buffer_corrupt_records"] = getattr(buffer, "corrupt_records", 0)
            m["buffer_missing_segments"] = getattr(buffer, "missing_segments", 0)
        if isinstance(self.sink, SinkMetrics):
            m.update(self.sink.metrics())
        m.update(_latency_summary(self.latencies))
        return m


def _persistent(buffer: Buffer) -> bool:
    """Whether ``buffer`` keeps what it holds across a restart (a disk buffer)."""
    return hasattr(buffer, "synced_position")


def _latency_summary(samples: Sequence[float] | deque[float]) -> dict[str, float]:
    if not samples:
        return {}
    s = sorted(samples)
    n = len(s)
    return {
        "latency_p50": s[n // 2],
        "latency_p99": s[min(n - 1, (n * 99) // 100)],
        "latency_max": s[-1],
    }


class Outlet:
    """Reads a subscription, batches and encodes once, and delivers to each sink of a group.

    Args:
        name: for logs, metrics and the subscription.
        bus: the bus to subscribe on (the subscription starts at construction, so nothing
            published between building and running the outlet is missed).
        sinks: the group (see ``group_sinks``); batch settings come from the first config.
        codec: codec name; default: the configs' ``codec``.
        buffer_factory: builds each sink's buffer (default ``make_buffer``).
        subscription: one taken on ``bus`` before the outlet could be built (a reload takes
            a successor's while its predecessor still holds the disk buffer); it must carry
            the group's filters. Default: subscribe at construction.

    Attributes:
        records_in: records taken from the subscription.
        records_encoded: lines/records the codec wrote; ``encode_*``: what it left out.
        batches / bytes_encoded: encoded batches handed to the buffers.
        channels: one ``SinkChannel`` per sink, with that sink's counters.
    """

    def __init__(
        self,
        name: str,
        bus: Bus,
        sinks: Sequence[tuple[SinkConfig, Sink]],
        *,
        codec: str | None = None,
        buffer_factory: BufferFactory | None = None,
        subscription: Subscription | None = None,
    ):
        if not sinks:
            raise ValueError(f"outlet {name!r} has no sinks")
        config = sinks[0][0]
        key = group_key(config)
        for other, _ in sinks[1:]:
            if group_key(other) != key:
                raise ValueError(
                    f"outlet {name!r}: sinks differ in subscription, codec or batch settings; "
                    "group them with group_sinks()"
                )
        self.name = name
        self.config = config
        self.codec_name = codec or config.codec
        self._codec = _Codec(self.codec_name, getattr(config, "uid_field", "uid"))
        factory = buffer_factory or make_buffer
        self.channels: list[SinkChannel] = []
        for i, (cfg, sink) in enumerate(sinks):
            sink_name = getattr(sink, "name", "") or cfg.name or f"{name}[{i}]"
            self.channels.append(SinkChannel(cfg, sink, factory(cfg, sink_name), sink_name))
        if subscription is not None and set(subscription.filters) != set(config.subscribe):
            raise ValueError(f"outlet {name!r}: the subscription given has other filters")
        self._sub = subscription or bus.subscribe(
            config.subscribe, size=config.queue.size, policy=config.queue.policy, name=name
        )
        self._pending: list[Record] = []
        self._line_estimate = _FIRST_LINE_ESTIMATE
        self._seq = 0
        self._main: asyncio.Task[None] | None = None  # supervises the batcher and senders
        self._batcher: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self.records_in = 0
        self.records_encoded = 0
        self.batches = 0
        self.bytes_encoded = 0
        self.encode_non_finite = 0
        self.encode_empty = 0
        self.encode_invalid = 0
        self.encode_seconds = 0.0
        self._invalid_logged = -_INVALID_LOG_INTERVAL
        self.undelivered_records = 0

    # -- running -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Batch, encode and deliver until ``stop()`` has drained (or given up on) the outlet.

        Raises only on bugs; a supervisor may call it again after one (in-flight batches are
        then sent again). Cancelling it cancels the outlet's tasks; buffers keep their batches.
        """
        if self._stopped.is_set():
            return
        if self._main is None or (self._main.done() and not self._stopping):
            self._start()
        main = self._main
        assert main is not None
        try:
            await asyncio.wait({main})
        except asyncio.CancelledError:
            main.cancel()
            await asyncio.wait({main})
            raise
        if not main.cancelled() and (error := main.exception()) is not None:
            raise error
        # cancelled by stop() giving up on a sink: that is a normal end of run()

    def _start(self) -> None:
        for ch in self.channels:
            ch.buffer.rewind()
        self._main = asyncio.create_task(self._supervise(), name=f"outlet:{self.name}")

    async def _supervise(self) -> None:
        self._batcher = asyncio.create_task(self._batch_loop(), name=f"{self.name}:batch")
        tasks = [self._batcher]
        tasks += [
            asyncio.create_task(self._send_loop(ch), name=f"{self.name}:{ch.name}")
            for ch in self.channels
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if not t.cancelled() and (error := t.exception()) is not None:
                    raise error
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def stop(self, timeout: float) -> None:  # noqa: ASYNC109 - a drain budget, not a cancel scope
        """Stop taking from the bus, deliver what is queued and buffered, then close the sinks.

        Works whether or not ``run()`` is running (records queued before it are delivered
        too). Whatever is not delivered within ``timeout`` seconds stays in the buffers (a
        disk buffer keeps it for the next start), counted as ``undelivered`` and logged.
        """
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self._sub.close()
        try:
            if self._main is None or self._main.done():
                self._start()  # drain with the same machinery even if run() never ran
            main = self._main
            assert main is not None
            await self._wait_drained(main, timeout)
            if not main.done():
                main.cancel()
                await asyncio.wait({main})
            elif not main.cancelled() and (error := main.exception()) is not None:
                log.error("outlet %s failed while stopping: %s", self.name, _describe(error))
            self._account_undelivered(timeout)
            for ch in self.channels:
                await ch.buffer.close()
            await asyncio.gather(*(self._close_sink(ch) for ch in self.channels))
        finally:
            self._stopped.set()

    async def _wait_drained(self, main: asyncio.Task[None], budget: float) -> None:
        """Wait for ``main`` within ``budget`` seconds, or less when waiting cannot help.

        Once every record was encoded into the buffers and each sink's buffer is a disk
        buffer whose sink is failing (its upstream is away), what is left is safe on disk:
        the drain ends there instead of retrying until the budget is spent.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(budget, 0.0)
        persistent = all(_persistent(ch.buffer) for ch in self.channels)
        while not main.done():
            left = deadline - loop.time()
            if left <= 0:
                return
            await asyncio.wait({main}, timeout=min(left, 0.2) if persistent else left)
            if (
                persistent
                and self._batcher is not None
                and self._batcher.done()
                and all(ch.failing for ch in self.channels)
            ):
                return

    def _account_undelivered(self, timeout: float) -> None:
        unbuffered = len(self._sub) + len(self._pending)
        self.undelivered_records = unbuffered
        for ch in self.channels:
            unbuffered_here = unbuffered + ch.incoming
            ch.undelivered_records = ch.buffer.records + unbuffered_here
            if _persistent(ch.buffer):
                ch.persisted_records = ch.buffer.records
            if ch.undelivered_records == ch.persisted_records:
                if ch.persisted_records:
                    log.info(
                        "outlet %s: sink %s: %d records in %d batches kept in the disk buffer "
                        "for the next start; last error: %s",
                        self.name,
                        ch.name,
                        ch.persisted_records,
                        ch.buffer.undelivered_batches,
                        ch.last_error or "none",
                    )
            elif ch.undelivered_records:
                log.warning(
                    "outlet %s: sink %s: %d records in %d batches not delivered within %.1fs "
                    "of stopping (%d more never encoded); last error: %s",
                    self.name,
                    ch.name,
                    ch.buffer.records,
                    ch.buffer.undelivered_batches,
                    timeout,
                    unbuffered_here,
                    ch.last_error or "none",
                )

    async def _close_sink(self, ch: SinkChannel) -> None:
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await ch.sink.close()
        except Exception as e:  # closing is best effort; the process moves on
            log.warning("outlet %s: closing sink %s failed: %s", self.name, ch.name, _describe(e))
        ch.connected = False

    # -- batching ----------------------------------------------------------------------------

    def _limit(self) -> int:
        """Records per batch: ``batch_size``, or fewer if the bytes estimate says so."""
        by_bytes = int(self.config.batch_bytes / self._line_estimate)
        return max(1, min(self.config.batch_size, by_bytes))

    async def _batch_loop(self) -> None:
        sub = self._sub
        linger = self.config.flush_interval
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                first = await sub.get(self._limit())
                if not first:
                    break  # closed and drained
                self.records_in += len(first)
                self._pending = list(first)  # the bus shares its lists: never mutate them
            limit = self._limit()
            # one timeout per batch (not per wake-up): the deadline is the first record's
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(loop.time() + linger):
                    while len(self._pending) < limit:
                        more = sub.get_nowait(limit - len(self._pending))
                        if more:
                            self.records_in += len(more)
                            self._pending.extend(more)
                        elif sub.closed:
                            break  # stopping: no linger
                        else:
                            await sub.wait_readable()
            await self._flush()
        await self._flush()
        # only a drained, closed subscription ends the senders; a crash leaves buffers open
        # for the supervisor's next run()
        for ch in self.channels:
            ch.buffer.seal()

    async def _flush(self) -> None:
        records = self._pending
        if not records:
            return
        payload, written, stats = await self._encode(records)
        self._pending = []
        self.records_encoded += written
        self.encode_non_finite += int(getattr(stats, "non_finite", 0))
        self.encode_empty += int(getattr(stats, "empty", 0))
        invalid = int(getattr(stats, "invalid", 0))
        if invalid:
            self.encode_invalid += invalid
            now = time.monotonic()
            if now - self._invalid_logged >= _INVALID_LOG_INTERVAL:
                self._invalid_logged = now
                log.warning(
                    "outlet %s: %d records have no valid encoding and were dropped "
                    "(%d so far), e.g.: %s",
                    self.name,
                    invalid,
                    self.encode_invalid,
                    getattr(stats, "last_invalid", "") or "no detail",
                )
        if not payload or not written:
            return
        # the next batch's size by bytes comes from this one: never encode twice to measure
        measured = len(payload) / len(records)
        if self.batches == 0:
            self._line_estimate = measured
        else:
            self._line_estimate = 0.5 * self._line_estimate + 0.5 * measured
        self._seq += 1
        batch = EncodedBatch(
            payload=payload,
            records=written,
            codec=self.codec_name,
            seq=self._seq,
            first_id=records[0].id,
            last_id=records[-1].id,
        )
        self.batches += 1
        self.bytes_encoded += len(payload)
        for ch in self.channels:
            ch.incoming = batch.records
        for ch in self.channels:
            await ch.buffer.append(batch)  # may wait (when_full = block)
            ch.incoming = 0

    async def _encode(self, records: list[Record]) -> tuple[bytes, int, Any]:
        """Encode a batch once, yielding to the loop every ``ENCODE_CHUNK`` records.

        If the outlet is cancelled in between, the records are still pending (and nothing
        was counted): the next run encodes the batch again from its start.
        """
        codec = self._codec
        chunk = ENCODE_CHUNK
        n = len(records)
        clock = time.perf_counter
        if n <= chunk or not codec.concatenates:
            t0 = clock()
            out = codec.encode(records)
            self.encode_seconds += clock() - t0
            return out
        stats = codec.new_stats()
        parts: list[bytes] = []
        for i in range(0, n, chunk):
            if i:
                await asyncio.sleep(0)  # let devices, subscribers and sinks run
            t0 = clock()
            parts.append(codec.encode_part(records[i : i + chunk], stats))
            self.encode_seconds += clock() - t0
        return codec.result(b"".join(parts), n, stats)

    # -- delivery ----------------------------------------------------------------------------

    async def _send_loop(self, ch: SinkChannel) -> None:
        await self._connect(ch)
        if len(ch.backoffs) == 1:
            await self._send_batches(ch, ch.backoff)
            return
        senders = [
            asyncio.create_task(self._send_batches(ch, b), name=f"{self.name}:{ch.name}:{i}")
            for i, b in enumerate(ch.backoffs)
        ]
        try:
            done, _ = await asyncio.wait(senders, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if not t.cancelled() and (error := t.exception()) is not None:
                    raise error
        finally:
            for t in senders:
                t.cancel()
            await asyncio.gather(*senders, return_exceptions=True)

    async def _send_batches(self, ch: SinkChannel, backoff: Backoff) -> None:
        """One batch in flight: take the oldest not yet sent, deliver it, acknowledge it."""
        buffer = ch.buffer
        while True:
            batch = await buffer.get()
            if batch is None:
                return  # sealed and everything handed out (the other senders finish theirs)
            await self._deliver(ch, batch, backoff)
            buffer.ack(batch)

    def _failed(self, ch: SinkChannel, what: str, error: BaseException) -> None:
        message = _describe(error)
        first = not ch.failing
        ch.failing = True
        # only an operator can fix it: an error, logged once, not a warning per retry
        misconfigured = isinstance(error, MisconfiguredSinkError)
        ch.unhealthy = misconfigured
        ch.retries += 1
        if first or message != ch.last_error:
            # a traceback only for what no sink should raise: that is a bug, not an outage
            expected = isinstance(error, RetryableSinkError | PermanentSinkError | OSError)
            log.log(
                logging.ERROR if misconfigured else logging.WARNING,
                "outlet %s: sink %s: %s failed (will retry): %s",
                self.name,
                ch.name,
                what,
                message,
                exc_info=None if expected or isinstance(error, TimeoutError) else error,
            )
        ch.last_error = message
        ch.last_error_time = time.time()

    def _recovered(self, ch: SinkChannel, what: str, backoff: Backoff) -> None:
        if ch.failing:
            log.info(
                "outlet %s: sink %s: %s succeeded after %d attempts",
                self.name,
                ch.name,
                what,
                backoff.attempts + 1,
            )
        ch.failing = False
        ch.unhealthy = False
        backoff.reset()

    async def _connect(self, ch: SinkChannel) -> None:
        timeout = ch.config.timeout
        while True:
            try:
                async with asyncio.timeout(timeout):
                    await ch.sink.connect()
            except TimeoutError:
                self._failed(ch, "connect", TimeoutError(f"connect timed out after {timeout:g}s"))
            except Exception as e:  # any connect failure is retried
                self._failed(ch, "connect", e)
            else:
                ch.connected = True
                self._recovered(ch, "connect", ch.backoff)
                log.debug("outlet %s: sink %s connected", self.name, ch.name)
                return
            raise_if_cancelling()
            await asyncio.sleep(ch.backoff.next())

    async def _deliver(self, ch: SinkChannel, batch: EncodedBatch, backoff: Backoff) -> None:
        """Write ``batch`` until the sink takes it or refuses it for good (waits by ``backoff``)."""
        cfg = ch.config
        while True:
            retry_after: float | None = None
            try:
                async with asyncio.timeout(cfg.timeout):
                    await ch.sink.write(batch)
            except PermanentSinkError as e:
                refused = batch.records
                if isinstance(e, PartialWriteError):
                    refused = min(max(e.rejected_records, 0), batch.records)
                    ch.records_out += batch.records - refused
                ch.rejected += 1
                ch.rejected_records += refused
                ch.last_error = _describe(e)
                ch.last_error_time = time.time()
                log.error(
                    "outlet %s: sink %s rejected batch %d (%d records, %s .. %s): %s",
                    self.name,
                    ch.name,
                    batch.seq,
                    batch.records,
                    batch.first_id,
                    batch.last_id,
                    ch.last_error,
                )
                # the upstream answered, so it is up: the next batch goes without delay
                self._recovered(ch, "write", backoff)
                return
            except RetryableSinkError as e:
                retry_after = e.retry_after
                self._failed(ch, "write", e)
            except TimeoutError:
                self._failed(ch, "write", TimeoutError(f"write timed out after {cfg.timeout:g}s"))
            except Exception as e:  # never lose a batch to a surprise
                self._failed(ch, "write", e)
            else:
                ch.records_out += batch.records
                ch.batches_out += 1
                ch.bytes_out += len(batch.payload)
                if batch.first_id:
                    with contextlib.suppress(ValueError):
                        ch.latencies.append(time.time() - id_time_ms(batch.first_id) / 1000)
                self._recovered(ch, "write", backoff)
                return
            raise_if_cancelling()
            delay = backoff.next()
            if retry_after is not None:
                # the upstream knows best when it can take more, within the configured cap
                delay = max(delay, min(retry_after, cfg.retry_max))
            await asyncio.sleep(delay)

    # -- metrics -----------------------------------------------------------------------------

    def metrics(self) -> dict[str, float | int]:
        """Counters of the outlet, totals over its sinks, and per sink as ``<sink>.<name>``."""
        m: dict[str, float | int] = {
            "records_in": self.records_in,
            "records_encoded": self.records_encoded,
            "batches": self.batches,
            "bytes_encoded": self.bytes_encoded,
            "encode_non_finite": self.encode_non_finite,
            "encode_empty": self.encode_empty,
            "encode_invalid": self.encode_invalid,
            "encode_seconds": self.encode_seconds,
            "queue_records": len(self._sub),
            "queue_dropped": self._sub.dropped,
            "queue_blocked": self._sub.blocked,
            "pending_records": len(self._pending),
            "sinks": len(self.channels),
        }
        totals = (
            "records_out",
            "batches_out",
            "bytes_out",
            "retries",
            "rejected",
            "rejected_records",
            "dropped",
            "dropped_batches",
            "buffer_records",
            "buffer_bytes",
            "undelivered",
        )
        for key in totals:
            m[key] = 0
        for ch in self.channels:
            per_sink = ch.metrics()
            for key in totals:
                m[key] += per_sink[key]
            for key, value in per_sink.items():
                m[f"{ch.name}.{key}"] = value
        m.update(_latency_summary([x for ch in self.channels for x in ch.latencies]))
        return m

    def status(self) -> dict[str, Any]:
        """Per sink: health, connected, failing, last error (for /healthz and the demo view)."""
        return {
            ch.name: {
                "health": ch.health,
                "connected": ch.connected,
                "failing": ch.failing,
                "last_error": ch.last_error,
                "last_error_time": ch.last_error_time,
            }
            for ch in self.channels
        }

    def __repr__(self) -> str:
        return f"Outlet({self.name!r}, sinks={[ch.name for ch in self.channels]})"


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
