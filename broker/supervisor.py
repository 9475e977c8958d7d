"""Supervision of long-running components: log a fault, back off, restart.

Every device connector and every outlet runs under its own ``Supervisor``. A component is
an ``async`` callable that runs until it is cancelled (a connector's ``run(emit)``) or until
it has finished its work (an outlet's ``run()`` returns after ``stop()``). When it raises,
the supervisor logs one line naming the component and the error (the traceback goes to
debug level, so a flapping PLC does not flood the journal), waits a jittered exponential
backoff and calls it again. A component that keeps failing the same way (a PLC that is
switched off) does not flood the journal either: the first fault of a streak is an error
line, a different fault is another, the repeats go to debug level with a warning reminder
every ``remind_every`` seconds (5 minutes), and one info line says when it has run fault-free
for ``healthy_after`` seconds again. Faults stay inside the supervisor: one PLC's fault never
cancels another device or a sink. Cancelling the supervisor's task stops the component
cleanly, including while it is backing off.

The supervisor keeps a small ``ComponentStatus`` (phase, restarts, last error) that the
runtime's metrics and the demo view read.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "DEFAULT_HEALTHY_AFTER",
    "ComponentStatus",
    "Phase",
    "RetryPolicy",
    "Supervisor",
]

log = logging.getLogger("plantbus.supervisor")

DEFAULT_HEALTHY_AFTER = 30.0
"""Seconds a component must run without a fault before its backoff starts over.

