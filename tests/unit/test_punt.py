"""The punt sink's parts that need no server: its config, the circuit breaker, results as Records.

The sink against a real function process is in tests/integration/punt/.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from plantbus.broker.config import check_config
from plantbus.broker.connector import BuildContext
from plantbus.broker.record import Quality, Record, Series
from plantbus.broker.sinks import punt
from plantbus.broker.sinks.breaker import BreakerState, CircuitBreaker
from plantbus.codecs import json as json_codec

# -- config -------------------------------------------------------------------------------------

PUNT = """
[[sinks.punt]]
url = "{url}"
subscribe = ["plant/#"]
result_topic = "{result_topic}"
{extra}
"""


def check(
    tmp_path: Path,
    url: str = "http://127.0.0.1:9/score",
    result_topic: str = "z/x",
    extra: str = "",
) -> list[str]:
    main = tmp_path / "plantbus.toml"
    main.write_text(PUNT.format(url=url, result_topic=result_topic, extra=extra))
    return check_config(main)


def test_valid_config_with_documented_defaults(tmp_path: Path) -> None:
    assert check(tmp_path) == []
    cfg = punt.Config(url="http://f/score", result_topic="z/x", subscribe=["plant/#"])
    assert (cfg.codec, cfg.batch_size, cfg.flush_interval, cfg.timeout) == ("json", 1000, 0.1, 5.0)
    assert (cfg.breaker.failures, cfg.breaker.cool_down, cfg.max_in_flight) == (5, 10.0, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"result_topic": "plant/scores"},
            "plantbus.toml: sinks.punt[0].result_topic: 'plant/scores' matches subscribe filter "
            "'plant/#': results would be sent to the function again",
        ),
        (
            {"result_topic": "z/+"},
            "plantbus.toml: sinks.punt[0].result_topic: topic 'z/+' holds a wildcard (+ or #); "
            "only filters may",
        ),
        (
            {"url": "ftp://f/score"},
            "plantbus.toml: sinks.punt[0].url: 'ftp://f/score': expected http://… or https://…",
        ),
        (
            {"extra": 'codec = "line_protocol"'},
            "plantbus.toml: sinks.punt[0].codec: must be 'json', not the string 'line_protocol'",
        ),
        (
            {"extra": "max_in_flight = 17"},
            "plantbus.toml: sinks.punt[0].max_in_flight: this sink kind takes at most 16 batches "
            "in flight",
        ),
        (
            {"extra": 'breaker = { failures = 3, cooldown = "1s" }'},
            "plantbus.toml: sinks.punt[0].breaker.cooldown: unknown key "
            "(did you mean 'cool_down'?)",
        ),
        (
            {"extra": "tls = { verify = false }"},
            "plantbus.toml: sinks.punt[0]: tls is set but the url is not https://",
        ),
    ],
)
def test_bad_config_names_file_and_key(
    tmp_path: Path, kwargs: dict[str, str], message: str
) -> None:
    assert check(tmp_path, **kwargs) == [message]


def test_default_subscription_would_feed_results_back(tmp_path: Path) -> None:
    main = tmp_path / "plantbus.toml"
    main.write_text('[[sinks.punt]]\nurl = "http://f/score"\nresult_topic = "z/x"\n')
    assert check_config(main) == [
        "plantbus.toml: sinks.punt[0].result_topic: 'z/x' matches subscribe filter '#': results "
        "would be sent to the function again"
    ]


def test_build_needs_the_bus() -> None:
    cfg = punt.Config(url="http://f/score", result_topic="z/x", subscribe=["plant/#"])
    ctx = BuildContext(node_name="n", node_tags={}, state_dir=Path("."))
    with pytest.raises(ValueError, match="publishes results on the bus"):
        punt.build(cfg, ctx)

    async def publish(records: list[Record]) -> None:
        pass

    sink = punt.build(cfg, BuildContext("n", {}, Path("."), extra={"publish": publish}))
    assert sink.codec == "json" and sink.metrics()["breaker_state"] == 0


# -- circuit breaker ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_only() -> None:
    b = CircuitBreaker(3, 10.0, Clock())
    for _ in range(2):
        assert b.admit() is None
        b.failure()
    b.success()  # a success in between starts the count again
    for _ in range(2):
        b.failure()
    assert b.state is BreakerState.CLOSED and b.admit() is None
    b.failure()
    assert b.state is BreakerState.OPEN
    assert b.metrics()["breaker_opened"] == 1


def test_breaker_turns_away_while_open_then_lets_one_probe_through() -> None:
    clock = Clock()
    b = CircuitBreaker(1, 10.0, clock)
    b.failure()
    assert b.admit() == pytest.approx(10.0)
    clock.now += 4
    assert b.admit() == pytest.approx(6.0)
    clock.now += 6
    assert b.admit() is None  # the probe
    assert b.state is BreakerState.HALF_OPEN
    assert b.admit() == 0.0  # the others wait for the probe's outcome
    b.failure()  # the probe failed: open again, a full cool-down
    assert b.state is BreakerState.OPEN and b.admit() == pytest.approx(10.0)
    clock.now += 10
    assert b.admit() is None
    b.success()
    assert b.state is BreakerState.CLOSED and b.admit() is None
    assert b.metrics() == {
        "breaker_state": 0,
        "breaker_consecutive_failures": 0,
        "breaker_opened": 1,
        "breaker_closed": 1,
        "breaker_probes": 2,
        "breaker_turned_away": 4,
    }


def test_breaker_needs_a_threshold() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        CircuitBreaker(0, 1.0)


# -- results as records -------------------------------------------------------------------------


def test_to_record_fills_in_what_the_result_leaves_out() -> None:
    cache = json_codec.SeriesCache()
    (doc,) = json_codec.decode(b'[{"fields": {"z": 1.5}}]')
    rec = json_codec.to_record(
        doc, topic="an/press/z", time_ns=123, uid="u1", parent="p1", series=cache
    )
    assert (rec.series.topic, rec.series.measurement, rec.series.tags) == ("an/press/z", "z", ())
    assert (rec.fields, rec.time_ns, rec.id, rec.parent, rec.quality) == (
        {"z": 1.5},
        123,
        "u1",
        "p1",
        Quality.GOOD,
    )
    again = json_codec.to_record(doc, topic="an/press/z", time_ns=1, uid="u2", series=cache)
    assert again.series is rec.series and len(cache) == 1  # one Series per stream


def test_to_record_keeps_what_the_result_says() -> None:
    (doc,) = json_codec.decode(
        b'{"uid": "u9", "topic": "a/b", "measurement": "m", "time": 5, "parent": "p9",'
        b' "tags": {"k": "v"}, "fields": {"x": 1, "y": 2.0, "s": "t"}, "quality": "good",'
        b' "status": {"x": 2155085824, "y": 1083441152}}'
    )
    rec = json_codec.to_record(doc, topic="other", time_ns=1, uid="u1", parent="p1")
    assert rec.series == Series("a/b", "m", {"k": "v"})
    assert (rec.time_ns, rec.id, rec.parent) == (5, "u9", "p9")
    # x's status is Bad (0x80740000): its value is dropped; y's is Uncertain: kept
    assert rec.fields == {"y": 2.0, "s": "t"}
    assert rec.quality is Quality.BAD
    assert rec.status == {"x": 0x80740000, "y": 0x40940000}


def test_to_record_refuses_a_topic_nobody_can_publish_to() -> None:
    (doc,) = json_codec.decode(b'{"topic": "a/#", "fields": {}}')
    with pytest.raises(json_codec.DecodeError, match="wildcard"):
        json_codec.to_record(doc, topic="x", time_ns=1, uid="u")


def test_parent_travels_in_the_json_record() -> None:
    series = Series("an/z", "zscore", {"device": "press"})
    good = Record(series, {"z": 0.5}, 7, "u1", parent="p1")
    flagged = Record(series, {"z": 0.5}, 8, "u2", Quality.UNCERTAIN, {"z": 0x40940000}, "p2")
    plain = Record(series, {"z": 0.5}, 9, "u3")
    docs = json_codec.decode(json_codec.encode([good, flagged, plain]))
    assert [d.get("parent") for d in docs] == ["p1", "p2", None]
    assert json_codec.record_to_dict(good)["parent"] == "p1"
    assert "parent" not in json_codec.record_to_dict(plain)
