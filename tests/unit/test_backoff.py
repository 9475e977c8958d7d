"""Backoff: capped exponential growth, each jitter strategy's bounds, reset."""

from __future__ import annotations

import random

import pytest

from plantbus.broker.backoff import Backoff


def test_no_jitter_doubles_up_to_the_cap():
    b = Backoff(0.1, 1.0, jitter="none")
    assert [round(b.next(), 6) for _ in range(7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert b.attempts == 7


def test_reset_starts_over():
    b = Backoff(0.5, 10.0, factor=3.0, jitter="none")
    assert [b.next() for _ in range(3)] == [0.5, 1.5, 4.5]
    b.reset()
    assert b.attempts == 0
    assert b.next() == 0.5


@pytest.mark.parametrize("jitter", ["full", "equal", "decorrelated"])
def test_jittered_delays_stay_within_bounds(jitter):
    b = Backoff(0.1, 2.0, jitter=jitter, rng=random.Random(7))
    for attempt in range(200):
        step = min(2.0, 0.1 * 2.0**attempt)
        d = b.next()
        assert 0.0 <= d <= 2.0
        if jitter == "full":
            assert d <= step
        elif jitter == "equal":
            assert step / 2 <= d <= step
        else:
            assert d >= 0.1


@pytest.mark.parametrize("jitter", ["full", "equal", "decorrelated"])
def test_jitter_spreads_clients_that_failed_together(jitter):
    # ten clients at their fifth retry must not all wait the same time
    delays = []
    for seed in range(10):
        b = Backoff(0.1, 30.0, jitter=jitter, rng=random.Random(seed))
        for _ in range(4):
            b.next()
        delays.append(b.next())
    assert len({round(d, 6) for d in delays}) == 10


def test_full_jitter_grows_on_average():
    rng = random.Random(1)
    early = [Backoff(0.1, 60.0, rng=rng).next() for _ in range(500)]
    late = []
    for _ in range(500):
        b = Backoff(0.1, 60.0, rng=rng)
        for _ in range(6):
            b.next()
        late.append(b.next())
    assert sum(late) / 500 > 20 * sum(early) / 500  # 6.4 s vs 0.1 s steps: means 3.2 vs 0.05


def test_long_outages_do_not_overflow():
    b = Backoff(0.1, 30.0, jitter="none")
    for _ in range(5000):
        d = b.next()
    assert d == 30.0


def test_iterates():
    b = Backoff(1.0, 4.0, jitter="none")
    it = iter(b)
    assert [next(it) for _ in range(4)] == [1.0, 2.0, 4.0, 4.0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0.0, 1.0), "initial delay must be positive"),
        ((2.0, 1.0), "below its initial delay"),
        ((0.1, 1.0, 0.5), "factor must be at least 1"),
    ],
)
def test_rejects_bad_parameters(args, message):
    with pytest.raises(ValueError, match=message):
        Backoff(*args)


def test_rejects_unknown_jitter():
    with pytest.raises(ValueError, match="unknown backoff jitter 'wild'"):
        Backoff(0.1, 1.0, jitter="wild")  # type: ignore[arg-type]
