"""A circuit breaker: stop calling an upstream that keeps failing, probe it after a cool-down.

States::

    closed --(``failures`` consecutive failures)--> open --(``cool_down`` passed)--> half-open
    half-open --(the one probe succeeds)--> closed      half-open --(it fails)--> open again

While open, ``admit`` turns requests away with the seconds left of the cool-down, so the caller
(a sink) raises ``RetryableSinkError`` with that ``retry_after`` and the batch waits in the
outlet's buffer instead of reaching the upstream. In half-open exactly one request (the probe)
goes through; the others wait for its outcome. Pure state and a clock: no I/O, no tasks.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(enum.IntEnum):
    """The breaker's state; the number is what metrics show."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    """Counts consecutive failures and decides whether a request may go to the upstream.

    Args:
        failures: consecutive failures that open the breaker (at least 1).
        cool_down: seconds the breaker stays open before it lets one probe through.
        clock: monotonic seconds (tests pass their own).

    Attributes:
        state: the current ``BreakerState``.
        consecutive_failures: failures since the last success.
        opened: times the breaker opened (from closed; a failed probe re-opening not counted).
        closed: times a successful probe closed it again.
        probes: requests let through in half-open.
        turned_away: requests refused without reaching the upstream.
    """

    def __init__(
        self,
        failures: int,
        cool_down: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        if failures < 1:
            raise ValueError("a breaker opens after at least 1 failure")
        self.failures = failures
        self.cool_down = cool_down
        self._clock = clock
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.opened = 0
        self.closed = 0
        self.probes = 0
        self.turned_away = 0

    def admit(self) -> float | None:
        """Whether a request may go now.

        Returns:
            ``None``: send it (in half-open it is the probe; report its outcome). Else the
            seconds to wait: what is left of the cool-down, or ``0.0`` while another request
            is probing (wait by the caller's own backoff).
        """
        if self.state is BreakerState.CLOSED:
            return None
        if self.state is BreakerState.OPEN:
            left = self._opened_at + self.cool_down - self._clock()
            if left > 0:
                self.turned_away += 1
                return left
            self.state = BreakerState.HALF_OPEN
        if self._probing:
            self.turned_away += 1
            return 0.0
        self._probing = True
        self.probes += 1
        return None

    def success(self) -> None:
        """The upstream answered: close the breaker."""
        if self.state is not BreakerState.CLOSED:
            self.closed += 1
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self._probing = False

    def failure(self) -> None:
        """A request failed (connection, timeout, 5xx): count it; open at the threshold."""
        self.consecutive_failures += 1
        if self.state is BreakerState.CLOSED:
            if self.consecutive_failures >= self.failures:
                self.opened += 1
                self._open()
        elif self._probing or self.state is BreakerState.HALF_OPEN:
            self._open()
        # a request sent before the breaker opened and failing now leaves it open as it is

    def _open(self) -> None:
        self.state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._probing = False

    def metrics(self) -> dict[str, int]:
        return {
            "breaker_state": int(self.state),
            "breaker_consecutive_failures": self.consecutive_failures,
            "breaker_opened": self.opened,
            "breaker_closed": self.closed,
            "breaker_probes": self.probes,
            "breaker_turned_away": self.turned_away,
        }
