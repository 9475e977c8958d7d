"""Supervisor: restart with backoff on faults, isolation between components, clean cancel."""

from __future__ import annotations

import asyncio
import logging

import pytest

from plantbus.broker.supervisor import ComponentStatus, Phase, Supervisor


class FakeBackoff:
    """Deterministic backoff: doubles from 1 up to 8, records resets."""

    def __init__(self) -> None:
        self.delay = 1.0
        self.resets = 0
        self.given: list[float] = []

    def next(self) -> float:
        d = self.delay
        self.delay = min(self.delay * 2, 8.0)
        self.given.append(d)
        return d

    def reset(self) -> None:
        self.delay = 1.0
        self.resets += 1


class FakeSleep:
    """Records the delays asked for and returns at once (yielding to the loop)."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


class Recorder:
    """on_change listener: keeps the phases seen and wakes waiters on a condition."""

    def __init__(self) -> None:
        self.phases: list[Phase] = []
        self.changed = asyncio.Event()

    def __call__(self, status: ComponentStatus) -> None:
        self.phases.append(status.phase)
        self.changed.set()

    async def wait_for(self, predicate, limit: float = 5.0) -> None:  # type: ignore[no-untyped-def]
        async with asyncio.timeout(limit):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


async def test_fault_is_restarted_with_backoff_while_another_keeps_running(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="plantbus.supervisor")
    attempts = 0

    async def flaky() -> None:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0)
        raise ConnectionError(f"PLC unreachable (attempt {attempts})")

    emitted: list[int] = []
    healthy_progress = asyncio.Event()

    async def healthy() -> None:
        n = 0
        while True:
            emitted.append(n)
            n += 1
            healthy_progress.set()
            await asyncio.sleep(0)

    backoff = FakeBackoff()
    sleep = FakeSleep()
    rec = Recorder()
    bad = Supervisor("press7", flaky, backoff, sleep=sleep, on_change=rec)
    good = Supervisor("sim1", healthy, FakeBackoff(), sleep=FakeSleep())

    async with asyncio.TaskGroup() as tg:
        t_bad = tg.create_task(bad.run(), name="device:press7")
        t_good = tg.create_task(good.run(), name="device:sim1")
        await rec.wait_for(lambda: bad.status.restarts >= 5)
        before = len(emitted)
        healthy_progress.clear()
        await asyncio.wait_for(healthy_progress.wait(), 5)
        assert len(emitted) > before, "the healthy device stopped while the other one faulted"
        assert not t_good.done()
        t_bad.cancel()
        t_good.cancel()

    assert bad.status.restarts >= 5
    assert attempts == bad.status.restarts or attempts == bad.status.restarts + 1
    # jittered exponential backoff, capped: the supervisor sleeps exactly what backoff gave
    assert sleep.delays[:5] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert sleep.delays == backoff.given[: len(sleep.delays)]
    assert backoff.resets == 0  # it never ran healthy for long
    assert bad.status.last_error is not None
    assert bad.status.last_error.startswith("ConnectionError: PLC unreachable")
    assert bad.status.phase is Phase.STOPPED
    assert good.status.phase is Phase.STOPPED and good.status.restarts == 0
    assert Phase.BACKING_OFF in rec.phases

    # one ERROR line per fault, naming the device and the error; traceback only at DEBUG
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and all("device press7 failed: ConnectionError" in r.getMessage() for r in errors)
    assert all(r.exc_info is None for r in errors)
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)


async def test_backoff_resets_after_a_healthy_run() -> None:
    now = 0.0
    runs = 0

    def clock() -> float:
        return now

    async def crashes_after_a_while() -> None:
        nonlocal now, runs
        runs += 1
        # the 3rd run is healthy for a minute before it faults
        now += 60.0 if runs == 3 else 0.1
        await asyncio.sleep(0)
        raise OSError("link down")

    backoff = FakeBackoff()
    sleep = FakeSleep()
    rec = Recorder()
    sup = Supervisor(
        "s7",
        crashes_after_a_while,
        backoff,
        sleep=sleep,
        clock=clock,
        healthy_after=30.0,
        on_change=rec,
    )
    task = asyncio.create_task(sup.run())
    await rec.wait_for(lambda: sup.status.restarts >= 4)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backoff.resets == 1
    assert sleep.delays[:4] == [1.0, 2.0, 1.0, 2.0]


async def test_cancel_while_backing_off_stops_cleanly() -> None:
    started = asyncio.Event()

    async def fails() -> None:
        started.set()
        raise RuntimeError("boom")

    # real sleep with a long backoff: the task must be parked in the backoff when cancelled
    class Long(FakeBackoff):
        def next(self) -> float:
            return 3600.0

    rec = Recorder()
    sup = Supervisor("modbus1", fails, Long(), on_change=rec)
    task = asyncio.create_task(sup.run())
    await rec.wait_for(lambda: sup.status.phase is Phase.BACKING_OFF)
    assert sup.status.retry_in == 3600.0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sup.status.phase is Phase.STOPPED
    assert sup.status.restarts == 1


async def test_cancel_reaches_the_component_and_it_can_clean_up() -> None:
    closed = asyncio.Event()
    running = asyncio.Event()

    async def device() -> None:
        running.set()
        try:
            await asyncio.Event().wait()
        finally:
            closed.set()  # a connector closes its connection here

    sup = Supervisor("opc1", device, FakeBackoff())
    task = asyncio.create_task(sup.run())
    await running.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed.is_set()
    assert sup.status.phase is Phase.STOPPED and sup.status.restarts == 0


async def test_a_component_that_returns_is_finished_not_restarted() -> None:
    calls = 0

    async def once() -> None:
        nonlocal calls
        calls += 1

    sup = Supervisor("outlet-file", once, FakeBackoff(), kind="outlet", returns=True)
    await asyncio.wait_for(sup.run(), 5)
    assert calls == 1
    assert sup.status.phase is Phase.FINISHED
    assert sup.status.as_dict()["state"] == "finished"


def test_repeated_fault_logs_one_error_then_debug_then_a_reminder(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A device that stays down: one error, debug repeats, a warning every remind_every."""
    now = [0.0]
    attempts = 0
    seventh = asyncio.Event()

    async def failing() -> None:
        nonlocal attempts
        attempts += 1
        now[0] += 100.0  # each attempt takes 100 s of (fake) time
        if attempts == 7:
            seventh.set()
        if attempts == 5:
            raise OSError(f"other fault {attempts}")
        raise ConnectionRefusedError(f"tcp 10.0.0.7:502: refused; next attempt in {attempts}.0s")

    async def main() -> None:
        sleep = FakeSleep()
        sup = Supervisor(
            "press7",
            failing,
            FakeBackoff(),
            sleep=sleep,
            clock=lambda: now[0],
            healthy_after=1000.0,
            remind_every=250.0,
        )
        task = asyncio.create_task(sup.run())
        await asyncio.wait_for(seventh.wait(), 10)
        await asyncio.sleep(0)  # let the seventh fault be reported
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.DEBUG, logger="plantbus.supervisor"):
        asyncio.run(main())
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if "press7" in r.getMessage()]
    levels = [level for level, _ in lines if "traceback" not in _]
    # 1 error; 2, 3 same fault (debug: 100 s, 200 s since the error); 4 reminder (300 s);
    # 5 a different fault: error; 6 back to the first fault: error; 7 debug
    assert levels[:7] == ["ERROR", "DEBUG", "DEBUG", "WARNING", "ERROR", "ERROR", "DEBUG"]
    assert "still failing" in next(m for lvl, m in lines if lvl == "WARNING")
