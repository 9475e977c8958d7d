"""Outlet: batching by count, bytes and linger; one encoding shared by a group; buffer limits;
retries, timeouts and rejections; connect retries; stop draining what is queued.

The sink here is an in-memory recorder (the InfluxDB path runs against a real server in
tests/integration/test_influxdb_sink.py); the codec is the real line-protocol encoder.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable

import pytest

from plantbus.broker.bus import Bus
from plantbus.broker.ids import new_ids
from plantbus.broker.outlet import Outlet, group_sinks
from plantbus.broker.record import Record, Series
from plantbus.broker.sinks.base import (
    EncodedBatch,
    PermanentSinkError,
    RetryableSinkError,
    SinkConfig,
)
from plantbus.codecs import line_protocol

T0 = 1_700_000_000_000_000_000
SERIES = Series("plant/h1/press7", "press7", {"device": "press7", "line": "L1"})
UID = re.compile(rb'uid="([^"]+)"')


def records(n: int, start: int = 0, series: Series = SERIES) -> list[Record]:
    """``n`` records whose lines all have the same length (fixed-width values)."""
    ids = new_ids(n)
    return [
        Record(series, {"n": 100_000 + start + i, "temp": 21.5}, T0 + start + i, ids[i])
        for i in range(n)
    ]


def uids(payloads: list[bytes]) -> list[str]:
    return [m.decode() for p in payloads for m in UID.findall(p)]


def config(**kw: object) -> SinkConfig:
    kw.setdefault("name", "rec")
    kw.setdefault("retry_initial", "1ms")
    kw.setdefault("retry_max", "20ms")
    return SinkConfig.model_validate(kw)


class RecordingSink:
    """An in-memory sink: keeps every batch it took; faults can be scripted.

    Attributes:
        script: what the next write attempts do before taking the batch: an exception to
            raise, or "hang" (wait forever, until the outlet's timeout cancels it).
        gate: when set (an unset Event), writes wait for it to open.
    """

    codec = "line_protocol"

    def __init__(self, name: str = "rec"):
        self.name = name
        self.batches: list[EncodedBatch] = []
        self.attempts: list[float] = []
        self.script: deque[BaseException | str] = deque()
        self.connect_failures: deque[BaseException] = deque()
        self.connects = 0
        self.closed = False
        self.gate: asyncio.Event | None = None

    async def connect(self) -> None:
        self.connects += 1
        if self.connect_failures:
            raise self.connect_failures.popleft()

    async def write(self, batch: EncodedBatch) -> None:
        self.attempts.append(time.monotonic())
        if self.gate is not None:
            await self.gate.wait()
        if self.script:
            action = self.script.popleft()
            if action == "hang":
                await asyncio.Event().wait()
            assert isinstance(action, BaseException)
            raise action
        self.batches.append(batch)

    async def close(self) -> None:
        self.closed = True

    @property
    def records(self) -> int:
        return sum(b.records for b in self.batches)

    @property
    def uids(self) -> list[str]:
        return uids([b.payload for b in self.batches])


async def until(predicate: Callable[[], object], limit: float = 5.0, what: str = "") -> None:
    """Poll ``predicate`` on the loop until true, failing after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.002)


class Running:
    """An outlet with its run() task; stops it on exit."""

    def __init__(self, outlet: Outlet):
        self.outlet = outlet
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Outlet:
        self.task = asyncio.create_task(self.outlet.run())
        return self.outlet

    async def __aexit__(self, *exc: object) -> None:
        await self.outlet.stop(2.0)
        assert self.task is not None
        await asyncio.wait_for(self.task, 5.0)


# -- batching --------------------------------------------------------------------------------


async def test_batches_by_count_and_flushes_the_rest_on_stop():
    bus = Bus()
    sink = RecordingSink()
    outlet = Outlet("o", bus, [(config(batch_size=100, flush_interval="60s"), sink)])
    sent = records(250)
    async with Running(outlet):
        await bus.publish(sent)
        await until(lambda: len(sink.batches) == 2, what="two full batches")
        assert [b.records for b in sink.batches] == [100, 100]
    assert [b.records for b in sink.batches] == [100, 100, 50]
    assert sink.uids == [r.id for r in sent]
    assert [b.seq for b in sink.batches] == [1, 2, 3]
    assert sink.batches[0].first_id == sent[0].id and sink.batches[0].last_id == sent[99].id
    m = outlet.metrics()
    assert m["records_in"] == m["records_out"] == m["records_encoded"] == 250
    assert m["batches_out"] == 3 and m["retries"] == 0 and m["dropped"] == 0
    assert sink.closed


