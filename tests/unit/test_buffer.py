"""MemoryBuffer: byte bound, each when_full policy with its drop counts, in-flight and acks."""

from __future__ import annotations

import asyncio

import pytest

from plantbus.broker.buffer import MemoryBuffer
from plantbus.broker.sinks.base import EncodedBatch


def batch(seq: int, size: int = 100, records: int = 10) -> EncodedBatch:
    return EncodedBatch(payload=b"x" * size, records=records, codec="line_protocol", seq=seq)


def seqs(buf: MemoryBuffer) -> list[int]:
    out = []
    while (b := buf.get_nowait()) is not None:
        out.append(b.seq)
    return out


async def test_fifo_with_counts():
    buf = MemoryBuffer(1000)
    for i in range(3):
        assert await buf.append(batch(i, size=100, records=5))
    assert (len(buf), buf.bytes, buf.records, buf.pending) == (3, 300, 15, 3)
    first = buf.get_nowait()
    assert first is not None and first.seq == 0
    assert (len(buf), buf.pending, buf.in_flight) == (3, 2, 1)
    buf.ack(first)
    assert (len(buf), buf.bytes, buf.records) == (2, 200, 10)
    assert seqs(buf) == [1, 2]


async def test_drop_oldest_makes_room_and_counts():
    buf = MemoryBuffer(350, "drop_oldest")
    for i in range(5):
        assert await buf.append(batch(i, size=100, records=7))
    # 3 fit in 350 bytes: the two oldest went
    assert seqs(buf) == [2, 3, 4]
    assert (buf.dropped_batches, buf.dropped_records) == (2, 14)


async def test_drop_oldest_never_drops_in_flight():
    buf = MemoryBuffer(250, "drop_oldest")
    await buf.append(batch(0))
    await buf.append(batch(1))
    in_flight = buf.get_nowait()
    assert in_flight is not None and in_flight.seq == 0
    await buf.append(batch(2))  # 300 > 250: the pending #1 goes, the in-flight #0 stays
    await buf.append(batch(3))  # only #2 is pending: it goes
    assert (buf.dropped_batches, buf.dropped_records) == (2, 20)
    assert buf.bytes == 200  # over by at most what is in flight
    buf.ack(in_flight)
    assert seqs(buf) == [3]


async def test_drop_newest_refuses_and_counts():
    buf = MemoryBuffer(250, "drop_newest")
    assert await buf.append(batch(0))
    assert await buf.append(batch(1))
    assert not await buf.append(batch(2, records=3))
    assert (buf.dropped_batches, buf.dropped_records) == (1, 3)
    assert seqs(buf) == [0, 1]


async def test_block_waits_for_room():
    buf = MemoryBuffer(250, "block")
    await buf.append(batch(0))
    await buf.append(batch(1))
    appended = asyncio.create_task(buf.append(batch(2)))
    await asyncio.sleep(0)
    assert not appended.done()
    assert buf.blocked == 1
    head = buf.get_nowait()
    assert head is not None
    await asyncio.sleep(0)
    assert not appended.done()  # in flight still takes its room
    buf.ack(head)
    assert await asyncio.wait_for(appended, 1.0) is True
    assert buf.dropped_batches == 0
    assert seqs(buf) == [1, 2]


async def test_block_waiter_is_refused_on_close():
    buf = MemoryBuffer(100, "block")
    await buf.append(batch(0))
    appended = asyncio.create_task(buf.append(batch(1, records=4)))
    await asyncio.sleep(0)
    await buf.close()
    assert await asyncio.wait_for(appended, 1.0) is False
    assert (buf.dropped_batches, buf.dropped_records) == (1, 4)
    assert len(buf) == 1  # what was held stays counted


@pytest.mark.parametrize("policy", ["block", "drop_oldest", "drop_newest"])
async def test_empty_buffer_takes_an_oversized_batch(policy):
    buf = MemoryBuffer(50, policy)
    assert await buf.append(batch(0, size=500))
    assert buf.bytes == 500


async def test_out_of_order_acks_release_in_order():
    buf = MemoryBuffer(10_000)
    for i in range(3):
        await buf.append(batch(i))
    a, b, c = buf.get_nowait(), buf.get_nowait(), buf.get_nowait()
    assert a and b and c
    buf.ack(b)
    assert len(buf) == 3  # #1 acked, but #0 still holds the head
    buf.ack(a)
    assert len(buf) == 1
    buf.ack(c)
    assert len(buf) == 0 and buf.bytes == 0 and buf.records == 0


async def test_rewind_hands_unacked_in_flight_out_again():
    buf = MemoryBuffer(10_000)
    for i in range(4):
        await buf.append(batch(i))
    a, b = buf.get_nowait(), buf.get_nowait()
    assert a and b
    buf.ack(b)  # delivered out of order: must not be sent again
    buf.rewind()
    assert seqs(buf) == [0, 2, 3]
    assert buf.records == 30


async def test_get_waits_and_ends_when_sealed():
    buf = MemoryBuffer(1000)
    getter = asyncio.create_task(buf.get())
    await asyncio.sleep(0)
    assert not getter.done()
    await buf.append(batch(5))
    got = await asyncio.wait_for(getter, 1.0)
    assert got is not None and got.seq == 5
    await buf.append(batch(6))
    buf.seal()
    nxt = await buf.get()
    assert nxt is not None and nxt.seq == 6
    assert await asyncio.wait_for(buf.get(), 1.0) is None
    with pytest.raises(RuntimeError, match="sealed"):
        await buf.append(batch(7))


async def test_ack_of_a_batch_not_in_flight_is_a_bug():
    buf = MemoryBuffer(1000)
    b = batch(1)
    await buf.append(b)
    with pytest.raises(ValueError, match="not in flight"):
        buf.ack(b)


def test_rejects_bad_parameters():
    with pytest.raises(ValueError, match="max_size"):
        MemoryBuffer(0)
    with pytest.raises(ValueError, match="unknown when_full policy 'sometimes'"):
        MemoryBuffer(10, "sometimes")  # type: ignore[arg-type]


async def test_a_batch_acked_behind_an_older_one_is_delivered_but_still_held():
    buf = MemoryBuffer(10_000)
    for i in range(3):
        await buf.append(batch(i))
    a, b = buf.get_nowait(), buf.get_nowait()
    assert a and b
    buf.ack(b)
    # records and batches still to deliver leave the count at once; bytes stay held
    assert (buf.records, buf.undelivered_batches, buf.in_flight, buf.pending) == (20, 2, 1, 1)
    assert (len(buf), buf.bytes) == (3, 300)
    with pytest.raises(ValueError, match="acknowledged twice"):
        buf.ack(b)
    buf.ack(a)
    assert (buf.records, buf.undelivered_batches, len(buf), buf.bytes) == (10, 1, 1, 100)
