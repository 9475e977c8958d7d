"""The bus: routing, per-subscription queue policies, isolation of slow subscribers."""

import asyncio

import pytest

from plantbus.broker.bus import Bus
from plantbus.broker.ids import new_ids
from plantbus.broker.record import Record, Series


def batch(series: Series, start: int, n: int) -> list[Record]:
    uids = new_ids(n)
    return [Record(series, {"n": start + i}, start + i, uids[i]) for i in range(n)]


S1 = Series("plant/h1/press7", "press7", {"line": "L1"})
S2 = Series("plant/h2/oven", "oven", {})
CMD = Series("$cmd/plant/h1/press7", "cmd", {})


async def test_routing_by_filter_and_dollar_topics():
    bus = Bus()
    all_ = bus.subscribe(["#"], name="all")
    h1 = bus.subscribe(["plant/h1/#"], name="h1")
    cmd = bus.subscribe(["$cmd/#"], name="cmd")
    await bus.publish(batch(S1, 0, 3))
    await bus.publish(batch(S2, 3, 2))
    await bus.publish(batch(CMD, 5, 1))
    assert [r.fields["n"] for r in all_.get_nowait()] == [0, 1, 2, 3, 4]
    assert [r.fields["n"] for r in h1.get_nowait()] == [0, 1, 2]
    assert [r.fields["n"] for r in cmd.get_nowait()] == [5]


async def test_route_cache_follows_subscription_changes():
    bus = Bus()
    a = bus.subscribe(["plant/#"])
    await bus.publish(batch(S1, 0, 1))
    b = bus.subscribe(["plant/h1/+"])
    await bus.publish(batch(S1, 1, 1))
    a.close()
    await bus.publish(batch(S1, 2, 1))
    assert [r.fields["n"] for r in a.get_nowait()] == [0, 1]
    assert [r.fields["n"] for r in b.get_nowait()] == [1, 2]


async def test_get_splits_batches_and_keeps_order():
    bus = Bus()
    sub = bus.subscribe(["#"], size=100)
    await bus.publish(batch(S1, 0, 7))
    await bus.publish(batch(S1, 7, 7))
    got = []
    while len(sub):
        got.extend(r.fields["n"] for r in await sub.get(max_records=4))
    assert got == list(range(14))


async def test_drop_oldest_and_drop_newest_count_drops():
    bus = Bus()
    old = bus.subscribe(["#"], size=10, policy="drop_oldest")
    new = bus.subscribe(["#"], size=10, policy="drop_newest")
    for i in range(0, 25, 5):
        await bus.publish(batch(S1, i, 5))
    assert [r.fields["n"] for r in old.get_nowait()] == list(range(15, 25))
    assert old.dropped == 15
    assert [r.fields["n"] for r in new.get_nowait()] == list(range(10))
    assert new.dropped == 15


async def test_oversized_batch_drop_oldest_keeps_newest_tail():
    bus = Bus()
    sub = bus.subscribe(["#"], size=4, policy="drop_oldest")
    await bus.publish(batch(S1, 0, 2))
    await bus.publish(batch(S1, 2, 6))
    assert [r.fields["n"] for r in sub.get_nowait()] == [4, 5, 6, 7]
    assert sub.dropped == 4


async def test_slow_drop_oldest_subscriber_does_not_delay_fast_one():
    bus = Bus()
    fast = bus.subscribe(["#"], size=100, policy="block", name="fast")
    slow = bus.subscribe(["#"], size=50, policy="drop_oldest", name="slow")  # never read
    got = 0

    async def reader():
        nonlocal got
        while got < 10_000:
            got += len(await fast.get())

    task = asyncio.create_task(reader())
    for i in range(0, 10_000, 100):
        await bus.publish(batch(S1, i, 100))
    await asyncio.wait_for(task, 5)
    assert got == 10_000
    assert len(slow) == 50
    assert slow.dropped == 10_000 - 50
    # the fast reader kept pace: the publisher only ever waited for it, never for `slow`
    assert fast.dropped == 0
    assert slow.blocked == 0
    assert [r.fields["n"] for r in slow.get_nowait()] == list(range(9950, 10_000))


async def test_block_slows_the_publisher_and_loses_nothing():
    bus = Bus()
    sub = bus.subscribe(["#"], size=20, policy="block")
    published = 0

    async def publisher():
        nonlocal published
        for i in range(0, 100, 10):
            await bus.publish(batch(S1, i, 10))
            published += 10

    task = asyncio.create_task(publisher())
    # the publisher fills the queue and then has to wait for the reader
    for _ in range(100):
        await asyncio.sleep(0)
    assert published == 20
    assert not task.done()
    assert sub.blocked == 1
    got = []
    while len(got) < 100:
        got.extend(r.fields["n"] for r in await sub.get())
    await asyncio.wait_for(task, 1)
    assert got == list(range(100))
    assert sub.dropped == 0


async def test_close_wakes_reader_and_blocked_publisher():
    bus = Bus()
    sub = bus.subscribe(["#"], size=1, policy="block")
    await bus.publish(batch(S1, 0, 1))
    pub = asyncio.create_task(bus.publish(batch(S1, 1, 1)))
    await asyncio.sleep(0)
    assert not pub.done()
    sub.close()
    await asyncio.wait_for(pub, 1)
    assert [r.fields["n"] for r in await sub.get()] == [0]
    assert await sub.get() == []


def test_queue_size_must_be_positive():
    with pytest.raises(ValueError):
        Bus().subscribe(["#"], size=0)


def test_record_mark_removes_bad_values_and_keeps_worst_quality():
    from plantbus.broker.record import Quality

    r = Record(S1, {"a": 1.0, "b": 2.0, "c": 3}, 1, "id")
    r.mark("a", Quality.UNCERTAIN, 0x40000000)
    r.mark("b", Quality.BAD, 0x80000000)
    r.mark("c", Quality.GOOD, 0)
    assert r.fields == {"a": 1.0, "c": 3}
    assert r.status == {"a": 0x40000000, "b": 0x80000000}
    assert r.quality is Quality.BAD
