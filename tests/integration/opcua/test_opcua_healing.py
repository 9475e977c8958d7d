"""Self-healing against real asyncua servers: a restart, a server that stops answering with
its TCP connections open (SIGSTOP), a node deleted on the server, and a dead server next to a
healthy one."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable

import pytest
from opcua_harness import CTX, Collector, UaServer, device, running

from plantbus.broker.record import Quality
from plantbus.connectors.opcua import build

BAD_NOT_CONNECTED = 0x808A0000
BAD_TIMEOUT = 0x800A0000
BAD_NODE_ID_UNKNOWN = 0x80340000

MODES = ["poll", "subscribe"]


def good_after(out: Collector, t: float, point: str) -> float | None:
    """The monotonic time of the first batch after ``t`` that carries a value of ``point``."""
    for when, batch in zip(out.times, out.batches, strict=True):
        if when > t and any(point in r.fields for r in batch):
            return when
    return None


def bad_records(out: Collector, code: int) -> list[float]:
    return [
        when
        for when, batch in zip(out.times, out.batches, strict=True)
        for r in batch
        if r.status and set(r.status.values()) == {code} and not r.fields
    ]


@pytest.mark.parametrize("mode", MODES)
async def test_a_restarted_server_is_read_again_within_two_intervals_and_the_backoff_cap(
    server_factory: Callable[..., UaServer], mode: str
) -> None:
    server = server_factory()
    interval, cap = 0.25, 1.0
    config = device(
        server.url,
        [{"name": "temp", "node": server.node("s=Line1.Temp")}],
        mode=mode,
        interval=f"{interval}s",
        reconnect_initial="100ms",
        reconnect_max=f"{cap}s",
        timeout="2s",
    )
    async with running(config) as (connector, out):
        await out.wait(lambda: out.last("temp") == 21.5, what="the first value")
        await asyncio.to_thread(server.stop)
        await out.wait(lambda: bad_records(out, BAD_NOT_CONNECTED), what="the outage record")
        await asyncio.sleep(1.5)  # down long enough for the backoff to reach its cap
        await asyncio.to_thread(server.start)
        ready = time.monotonic()
        back = await out.wait(lambda: good_after(out, ready, "temp"), what="a value again")
    assert back - ready <= 2 * interval + cap, f"{back - ready:.2f}s after the restart"
    assert connector.connects == 2
    # exactly one all-Bad record for the outage, however many attempts failed
    assert len(bad_records(out, BAD_NOT_CONNECTED)) == 1


@pytest.mark.parametrize("mode", MODES)
async def test_a_server_that_stops_answering_times_out_and_is_reconnected(
    server_factory: Callable[..., UaServer], mode: str
) -> None:
    server = server_factory()
    timeout = 1.0
    config = device(
        server.url,
        [{"name": "temp", "node": server.node("s=Line1.Temp")}],
        mode=mode,
        interval="100ms",
        timeout=f"{timeout}s",
        reconnect_initial="100ms",
        reconnect_max="500ms",
    )
    async with running(config) as (connector, out):
        await out.wait(lambda: out.last("temp") == 21.5, what="the first value")
        server.pause()  # TCP stays open, nothing answers
        paused = time.monotonic()
        try:
            await out.wait(lambda: bad_records(out, BAD_TIMEOUT), within=15, what="the timeout")
            detected = bad_records(out, BAD_TIMEOUT)[0] - paused
            assert not connector.connected
            assert "TimeoutError" in (connector.last_error or "")
        finally:
            server.resume()
        resumed = time.monotonic()
        await out.wait(lambda: good_after(out, resumed, "temp"), within=15, what="a value again")
    # poll: a read's timeout; subscribe: the silence beyond the keep-alive, or the watchdog
    limit = 2 * timeout + 0.5 if mode == "poll" else 4 * timeout + 1.0
    assert detected <= limit, f"detected after {detected:.2f}s"
    assert connector.connects >= 2  # the hung connection was dropped, a new one made


@pytest.mark.parametrize("mode", MODES)
async def test_a_deleted_node_goes_bad_and_the_others_keep_flowing(
    ua_server: UaServer, mode: str
) -> None:
    doomed = f"s=Doomed.{mode}"
    # asyncua's server does not notify the monitored item of a deleted node: in subscribe
    # mode it is the connector's check of the monitored nodes that finds it gone
    keys = {"verify_interval": "200ms"} if mode == "subscribe" else {}
    config = device(
        ua_server.url,
        [
            {"name": "doomed", "node": ua_server.node(doomed)},
            {"name": "other", "node": ua_server.node("s=Bulk.v3")},
        ],
        mode=mode,
        interval="50ms",
        **keys,
    )
    try:
        async with running(config) as (connector, out):
            await out.wait(lambda: out.last("doomed") == 1.0, what="the doomed value")
            await ua_server.acall("delete", node=doomed)
            await out.wait(
                lambda: out.last_status("doomed") == BAD_NODE_ID_UNKNOWN, what="doomed going Bad"
            )
            await ua_server.acall("write", node="s=Bulk.v3", type="Double", value=33.0)
            await out.wait(lambda: out.last("other") == 33.0, what="the other point")
            # and when the node is back, so is its value
            variable = {"node": doomed, "name": mode, "parent": "Doomed", "type": "Double"}
            await ua_server.acall("add", variable={**variable, "value": 5.0})
            await out.wait(lambda: out.last("doomed") == 5.0, what="the node back")
    finally:
        await ua_server.acall("write", node="s=Bulk.v3", type="Double", value=3.0)
    assert connector.connects == 1  # no reconnect for a Bad point
    bad = next(r for r in out.records if r.status and "doomed" in r.status)
    assert "doomed" not in bad.fields and bad.quality is Quality.BAD


async def test_a_hung_server_does_not_change_another_devices_rate(
    ua_server: UaServer, server_factory: Callable[..., UaServer]
) -> None:
    sick = server_factory()
    interval, window = 0.1, 1.5
    healthy_cfg = device(
        ua_server.url,
        [{"name": "temp", "node": ua_server.node("s=Line1.Temp")}],
        name="healthy",
        interval=f"{interval}s",
        timestamp="read",
    )
    sick_cfg = device(
        sick.url,
        [{"name": "temp", "node": sick.node("s=Line1.Temp")}],
        name="sick",
        interval=f"{interval}s",
        timeout="500ms",
        reconnect_initial="50ms",
        reconnect_max="200ms",
    )

    def polls_in(out: Collector, start: float) -> int:
        return sum(1 for t in out.times if start <= t < start + window)

    async with running(healthy_cfg) as (healthy, out), running(sick_cfg) as (_, sick_out):
        await out.wait(lambda: out.batches, what="the healthy device")
        await sick_out.wait(lambda: sick_out.batches, what="the sick device")
        before = time.monotonic()
        await asyncio.sleep(window)
        overruns = healthy.overruns
        sick.pause()
        try:
            await sick_out.wait(
                lambda: bad_records(sick_out, BAD_TIMEOUT), what="the sick device timing out"
            )
            during = time.monotonic()
            await asyncio.sleep(window)  # the sick device keeps timing out and reconnecting
        finally:
            sick.resume()
    expected = window / interval
    assert polls_in(out, before) >= 0.9 * expected
    assert polls_in(out, during) >= 0.9 * expected, "the healthy device slowed down"
    assert healthy.overruns - overruns <= 1


@pytest.mark.parametrize("mode", MODES)
async def test_a_cancelled_device_always_stops(
    server_factory: Callable[..., UaServer], mode: str
) -> None:
    # values change every 5 ms, so cancellations land at every point of a read or publish
    server = server_factory(writer={"period": 0.005, "first": 0, "count": 40})
    points = [{"name": f"v{i}", "node": server.node(f"s=Bulk.v{i}")} for i in range(20)]
    config = device(server.url, points, mode=mode, interval="10ms", timeout="2s")
    rng = random.Random(7)
    for _ in range(12):
        out = Collector()
        connector = build(config, CTX)
        task = asyncio.create_task(connector.run(out.emit))
        await out.wait(lambda o=out: len(o.batches) >= 2, what="data")
        await asyncio.sleep(rng.uniform(0, 0.05))
        task.cancel()
        async with asyncio.timeout(5):  # a lost cancellation would hang here
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert task.cancelled()
