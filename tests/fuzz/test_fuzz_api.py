"""Fuzz: JSON records from outside the node: the consumer API's publish body and the punt
sink's answers.

* ``ConsumerApi.publish_json`` (``POST /v1/publish`` and WebSocket publish frames) on a real
  runtime's bus: it publishes the records or raises ``ApiError`` 400 (not records) or 403
  (a topic the role may not publish on), with a reason; never another exception, which
  aiohttp would turn into a 500.
* ``PuntSink._results``: the function's answer becomes result records, or the batch fails
  with ``PermanentSinkError``; results it cannot use are left out and counted.

Inputs: random bytes, mutations of valid bodies, record-shaped documents of any shape.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from fuzzkit import FUZZ, mutated, within
from hypothesis import example, given
from hypothesis import strategies as st
from jsongen import record_payloads

from plantbus.broker.api import ApiError, ConsumerApi, Role
from plantbus.broker.config import parse_config
from plantbus.broker.record import Record, Series
from plantbus.broker.runtime import Runtime
from plantbus.broker.sinks import punt
from plantbus.broker.sinks.base import EncodedBatch, PermanentSinkError
from plantbus.codecs import json as json_codec

pytestmark = pytest.mark.fuzz

SEEDS = [
    b'[{"topic":"plant/h1/press7","fields":{"temp":21.5,"on":true},"tags":{"line":"L1"},'
    b'"time":1732790000123456789,"quality":"uncertain","status":{"temp":1073741824}}]',
    b'{"fields":{"x":1},"measurement":"m","uid":"0190abc"}',
    b'[{"topic":"$cmd/edge/press","fields":{"setpoint":3}},{"topic":"other/x","fields":{}}]',
]
bodies = st.one_of(st.binary(max_size=150), mutated(st.sampled_from(SEEDS)), record_payloads)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> ConsumerApi:
    main = tmp_path_factory.mktemp("api") / "plantbus.toml"
    runtime = Runtime(parse_config('[api]\nlisten = "127.0.0.1:0"\n', main))
    runtime.started_at = time.monotonic()  # running: publishes reach the (empty) bus
    return ConsumerApi(runtime.config.api, runtime)


ROLES = [
    Role("local", everything=True),
    Role("local-commands", everything=True, commands=True),
    Role("line1", publish=("plant/h1/#",), write=("edge/+",)),
]


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@FUZZ
@given(
    bodies,
    st.sampled_from(range(len(ROLES))),
    st.sampled_from([None, "plant/h1/x", "a/+", "", "$x"]),
)
@example(b'{"fields":{},"quality":[]}', 0, "plant/h1/x")  # found: TypeError, answered 500
def test_publish_body(
    loop: asyncio.AbstractEventLoop, api: ConsumerApi, body: bytes, role: int, topic: str | None
) -> None:
    with within():
        try:
            uids = loop.run_until_complete(api.publish_json(ROLES[role], body, topic))
        except ApiError as e:
            assert e.status in (400, 403), e.status
            assert e.reason
            return
    assert all(type(u) is str for u in uids)  # a publisher may set any uid, even ""


SINK = punt.PuntSink(
    punt.Config(url="http://127.0.0.1:9/score", result_topic="scores/x", subscribe=["plant/#"]),
    publish=None,  # type: ignore[arg-type]  # _results does not publish
)
SOURCES = [Record(Series("plant/a", "a"), {"t": 1.0}, 1_000 + i, f"0190src{i}") for i in range(3)]
BATCH = EncodedBatch(json_codec.encode(SOURCES), 3, "json")
ANSWERS = [
    b'[{"fields":{"score":0.9}},{"fields":{"score":0.1}},{"fields":{"score":0.5}}]',
    b'[{"parent":"0190src1","fields":{"score":1},"topic":"scores/y","tags":{"m":"v2"}}]',
    b'[{"parent":"nope","fields":{}},{"parent":"0190src0","topic":"plant/loop","fields":{}}]',
]
answers = st.one_of(st.binary(max_size=150), mutated(st.sampled_from(ANSWERS)), record_payloads)


@FUZZ
@given(answers)
@example(b'[{"parent":"0190src0","fields":{},"topic":"a/+"}]')
@example(b'[{"parent":"0190src0","fields":{},"topic":""}]')
@example(b'[{"parent":["x"],"fields":{}}]')
@example(b'[{"parent":"0190src0","fields":{},"topic":7}]')
def test_punt_answer(body: bytes) -> None:
    with within():
        try:
            results = SINK._results(BATCH, body)
        except PermanentSinkError as e:
            assert str(e)
            return
    for rec in results:
        assert rec.parent in {s.id for s in SOURCES}
        assert not rec.series.topic.startswith("plant/")
        assert all(type(v) in (float, int, bool, str) for v in rec.fields.values())