async def test_batches_by_bytes_from_the_measured_line_size():
    bus = Bus()
    sink = RecordingSink()
    cfg = config(batch_size=100_000, batch_bytes=2000, flush_interval="60s")
    outlet = Outlet("o", bus, [(cfg, sink)])
    async with Running(outlet):
        for i in range(40):
            await bus.publish(records(10, start=i * 10))
        await until(lambda: outlet.records_in == 400)
    line = len(sink.batches[0].payload) // sink.batches[0].records
    per_batch = 2000 // line
    assert sink.records == 400
    # the first batch is sized from a guess; the rest from the measured line length
    assert all(len(b.payload) <= 2000 for b in sink.batches)
    assert [b.records for b in sink.batches[1:-1]] == [per_batch] * (len(sink.batches) - 2)


async def test_linger_flushes_a_partial_batch_after_flush_interval():
    bus = Bus()
    sink = RecordingSink()
    outlet = Outlet("o", bus, [(config(batch_size=1000, flush_interval="150ms"), sink)])
    async with Running(outlet):
        t0 = time.monotonic()
        await bus.publish(records(3))
        await until(lambda: sink.batches, what="the lingering batch")
        waited = time.monotonic() - t0
        await bus.publish(records(2, start=3))
        await until(lambda: len(sink.batches) == 2, what="the second lingering batch")
    assert 0.14 <= waited < 1.0
    assert [b.records for b in sink.batches] == [3, 2]


async def test_group_shares_one_encoded_batch():
    bus = Bus()
    influx, kapacitor = RecordingSink("influx"), RecordingSink("kapacitor")
    entries = [
        (config(name="influx", subscribe=["plant/#"], batch_size=50), influx),
        (config(name="kapacitor", subscribe=["plant/#"], batch_size=50), kapacitor),
        (config(name="other", subscribe=["plant/#"], batch_size=10), RecordingSink("other")),
    ]
    groups = group_sinks(entries)
    assert [[c.name for c, _ in g] for g in groups] == [["influx", "kapacitor"], ["other"]]
    outlet = Outlet("influx+kapacitor", bus, groups[0])
    async with Running(outlet):
        await bus.publish(records(120))
    assert len(influx.batches) == len(kapacitor.batches) == 3
    for a, b in zip(influx.batches, kapacitor.batches, strict=True):
        assert a is b  # encoded once, the same bytes object handed to both
    m = outlet.metrics()
    assert m["batches"] == 3 and m["influx.records_out"] == m["kapacitor.records_out"] == 120


def test_group_sinks_groups_by_filters_codec_batching_and_queue():
    a = config(name="a", subscribe=["x/#", "y/#"])
    b = config(name="b", subscribe=["y/#", "x/#"], retry_max="5s", timeout="1s")
    c = config(name="c", subscribe=["x/#", "y/#"], codec="json")
    d = config(name="d", subscribe=["x/#", "y/#"], flush_interval="2s")
    e = config(name="e", subscribe=["x/#", "y/#"], queue={"size": 10})
    f = config(name="f", subscribe=["x/#", "y/#"], buffer={"max_size": "1MiB"})
    groups = group_sinks([(cfg, None) for cfg in (a, b, c, d, e, f)])  # type: ignore[misc]
    assert [[cfg.name for cfg, _ in g] for g in groups] == [["a", "b", "f"], ["c"], ["d"], ["e"]]


def test_outlet_refuses_sinks_that_cannot_share():
    with pytest.raises(ValueError, match="group them with group_sinks"):
        Outlet("x", Bus(), [(config(batch_size=1), RecordingSink()), (config(), RecordingSink())])


async def test_unencodable_records_are_counted_not_sent(caplog):
    bus = Bus()
    sink = RecordingSink()
    bad = Series("plant/h1/bad", "bad\\", {})  # a measurement ending in a backslash
    good = records(5)
    outlet = Outlet("o", bus, [(config(batch_size=1000, flush_interval="10ms"), sink)])
    with caplog.at_level(logging.WARNING, "plantbus.broker.outlet"):
        async with Running(outlet):
            await bus.publish(good)
            await bus.publish(records(2, series=Series("plant/h1/bad", "bad\\", {})))
            await bus.publish([Record(bad, {"v": float("nan")}, T0, new_ids(1)[0])])
    m = outlet.metrics()
    assert m["records_in"] == 8 and m["records_out"] == 5 and m["encode_invalid"] == 3
    assert sink.uids == [r.id for r in good]
    assert "have no valid encoding" in caplog.text and "ends with a backslash" in caplog.text


