"""Pure signal generators for the ``sim`` device: one column of values per tick.

Each generator turns the timestamps of one tick's records (Unix ns, strictly increasing)
into one value per record. Generators work on whole columns rather than single values so
that a tick of ``batch`` records costs one Python call per point, not one per point and
record.

* time-based signals (``sine``, ``ramp``, ``step``) are functions of the record's own
  timestamp, so their shape is right at any interval or batch size and a restarted device
  continues the same curve;
* sample-based signals (``counter``, ``random_walk``) advance once per record and keep
  their state on the generator object, so a device restarted by the supervisor continues
  where it stopped.

Time arithmetic is done in integer nanoseconds: a Unix ns timestamp (about 2**61) held in
a float would lose everything below ~256 ns and, worse, phase precision at short periods.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Literal

__all__ = ["Counter", "Ramp", "RandomWalk", "Signal", "Sine", "Step", "ValueType"]

ValueType = Literal["float", "int", "bool"]

_TWO_PI = 2.0 * math.pi


class Signal:
    """Base of all generators: bounds, value type and the float → type conversion.

    Attributes:
        low / high: the closed range every value stays in (before the type conversion).
        type: ``float`` as generated, ``int`` rounded to the nearest integer, ``bool``
            true in the upper half of the range (``value >= (low + high) / 2``).
    """

    __slots__ = ("_mid", "high", "low", "type")

    def __init__(self, low: float, high: float, type: ValueType = "float"):
        if not low < high:
            raise ValueError(f"min ({low}) must be less than max ({high})")
        if type not in ("float", "int", "bool"):
            raise ValueError(f"type must be float, int or bool, not {type!r}")
        self.low = float(low)
        self.high = float(high)
        self.type = type
        self._mid = (self.low + self.high) / 2.0

    def values(self, times: Sequence[int]) -> list[float] | list[int] | list[bool]:
        """One value per timestamp in ``times`` (Unix ns, increasing), in the point's type."""
        col = self._floats(times)
        if self.type == "float":
            return col
        if self.type == "int":
            return [round(v) for v in col]
        mid = self._mid
        return [v >= mid for v in col]

    def _floats(self, times: Sequence[int]) -> list[float]:
        raise NotImplementedError  # every concrete signal overrides it


def _phase_run(times: Sequence[int], off: int, pns: int) -> range | None:
    """The phases ``(t + off) % pns`` of a tick as a range, when that is exact.

    A tick's timestamps are consecutive nanoseconds (a ``range``); unless the tick straddles
    a period boundary their phases are consecutive too, and a range of small ints spares
    a big-int add and modulo per record (the sine costs 0.08 instead of 0.13 µs).
    """
    if isinstance(times, range) and times.step == 1 and len(times):
        first = (times.start + off) % pns
        if first + len(times) <= pns:
            return range(first, first + len(times))
    return None


def _period_ns(period: float) -> int:
    if not period > 0:
        raise ValueError(f"period must be positive, not {period}")
    return max(1, round(period * 1e9))


class Sine(Signal):
    """``low + (high - low) * (1 + sin(2π (t / period + phase))) / 2``.

    Args:
        low / high: the range; the curve starts (phase 0) at the midpoint, rising.
        period: seconds per full wave.
        phase: fraction of a period (0 ≤ phase < 1) to shift the wave by, so that points
            generated together (``count``) do not all carry the same value.
    """

    __slots__ = ("_amp", "_off", "_pns", "_w")

    def __init__(
        self, low: float, high: float, period: float, phase: float = 0.0, type: ValueType = "float"
    ):
        super().__init__(low, high, type)
        self._pns = _period_ns(period)
        self._off = round((phase % 1.0) * self._pns)
        self._w = _TWO_PI / self._pns
        # mid + amp can round past a bound by one ulp; shrink amp until both extremes are
        # inside, and monotonic float rounding keeps every mid + amp * sin(x) inside too
        amp = (self.high - self.low) / 2.0
        while self._mid + amp > self.high or self._mid - amp < self.low:
            amp = math.nextafter(amp, 0.0)
        self._amp = amp

    def _floats(self, times: Sequence[int]) -> list[float]:
        pns, off, w, mid, amp, sin = self._pns, self._off, self._w, self._mid, self._amp, math.sin
        run = _phase_run(times, off, pns)
        if run is not None:
            return [mid + amp * sin(x * w) for x in run]
        return [mid + amp * sin(((t + off) % pns) * w) for t in times]