A component that faults more often than this is flapping, and its restarts keep
slowing down up to the cap instead of hammering the device every half second.
"""


DEFAULT_REMIND_EVERY = 300.0
"""Seconds between the reminder lines of a component that keeps failing the same way."""

_NUMBERS = re.compile(r"\d+(?:\.\d+)?")


def _fault_key(text: str) -> str:
    # numbers ("after 3 attempts", a port) and a "; detail" tail ("; next attempt in 0.4s")
    # vary from fault to fault; the fault itself does not
    return _NUMBERS.sub("#", text.split(";", 1)[0])


class RetryPolicy(Protocol):
    """The backoff a supervisor asks for the next delay (``plantbus.broker.backoff.Backoff``)."""

    def next(self) -> float: ...

    def reset(self) -> None: ...


class Phase(enum.StrEnum):
    """Where a supervised component is in its life."""

    STARTING = "starting"
    RUNNING = "running"
    BACKING_OFF = "backing_off"
    FINISHED = "finished"  # returned on its own; not restarted
    STOPPED = "stopped"  # cancelled


@dataclass(slots=True)
class ComponentStatus:
    """What a supervisor knows about its component, for metrics and the demo view.

    Attributes:
        name: the component's name (device or outlet name).
        kind: ``"device"`` or ``"outlet"``.
        phase: current phase.
        restarts: how often it was restarted after a fault.
        last_error: ``"ExceptionType: message"`` of the latest fault, or None.
        last_error_at: wall-clock time (Unix seconds) of the latest fault.
        retry_in: the backoff delay being waited, while backing off.
        since: monotonic time the current phase began.
    """

    name: str
    kind: str
    phase: Phase = Phase.STARTING
    restarts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    retry_in: float | None = None
    since: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "state": self.phase.value,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "retry_in": self.retry_in,
        }


def describe_error(exc: BaseException) -> str:
    """``"Type: message"`` in one line, or just the type when the message is empty."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Supervisor:
    """Run ``target`` and restart it with backoff whenever it raises.

    Args:
        name: the component's name, used in every log line.
        target: called with no arguments for each attempt; returns the awaitable to run.
        backoff: gives the delay before each restart; reset after a healthy run.
        kind: ``"device"`` or ``"outlet"``, for logs and metrics.
        healthy_after: seconds of fault-free running after which the backoff starts over.
        sleep: how to wait out a delay (tests pass a fake to avoid real sleeps).
        clock: monotonic clock, seconds.
        on_change: called with the status after every phase change (metrics, tests).
        returns: the component is expected to return when its work is done (an outlet
            after ``stop()``); otherwise a return is unusual and logged as a warning.
        logger: where the one-line fault reports go.
        remind_every: seconds between reminder lines while the same fault repeats.
    """

    def __init__(
        self,
        name: str,
        target: Callable[[], Awaitable[None]],
        backoff: RetryPolicy,
        *,
        kind: str = "device",
        healthy_after: float = DEFAULT_HEALTHY_AFTER,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[ComponentStatus], None] | None = None,
        returns: bool = False,
        logger: logging.Logger = log,
        remind_every: float = DEFAULT_REMIND_EVERY,
    ):
        self.name = name
        self._target = target
        self._backoff = backoff
        self._healthy_after = healthy_after
        self._sleep = sleep
        self._clock = clock
        self._on_change = on_change
        self._returns = returns
        self._log = logger
        self._remind_every = remind_every
        self.status = ComponentStatus(name=name, kind=kind, since=clock())
        # the current streak of faults: how many, the fault's key, when it was last reported
        self._streak = 0
        self._streak_key = ""
        self._reported_at = 0.0
        self._recovered: asyncio.TimerHandle | None = None

    def _enter(self, phase: Phase, retry_in: float | None = None) -> None:
        self.status.phase = phase
        self.status.since = self._clock()
        self.status.retry_in = retry_in
        if self._on_change is not None:
            self._on_change(self.status)

    async def run(self) -> None:
        """Run the component until it finishes or this coroutine is cancelled.

        Never raises for a fault of the component (only ``CancelledError`` propagates,
        and non-``Exception`` errors such as ``KeyboardInterrupt``).
        """
        kind = self.status.kind
        try:
            while True:
                started = self._clock()
                self._enter(Phase.RUNNING)
                self._watch_recovery()
                try:
                    await self._target()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._cancel_recovery()
                    if self._clock() - started >= self._healthy_after:
                        self._backoff.reset()
                        self._streak = 0
                    delay = self._backoff.next()
                    self.status.restarts += 1
                    self.status.last_error = describe_error(exc)
                    self.status.last_error_at = time.time()
                    self._report(self.status.last_error, delay)
                    self._log.debug("%s %s traceback", kind, self.name, exc_info=exc)
                    self._enter(Phase.BACKING_OFF, retry_in=delay)
                    await self._sleep(delay)
                    continue
                if self._returns:
                    self._log.debug("%s %s finished", kind, self.name)
                else:
                    self._log.warning("%s %s returned; not restarted", kind, self.name)
                self._enter(Phase.FINISHED)
                return
        except asyncio.CancelledError:
            self._cancel_recovery()
            self._enter(Phase.STOPPED)
            raise
        finally:
            self._cancel_recovery()

    def _report(self, error: str, delay: float) -> None:
        """One line per change of state; repeats of the same fault go to debug level."""
        kind = self.status.kind
        key = _fault_key(error)
        now = self._clock()
        self._streak += 1
        if self._streak == 1 or key != self._streak_key:
            self._streak_key = key
            self._reported_at = now
            self._log.error(
                "%s %s failed: %s; restart %d in %.1fs",
                kind,
                self.name,
                error,
                self.status.restarts,
                delay,
            )
        elif now - self._reported_at >= self._remind_every:
            self._reported_at = now
            self._log.warning(
                "%s %s still failing: %s (%d faults in a row); restart %d in %.1fs",
                kind,
                self.name,
                error,
                self._streak,
                self.status.restarts,
                delay,
            )
        else:
            self._log.debug(
                "%s %s failed again: %s; restart %d in %.1fs",
                kind,
                self.name,
                error,
                self.status.restarts,
                delay,
            )

    def _watch_recovery(self) -> None:
        # after a streak of faults, say once when the component has run fault-free long enough
        if self._streak == 0:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._recovered = loop.call_later(self._healthy_after, self._on_recovered)

    def _cancel_recovery(self) -> None:
        if self._recovered is not None:
            self._recovered.cancel()
            self._recovered = None

    def _on_recovered(self) -> None:
        self._recovered = None
        if self.status.phase is Phase.RUNNING and self._streak:
            self._log.info(
                "%s %s running again (fault-free for %gs after %d faults)",
                self.status.kind,
                self.name,
                self._healthy_after,
                self._streak,
            )
            self._streak = 0