# -- buffer limits ---------------------------------------------------------------------------


async def fill_while_blocked(when_full: str) -> tuple[Outlet, RecordingSink, list[list[Record]]]:
    """10 batches of 10 records into an outlet whose sink is stuck on the first one."""
    bus = Bus()
    sink = RecordingSink()
    sink.gate = asyncio.Event()
    payload = line_protocol.encode(records(10))
    cfg = config(
        batch_size=10,
        flush_interval="60s",
        buffer={"max_size": int(len(payload) * 3.5), "when_full": when_full},
        queue={"size": 10},
    )
    outlet = Outlet("o", bus, [(cfg, sink)])
    task = asyncio.create_task(outlet.run())
    sent = [records(10, start=i * 10) for i in range(10)]
    publisher = asyncio.create_task(_publish_all(bus, sent))
    await until(lambda: sink.attempts, what="the first write")
    if when_full == "block":
        await until(lambda: outlet.channels[0].buffer.blocked == 1, what="a blocked append")
    else:
        await until(lambda: publisher.done(), what="every batch published")
        await until(lambda: outlet.batches == 10, what="every batch encoded")
    sink.gate.set()
    await publisher
    await outlet.stop(5.0)
    await task
    return outlet, sink, sent


async def _publish_all(bus: Bus, batches: list[list[Record]]) -> None:
    for b in batches:
        await bus.publish(b)


async def test_buffer_drop_oldest_keeps_the_in_flight_and_newest_batches():
    outlet, sink, sent = await fill_while_blocked("drop_oldest")
    # batch 0 was in flight (its bytes count too); of the rest only the two newest fitted
    assert sink.uids == [r.id for b in (sent[0], sent[8], sent[9]) for r in b]
    m = outlet.metrics()
    assert (m["dropped"], m["dropped_batches"], m["records_out"]) == (70, 7, 30)


async def test_buffer_drop_newest_keeps_the_oldest_batches():
    outlet, sink, sent = await fill_while_blocked("drop_newest")
    assert sink.uids == [r.id for b in sent[:3] for r in b]
    m = outlet.metrics()
    assert (m["dropped"], m["dropped_batches"], m["records_out"]) == (70, 7, 30)


async def test_buffer_block_loses_nothing_and_pushes_back_to_the_bus():
    outlet, sink, sent = await fill_while_blocked("block")
    assert sink.uids == [r.id for b in sent for r in b]
    m = outlet.metrics()
    assert m["dropped"] == 0 and m["queue_dropped"] == 0 and m["records_out"] == 100
    assert m["queue_blocked"] >= 1  # the publisher waited: back-pressure reached the bus


# -- retries ---------------------------------------------------------------------------------


async def test_retryable_errors_are_retried_until_the_batch_is_taken_once():
    bus = Bus()
    sink = RecordingSink()
    sink.script.extend(RetryableSinkError(f"HTTP 503 #{i}") for i in range(3))
    outlet = Outlet("o", bus, [(config(batch_size=10, flush_interval="60s"), sink)])
    sent = records(30)
    async with Running(outlet):
        await bus.publish(sent)
        await until(lambda: sink.records == 30)
    assert sink.uids == [r.id for r in sent]
    assert len(sink.attempts) == 6
    m = outlet.metrics()
    assert m["retries"] == 3 and m["rejected"] == 0 and m["records_out"] == 30
    assert outlet.channels[0].last_error == "RetryableSinkError: HTTP 503 #2"
    assert not outlet.channels[0].failing


async def test_connection_errors_are_retried():
    bus = Bus()
    sink = RecordingSink()
    sink.script.extend([ConnectionResetError("reset by peer"), OSError("no route to host")])
    outlet = Outlet("o", bus, [(config(batch_size=5), sink)])
    async with Running(outlet):
        await bus.publish(records(5))
        await until(lambda: sink.records == 5)
    assert outlet.metrics()["retries"] == 2


async def test_retry_after_is_honoured():
    bus = Bus()
    sink = RecordingSink()
    sink.script.append(RetryableSinkError("HTTP 429", retry_after=0.3))
    cfg = config(batch_size=5, retry_initial="1ms", retry_max="5s")
    outlet = Outlet("o", bus, [(cfg, sink)])
    async with Running(outlet):
        await bus.publish(records(5))
        await until(lambda: sink.records == 5)
    assert sink.attempts[1] - sink.attempts[0] >= 0.29


