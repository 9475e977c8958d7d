"""The punt sink against a real function container process (a rolling z-score scorer).

A sim device feeds the runtime's bus; the punt sink POSTs its batches to
``zscore_function.py`` and publishes the answers. The tests tap the bus for the source
records and the results and check them by uid: every source scored exactly once (or counted
as rejected), each result with its parent, topic, time and the score recomputed here.
Faults come from the function itself (``/mode``): HTTP 500s, a hang, a garbage answer.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from punt_harness import PuntRun, punt_run
from zscore_function import Scorer

from plantbus.broker.record import Record

pytestmark = pytest.mark.slow

UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")

CONFIG = """
[node]
name = "edge"
state_dir = "state"
shutdown_timeout = "20s"
tags = {{ site = "ulm" }}

[api]
enabled = false

[[devices.sim]]
name = "press"
topic = "plant/press"
interval = "5ms"
batch = 4
tags = {{ line = "L1" }}
points = [
  {{ name = "n", signal = "counter" }},
  {{ name = "force", signal = "random_walk", min = 0.0, max = 100.0 }},
]

[[sinks.punt]]
name = "scorer"
url = "{url}"
subscribe = ["plant/#"]
result_topic = "analytics/press/z"
batch_size = 50
flush_interval = "20ms"
timeout = "{timeout}"
retry_initial = "10ms"
retry_max = "100ms"
breaker = {{ failures = 3, cool_down = "{cool_down}" }}
"""


def config(url: str, *, timeout: str = "5s", cool_down: str = "300ms") -> str:
    return CONFIG.format(url=url, timeout=timeout, cool_down=cool_down)


def expected_scores(sources: list[Record]) -> dict[str, dict[str, float]]:
    """The scorer's results recomputed here: source uid -> fields, in the order it saw them."""
    scorer = Scorer(20)
    return {
        r.id: {f"{k}_z": scorer.z(r.series.topic, k, float(v)) for k, v in r.fields.items()}
        for r in sources
    }


def by_parent(results: list[Record]) -> dict[str, Record]:
    parents = [r.parent for r in results]
    assert None not in parents
    assert len(set(parents)) == len(parents), "a source record was scored twice"
    return {r.parent: r for r in results if r.parent is not None}


async def test_every_record_scored_once_with_parent_topic_time(
    tmp_path: Path, function_server
) -> None:  # type: ignore[no-untyped-def]
    fn = function_server()
    async with punt_run(tmp_path, config(fn.url), "plant/#", "analytics/#") as run:
        await run.until(lambda: len(run.results.records) >= 400)
    sources, results = run.sources.records, run.results.records
    # the drain delivered every source record to the function and published every result
    got = by_parent(results)
    assert set(got) == {r.id for r in sources}
    source_of = {r.id: r for r in sources}
    want = expected_scores(sources)
    for parent, res in got.items():
        src = source_of[parent]
        assert res.series.topic == "analytics/press/z"  # result_topic: the function named none
        assert res.series.measurement == "zscore"
        assert (
            res.series.tag_dict
            == src.series.tag_dict
            == {
                "site": "ulm",
                "line": "L1",
                "device": "press",
            }
        )
        assert res.time_ns == src.time_ns  # the source's time
        assert UUID7.match(res.id) and res.id not in source_of
        assert res.fields == pytest.approx(want[parent])
    assert len({r.id for r in results}) == len(results)
    # results keep the order of their sources
    assert [r.parent for r in results] == [r.id for r in sources]
    m = run.sink_metrics()
    assert m["results_out"] == len(results)
    assert m["records_out"] == len(sources)
    assert m["breaker_state"] == 0 and m["breaker_opened"] == 0
    assert m["invalid_answers"] == m["invalid_results"] == 0


async def test_function_naming_parents_for_its_anomalies_only(
    tmp_path: Path, function_server
) -> None:  # type: ignore[no-untyped-def]
    fn = function_server("--anomalies", "1.5")
    async with punt_run(tmp_path, config(fn.url), "plant/#", "anomalies/#") as run:
        await run.until(lambda: len(run.results.records) >= 20)
    sources, results = run.sources.records, run.results.records
    want = {
        uid: fields
        for uid, fields in expected_scores(sources).items()
        if any(abs(z) >= 1.5 for z in fields.values())
    }
    got = by_parent(results)
    assert set(got) == set(want)
    source_of = {r.id: r for r in sources}
    for parent, res in got.items():
        assert res.series.topic == "anomalies/plant/press"  # the function's topic
        assert res.series.measurement == "anomaly"
        assert res.time_ns == source_of[parent].time_ns + 1  # the function's time
        assert res.fields == pytest.approx(want[parent])
    assert run.sink_metrics()["invalid_results"] == 0


