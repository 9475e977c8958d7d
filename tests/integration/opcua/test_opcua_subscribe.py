"""Subscribe mode against a real asyncua server: initial values, changes delivered per publish
response, deadband, queue size, refused items."""

from __future__ import annotations

import time

from opcua_harness import UaServer, device, running

from plantbus.broker.record import Quality

BAD_NODE_ID_UNKNOWN = 0x80340000


def bulk(server: UaServer, first: int, n: int, **keys: object) -> list[dict[str, object]]:
    return [
        {"name": f"v{i}", "node": server.node(f"s=Bulk.v{i}"), **keys}
        for i in range(first, first + n)
    ]


async def test_initial_values_then_changes_in_one_batch_per_publish(ua_server: UaServer) -> None:
    config = device(ua_server.url, bulk(ua_server, 10, 10), mode="subscribe", interval="100ms")
    async with running(config) as (connector, out):
        await out.wait(
            lambda: all(out.last(f"v{i}") is not None for i in range(10, 20)), what="initial values"
        )
        before = len(out.batches)
        t = time.time_ns() // 1000 * 1000
        items = [
            {"node": f"s=Bulk.v{i}", "type": "Double", "value": 100.0 + i} for i in range(10, 20)
        ]
        await ua_server.acall("write_many", items=items, source_ns=t)
        await out.wait(lambda: out.last("v19") == 119.0, what="the new values")
    new = [b for b in out.batches[before:] if any(r.time_ns == t for r in b)]
    # all ten changes arrived in one publish response, emitted at once as one record
    assert len(new) == 1
    assert [(r.time_ns, r.fields) for r in new[0]] == [
        (t, {f"v{i}": 100.0 + i for i in range(10, 20)})
    ]
    assert connector.values >= 20 and connector.emitted == len(out.records)
    for i in range(10, 20):  # leave the shared server as the other tests expect it
        await ua_server.acall("write", node=f"s=Bulk.v{i}", type="Double", value=float(i))


async def test_changes_within_the_deadband_are_not_reported(ua_server: UaServer) -> None:
    points = [
        {"name": "damped", "node": ua_server.node("s=Bulk.v0"), "deadband": 1.0},
        {"name": "marker", "node": ua_server.node("s=Bulk.v1")},
    ]
    config = device(ua_server.url, points, mode="subscribe", interval="50ms")
    try:
        async with running(config) as (_, out):
            await out.wait(lambda: out.last("damped") == 0.0, what="the initial value")
            await ua_server.acall("write", node="s=Bulk.v0", type="Double", value=0.5)
            await ua_server.acall("write", node="s=Bulk.v1", type="Double", value=-1.0)
            await out.wait(lambda: out.last("marker") == -1.0, what="the marker")
            await ua_server.acall("write", node="s=Bulk.v0", type="Double", value=2.0)
            await out.wait(lambda: out.last("damped") == 2.0, what="the change beyond the deadband")
    finally:
        await ua_server.acall("write", node="s=Bulk.v0", type="Double", value=0.0)
        await ua_server.acall("write", node="s=Bulk.v1", type="Double", value=1.0)
    damped = [r.fields["damped"] for r in out.records if "damped" in r.fields]
    assert damped == [0.0, 2.0]  # 0.5 was within 1.0 of 0.0


async def test_queue_keeps_every_sample_between_publishes(ua_server: UaServer) -> None:
    base = {"node": "s=Bulk.v2", "type": "Double"}
    for queue_size, expected in ((None, [10.0, 11.0, 12.0, 13.0]), (1, [13.0])):
        await ua_server.acall("write", **base, value=2.0)
        t0 = time.time_ns() // 1000 * 1000
        keys = {"queue_size": queue_size} if queue_size else {}
        points = [{"name": "v", "node": ua_server.node("s=Bulk.v2"), **keys}]
        config = device(
            ua_server.url, points, mode="subscribe", interval="1s", sampling_interval="10ms"
        )
        async with running(config) as (_, out):
            await out.wait(lambda: out.last("v") == 2.0, what="the initial value")
            start = len(out.records)
            for k in range(4):  # four samples within one publishing interval
                await ua_server.acall("write", **base, value=10.0 + k, source_ns=t0 + k * 1000)
            await out.wait(lambda: out.last("v") == 13.0, what="the last sample")
        got = [r.fields["v"] for r in out.records[start:] if "v" in r.fields]
        assert got == expected, f"queue_size={queue_size}"
        times = [r.time_ns for r in out.records[start:] if "v" in r.fields]
        assert times == sorted(times)
    await ua_server.acall("write", **base, value=2.0)  # as the other tests expect it


async def test_a_refused_item_is_bad_and_the_others_flow(ua_server: UaServer) -> None:
    points = [
        {"name": "temp", "node": ua_server.node("s=Line1.Temp")},
        {"name": "ghost", "node": ua_server.node("s=Line1.Ghost")},
    ]
    config = device(ua_server.url, points, mode="subscribe", interval="50ms")
    async with running(config) as (_, out):
        await out.wait(lambda: out.last("temp") == 21.5, what="temp")
        await out.wait(lambda: out.last_status("ghost") is not None, what="ghost's status")
    assert out.last_status("ghost") == BAD_NODE_ID_UNKNOWN
    bad = next(r for r in out.records if r.status and "ghost" in r.status)
    assert bad.quality is Quality.BAD and "ghost" not in bad.fields
