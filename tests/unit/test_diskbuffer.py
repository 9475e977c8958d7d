"""DiskBuffer: the MemoryBuffer behaviour on segment files, restarts, recovery from damage."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from plantbus.broker import diskbuffer
from plantbus.broker.diskbuffer import RECORD_HEADER_SIZE, DiskBuffer
from plantbus.broker.sinks.base import EncodedBatch


def batch(seq: int, size: int = 100, records: int = 10) -> EncodedBatch:
    # the payload names its batch, so a mix-up on disk cannot go unnoticed
    body = f"{seq}:".encode()
    return EncodedBatch(
        payload=(body * (size // len(body) + 1))[:size],
        records=records,
        codec="line_protocol",
        seq=seq,
        first_id=f"f{seq}",
        last_id=f"l{seq}",
    )


def seqs(buf: DiskBuffer) -> list[int]:
    out = []
    while (b := buf.get_nowait()) is not None:
        assert b == batch(b.seq, len(b.payload), b.records)
        out.append(b.seq)
    return out


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("*.seg"))


def die(buf: DiskBuffer) -> None:
    """The process holding ``buf`` dies: no close, no flush; its descriptors go with it."""
    for f in buf._files.values():
        f.close()
    buf._files.clear()
    if buf._ack_fd is not None:
        os.close(buf._ack_fd)
        buf._ack_fd = None
    if buf._lock_fd is not None:
        os.close(buf._lock_fd)
        buf._lock_fd = None
    if buf._sync_task is not None:
        buf._sync_task.cancel()


@pytest.fixture
def make(tmp_path):
    opened: list[DiskBuffer] = []

    def _make(max_size: int = 10_000, when_full="drop_oldest", **kw) -> DiskBuffer:
        kw.setdefault("sync_interval", 0.05)
        # opening the folder again without close() is a restart after a crash
        for old in opened:
            if not old.closed:
                die(old)
        buf = DiskBuffer(tmp_path / "buf", max_size, when_full, **kw)
        opened.append(buf)
        return buf

    yield _make
    for buf in opened:
        die(buf)


# -- the MemoryBuffer behaviour ----------------------------------------------------------------


async def test_fifo_with_counts(make):
    buf = make(1000)
    for i in range(3):
        assert await buf.append(batch(i, size=100, records=5))
    assert (len(buf), buf.bytes, buf.records, buf.pending) == (3, 300, 15, 3)
    first = buf.get_nowait()
    assert first is not None and first.seq == 0
    assert (len(buf), buf.pending, buf.in_flight) == (3, 2, 1)
    buf.ack(first)
    assert (len(buf), buf.bytes, buf.records) == (2, 200, 10)
    assert seqs(buf) == [1, 2]


async def test_drop_oldest_makes_room_and_counts(make):
    buf = make(350, "drop_oldest")
    for i in range(5):
        assert await buf.append(batch(i, size=100, records=7))
    assert seqs(buf) == [2, 3, 4]
    assert (buf.dropped_batches, buf.dropped_records) == (2, 14)


async def test_drop_oldest_never_drops_in_flight(make):
    buf = make(250, "drop_oldest")
    await buf.append(batch(0))
    await buf.append(batch(1))
    in_flight = buf.get_nowait()
    assert in_flight is not None and in_flight.seq == 0
    await buf.append(batch(2))  # 300 > 250: the pending #1 goes, the in-flight #0 stays
    await buf.append(batch(3))  # only #2 is pending: it goes
    assert (buf.dropped_batches, buf.dropped_records) == (2, 20)
    assert buf.bytes == 200
    buf.ack(in_flight)
    assert seqs(buf) == [3]


async def test_drop_newest_refuses_and_counts(make):
    buf = make(250, "drop_newest")
    assert await buf.append(batch(0))
    assert await buf.append(batch(1))
    assert not await buf.append(batch(2, records=3))
    assert (buf.dropped_batches, buf.dropped_records) == (1, 3)
    assert seqs(buf) == [0, 1]


async def test_block_waits_for_room(make):
    buf = make(250, "block")
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


async def test_block_waiter_is_refused_on_close(make):
    buf = make(100, "block")
    await buf.append(batch(0))
    appended = asyncio.create_task(buf.append(batch(1, records=4)))
    await asyncio.sleep(0)
    await buf.close()
    assert await asyncio.wait_for(appended, 1.0) is False
    assert (buf.dropped_batches, buf.dropped_records) == (1, 4)
    assert len(buf) == 1


@pytest.mark.parametrize("policy", ["block", "drop_oldest", "drop_newest"])
async def test_empty_buffer_takes_an_oversized_batch(make, policy):
    buf = make(50, policy)
    assert await buf.append(batch(0, size=500))
    assert buf.bytes == 500


async def test_out_of_order_acks_release_in_order(make):
    buf = make()
    for i in range(3):
        await buf.append(batch(i))
    a, b, c = buf.get_nowait(), buf.get_nowait(), buf.get_nowait()
    assert a and b and c
    buf.ack(b)
    assert len(buf) == 3
    buf.ack(a)
    assert len(buf) == 1
    buf.ack(c)
    assert len(buf) == 0 and buf.bytes == 0 and buf.records == 0


async def test_rewind_hands_unacked_in_flight_out_again(make):
    buf = make()
    for i in range(4):
        await buf.append(batch(i))
    a, b = buf.get_nowait(), buf.get_nowait()
    assert a and b
    buf.ack(b)
    buf.rewind()
    assert seqs(buf) == [0, 2, 3]
    assert buf.records == 30


async def test_get_waits_and_ends_when_sealed(make):
    buf = make(1000)
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


async def test_ack_of_a_batch_not_in_flight_is_a_bug(make):
    buf = make(1000)
    b = batch(1)
    await buf.append(b)
    with pytest.raises(ValueError, match="not in flight"):
        buf.ack(b)  # the appended object is not the one handed out


def test_rejects_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="max_size"):
        DiskBuffer(tmp_path, 0, "block")
    with pytest.raises(ValueError, match="unknown when_full policy 'sometimes'"):
        DiskBuffer(tmp_path, 10, "sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sync_interval"):
        DiskBuffer(tmp_path, 10, "block", sync_interval=-1)


async def test_a_batch_acked_behind_an_older_one_is_delivered_but_still_held(make):
    buf = make()
    for i in range(3):
        await buf.append(batch(i))
    a, b = buf.get_nowait(), buf.get_nowait()
    assert a and b
    buf.ack(b)
    assert (buf.records, buf.undelivered_batches, buf.in_flight, buf.pending) == (20, 2, 1, 1)
    assert (len(buf), buf.bytes) == (3, 300)
    with pytest.raises(ValueError, match="acknowledged twice"):
        buf.ack(b)
    buf.ack(a)
    assert (buf.records, buf.undelivered_batches, len(buf), buf.bytes) == (10, 1, 1, 100)


# -- durability and restarts -------------------------------------------------------------------


async def test_restart_replays_exactly_the_unacked_batches_in_order(make):
    buf = make()
    for i in range(6):
        await buf.append(batch(i, records=i + 1))
    a, b, c = buf.get_nowait(), buf.get_nowait(), buf.get_nowait()
    assert a and b and c
    buf.ack(a)
    buf.ack(c)  # acked behind the in-flight #1: must not come back either
    await buf.close()
    again = make()
    assert (len(again), again.records, again.bytes) == (4, 2 + 4 + 5 + 6, 400)
    assert seqs(again) == [1, 3, 4, 5]


async def test_restart_after_a_crash_keeps_acks_and_synced_batches(make):
    buf = make(sync_interval=0)
    for i in range(3):
        await buf.append(batch(i))
    assert buf.synced_position == 3 and buf.synced_seq == 2
    head = buf.get_nowait()
    assert head is not None
    buf.ack(head)
    # a crash: no close(), nothing flushed beyond what the calls did
    again = make()
    assert seqs(again) == [1, 2]


async def test_group_commit_advances_the_synced_position(make):
    buf = make(sync_interval=0.01)
    await buf.append(batch(0))
    assert buf.synced_position == 0
    for _ in range(100):
        if buf.synced_position == 1:
            break
        await asyncio.sleep(0.01)
    assert (buf.synced_position, buf.synced_seq) == (1, 0)
    await buf.close()


async def test_appends_after_a_restart_follow_the_replayed_ones(make):
    buf = make()
    await buf.append(batch(0))
    await buf.close()
    again = make()
    await again.append(batch(1))
    assert seqs(again) == [0, 1]


async def test_segments_are_deleted_once_delivered(make, tmp_path):
    buf = make(segment_size=250)  # two 100-byte batches (plus framing) per segment
    for i in range(6):
        await buf.append(batch(i))
    assert len(segments(tmp_path / "buf")) == 3
    got = [buf.get_nowait() for _ in range(4)]
    for b in got:
        assert b is not None
        buf.ack(b)
    assert len(segments(tmp_path / "buf")) == 1
    rest = [buf.get_nowait(), buf.get_nowait()]
    for b in rest:
        assert b is not None
        buf.ack(b)
    await buf.close()
    # the active segment stays open for appends; a fresh open finds nothing held
    again = make()
    assert len(again) == 0 and segments(tmp_path / "buf") == []


async def test_drop_oldest_is_persisted_and_frees_segments(make, tmp_path):
    buf = make(350, "drop_oldest", segment_size=1)  # one batch per segment
    for i in range(6):
        await buf.append(batch(i))
    assert buf.dropped_batches == 3
    assert len(segments(tmp_path / "buf")) == 3
    assert buf.disk_bytes == sum(p.stat().st_size for p in segments(tmp_path / "buf"))
    await buf.close()
    again = make(350, "drop_oldest")
    assert seqs(again) == [3, 4, 5]
    assert again.missing_segments == 0


async def test_drop_oldest_behind_a_stuck_in_flight_batch_survives_a_restart(make, tmp_path):
    buf = make(250, "drop_oldest", segment_size=1)
    await buf.append(batch(0))
    stuck = buf.get_nowait()  # the sink is down: #0 is retried for ever
    assert stuck is not None
    for i in range(1, 8):
        await buf.append(batch(i))
    assert buf.dropped_batches == 6
    await buf.close()
    again = make(250, "drop_oldest")
    assert seqs(again) == [0, 7]
    assert again.missing_segments == 0  # the dropped segments' gap is explained


async def test_the_ack_log_is_compacted(make, tmp_path, monkeypatch):
    monkeypatch.setattr(diskbuffer, "_ACK_LOG_MAX", 200)
    buf = make()
    for i in range(60):
        await buf.append(batch(i, size=10))
    got = [buf.get_nowait() for _ in range(50)]
    for b in reversed(got):  # all behind the head: one "d" line each, then the head goes
        assert b is not None
        buf.ack(b)
    ack = tmp_path / "buf" / "ack"
    assert ack.stat().st_size < 250
    # no close (a crash): what the log holds must be enough
    again = make()
    assert seqs(again) == list(range(50, 60))


async def test_a_torn_ack_line_is_ignored(make, tmp_path):
    buf = make()
    for i in range(3):
        await buf.append(batch(i))
    got = buf.get_nowait()
    assert got is not None
    buf.ack(got)
    ack = tmp_path / "buf" / "ack"
    ack.write_bytes(ack.read_bytes() + b"a 3")  # a crash in the middle of a line
    again = make()
    assert seqs(again) == [1, 2]


async def test_on_disk_overhead_per_batch(make, tmp_path):
    buf = make(segment_size=1 << 20)
    await buf.append(batch(0, size=1000))
    size = segments(tmp_path / "buf")[0].stat().st_size
    assert size - 1000 == RECORD_HEADER_SIZE + len("line_protocol") + len("f0") + len("l0")
    await buf.close()


# -- recovery from damage ----------------------------------------------------------------------


async def _filled(make, n: int = 6, **kw) -> DiskBuffer:
    buf = make(**kw)
    for i in range(n):
        await buf.append(batch(i))
    await buf.close()
    return buf


async def test_a_torn_last_record_is_skipped(make, tmp_path, caplog):
    await _filled(make)
    seg = segments(tmp_path / "buf")[0]
    os.truncate(seg, seg.stat().st_size - 37)
    with caplog.at_level(logging.WARNING):
        again = make()
    assert seqs(again) == [0, 1, 2, 3, 4]
    assert again.corrupt_records == 1 and again.corrupt_bytes > 0
    assert f"{seg} is damaged at offset" in caplog.text
    await again.append(batch(9))  # new batches go to a new segment, after the torn tail
    again.rewind()
    assert seqs(again) == [0, 1, 2, 3, 4, 9]


async def test_flipped_bits_in_the_middle_lose_only_that_batch(make, tmp_path, caplog):
    await _filled(make)
    seg = segments(tmp_path / "buf")[0]
    data = bytearray(seg.read_bytes())
    record = len(data) // 6
    data[2 * record + record // 2] ^= 0x10  # in the payload of #2
    seg.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        again = make()
    assert seqs(again) == [0, 1, 3, 4, 5]
    assert (again.corrupt_records, again.corrupt_bytes) == (1, record)
    assert f"{seg} is damaged at offset {2 * record}" in caplog.text


async def test_two_damaged_places_in_a_segment_make_one_warning(make, tmp_path, caplog):
    await _filled(make)
    seg = segments(tmp_path / "buf")[0]
    data = bytearray(seg.read_bytes())
    record = len(data) // 6
    data[record + 60] ^= 0xFF  # in #1
    data[4 * record + 60] ^= 0xFF  # in #4
    seg.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        again = make()
    assert seqs(again) == [0, 2, 3, 5]
    assert (again.corrupt_records, again.corrupt_bytes) == (2, 2 * record)
    assert caplog.text.count("is damaged") == 1
    assert f"{seg} is damaged at offset {record}: {2 * record} bytes in 2 place(s)" in caplog.text


async def test_a_corrupt_length_is_skipped(make, tmp_path):
    await _filled(make)
    seg = segments(tmp_path / "buf")[0]
    data = bytearray(seg.read_bytes())
    record = len(data) // 6
    data[record + 30 : record + 34] = (2**31).to_bytes(4, "little")  # payload length of #1
    seg.write_bytes(bytes(data))
    again = make()
    assert seqs(again) == [0, 2, 3, 4, 5]
    assert again.corrupt_records == 1


async def test_a_zero_length_segment_is_skipped(make, tmp_path, caplog):
    await _filled(make, segment_size=1)
    (tmp_path / "buf" / "000000000099.seg").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        again = make()
    assert seqs(again) == [0, 1, 2, 3, 4, 5]
    assert again.empty_segments == 1
    assert "000000000099.seg is empty" in caplog.text


async def test_an_empty_segment_left_by_a_crash_is_no_gap_later(make, tmp_path):
    await _filled(make, n=2, segment_size=1)  # segments 1 and 2
    (tmp_path / "buf" / "000000000003.seg").write_bytes(b"")  # crashed right after a roll
    again = make(segment_size=1)
    await again.append(batch(2))  # goes to segment 4
    await again.close()
    third = make()
    assert seqs(third) == [0, 1, 2]
    assert (third.missing_segments, third.empty_segments) == (0, 0)


async def test_a_missing_segment_is_counted(make, tmp_path, caplog):
    await _filled(make, segment_size=1)
    (tmp_path / "buf" / "000000000003.seg").unlink()  # batch #2
    with caplog.at_level(logging.WARNING):
        again = make()
    assert seqs(again) == [0, 1, 3, 4, 5]
    assert again.missing_segments == 1
    assert "missing between 000000000002.seg and 000000000004.seg" in caplog.text


async def test_an_unreadable_ack_file_replays_everything(make, tmp_path, caplog):
    buf = make()
    for i in range(3):
        await buf.append(batch(i))
    got = buf.get_nowait()
    assert got is not None
    buf.ack(got)
    await buf.close()
    (tmp_path / "buf" / "ack").write_bytes(b"garbage\n")
    with caplog.at_level(logging.WARNING):
        again = make()
    assert seqs(again) == [0, 1, 2]  # at least once: #0 is still in the segment, it replays
    assert "unreadable" in caplog.text


async def test_a_segment_of_garbage_is_skipped_whole(make, tmp_path):
    await _filled(make, n=2, segment_size=1)
    (tmp_path / "buf" / "000000000003.seg").write_bytes(os.urandom(500))
    again = make()
    assert seqs(again) == [0, 1]
    assert (again.corrupt_records, again.corrupt_bytes) == (1, 500)


# -- stateful: append / get / ack / crash / reopen ---------------------------------------------


class DiskBufferMachine(RuleBasedStateMachine):
    """Random lives of a disk buffer checked against a model of what may come back.

    Invariants at every reopen: nothing acknowledged comes back, nothing synced and not
    acknowledged is lost, the order is kept, nothing appears that was never appended.
    """

    def __init__(self):
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.path = Path(self.tmp.name) / "buf"
        self.loop = asyncio.new_event_loop()
        self.next_seq = 0
        self.appended: dict[int, int] = {}  # seq -> ordinal in this buffer
        self.acked: set[int] = set()  # acknowledged or dropped: must never come back
        self.held: list[int] = []  # what the model knows is held, in order
        self.in_flight: list[EncodedBatch] = []
        self.buf = self._open()

    def _open(self) -> DiskBuffer:
        # a long sync interval: group commits happen only where the `sync` rule says
        # drop_oldest with room for a few batches: drops happen and must stay dropped
        return DiskBuffer(self.path, 400, "drop_oldest", sync_interval=3600, segment_size=300)

    def _run(self, coro):
        return self.loop.run_until_complete(coro)

    def _abandon(self) -> None:
        """The process dies: no close, no flush; its file descriptors go with it."""
        task = self.buf._sync_task
        if task is not None:
            task.cancel()
            self._run(asyncio.gather(task, return_exceptions=True))
        die(self.buf)
        self.buf = None  # type: ignore[assignment]

    def _reopen(self, synced: set[int]) -> None:
        self.buf = self._open()
        got = []
        while (b := self.buf.get_nowait()) is not None:
            got.append(b.seq)
            assert b == batch(b.seq, len(b.payload), b.records), "payload mixed up"
        self.buf.rewind()
        assert got == sorted(got), f"order lost: {got}"
        assert set(got) <= set(self.appended), f"never appended: {set(got) - set(self.appended)}"
        assert not set(got) & self.acked, f"acknowledged came back: {set(got) & self.acked}"
        lost = synced - set(got)
        assert not lost, f"synced and unacknowledged, lost: {lost}"
        self.held = got
        self.in_flight = []

    @rule(size=st.integers(0, 120))
    def append(self, size):
        seq = self.next_seq
        self.next_seq += 1
        dropped = self.buf.dropped_batches
        assert self._run(self.buf.append(batch(seq, size, records=1)))
        # drop_oldest takes the oldest batches that are not in flight
        start = len(self.in_flight)
        gone = self.held[start : start + self.buf.dropped_batches - dropped]
        del self.held[start : start + len(gone)]
        self.acked.update(gone)
        self.appended[seq] = self.buf.appended_position - 1
        self.held.append(seq)

    @rule(k=st.integers(1, 3))
    def get(self, k):
        # several at once: out-of-order acks need more than one batch in flight
        for _ in range(k):
            b = self.buf.get_nowait()
            if b is None:
                assert len(self.in_flight) == len(self.held)
                return
            assert b.seq == self.held[len(self.in_flight)]
            self.in_flight.append(b)

    @precondition(lambda self: self.in_flight)
    @rule(i=st.integers(0, 10))
    def ack(self, i):
        b = self.in_flight.pop(i % len(self.in_flight))
        self.buf.ack(b)
        self.acked.add(b.seq)
        self.held.remove(b.seq)

    @rule()
    def rewind(self):
        self.buf.rewind()
        self.in_flight = []

    @rule()
    def sync(self):
        self._run(self.buf.sync())

    @rule()
    def restart(self):
        synced = {s for s in self.held}
        self._run(self.buf.close())
        self._reopen(synced)
        assert self.buf.undelivered_batches == len(synced)

    @rule(tear=st.booleans(), at=st.floats(0, 1))
    def crash(self, tear, at):
        position = self.buf.synced_position
        synced = {s for s in self.held if self.appended[s] < position}
        self._abandon()
        segs = sorted(self.path.glob("*.seg"))
        if tear and segs:
            # a torn write after the last fsync: cut the last segment at or after the part
            # that is durable (the page cache is not lost here, so cutting models it)
            last = segs[-1]
            keep = self._durable_prefix(last, position)
            size = last.stat().st_size
            os.truncate(last, keep + int((size - keep) * at))
        self._reopen(synced)

    def _durable_prefix(self, seg: Path, position: int) -> int:
        """Bytes at the start of ``seg`` that hold only batches below ``position``."""
        data = seg.read_bytes()
        off = 0
        while off + RECORD_HEADER_SIZE <= len(data):
            n = int.from_bytes(data[off + 22 : off + 30], "little")
            if n >= position:
                break
            lc, lf, ll = (
                data[off + 5],
                int.from_bytes(data[off + 6 : off + 8], "little"),
                int.from_bytes(data[off + 8 : off + 10], "little"),
            )
            lp = int.from_bytes(data[off + 30 : off + 34], "little")
            off += RECORD_HEADER_SIZE + lc + lf + ll + lp
        return off

    @invariant()
    def counts_match(self):
        assert self.buf.undelivered_batches == len(self.held)
        assert self.buf.in_flight == len(self.in_flight)

    def teardown(self):
        if self.buf is not None:
            self._run(self.buf.close())
        self.loop.close()
        self.tmp.cleanup()


DiskBufferMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_disk_buffer_lives = DiskBufferMachine.TestCase


async def test_a_folder_is_held_by_one_open_buffer_at_a_time(make, tmp_path):
    from plantbus.broker.diskbuffer import FolderInUse

    first = make()
    await first.append(batch(0))
    # a second daemon on the same state_dir, or two sinks given one buffer.path
    held = rf"buf is in use by another buffer \(process {os.getpid()}\)"
    with pytest.raises(FolderInUse, match=held):
        DiskBuffer(tmp_path / "buf", 10_000, "drop_oldest")
    assert seqs(first) == [0]  # the refused one touched nothing
    first.rewind()
    await first.close()
    again = make()
    assert seqs(again) == [0]
