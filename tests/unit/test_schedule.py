"""The fixed-rate schedule of every polling device (sim, modbus, s7, opcua)."""

from __future__ import annotations

import pytest

from plantbus.broker.schedule import FixedRate


class Clock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_schedule_stays_on_its_grid() -> None:
    clock = Clock()
    ticks = FixedRate(0.1, clock)
    clock.now = 100.03  # the first tick took 30 ms: sleep until 100.1
    assert ticks.next_pause() == pytest.approx(0.07)
    clock.now = 100.15  # the second tick ended 50 ms late (due at 100.2: on time)
    assert ticks.next_pause() == pytest.approx(0.05)
    # the third ends at 100.55, due at 100.3: an overrun, two ticks skipped
    clock.now = 100.55
    assert ticks.next_pause() is None
    assert (ticks.overruns, ticks.missed) == (1, 2)
    # the grid is kept: the next tick is due at 100.6, not 100.55 + 0.1
    assert ticks.next_pause() == pytest.approx(0.05)


def test_restart_starts_a_new_grid_and_keeps_the_counters() -> None:
    clock = Clock()
    ticks = FixedRate(1.0, clock)
    clock.now = 105.5
    assert ticks.next_pause() is None and (ticks.overruns, ticks.missed) == (1, 4)
    clock.now = 200.0  # a new connection
    ticks.restart()
    clock.now = 200.25
    assert ticks.next_pause() == pytest.approx(0.75)
    assert (ticks.overruns, ticks.missed) == (1, 4)


def test_no_interval_is_flat_out_and_never_late() -> None:
    clock = Clock()
    ticks = FixedRate(0, clock)
    clock.now = 1e6
    assert ticks.next_pause() == 0.0
    assert (ticks.overruns, ticks.missed) == (0, 0)