class Ramp(Signal):
    """Sawtooth: rises linearly from ``low`` towards ``high`` over ``period``, then restarts."""

    __slots__ = ("_off", "_pns", "_scale")

    def __init__(
        self, low: float, high: float, period: float, phase: float = 0.0, type: ValueType = "float"
    ):
        super().__init__(low, high, type)
        self._pns = _period_ns(period)
        self._off = round((phase % 1.0) * self._pns)
        self._scale = (self.high - self.low) / self._pns

    def _floats(self, times: Sequence[int]) -> list[float]:
        pns, off, scale, low = self._pns, self._off, self._scale, self.low
        run = _phase_run(times, off, pns)
        if run is not None:
            return [low + x * scale for x in run]
        return [low + ((t + off) % pns) * scale for t in times]


class Step(Signal):
    """Staircase: holds each level for ``period``, levels ``low, low + step, …`` up to
    ``high``, then starts again at ``low``.

    With the default ``step = high - low`` it is a square wave between the two bounds;
    with ``type = "bool"`` and bounds 0 and 1 it toggles false/true every period.
    """

    __slots__ = ("_levels", "_off", "_pns", "step")

    def __init__(
        self,
        low: float,
        high: float,
        period: float,
        step: float | None = None,
        phase: float = 0.0,
        type: ValueType = "float",
    ):
        super().__init__(low, high, type)
        span = self.high - self.low
        step = span if step is None else float(step)
        if not 0 < step <= span:
            raise ValueError(f"step ({step}) must be positive and at most max - min ({span})")
        self.step = step
        self._pns = _period_ns(period)
        # the 1e-9 keeps a step that divides the span exactly (up to float error) on max
        n = int(span / step + 1e-9) + 1
        self._levels = [self.low + i * step for i in range(n)]
        self._off = round((phase % 1.0) * self._pns * n)

    def _floats(self, times: Sequence[int]) -> list[float]:
        pns, off, levels = self._pns, self._off, self._levels
        n = len(levels)
        if _phase_run(times, off, pns) is not None:
            # the whole tick lies within one level
            return [levels[((times[0] + off) // pns) % n]] * len(times)
        return [levels[((t + off) // pns) % n] for t in times]


class RandomWalk(Signal):
    """Each record moves by a uniform random amount in ``[-step, +step]``, reflected at the
    bounds. Starts at the midpoint; the position survives restarts of the device.

    Args:
        step: the largest move per record; default one hundredth of the range.
        rng: the random source (inject a seeded ``random.Random`` for reproducible runs).
    """

    __slots__ = ("_rng", "step", "value")

    def __init__(
        self,
        low: float,
        high: float,
        step: float | None = None,
        rng: random.Random | None = None,
        type: ValueType = "float",
    ):
        super().__init__(low, high, type)
        span = self.high - self.low
        step = span / 100.0 if step is None else float(step)
        if not 0 < step <= span:
            raise ValueError(f"step ({step}) must be positive and at most max - min ({span})")
        self.step = step
        self._rng = rng or random.Random()
        self.value = self._mid

    def _floats(self, times: Sequence[int]) -> list[float]:
        rnd, width, step = self._rng.random, 2.0 * self.step, self.step
        low, high = self.low, self.high
        v = self.value
        out: list[float] = []
        append = out.append
        for _ in range(len(times)):
            v += rnd() * width - step
            # one reflection is enough because step <= high - low
            if v > high:
                v = high - (v - high)
            elif v < low:
                v = low + (low - v)
            append(v)
        self.value = v
        return out


class Counter:
    """0, 1, 2, … one per record, across ticks and restarts (the next value is ``next``).

    A counter point lets a test prove that no record went missing or came twice on the
    way to a sink: the stored values must be exactly ``0 … n-1``.
    """

    __slots__ = ("next", "type")

    def __init__(self, start: int = 0):
        self.next = start
        self.type: ValueType = "int"

    def values(self, times: Sequence[int]) -> list[int]:
        n = self.next
        self.next = n + len(times)
        return list(range(n, n + len(times)))