async def outage(run: PuntRun, fn, mode: str) -> None:  # type: ignore[no-untyped-def]
    """Put the function into ``mode`` until the breaker opened and one probe failed, then heal."""
    await run.until(lambda: len(run.results.records) >= 100)
    await fn.set_mode(mode)
    await run.until(lambda: run.sink_metrics()["breaker_probes"] >= 2)
    assert run.sink_metrics()["breaker_state"] != 0
    await fn.set_mode("ok")
    await run.until(lambda: run.sink_metrics()["breaker_state"] == 0)
    healed_at = len(run.results.records)
    await run.until(lambda: len(run.results.records) >= healed_at + 100)


async def check_outage(run: PuntRun, fn, mode: str) -> None:  # type: ignore[no-untyped-def]
    sources, results = run.sources.records, run.results.records
    # nothing lost, nothing scored twice
    assert set(by_parent(results)) == {r.id for r in sources}
    m = run.sink_metrics()
    assert m["breaker_opened"] == 1 and m["breaker_closed"] == 1 and m["breaker_state"] == 0
    assert m["breaker_turned_away"] > 0  # batches waited in the buffer while it was open
    assert m["retries"] >= 3
    assert m["rejected"] == 0
    # the function saw 3 failures, then one request per probe (the last probe succeeded):
    # while the breaker was open nothing else reached it
    stats = await fn.stats()
    assert stats["requests"][mode] == 3 + m["breaker_probes"] - 1
    assert stats["records"] == len(sources)


async def test_function_failing_then_recovering(tmp_path: Path, function_server) -> None:  # type: ignore[no-untyped-def]
    fn = function_server()
    async with punt_run(tmp_path, config(fn.url), "plant/#", "analytics/#") as run:
        await outage(run, fn, "fail")
    await check_outage(run, fn, "fail")


async def test_function_hanging_times_out_and_recovers(tmp_path: Path, function_server) -> None:  # type: ignore[no-untyped-def]
    fn = function_server()
    cfg = config(fn.url, timeout="300ms", cool_down="200ms")
    async with punt_run(tmp_path, cfg, "plant/#", "analytics/#") as run:
        await outage(run, fn, "hang")
    await check_outage(run, fn, "hang")
    assert (await fn.stats())["hanging"] == 0


async def test_garbage_answer_rejects_the_batch_once(
    tmp_path: Path, function_server, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.ERROR, logger="plantbus.broker.outlet")
    fn = function_server()
    async with punt_run(tmp_path, config(fn.url), "plant/#", "analytics/#") as run:
        await run.until(lambda: len(run.results.records) >= 100)
        await fn.set_mode("garbage")
        await run.until(lambda: run.sink_metrics()["invalid_answers"] >= 3)
        await fn.set_mode("ok")
        healed_at = len(run.results.records)
        await run.until(lambda: len(run.results.records) >= healed_at + 100)
    sources, results = run.sources.records, run.results.records
    m = run.sink_metrics()
    stats = await fn.stats()
    # each garbage answer cost one batch, sent once: counted, not retried
    assert m["invalid_answers"] == m["rejected"] == stats["requests"]["garbage"]
    assert m["breaker_opened"] == 0  # the function answered: it is not down
    scored = set(by_parent(results))
    lost = {r.id for r in sources} - scored
    assert len(lost) == m["rejected_records"] > 0
    assert scored <= {r.id for r in sources}
    rejections = [r.getMessage() for r in caplog.records if "rejected batch" in r.getMessage()]
    assert len(rejections) == m["rejected"]
    assert "not a JSON array of records" in rejections[0]
    assert "502 Bad Gateway" in rejections[0]  # the function's own text, shortened
    assert "characters)" in rejections[0] and len(rejections[0]) < 1000