async def test_retry_after_is_capped_by_retry_max():
    bus = Bus()
    sink = RecordingSink()
    sink.script.append(RetryableSinkError("HTTP 503", retry_after=3600))
    cfg = config(batch_size=5, retry_initial="1ms", retry_max="50ms")
    outlet = Outlet("o", bus, [(cfg, sink)])
    async with Running(outlet):
        await bus.publish(records(5))
        await until(lambda: sink.records == 5, limit=2.0)
    assert sink.attempts[1] - sink.attempts[0] < 1.0


async def test_a_hung_write_times_out_and_is_retried():
    bus = Bus()
    sink = RecordingSink()
    sink.script.append("hang")
    outlet = Outlet("o", bus, [(config(batch_size=5, timeout="100ms"), sink)])
    async with Running(outlet):
        await bus.publish(records(5))
        await until(lambda: sink.records == 5)
    assert sink.attempts[1] - sink.attempts[0] >= 0.09
    assert outlet.channels[0].last_error == "TimeoutError: write timed out after 0.1s"
    assert outlet.metrics()["retries"] == 1


async def test_permanent_error_rejects_the_batch_and_goes_on(caplog):
    bus = Bus()
    sink = RecordingSink()
    sink.script.append(PermanentSinkError("HTTP 400: partial write: field type conflict"))
    outlet = Outlet("o", bus, [(config(batch_size=10, flush_interval="60s"), sink)])
    sent = records(30)
    with caplog.at_level(logging.ERROR, "plantbus.broker.outlet"):
        async with Running(outlet):
            await bus.publish(sent)
            await until(lambda: sink.records == 20)
    assert sink.uids == [r.id for r in sent[10:]]
    m = outlet.metrics()
    assert (m["rejected"], m["rejected_records"], m["records_out"], m["retries"]) == (1, 10, 20, 0)
    assert "rejected batch 1 (10 records" in caplog.text
    assert "field type conflict" in caplog.text


async def test_connect_is_retried_with_backoff():
    bus = Bus()
    sink = RecordingSink()
    sink.connect_failures.extend([RetryableSinkError("refused"), OSError("unreachable")])
    outlet = Outlet("o", bus, [(config(batch_size=5), sink)])
    async with Running(outlet):
        await bus.publish(records(5))
        await until(lambda: sink.records == 5)
        assert outlet.metrics()["rec.connected"] == 1
    assert sink.connects == 3
    assert outlet.metrics()["retries"] == 2


async def test_one_failing_sink_does_not_hold_back_the_other():
    bus = Bus()
    up, down = RecordingSink("up"), RecordingSink("down")
    down.gate = asyncio.Event()  # never opens
    outlet = Outlet(
        "o",
        bus,
        [(config(name="up", batch_size=10), up), (config(name="down", batch_size=10), down)],
    )
    async with Running(outlet):
        await bus.publish(records(50))
        await until(lambda: up.records == 50)
        down.gate.set()
    assert down.records == 50


# -- stop ------------------------------------------------------------------------------------


async def test_stop_flushes_everything_queued_at_once():
    bus = Bus()
    sink = RecordingSink()
    outlet = Outlet("o", bus, [(config(batch_size=5000, flush_interval="1h"), sink)])
    task = asyncio.create_task(outlet.run())
    sent = [r for i in range(10) for r in records(100, start=i * 100)]
    for i in range(10):
        await bus.publish(sent[i * 100 : (i + 1) * 100])
    t0 = time.monotonic()
    await outlet.stop(5.0)
    await asyncio.wait_for(task, 1.0)
    assert time.monotonic() - t0 < 1.0  # no linger while stopping
    assert sink.uids == [r.id for r in sent]
    assert sink.closed
    assert outlet.metrics()["undelivered"] == 0


async def test_stop_gives_up_after_its_timeout_and_counts_what_is_left(caplog):
    bus = Bus()
    sink = RecordingSink()
    sink.script.extend(RetryableSinkError("down") for _ in range(10_000))
    outlet = Outlet("o", bus, [(config(batch_size=10, retry_max="10ms"), sink)])
    task = asyncio.create_task(outlet.run())
    await bus.publish(records(35))
    await until(lambda: outlet.batches == 4)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, "plantbus.broker.outlet"):
        await outlet.stop(0.2)
    assert 0.19 <= time.monotonic() - t0 < 1.0
    await asyncio.wait_for(task, 1.0)
    m = outlet.metrics()
    assert m["undelivered"] == 35 and m["buffer_records"] == 35 and m["records_out"] == 0
    assert "35 records in 4 batches not delivered" in caplog.text
    assert sink.closed


