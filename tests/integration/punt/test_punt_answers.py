"""How the punt sink maps a function's answers, against a real HTTP server on loopback.

The server (aiohttp, on the test's loop) answers each request with what the test set; the sink
is driven by hand (``write`` as the outlet calls it) so each answer's outcome is seen alone:
published results, ``RetryableSinkError`` / ``PermanentSinkError`` and the counters.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web
from servers import free_port

from plantbus.broker.connector import BuildContext
from plantbus.broker.ids import new_ids
from plantbus.broker.record import Record, Series
from plantbus.broker.sinks import punt
from plantbus.broker.sinks.base import (
    EncodedBatch,
    MisconfiguredSinkError,
    PermanentSinkError,
    RetryableSinkError,
)
from plantbus.codecs import json as json_codec

SOURCE = Series("plant/press", "press", {"device": "press"})


class Function:
    """A loopback HTTP endpoint answering every POST with ``status`` / ``body`` / ``headers``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.status = 200
        self.body = b"[]"
        self.headers: dict[str, str] = {}
        self.requests: list[bytes] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/score"

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(await request.read())
        return web.Response(status=self.status, body=self.body, headers=self.headers)


@pytest_asyncio.fixture(loop_scope="function")
async def function() -> AsyncIterator[Function]:
    fn = Function()
    app = web.Application()
    app.router.add_post("/score", fn.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", fn.port).start()
    try:
        yield fn
    finally:
        await runner.cleanup()


class Published:
    """The bus's ``publish`` as the sink sees it: records kept per call."""

    def __init__(self) -> None:
        self.calls: list[list[Record]] = []

    async def __call__(self, records: list[Record]) -> None:
        self.calls.append(records)

    @property
    def records(self) -> list[Record]:
        return [r for call in self.calls for r in call]


def make_sink(url: str, publish: punt.Publish, **options: object) -> punt.PuntSink:
    cfg = punt.Config(url=url, result_topic="an/press/z", subscribe=["plant/#"], **options)
    return punt.build(cfg, BuildContext("edge", {}, Path("."), extra={"publish": publish}))


def batch(n: int, seq: int = 1) -> tuple[EncodedBatch, list[Record]]:
    records = [
        Record(SOURCE, {"force": float(i)}, 1_000 + i, uid) for i, uid in enumerate(new_ids(n))
    ]
    payload = json_codec.encode(records)
    return EncodedBatch(payload, n, "json", seq, records[0].id, records[-1].id), records


def answer(fn: Function, docs: list[dict[str, object]], status: int = 200) -> None:
    fn.status = status
    fn.body = json.dumps(docs).encode()


async def test_results_fill_in_parent_topic_uid_time(function: Function) -> None:
    published = Published()
    sink = make_sink(function.url, published)
    b, sources = batch(3)
    answer(function, [{"fields": {"z": float(i)}} for i in range(3)])
    await sink.write(b)
    await sink.close()
    assert json.loads(function.requests[0]) == json.loads(b.payload)  # the batch as encoded
    results = published.records
    assert [r.parent for r in results] == [s.id for s in sources]
    assert [r.time_ns for r in results] == [1_000, 1_001, 1_002]
    assert {r.series.topic for r in results} == {"an/press/z"}
    assert len({r.id for r in results} | {s.id for s in sources}) == 6
    assert len(published.calls) == 1  # one topic: one publish
    assert sink.metrics()["results_out"] == 3


async def test_results_that_cannot_be_placed_are_counted_and_left_out(function: Function) -> None:
    published = Published()
    sink = make_sink(function.url, published)
    b, sources = batch(3)
    answer(
        function,
        [
            {"parent": sources[2].id, "fields": {"z": 2.0}},
            {"fields": {"z": 9.0}},  # no parent, and not one result per input
            {"parent": "0190aaaa-0000-7000-8000-000000000000", "fields": {"z": 9.0}},
            {"parent": sources[0].id, "topic": "plant/press/z", "fields": {"z": 9.0}},
            {"parent": sources[1].id, "topic": "an/other", "fields": {"z": 1.0}},
        ],
    )
    await sink.write(b)
    await sink.close()
    assert [(r.parent, r.series.topic, r.fields) for r in published.records] == [
        (sources[2].id, "an/press/z", {"z": 2.0}),
        (sources[1].id, "an/other", {"z": 1.0}),
    ]
    assert len(published.calls) == 2  # one publish per run of one topic
    m = sink.metrics()
    assert (m["invalid_results"], m["results_out"]) == (3, 2)
    assert "subscribes to" in sink.last_invalid


async def test_no_content_is_no_results(function: Function) -> None:
    published = Published()
    sink = make_sink(function.url, published)
    function.status, function.body = 204, b""
    await sink.write(batch(2)[0])
    await sink.close()
    assert published.records == [] and sink.metrics()["invalid_answers"] == 0


@pytest.mark.parametrize(
    ("body", "fault"),
    [
        (b"", "the answer is empty"),
        (b"{nope", "not JSON"),
        (b'{"score": 1}', "record: unknown key 'score'"),
        (b'[{"tags": {}}]', "[0]: missing 'fields'"),
        (b'[{"fields": {"z": [1]}}]', "[0].fields.z: expected a number, boolean or string"),
    ],
)
async def test_an_answer_that_is_not_records_rejects_the_batch(
    function: Function, body: bytes, fault: str
) -> None:
    published = Published()
    sink = make_sink(function.url, published)
    function.body = body
    with pytest.raises(PermanentSinkError) as info:
        await sink.write(batch(2)[0])
    await sink.close()
    assert "not a JSON array of records" in str(info.value)
    assert fault in str(info.value)
    assert published.records == []
    m = sink.metrics()
    assert (m["invalid_answers"], m["breaker_consecutive_failures"]) == (1, 0)


async def test_function_refusing_the_batch_is_permanent(function: Function) -> None:
    sink = make_sink(function.url, Published())
    function.status, function.body = 422, b"field force missing"
    with pytest.raises(PermanentSinkError, match="HTTP 422: 'field force missing'"):
        await sink.write(batch(1)[0])
    await sink.close()
    assert sink.metrics()["refused"] == 1


async def test_busy_function_is_retried_after_what_it_asks(function: Function) -> None:
    sink = make_sink(function.url, Published(), breaker={"failures": 2, "cool_down": "30s"})
    function.status, function.body, function.headers = 429, b"busy", {"Retry-After": "2"}
    with pytest.raises(RetryableSinkError, match="HTTP 429: 'busy'") as info:
        await sink.write(batch(1)[0])
    assert info.value.retry_after == 2.0
    function.status = 503
    with pytest.raises(RetryableSinkError, match="HTTP 503"):
        await sink.write(batch(1)[0])
    # the breaker is open now: the function is not called
    with pytest.raises(RetryableSinkError, match="circuit open after 2") as info:
        await sink.write(batch(1)[0])
    await sink.close()
    assert 29.0 < (info.value.retry_after or 0) <= 30.0
    assert len(function.requests) == 2
    assert sink.metrics()["breaker_state"] == 1


async def test_wrong_path_is_an_operators_problem(function: Function) -> None:
    sink = make_sink(function.url, Published())
    function.status, function.body = 404, b"no such function"
    with pytest.raises(MisconfiguredSinkError, match="HTTP 404: 'no such function'"):
        await sink.write(batch(1)[0])
    await sink.close()
    assert sink.metrics()["breaker_consecutive_failures"] == 1


async def test_unreachable_function_is_a_breaker_failure() -> None:
    sink = make_sink(f"http://127.0.0.1:{free_port()}/score", Published())
    with pytest.raises(RetryableSinkError, match="ClientConnectorError"):
        await sink.write(batch(1)[0])
    await sink.close()
    assert sink.metrics()["breaker_consecutive_failures"] == 1


async def test_oversized_answer_is_refused(function: Function) -> None:
    sink = make_sink(function.url, Published(), max_answer_bytes="1KiB")
    answer(function, [{"fields": {"z": 1.0, "pad": "x" * 2000}}])
    with pytest.raises(PermanentSinkError, match="more than max_answer_bytes"):
        await sink.write(batch(1)[0])
    await sink.close()


async def test_a_retry_publishes_the_rest_of_an_answer_without_calling_again(
    function: Function,
) -> None:
    published = Published()
    gate = asyncio.Event()

    async def slow_bus(records: list[Record]) -> None:
        # the second topic's subscribers push back until the gate opens
        if records[0].series.topic == "an/b":
            await gate.wait()
        await published(records)

    sink = make_sink(function.url, slow_bus)
    b, sources = batch(2)
    answer(
        function,
        [
            {"parent": sources[0].id, "topic": "an/a", "fields": {"z": 1.0}},
            {"parent": sources[1].id, "topic": "an/b", "fields": {"z": 2.0}},
        ],
    )
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):  # the outlet's write timeout
            await sink.write(b)
    assert [r.series.topic for r in published.records] == ["an/a"]
    gate.set()
    await sink.write(b)  # the outlet retries the same batch
    await sink.close()
    assert [r.series.topic for r in published.records] == ["an/a", "an/b"]
    assert len(function.requests) == 1
