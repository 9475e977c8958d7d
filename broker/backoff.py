"""Capped exponential backoff with jitter, for sink retries and the runtime's supervisor.

Jitter spreads the retries of many clients that failed together (a restarted InfluxDB, a
switch that came back) so they do not return in lock-step. The strategies follow the AWS
Architecture Blog post "Exponential Backoff And Jitter":

* ``full``: ``uniform(0, min(maximum, initial * factor**n))``: the least load on a
  recovering server; a delay may come out close to zero.
* ``equal``: half of the capped exponential plus a random half: never below half the step.
* ``decorrelated``: ``min(maximum, uniform(initial, previous * (factor + 1)))``: grows from
  the previous delay rather than the attempt count, never below ``initial``.
* ``none``: the capped exponential itself (deterministic; for tests and logs).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Literal

__all__ = ["Backoff", "Jitter"]

Jitter = Literal["full", "equal", "decorrelated", "none"]

_JITTERS = ("full", "equal", "decorrelated", "none")


class Backoff:
    """A sequence of retry delays in seconds: ``next()`` for the next wait, ``reset()`` on success.

    Args:
        initial: the first (uncapped, unjittered) delay, in seconds; must be > 0.
        maximum: no delay is longer than this.
        factor: growth per attempt (>= 1).
        jitter: one of ``full``, ``equal``, ``decorrelated``, ``none`` (see the module doc).
        rng: a ``random.Random`` to draw from (seed it for reproducible tests).

    Attributes:
        attempts: delays handed out since the last ``reset()``.
    """

    __slots__ = ("_prev", "_rng", "attempts", "factor", "initial", "jitter", "maximum")

    def __init__(
        self,
        initial: float,
        maximum: float,
        factor: float = 2.0,
        jitter: Jitter = "full",
        *,
        rng: random.Random | None = None,
    ):
        if initial <= 0:
            raise ValueError(f"backoff initial delay must be positive, not {initial}")
        if maximum < initial:
            raise ValueError(f"backoff maximum {maximum} is below its initial delay {initial}")
        if factor < 1:
            raise ValueError(f"backoff factor must be at least 1, not {factor}")
        if jitter not in _JITTERS:
            known = ", ".join(_JITTERS)
            raise ValueError(f"unknown backoff jitter {jitter!r} (use one of {known})")
        self.initial = float(initial)
        self.maximum = float(maximum)
        self.factor = float(factor)
        self.jitter: Jitter = jitter
        self._rng = rng or random.Random()
        self.attempts = 0
        self._prev = self.initial

    def _step(self) -> float:
        # cap the exponent's result rather than the exponent, without overflowing on long outages
        step = self.initial
        for _ in range(self.attempts):
            step *= self.factor
            if step >= self.maximum:
                return self.maximum
        return min(step, self.maximum)

    def next(self) -> float:
        """The delay before the next attempt, in seconds."""
        if self.jitter == "decorrelated":
            upper = min(self.maximum, self._prev * (self.factor + 1.0))
            delay = self._rng.uniform(self.initial, max(upper, self.initial))
            self._prev = delay
        else:
            step = self._step()
            if self.jitter == "full":
                delay = self._rng.uniform(0.0, step)
            elif self.jitter == "equal":
                delay = step / 2 + self._rng.uniform(0.0, step / 2)
            else:
                delay = step
        self.attempts += 1
        return min(delay, self.maximum)

    def reset(self) -> None:
        """Start over from ``initial`` (call after a success)."""
        self.attempts = 0
        self._prev = self.initial

    def __iter__(self) -> Iterator[float]:
        return self

    def __next__(self) -> float:
        return self.next()

    def __repr__(self) -> str:
        return (
            f"Backoff(initial={self.initial}, maximum={self.maximum}, factor={self.factor}, "
            f"jitter={self.jitter!r}, attempts={self.attempts})"
        )