class SwallowingSink(RecordingSink):
    """A driver that turns a cancellation into its own error (aiormq does this when it is
    cancelled in a failing TLS handshake): in ``connect``, or in ``write`` once connected."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where

    async def _fail_slowly(self) -> None:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            raise OSError("connection aborted") from None
        raise OSError("handshake failed")

    async def connect(self) -> None:
        self.connects += 1
        if self.where == "connect":
            await self._fail_slowly()

    async def write(self, batch: EncodedBatch) -> None:
        self.attempts.append(time.monotonic())
        await self._fail_slowly()


@pytest.mark.parametrize("where", ["connect", "write"])
async def test_stop_ends_even_when_the_driver_swallows_the_cancellation(where):
    bus = Bus()
    sink = SwallowingSink(where)
    outlet = Outlet("o", bus, [(config(batch_size=10, retry_max="1ms"), sink)])
    task = asyncio.create_task(outlet.run())
    await bus.publish(records(10))
    await until(lambda: sink.connects >= 3 if where == "connect" else len(sink.attempts) >= 3)
    await outlet.stop(0.1)
    await asyncio.wait_for(task, 2.0)  # before the fix: retried forever after stop
    assert outlet.metrics()["undelivered"] == 10


async def test_records_published_before_run_are_not_lost():
    bus = Bus()
    sink = RecordingSink()
    outlet = Outlet("o", bus, [(config(batch_size=100), sink)])
    sent = records(20)
    await bus.publish(sent)  # the subscription exists from construction
    async with Running(outlet):
        pass
    assert sink.uids == [r.id for r in sent]


async def test_latency_is_sampled_from_record_ids():
    bus = Bus()
    sink = RecordingSink()
    outlet = Outlet("o", bus, [(config(batch_size=10), sink)])
    async with Running(outlet):
        await bus.publish(records(10))
        await until(lambda: sink.records == 10)
    m = outlet.metrics()
    assert 0 <= m["latency_p50"] <= m["latency_max"] < 5.0


async def test_a_cancelled_run_keeps_its_batches_for_the_next_run():
    bus = Bus()
    sink = RecordingSink()
    sink.gate = asyncio.Event()
    outlet = Outlet("o", bus, [(config(batch_size=10), sink)])
    sent = records(20)
    task = asyncio.create_task(outlet.run())
    await bus.publish(sent)
    await until(lambda: sink.attempts, what="a write in flight")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert outlet.metrics()["buffer_records"] == 20  # the in-flight batch was not lost
    sink.gate.set()
    async with Running(outlet):  # a supervisor's restart sends the in-flight batch again
        await until(lambda: sink.records == 20)
    assert sink.uids == [r.id for r in sent]


async def test_stop_counts_a_batch_stuck_before_a_full_blocking_buffer():
    bus = Bus()
    sink = RecordingSink()
    sink.script.extend(RetryableSinkError("down") for _ in range(10_000))
    one = len(line_protocol.encode(records(10)))
    cfg = config(
        batch_size=10,
        flush_interval="60s",
        retry_max="10ms",
        buffer={"max_size": one * 2, "when_full": "block"},
    )
    outlet = Outlet("o", bus, [(cfg, sink)])
    task = asyncio.create_task(outlet.run())
    for i in range(4):
        await bus.publish(records(10, start=i * 10))
    await until(lambda: outlet.channels[0].buffer.blocked == 1, what="a blocked append")
    await outlet.stop(0.1)
    await task
    m = outlet.metrics()
    # 2 batches buffered, 1 waiting for room, 1 still queued: none lost from the count
    assert (m["buffer_records"], m["undelivered"], m["dropped"]) == (20, 40, 0)


async def test_json_codec_batches_are_json_arrays():
    bus = Bus()
    sink = RecordingSink()
    sink.codec = "json"
    outlet = Outlet("o", bus, [(config(codec="json", batch_size=4, flush_interval="60s"), sink)])
    sent = records(10)
    async with Running(outlet):
        await bus.publish(sent)
    docs = [doc for b in sink.batches for doc in json.loads(b.payload)]
    assert [b.records for b in sink.batches] == [4, 4, 2]
    assert all(b.codec == "json" for b in sink.batches)
    assert [d["uid"] for d in docs] == [r.id for r in sent]
    assert docs[0]["fields"] == {"n": 100_000, "temp": 21.5}
    assert outlet.metrics()["records_out"] == 10


# -- several batches in flight ---------------------------------------------------------------


class ConcurrentConfig(SinkConfig):
    """A sink kind that takes several batches at once (as ``influxdb`` does)."""

    MAX_IN_FLIGHT_LIMIT = 8


def concurrent_config(**kw: object) -> SinkConfig:
    kw.setdefault("name", "rec")
    kw.setdefault("retry_initial", "1ms")
    kw.setdefault("retry_max", "20ms")
    return ConcurrentConfig.model_validate(kw)


class GatedSink(RecordingSink):
    """Each write waits for the gate of its batch (by ``seq``); ``failures[seq]`` counts
    how many attempts of that batch fail (retryable) once their gate is open."""

    def __init__(self, name: str = "rec"):
        super().__init__(name)
        self.gates: dict[int, asyncio.Event] = {}
        self.failures: dict[int, int] = {}
        self.writing: list[int] = []  # seqs of the writes running now
        self.most_at_once = 0

    def gate_of(self, seq: int) -> asyncio.Event:
        return self.gates.setdefault(seq, asyncio.Event())

    async def write(self, batch: EncodedBatch) -> None:
        self.attempts.append(time.monotonic())
        self.writing.append(batch.seq)
        self.most_at_once = max(self.most_at_once, len(self.writing))
        try:
            await self.gate_of(batch.seq).wait()
            if self.failures.get(batch.seq, 0) > 0:
                self.failures[batch.seq] -= 1
                raise RetryableSinkError(f"batch {batch.seq} failed")
            self.batches.append(batch)
        finally:
            self.writing.remove(batch.seq)


def test_max_in_flight_is_a_sink_key_only_kinds_that_allow_it_raise():
    from plantbus.broker.sinks import file, influxdb

    assert SinkConfig().max_in_flight == 1
    assert influxdb.Config(database="d").max_in_flight == 2
    assert influxdb.Config(database="d", max_in_flight=16).max_in_flight == 16
    with pytest.raises(ValueError, match="at most 16"):
        influxdb.Config(database="d", max_in_flight=17)
    with pytest.raises(ValueError, match="one batch at a time"):
        file.Config(max_in_flight=2)
    with pytest.raises(ValueError, match="one batch at a time"):
        config(max_in_flight=2)
    with pytest.raises(ValueError):
        concurrent_config(max_in_flight=0)


async def test_batches_in_flight_are_acked_out_of_order_and_leave_the_buffer_in_order():
    bus = Bus()
    sink = GatedSink()
    outlet = Outlet("o", bus, [(concurrent_config(batch_size=10, max_in_flight=2), sink)])
    buffer = outlet.channels[0].buffer
    sent = records(30)
    async with Running(outlet):
        await bus.publish(sent)
        await until(lambda: outlet.batches == 3 and sorted(sink.writing) == [1, 2])
        assert buffer.in_flight == 2 and buffer.pending == 1  # the third waits for a slot
        sink.gate_of(2).set()  # the second batch is taken first
        await until(lambda: 2 in [b.seq for b in sink.batches] and sink.writing == [1, 3])
        m = outlet.metrics()
        assert (m["records_out"], m["batches_out"]) == (10, 1)
        # delivered, but held until the first one is: a restart would never skip batch 1
        assert (buffer.records, buffer.undelivered_batches, len(buffer)) == (20, 2, 3)
        assert buffer.bytes == sum(len(b.payload) for b in sink.batches) * 3
        sink.gate_of(1).set()
        await until(lambda: len(sink.batches) == 2)
        assert (buffer.records, len(buffer)) == (10, 1)  # batches 1 and 2 left, in order
        sink.gate_of(3).set()
        await until(lambda: len(sink.batches) == 3)
    assert [b.seq for b in sink.batches] == [2, 1, 3]
    assert sorted(sink.uids) == sorted(r.id for r in sent)
    m = outlet.metrics()
    assert (m["records_out"], m["batches_out"], m["retries"], m["buffer_records"]) == (30, 3, 0, 0)
    assert sink.most_at_once == 2


async def test_max_in_flight_bounds_the_writes_running_at_once():
    bus = Bus()
    sink = GatedSink()
    outlet = Outlet("o", bus, [(concurrent_config(batch_size=10, max_in_flight=3), sink)])
    sent = records(100)
    async with Running(outlet):
        await bus.publish(sent)
        await until(lambda: len(sink.writing) == 3)
        await asyncio.sleep(0.02)
        assert sorted(sink.writing) == [1, 2, 3]
        for seq in range(1, 11):
            sink.gate_of(seq).set()
        await until(lambda: sink.records == 100)
    assert sink.most_at_once == 3
    assert sorted(sink.uids) == sorted(r.id for r in sent)
    assert outlet.metrics()["records_out"] == 100


async def test_one_batch_in_flight_is_retried_while_the_other_succeeds():
    bus = Bus()
    sink = GatedSink()
    sink.failures[1] = 1_000_000  # batch 1 fails until told otherwise
    outlet = Outlet("o", bus, [(concurrent_config(batch_size=10, max_in_flight=2), sink)])
    sent = records(20)
    async with Running(outlet):
        await bus.publish(sent)
        await until(lambda: sorted(sink.writing) == [1, 2])
        sink.gate_of(1).set()
        await until(lambda: outlet.channels[0].retries >= 2, what="batch 1 failing")
        sink.gate_of(2).set()  # batch 2 goes through while batch 1 keeps being retried
        await until(lambda: sink.records == 10)
        assert [b.seq for b in sink.batches] == [2]
        retried = outlet.channels[0].retries
        await until(lambda: outlet.channels[0].retries > retried, what="batch 1 retried")
        sink.failures[1] = 0
        await until(lambda: sink.records == 20)
    assert [b.seq for b in sink.batches] == [2, 1]
    assert sorted(sink.uids) == sorted(r.id for r in sent)  # each record exactly once
    m = outlet.metrics()
    assert (m["records_out"], m["batches_out"]) == (20, 2)
    assert len(sink.attempts) == m["retries"] + 2  # every failed attempt counted, once
    assert (m["buffer_records"], m["undelivered"], m["rec.failing"]) == (0, 0, 0)


async def test_stop_drains_every_batch_in_flight():
    bus = Bus()
    sink = GatedSink()
    outlet = Outlet("o", bus, [(concurrent_config(batch_size=10, max_in_flight=2), sink)])
    sent = records(45)
    task = asyncio.create_task(outlet.run())
    await bus.publish(sent)
    await until(lambda: sorted(sink.writing) == [1, 2])
    stopping = asyncio.create_task(outlet.stop(5.0))
    await asyncio.sleep(0.05)
    assert not stopping.done()  # waits for the two writes in flight
    for seq in range(1, 6):
        sink.gate_of(seq).set()
    await asyncio.wait_for(stopping, 5.0)
    await asyncio.wait_for(task, 5.0)
    assert sorted(sink.uids) == sorted(r.id for r in sent)
    m = outlet.metrics()
    assert (m["records_out"], m["batches_out"], m["undelivered"]) == (45, 5, 0)
    assert sink.closed


async def test_stop_counts_batches_still_in_flight_at_its_timeout():
    bus = Bus()
    sink = GatedSink()
    outlet = Outlet("o", bus, [(concurrent_config(batch_size=10, max_in_flight=2), sink)])
    task = asyncio.create_task(outlet.run())
    await bus.publish(records(30))
    await until(lambda: sorted(sink.writing) == [1, 2])
    sink.gate_of(2).set()
    await until(lambda: sink.records == 10)
    await until(lambda: sorted(sink.writing) == [1, 3])
    await outlet.stop(0.1)
    await asyncio.wait_for(task, 5.0)
    m = outlet.metrics()
    # batch 2 went through; 1 and 3 were in flight when stop gave up: held, not lost
    assert (m["records_out"], m["undelivered"], m["buffer_records"]) == (10, 20, 20)


# -- encoding in chunks ----------------------------------------------------------------------


def mixed_records(n: int) -> list[Record]:
    """``n`` records of all kinds the codec treats differently (plain, NaN, Bad status,
    unencodable series, nothing left to write), in one batch."""
    bad_series = Series("plant/h1/bad", "bad\\", {})
    ids = new_ids(n)
    out = []
    for i in range(n):
        fields: dict[str, float | int | bool | str] = {"n": i, "temp": 20.0 + i / 7}
        rec = Record(SERIES, fields, T0 + i, ids[i])
        if i % 97 == 5:
            rec = Record(SERIES, {"n": i, "temp": float("nan")}, T0 + i, ids[i])
        elif i % 101 == 7:
            rec = Record(bad_series, fields, T0 + i, ids[i])
        elif i % 103 == 9:
            rec = Record(SERIES, {"temp": float("inf")}, T0 + i, ids[i])
        elif i % 89 == 11:
            rec = Record(SERIES, {"s": 'say "hi"\\', "ok": True}, T0 + i, ids[i])
        out.append(rec)
    return out


async def test_a_large_batch_is_encoded_in_chunks_into_the_same_bytes(monkeypatch):
    from plantbus.broker import outlet as outlet_module

    assert 2 * outlet_module.ENCODE_CHUNK < 4321  # several chunks
    bus = Bus()
    sink = RecordingSink()
    outlet = Outlet("o", bus, [(config(batch_size=5000, flush_interval="60s"), sink)])
    sent = mixed_records(4321)
    expected = line_protocol.EncodeStats()
    one_shot = line_protocol.encode(sent, expected)

    calls: list[tuple[int, int]] = []  # (records encoded, loop ticks seen so far)
    ticks = 0
    real_encode = line_protocol.encode

    def spy(records, stats=None, uid_field="uid"):  # type: ignore[no-untyped-def]
        calls.append((len(records), ticks))
        return real_encode(records, stats, uid_field)

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    monkeypatch.setattr(line_protocol, "encode", spy)
    tick_task = asyncio.create_task(ticker())
    try:
        async with Running(outlet):
            await bus.publish(sent)
    finally:
        tick_task.cancel()
    assert [b.payload for b in sink.batches] == [one_shot]  # one payload, the same bytes
    chunk = outlet_module.ENCODE_CHUNK
    assert [n for n, _ in calls] == [chunk] * (4321 // chunk) + [4321 % chunk]
    # the loop ran between chunks: the ticker advanced before every chunk after the first
    assert all(b[1] > a[1] for a, b in itertools.pairwise(calls))
    m = outlet.metrics()
    assert m["records_encoded"] == m["records_out"] == expected.lines
    assert m["encode_invalid"] == expected.invalid > 0
    assert m["encode_non_finite"] == expected.non_finite > 0
    assert m["encode_empty"] == expected.empty > 0
    assert sink.batches[0].records == expected.lines
    assert (sink.batches[0].first_id, sink.batches[0].last_id) == (sent[0].id, sent[-1].id)


async def test_a_json_batch_is_encoded_in_one_go():
    bus = Bus()
    sink = RecordingSink()
    sink.codec = "json"
    outlet = Outlet("o", bus, [(config(codec="json", batch_size=2500), sink)])
    sent = records(2500)
    async with Running(outlet):
        await bus.publish(sent)
    assert [len(json.loads(b.payload)) for b in sink.batches] == [2500]


async def test_disk_buffer_keeps_what_a_down_sink_missed_and_replays_it_first(tmp_path):
    from plantbus.broker.outlet import make_buffer

    cfg = config(batch_size=100, flush_interval="10ms", buffer={"kind": "disk"})
    folder = tmp_path / "buffers" / "rec"

    def factory(c: SinkConfig, name: str):
        return make_buffer(c, name, directory=folder)

    down = RecordingSink()
    down.connect_failures.extend(ConnectionRefusedError("down") for _ in range(10_000))
    bus = Bus()
    outlet = Outlet("o", bus, [(cfg, down)], buffer_factory=factory)
    old = records(250)
    async with Running(outlet):
        await bus.publish(old)
        await until(lambda: outlet.channels[0].buffer.records == 250, what="buffered on disk")
    # the upstream was away: the drain ended early, the records are kept on disk and counted
    ch = outlet.channels[0]
    assert (ch.undelivered_records, ch.persisted_records, ch.records_out) == (250, 250, 0)
    assert ch.metrics()["persisted"] == 250

    up = RecordingSink()
    bus = Bus()
    outlet = Outlet("o", bus, [(cfg, up)], buffer_factory=factory)
    new = records(50, start=250)
    async with Running(outlet):
        await bus.publish(new)
        await until(lambda: up.records == 300, what="backlog and live records delivered")
    # the backlog first, then the live records, each exactly once, in order
    assert up.uids == [r.id for r in old + new]
    assert outlet.channels[0].metrics()["buffer_synced_records"] == 50
    assert sorted(p.name for p in folder.glob("*.seg")) == ["000000000002.seg"]
