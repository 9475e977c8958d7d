"""The shared link's turn-taking, its settings and registry, and the status codes of faults."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from plantbus.broker.connector import BuildContext
from plantbus.connectors.modbus import Config, build
from plantbus.connectors.modbus.link import LinkSettings, _Turns, link_for
from plantbus.connectors.modbus.status import (
    BAD_DEVICE_FAILURE,
    BAD_NODE_ID_UNKNOWN,
    BAD_NOT_SUPPORTED,
    BAD_UNEXPECTED_ERROR,
    exception_code_of,
    status_for_exception,
)

CTX = BuildContext(node_name="edge", node_tags={}, state_dir=Path("/nonexistent"))


async def test_turns_rotate_over_the_waiting_owners() -> None:
    turns = _Turns()
    order: list[str] = []
    gate = asyncio.Event()

    async def owner(name: str, n: int) -> None:
        for _ in range(n):
            await turns.acquire(name)
            order.append(name)
            await gate.wait()  # hold the turn until everybody queued up
            turns.release()

    await turns.acquire("first")
    # "a" queues 1 request at a time but wants 4, "b" 2, "c" 3
    tasks = [asyncio.create_task(owner(n, k)) for n, k in (("a", 4), ("b", 2), ("c", 3))]
    await asyncio.sleep(0)
    gate.set()
    turns.release()
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c", "a", "b", "c", "a", "c", "a"]


async def test_an_owner_with_many_queued_requests_does_not_starve_the_others() -> None:
    turns = _Turns()
    order: list[str] = []

    async def one(name: str) -> None:
        await turns.acquire(name)
        order.append(name)
        await asyncio.sleep(0)
        turns.release()

    await turns.acquire("x")
    tasks = [asyncio.create_task(one("greedy")) for _ in range(5)]
    tasks += [asyncio.create_task(one("modest")) for _ in range(2)]
    await asyncio.sleep(0)
    turns.release()
    await asyncio.gather(*tasks)
    assert order == ["greedy", "modest", "greedy", "modest", "greedy", "greedy", "greedy"]


async def test_a_cancelled_waiter_leaves_the_queue_and_passes_a_handed_turn_on() -> None:
    turns = _Turns()
    await turns.acquire("holder")
    waiting = asyncio.create_task(turns.acquire("w1"))
    later = asyncio.create_task(turns.acquire("w2"))
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    turns.release()  # to w2: w1 left the queue
    await asyncio.wait_for(later, 1)
    # now hand the turn to w3 and cancel it before it runs: the turn passes on to w4
    w3 = asyncio.create_task(turns.acquire("w3"))
    w4 = asyncio.create_task(turns.acquire("w4"))
    await asyncio.sleep(0)
    turns.release()
    w3.cancel()
    await asyncio.gather(w3, return_exceptions=True)
    await asyncio.wait_for(w4, 1)
    turns.release()
    await asyncio.wait_for(turns.acquire("free"), 1)  # nobody holds it any more


def _config(**kw: object) -> Config:
    kw.setdefault("name", "d")
    kw.setdefault("points", [{"name": "v", "address": 0}])
    return Config.model_validate(kw)


def test_devices_share_a_link_per_endpoint() -> None:
    a = build(_config(host="gw", port=5020, unit=1), CTX)
    b = build(_config(host="gw", port=5020, unit=2), CTX)
    c = build(_config(host="gw", port=5021, unit=1), CTX)
    d = build(_config(host="gw", port=5020, transport="rtu-over-tcp"), CTX)
    assert a.link is b.link
    assert c.link is not a.link and d.link is not a.link
    assert a.link.label == "tcp gw:5020" and d.link.label == "rtu-over-tcp gw:5020"
    v6 = LinkSettings.of(_config(host="fe80::1"))
    assert v6.label == "tcp [fe80::1]:502"


def test_a_serial_line_needs_one_set_of_line_settings() -> None:
    serial = {"port": "/dev/ttyTEST0", "baudrate": 9600}
    first = link_for(_config(transport="rtu", serial=serial))
    again = link_for(_config(transport="rtu", serial=serial, unit=2))
    assert first is again
    with pytest.raises(
        ValueError, match=r"rtu /dev/ttyTEST0 is already used .*9600 baud 8E1.*19200 baud 8E1"
    ):
        link_for(_config(transport="rtu", serial={"port": "/dev/ttyTEST0"}))


@pytest.mark.parametrize(
    ("exception", "status"),
    [
        (1, BAD_NOT_SUPPORTED | 1),
        (2, BAD_NODE_ID_UNKNOWN | 2),
        (3, 0x803C0003),
        (4, BAD_DEVICE_FAILURE | 4),
        (6, 0x80EE0006),
        (10, 0x8031000A),
        (11, 0x800A000B),
        (0x42, BAD_UNEXPECTED_ERROR | 0x42),
    ],
)
def test_modbus_exceptions_map_onto_bad_codes_that_carry_them(exception: int, status: int) -> None:
    assert status_for_exception(exception) == status
    assert status >> 30 == 0b10  # Bad
    assert exception_code_of(status) == exception


def test_codes_without_an_exception() -> None:
    assert exception_code_of(0x800A0000) is None  # a plain timeout
    assert exception_code_of(0x40000002) is None  # not Bad
