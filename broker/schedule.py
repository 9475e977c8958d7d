"""The fixed-rate schedule every polling device runs on.

Tick k is due at ``start + k × interval``. A tick that ends after the next one was due is
an *overrun*; the ticks whose time has fully passed are *missed* and the schedule stays on
its grid, rather than bursting to catch up (a PLC polled late is not polled twice as fast
afterwards). An interval of 0 or less means "as fast as possible": never late, never
counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["FixedRate", "PolledCounters"]


class FixedRate:
    """A fixed-rate schedule with its overrun counters (which survive ``restart``).

    Args:
        interval: seconds between ticks (``<= 0``: flat out).
        clock: monotonic seconds (tests inject a fake one).

    Attributes:
        overruns: ticks that ended after the next one was due.
        missed: ticks skipped because of overruns.
    """

    __slots__ = ("_clock", "_k", "_start", "interval", "missed", "overruns")

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic):
        self.interval = float(interval)
        self._clock = clock
        self.overruns = 0
        self.missed = 0
        self.restart()

    def restart(self) -> None:
        """Start the grid now (a new connection); the counters go on."""
        self._start = self._clock()
        self._k = 0

    def next_pause(self) -> float | None:
        """After a tick: the seconds until the next one is due, or None when it is overdue.

        An overdue tick is counted (``overruns``, ``missed``) and should run at once, after
        yielding to the event loop so that the rest of it runs even when a device is behind.
        """
        interval = self.interval
        if interval <= 0:
            return 0.0
        self._k += 1
        late = self._clock() - (self._start + self._k * interval)
        if late <= 0:
            return -late
        skip = int(late // interval)
        self.overruns += 1
        self.missed += skip
        self._k += skip
        return None


class PolledCounters:
    """``overruns`` and ``missed`` of a device polled on its ``_ticks`` schedule."""

    _ticks: FixedRate

    @property
    def overruns(self) -> int:
        """Polls that ended after the next one was due."""
        return self._ticks.overruns

    @property
    def missed(self) -> int:
        """Polls skipped because of overruns."""
        return self._ticks.missed
