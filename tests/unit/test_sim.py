"""The ``sim`` device: config validation, signal shapes, timestamps, fixed-rate schedule."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from plantbus.broker.bus import Bus
from plantbus.broker.connector import BuildContext
from plantbus.broker.record import Record
from plantbus.broker.registry import load_device_module
from plantbus.connectors.sim import Config, SimConnector, build
from plantbus.connectors.sim.signals import Counter, Ramp, RandomWalk, Sine, Step

S = 1_000_000_000  # ns per second
T0 = 1_699_999_200 * S  # a whole number of hours: phase 0 of every period used here

CTX = BuildContext(node_name="edge-07", node_tags={"site": "ulm"}, state_dir=Path("/nonexistent"))


def sim_config(**kw: object) -> Config:
    kw.setdefault("name", "sim1")
    kw.setdefault("points", [{"name": "n", "signal": "counter"}])
    return Config.model_validate(kw)


class FakeClock:
    """Monotonic seconds that only move when the code under test sleeps or "works"."""

    def __init__(self, start: float = 1000.0):
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Stop(Exception):
    pass


# -- config ----------------------------------------------------------------------------------


def test_config_full_example_parses() -> None:
    c = sim_config(
        topic="plant/demo/sim1",
        interval="10ms",
        batch=100,
        points=[
            {"name": "n", "signal": "counter"},
            {"name": "temp", "signal": "sine", "min": 20.0, "max": 80.0, "period": "60s"},
            {"name": "level", "signal": "ramp", "min": 0, "max": 10, "period": "5s", "type": "int"},
            {"name": "pos", "signal": "random_walk", "min": -1, "max": 1, "step": 0.1},
            {"name": "on", "signal": "step", "min": 0, "max": 1, "period": "2s", "type": "bool"},
        ],
    )
    assert c.interval == pytest.approx(0.01)
    assert c.batch == 100
    assert c.points[1].period == 60.0


@pytest.mark.parametrize(
    ("point", "message"),
    [
        ({"name": "x", "signal": "sine", "min": 5, "max": 5}, "min (5) must be less than max (5)"),
        ({"name": "x", "signal": "ramp", "min": 9, "max": 1}, "must be less than max"),
        ({"name": "x", "signal": "sine", "period": "0s"}, "period must be longer than 0s"),
        ({"name": "x", "signal": "counter", "period": "1s"}, "period does not apply to signal"),
        ({"name": "x", "signal": "counter", "min": 1}, "min does not apply"),
        ({"name": "x", "signal": "counter", "type": "float"}, 'a counter is always type "int"'),
        ({"name": "x", "signal": "random_walk", "period": "1s"}, "period does not apply"),
        ({"name": "x", "signal": "sine", "step": 1}, "step does not apply to signal 'sine'"),
        ({"name": "x", "signal": "random_walk", "step": 0}, "step (0) must be positive"),
        ({"name": "x", "signal": "step", "min": 0, "max": 1, "step": 2}, "at most max - min (1)"),
        ({"name": "x", "signal": "sawtooth"}, "signal"),
        ({"name": "x", "signal": "sine", "periode": "1s"}, "periode"),
        ({"name": "x", "signal": "sine", "type": "double"}, "type"),
        ({"name": "x\\", "signal": "sine"}, "ends in a backslash"),
        ({"name": "a\nb", "signal": "sine"}, "line break"),
        ({"name": "", "signal": "sine"}, "name"),
        ({"name": "x", "signal": "sine", "max": math.inf}, "finite"),
        ({"name": "x", "signal": "sine", "count": 0}, "count"),
    ],
)
def test_config_point_errors(point: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        sim_config(points=[point])
    assert message in str(exc.value)


def test_config_needs_a_point() -> None:
    with pytest.raises(ValidationError, match="points"):
        sim_config(points=[])


def test_config_batch_positive() -> None:
    with pytest.raises(ValidationError, match="batch"):
        sim_config(batch=0)


def test_config_duplicate_names_after_expansion() -> None:
    with pytest.raises(ValidationError, match="'v1' is used twice"):
        sim_config(
            points=[{"name": "v", "signal": "sine", "count": 3}, {"name": "v1", "signal": "ramp"}]
        )


def test_count_expands_points_with_spread_phases() -> None:
    c = sim_config(points=[{"name": "v", "signal": "sine", "count": 4, "period": "4s"}])
    dev = build(c, CTX)
    assert dev.point_names == ("v0", "v1", "v2", "v3")
    dev._time_ns = lambda: T0  # type: ignore[method-assign]
    (rec,) = dev.read()
    # quarter-period phase steps: mid, max, mid, min
    assert [rec.fields[n] for n in dev.point_names] == pytest.approx([50, 100, 50, 0], abs=1e-9)


# -- signals ---------------------------------------------------------------------------------


def sample(sig: object, times: list[int]) -> list[object]:
    # a list (not a range) takes the generic per-timestamp path
    return sig.values(times)  # type: ignore[attr-defined, no-any-return]


def test_sine_shape_and_bounds() -> None:
    sig = Sine(20.0, 80.0, period=60.0)
    quarter = 15 * S
    assert sample(sig, [T0, T0 + quarter, T0 + 2 * quarter, T0 + 3 * quarter]) == pytest.approx(
        [50.0, 80.0, 50.0, 20.0], abs=1e-9
    )
    vals = sample(sig, [T0 + i * 7_777_777 for i in range(20_000)])
    assert min(vals) >= 20.0 and max(vals) <= 80.0  # type: ignore[operator]
    # periodic: one period later gives the same value
    a, b = sample(sig, [T0 + 1_234_567, T0 + 1_234_567 + 60 * S])
    assert a == pytest.approx(b)


def test_sine_exact_bounds_never_overshoot() -> None:
    # bounds whose midpoint arithmetic rounds: the extremes must still stay inside
    sig = Sine(0.1, 0.7, period=1.0)
    vals = sample(sig, [T0 + i for i in range(0, S, S // 4000)])
    assert min(vals) >= 0.1 and max(vals) <= 0.7  # type: ignore[operator]


def test_ramp_rises_and_restarts() -> None:
    sig = Ramp(0.0, 10.0, period=10.0)
    assert sample(sig, [T0, T0 + 5 * S, T0 + 10 * S - 1, T0 + 10 * S]) == pytest.approx(
        [0.0, 5.0, 10.0, 0.0], abs=1e-6
    )
    vals = sample(sig, [T0 + i * 3_333_333 for i in range(10_000)])
    assert min(vals) >= 0.0 and max(vals) < 10.0  # type: ignore[operator]


def test_step_levels_and_hold() -> None:
    sig = Step(0.0, 3.0, period=2.0, step=1.0)
    vals = sample(sig, [T0 + i * S for i in range(10)])
    # each level held for 2 s, levels 0..3, then back to 0
    assert vals == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 0.0, 0.0]


def test_step_bool_toggles() -> None:
    sig = Step(0, 1, period=1.0, type="bool")
    assert sample(sig, [T0 + i * S + 1 for i in range(4)]) == [False, True, False, True]


def test_typed_values() -> None:
    ints = Ramp(0, 10, period=10.0, type="int").values([T0 + 2_600_000_000])
    assert ints == [3] and type(ints[0]) is int
    bools = Sine(0, 1, period=4.0, type="bool").values([T0 + S, T0 + 3 * S])
    assert bools == [True, False]


def test_random_walk_bounds_steps_and_seed() -> None:
    sig = RandomWalk(-1.0, 1.0, step=0.25, rng=random.Random(7))
    vals = sig.values(range(200_000))
    assert min(vals) >= -1.0 and max(vals) <= 1.0
    prev = 0.0  # starts at the midpoint
    for v in vals:
        assert abs(v - prev) <= 0.25 + 1e-12
        prev = v
    # it really moves around the whole range
    assert min(vals) < -0.9 and max(vals) > 0.9
    again = RandomWalk(-1.0, 1.0, step=0.25, rng=random.Random(7)).values(range(200_000))
    assert again == vals
    # continues from its last position
    assert abs(sig.values(range(1))[0] - vals[-1]) <= 0.25


def test_counter_continues_across_calls() -> None:
    c = Counter()
    assert c.values(range(3)) == [0, 1, 2]
    assert c.values(range(2)) == [3, 4]
    assert c.next == 5


@pytest.mark.parametrize("start_offset", [0, 60 * S - 500, 123_456_789])
def test_fast_phase_path_equals_generic_path(start_offset: int) -> None:
    # a tick given as a range (fast path) must give the same values as the same timestamps
    # as a list, including a tick that straddles a period boundary
    times = range(T0 + start_offset, T0 + start_offset + 1000)
    for make in (
        lambda: Sine(0, 1, period=60.0, phase=0.3),
        lambda: Ramp(0, 1, period=60.0, phase=0.3),
        lambda: Step(0, 4, period=60.0, step=1, phase=0.3),
        lambda: Step(0, 1, period=1e-6),  # a period shorter than the tick
    ):
        assert make().values(times) == make().values(list(times))


# -- connector: records, timestamps, ids ------------------------------------------------------


def test_series_topic_and_tags_from_context() -> None:
    dev = build(sim_config(tags={"line": "L1"}), CTX)
    assert dev.series.topic == "edge-07/sim1"
    assert dev.series.measurement == "sim1"
    assert dev.series.tags == (("device", "sim1"), ("line", "L1"), ("site", "ulm"))
    dev2 = build(sim_config(topic="plant/demo/x", measurement="m"), CTX)
    assert (dev2.series.topic, dev2.series.measurement) == ("plant/demo/x", "m")


def test_invalid_topic_refused() -> None:
    with pytest.raises(ValueError, match="wildcard"):
        build(sim_config(topic="plant/+/x"), CTX)


def test_registry_finds_sim() -> None:
    mod = load_device_module("sim")
    config = mod.Config(name="s", points=[{"name": "n", "signal": "counter"}])
    assert mod.build(config, CTX).name == "s"


def test_batch_records_share_series_with_increasing_times_and_ids() -> None:
    wall = [T0, T0, T0 - 5 * S, T0 + 10]  # the wall clock stalls and steps back
    dev = SimConnector(sim_config(batch=50), CTX, time_ns=lambda: wall.pop(0))
    recs: list[Record] = []
    for _ in range(4):
        recs.extend(dev.read())
    assert len(recs) == 200
    assert all(r.series is dev.series for r in recs)
    times = [r.time_ns for r in recs]
    assert all(b > a for a, b in itertools.pairwise(times))
    assert times[0] == T0 and times[49] == T0 + 49
    assert times[50] == T0 + 50  # never at or before the previous tick's last timestamp
    ids = [r.id for r in recs]
    assert len(set(ids)) == 200 and ids == sorted(ids)
    assert uuid.UUID(ids[0]).version == 7
    assert [r.fields["n"] for r in recs] == list(range(200))


def test_fields_dict_per_record() -> None:
    dev = build(
        sim_config(
            batch=3, points=[{"name": "n", "signal": "counter"}, {"name": "x", "signal": "ramp"}]
        ),
        CTX,
    )
    recs = dev.read()
    assert [list(r.fields) for r in recs] == [["n", "x"]] * 3
    assert len({id(r.fields) for r in recs}) == 3
    recs[0].fields["n"] = -1  # a consumer marking a point must not touch its neighbours
    assert recs[1].fields["n"] == 1


# -- connector: schedule ---------------------------------------------------------------------


async def run_ticks(dev: SimConnector, clock: FakeClock, work: list[float]) -> list[float]:
    """Run ``dev`` for ``len(work)`` ticks; emit i takes ``work[i]`` seconds."""
    at: list[float] = []

    async def emit(records: list[Record]) -> None:
        at.append(clock())
        if len(at) > len(work):
            raise Stop
        clock.now += work[len(at) - 1]

    with pytest.raises(Stop):
        await dev.run(emit)
    return at[: len(work)]


async def test_fixed_rate_without_drift() -> None:
    clock = FakeClock()
    dev = SimConnector(sim_config(interval="100ms"), CTX, clock=clock, sleep=clock.sleep)
    rng = random.Random(1)
    work = [rng.uniform(0.0, 0.09) for _ in range(1000)]
    at = await run_ticks(dev, clock, work)
    # tick k starts at start + k * interval whatever the emit took: no accumulated drift
    for k, t in enumerate(at):
        assert t == pytest.approx(1000.0 + k * 0.1, abs=1e-9)
    assert dev.overruns == 0 and dev.missed == 0
    assert dev.ticks == 1000 and dev.emitted == 1000


async def test_overruns_counted_and_grid_kept() -> None:
    clock = FakeClock()
    dev = SimConnector(sim_config(interval="100ms"), CTX, clock=clock, sleep=clock.sleep)
    work = [0.01, 0.01, 0.25, 0.01, 0.01, 0.15, 0.01, 0.01]
    at = await run_ticks(dev, clock, work)
    rel = [round(t - 1000.0, 6) for t in at]
    # 0.2+0.25 = 0.45: slots 0.3 and 0.4 passed; 0.3 is skipped, 0.4's tick runs at 0.45
    # 0.55+0.15 = 0.70: slot 0.6 passed, runs at once (0.70), then the grid again at 0.8
    assert rel == [0.0, 0.1, 0.2, 0.45, 0.5, 0.6, 0.75, 0.8]
    assert dev.overruns == 2
    assert dev.missed == 1


async def test_zero_interval_runs_flat_out_and_yields() -> None:
    clock = FakeClock()
    dev = SimConnector(sim_config(interval="0s", batch=10), CTX, clock=clock, sleep=clock.sleep)
    at = await run_ticks(dev, clock, [0.0] * 5)
    assert len(at) == 5
    assert clock.sleeps[:5] == [0, 0, 0, 0, 0]
    assert dev.emitted == 50


async def test_restart_continues_counter_and_time() -> None:
    clock = FakeClock()
    dev = SimConnector(sim_config(interval="10ms", batch=4), CTX, clock=clock, sleep=clock.sleep)
    got: list[Record] = []

    async def emit(records: list[Record]) -> None:
        got.extend(records)
        if len(got) % 12 == 0:
            raise RuntimeError("device fault")  # the supervisor would restart run()

    for _ in range(3):
        with pytest.raises(RuntimeError):
            await dev.run(emit)
    assert [r.fields["n"] for r in got] == list(range(36))
    times = [r.time_ns for r in got]
    assert all(b > a for a, b in itertools.pairwise(times))


# -- through a real bus -----------------------------------------------------------------------


async def test_emits_through_bus_to_subscription() -> None:
    bus = Bus()
    sub = bus.subscribe(["plant/#"], size=100_000, name="test")
    other = bus.subscribe(["other/#"], name="other")
    dev = build(
        sim_config(
            topic="plant/demo/sim1",
            interval="1ms",
            batch=25,
            points=[
                {"name": "n", "signal": "counter"},
                {"name": "temp", "signal": "sine", "min": 20, "max": 80, "period": "1s"},
                {"name": "v", "signal": "random_walk", "count": 10},
            ],
        ),
        CTX,
    )
    task = asyncio.create_task(dev.run(bus.publish))
    got: list[Record] = []
    while len(got) < 1000:
        got.extend(await asyncio.wait_for(sub.get(), 5))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [r.fields["n"] for r in got[:1000]] == list(range(1000))
    assert all(r.topic == "plant/demo/sim1" for r in got)
    assert len(got[0].fields) == 12
    assert all(20 <= r.fields["temp"] <= 80 for r in got)  # type: ignore[operator]
    assert len(other) == 0
    assert bus.published >= 1000
