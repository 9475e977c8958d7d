"""Small pieces of the opcua connector that need no server: the split of the points over
sessions, and the guard against cancellations that Python 3.11 loses."""

from __future__ import annotations

import asyncio

import pytest

from plantbus.broker.cancel import raise_if_cancelling
from plantbus.connectors.opcua.connector import OpcUaConnector


def test_points_are_split_evenly_over_the_sessions() -> None:
    assert OpcUaConnector._slices(20, 3) == [range(0, 7), range(7, 14), range(14, 20)]
    assert OpcUaConnector._slices(2, 2) == [range(0, 1), range(1, 2)]


async def test_a_cancellation_that_wait_for_swallowed_still_stops_the_loop() -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    seen: list[str] = []

    async def device_loop() -> None:
        me = asyncio.current_task()
        while True:
            raise_if_cancelling(me)
            # the shape of every asyncua request: wait_for around an awaitable
            await asyncio.wait_for(queue.get(), 10)
            seen.append("a value")

    task = asyncio.create_task(device_loop())
    await asyncio.sleep(0)  # the loop waits for a value
    queue.put_nowait(1)
    await asyncio.sleep(0)  # the value is handed over, the loop not yet resumed ...
    task.cancel()  # ... when the stop comes: wait_for returns the value instead of raising
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(2):
            await task
    assert seen == ["a value"]  # the swallowed case happened, and the guard stopped the loop
