"""A disk-backed store-and-forward buffer: append-only segment files of encoded batches.

``DiskBuffer`` implements the same ``Buffer`` protocol as ``MemoryBuffer`` (in-flight
batches, out-of-order acks released in order, ``rewind``, ``seal``, the ``when_full``
policies and their drop counts) and keeps what it holds across a crash or a restart.

Directory layout (``path``)::

    000000000001.seg   segment files, numbered in write order, appended to only
    000000000002.seg
    ack                acknowledgement log (below), compacted via ``ack.tmp`` + rename
    synced             what the last group commit made durable (diagnostics, one line)

Record format (little-endian), one per batch, back to back in a segment::

    offset size
     0      4   magic b"PBDB"
     4      1   version (1)
     5      1   len(codec)
     6      2   len(first_id)
     8      2   len(last_id)
    10      4   records (u32)
    14      8   seq (i64, the outlet's batch sequence number)
    22      8   ordinal (u64, this buffer's append counter, strictly increasing)
    30      4   len(payload) (u32)
    34      4   CRC32 of bytes 0..33, the three strings and the payload
    38      -   codec, first_id, last_id (UTF-8), then the payload

So a batch costs 38 bytes plus its codec name and record IDs beyond its payload.

The ``ack`` file is a log of text lines: ``a N`` (every ordinal below ``N`` is gone),
``d N`` (ordinal ``N`` is gone: acknowledged behind an older batch, or dropped by
``drop_oldest``) and ``r A B`` (``A`` to ``B`` inclusive are gone). One line is appended
per release (a few µs), so an acknowledged batch never comes back after a process crash;
the log is fsynced with the next group commit and compacted into ``a``/``r`` lines (via
``ack.tmp`` + rename) once it passes 64 KiB. A torn last line is ignored; a lost or
unreadable ``ack`` file only means batches replay again (at least once, never lost).

Durability: appends are written at once (to the page cache) and fsynced by a background
task every ``sync_interval`` seconds (group commit), or on every append when it is 0. Every
batch whose ordinal is below ``synced_position`` survives a crash of the machine.

Recovery on open: segments are scanned in order; a record with a bad magic, length or CRC
(a torn write, flipped bits) is skipped up to the next record that checks out (resync on
the magic, verified by its CRC), a zero-length segment is removed, a gap in the segment
numbering that the ``ack`` state does not explain is a missing segment. Each damaged
segment is logged once (file and offset) and counted in ``corrupt_records``,
``corrupt_bytes``, ``missing_segments`` and ``empty_segments``. New batches always go to
a new segment, never after a damaged tail.

Memory: only each batch's metadata (about 200 bytes) stays in RAM; ``get()`` reads the
payload back from its segment.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fcntl
import io
import logging
import mmap
import os
import struct
import zlib
from collections import deque
from pathlib import Path

from plantbus.broker.buffer import BoundedBuffer, WhenFull
from plantbus.broker.sinks.base import EncodedBatch

__all__ = ["RECORD_HEADER_SIZE", "DiskBuffer"]

log = logging.getLogger(__name__)

_MAGIC = b"PBDB"
_VERSION = 1
# magic, version, codec_len, first_id_len, last_id_len, records, seq, ordinal, payload_len
_HEAD = struct.Struct("<4sBBHHIqQI")
_CRC = struct.Struct("<I")
RECORD_HEADER_SIZE = _HEAD.size + _CRC.size
"""Fixed bytes per record before the strings and the payload (38)."""
_SUFFIX = ".seg"
_ACK = "ack"
_LOCK = "lock"  # flock'd by the open buffer; holds its pid
_SYNCED = "synced"  # what the last group commit made durable (diagnostics, never read back)
_SYNCED_SIZE = 100  # fixed length: an overwrite in place never leaves a longer old tail
_ACK_LOG_MAX = 64 * 1024  # compact the ack log past this size
_ORDINAL_LIMIT = 1 << 63  # ordinals count appends from 0: an ack log line beyond is damage


class _Entry:
    """One held batch: where it is on disk and its metadata (never its payload)."""

    __slots__ = (
        "acked",
        "batch",
        "codec",
        "first_id",
        "last_id",
        "length",
        "n",
        "offset",
        "records",
        "segno",
        "seq",
    )

    def __init__(
        self,
        n: int,
        segno: int,
        offset: int,
        length: int,
        records: int,
        codec: str,
        seq: int,
        first_id: str,
        last_id: str,
    ):
        self.n = n
        self.segno = segno
        self.offset = offset  # of the payload in the segment
        self.length = length
        self.records = records
        self.codec = codec
        self.seq = seq
        self.first_id = first_id
        self.last_id = last_id
        self.batch: EncodedBatch | None = None  # the object handed out while in flight
        self.acked = False


def _encode(n: int, batch: EncodedBatch) -> tuple[bytes, bytes]:
    """The header (with CRC) and the metadata strings of one record."""
    codec = batch.codec.encode()
    first = batch.first_id.encode()
    last = batch.last_id.encode()
    head = _HEAD.pack(
        _MAGIC,
        _VERSION,
        len(codec),
        len(first),
        len(last),
        batch.records,
        batch.seq,
        n,
        len(batch.payload),
    )
    meta = codec + first + last
    crc = zlib.crc32(batch.payload, zlib.crc32(meta, zlib.crc32(head)))
    return head + _CRC.pack(crc), meta


def _parse(buf: mmap.mmap, off: int, end: int) -> tuple[_Entry, int] | None:
    """The record at ``off`` (its entry with ``segno`` unset, and its end), or ``None``."""
    if end - off < RECORD_HEADER_SIZE:
        return None
    magic, version, lc, lf, ll, records, seq, n, lp = _HEAD.unpack_from(buf, off)
    if magic != _MAGIC or version != _VERSION:
        return None
    meta_at = off + RECORD_HEADER_SIZE
    pay_at = meta_at + lc + lf + ll
    rec_end = pay_at + lp
    if rec_end > end:
        return None
    (crc,) = _CRC.unpack_from(buf, off + _HEAD.size)
    got = zlib.crc32(buf[off : off + _HEAD.size])
    got = zlib.crc32(buf[meta_at:rec_end], got)
    if got != crc:
        return None
    try:
        codec = bytes(buf[meta_at : meta_at + lc]).decode()
        first = bytes(buf[meta_at + lc : meta_at + lc + lf]).decode()
        last = bytes(buf[meta_at + lc + lf : pay_at]).decode()
    except UnicodeDecodeError:
        return None
    return _Entry(n, -1, pay_at, lp, records, codec, seq, first, last), rec_end


def _ranges(values: set[int]) -> list[list[int]]:
    """Sorted inclusive ``[a, b]`` runs of ``values`` (drops come in runs: stays small)."""
    out: list[list[int]] = []
    for v in sorted(values):
        if out and out[-1][1] == v - 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return out


def _fsync_all(fds: list[int], paths: list[Path]) -> None:
    """Fsync and close ``fds``, then fsync ``paths`` (the ack file, the directory)."""
    try:
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            continue  # e.g. the ack file between writes: the next commit gets it
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class FolderInUse(OSError):
    """Another open buffer (in this process or another) holds the folder."""


def _lock_folder(path: Path) -> int:
    """Take the folder's ``lock`` file (flock, released when the holder closes or dies).

    Two buffers appending to one folder would interleave segments and acks: a second
    daemon on the same ``state_dir``, or two sinks given one ``buffer.path``.
    """
    fd = os.open(path / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise FolderInUse(
            f"disk buffer folder {path} is in use by another buffer (process {holder}); "
            "two sinks or two daemons cannot share one"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class DiskBuffer(BoundedBuffer[_Entry]):
    """A byte-bounded buffer of encoded batches in append-only segment files.

    Opening it recovers what an earlier instance left in ``path`` (see the module doc):
    only unacknowledged batches replay, in order. The constructor does blocking file I/O
    (the recovery scan); build it off the event loop when a large backlog is expected.

    Args:
        path: the buffer's own directory (created if missing).
        max_size: bound in bytes of the payloads held (in flight included), as in
            ``MemoryBuffer``; files hold up to one segment more (framing, dropped and
            acknowledged batches whose segment still holds a live one).
        when_full: ``block``, ``drop_oldest`` or ``drop_newest``.
        sync_interval: seconds between group commits (fsync); 0 fsyncs every append.
        name: for logs and metrics.
        segment_size: a new segment is started once the current one reaches this size.

    Attributes:
        synced_position: every batch appended with an ordinal below it is durable.
        synced_seq: ``seq`` of the newest durable batch (-1: none yet).
        synced_records: records appended by this instance (since it was opened) that are
            durable; with ``synced_position`` and ``synced_seq`` it is also written to the
            ``synced`` file after every group commit.
        appended_position: the ordinal the next appended batch gets.
        corrupt_records / corrupt_bytes / missing_segments / empty_segments: damage found
            when opening.
    """

    def __init__(
        self,
        path: Path,
        max_size: int,
        when_full: WhenFull = "drop_oldest",
        *,
        sync_interval: float = 1.0,
        name: str = "",
        segment_size: int = 64 * 1024 * 1024,
    ):
        super().__init__(max_size, when_full, name)
        if sync_interval < 0:
            raise ValueError("buffer sync_interval cannot be negative")
        if segment_size < 1:
            raise ValueError("buffer segment_size must be at least 1 byte")
        self.path = Path(path)
        self.sync_interval = sync_interval
        self.segment_size = segment_size
        self.corrupt_records = 0
        self.corrupt_bytes = 0
        self.missing_segments = 0
        self.empty_segments = 0
        self._acked = 0  # in-flight entries acked out of order (still held)
        self._by_id: dict[int, _Entry] = {}
        self._files: dict[int, io.FileIO] = {}  # open segments that hold a live batch
        self._live: dict[int, int] = {}  # segment number -> batches held in it
        self._active: int | None = None  # the segment appends go to
        self._active_size = 0
        self._disk_bytes = 0
        self._acked_below = 0
        self._dead: set[int] = set()  # ordinals >= _acked_below that are gone
        self._dead_starts: list[int] = []  # while recovering: the ack log's "r" ranges, merged
        self._dead_ends: list[int] = []
        self._sync_task: asyncio.Task[None] | None = None
        self._sync_lock = asyncio.Lock()
        self._unsynced_fds: list[int] = []  # dups of rolled-over segments not fsynced yet
        self._dirty = False
        self._dir_dirty = False
        self._ack_dirty = False
        self._ack_fd: int | None = None  # the ack log, opened at the first write
        self._ack_log_size = 0
        self._last_seq = -1
        self.synced_seq = -1
        self._appended_records = 0  # records appended by this instance
        self.synced_records = 0
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = _lock_folder(self.path)
        try:
            self._next_n = self._recover()
            self.appended_position = self._next_n
            self.synced_position = self._next_n  # what recovery found is on disk already
            self._write_synced_state()  # this instance's, from zero: never an earlier one's
        except BaseException:
            self._release_folder()
            raise
        if self._items:
            self._readable.set()

    # -- recovery ----------------------------------------------------------------------------

    def _seg_path(self, segno: int) -> Path:
        return self.path / f"{segno:012d}{_SUFFIX}"

    def _load_acks(self) -> None:
        p = self.path / _ACK
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            # safe direction: without the ack state everything on disk replays once more
            log.warning("disk buffer %r: %s is unreadable (%s): replaying all", self.name, p, e)
            return
        lines = data.split(b"\n")
        lines.pop()  # after the last newline: empty, or a line torn by a crash (ignored)
        ranges: list[tuple[int, int]] = []
        for i, line in enumerate(lines):
            try:
                kind, *args = line.split()
                nums = [int(a) for a in args]
                if not all(0 <= x < _ORDINAL_LIMIT for x in nums):
                    raise ValueError(f"ordinal out of range in {line[:40]!r}")
                if kind == b"a" and len(nums) == 1:
                    self._acked_below = max(self._acked_below, nums[0])
                elif kind == b"d" and len(nums) == 1:
                    self._dead.add(nums[0])
                elif kind == b"r" and len(nums) == 2 and nums[0] <= nums[1]:
                    # kept as a range: a damaged line such as "r 0 10^18" must not become
                    # a set of 10^18 ordinals; only those still on disk are looked up
                    ranges.append((nums[0], nums[1]))
                else:
                    raise ValueError(f"unknown entry {line[:40]!r}")
            except ValueError as e:
                # what follows is lost: those batches replay once more (never lost)
                log.warning(
                    "disk buffer %r: %s is unreadable from line %d (%s): the rest replays",
                    self.name,
                    p,
                    i + 1,
                    e,
                )
                break
        self._dead = {n for n in self._dead if n >= self._acked_below}
        merged: list[list[int]] = []
        for a, b in sorted(r for r in ranges if r[1] >= self._acked_below):
            if merged and a <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self._dead_starts = [a for a, _ in merged]
        self._dead_ends = [b for _, b in merged]

    def _gone(self, n: int) -> bool:
        if n < self._acked_below or n in self._dead:
            return True
        i = bisect.bisect_right(self._dead_starts, n) - 1  # recovery only: the ack log's ranges
        return i >= 0 and n <= self._dead_ends[i]

    def _recover(self) -> int:
        """Scan the segments, index every intact live batch; returns the next ordinal."""
        self._load_acks()
        segnos = sorted(int(p.stem) for p in self.path.glob(f"*{_SUFFIX}") if p.stem.isdigit())
        max_n = -1
        prev: int | None = None  # the previous segment's number
        prev_last: int | None = None  # its last intact ordinal
        for segno in segnos:
            p = self._seg_path(segno)
            size = p.stat().st_size
            if prev is not None and segno != prev + 1:
                self._check_gap(prev, segno, prev_last, self._first_n(p, size))
            prev = segno  # an empty segment still takes its number: no gap after it
            if size == 0:
                # a crash right after a segment was created: nothing was in it
                self.empty_segments += 1
                log.warning("disk buffer %r: %s is empty: removed", self.name, p)
                p.unlink()
                continue
            found: list[_Entry] = []
            damage: list[tuple[int, int]] = []  # (offset, bytes skipped)
            with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                off = 0
                while off < size:
                    parsed = _parse(mm, off, size)
                    if parsed is not None and (not found or parsed[0].n > found[-1].n):
                        entry, off = parsed
                        entry.segno = segno
                        found.append(entry)
                        continue
                    # damaged: resync on the next magic whose record checks out
                    bad_at = off
                    nxt = mm.find(_MAGIC, off + 1)
                    while nxt != -1:
                        cand = _parse(mm, nxt, size)
                        if cand is not None and (not found or cand[0].n > found[-1].n):
                            break
                        nxt = mm.find(_MAGIC, nxt + 1)
                    off = size if nxt == -1 else nxt
                    damage.append((bad_at, off - bad_at))
            if damage:
                # one warning per damaged segment, however many places are hit
                skipped = sum(n for _, n in damage)
                self.corrupt_records += len(damage)
                self.corrupt_bytes += skipped
                log.warning(
                    "disk buffer %r: %s is damaged at offset %d%s: %d bytes in %d place(s) "
                    "skipped, %d intact batches recovered from it",
                    self.name,
                    p,
                    damage[0][0],
                    " (torn or corrupt tail)" if sum(damage[-1]) == size else "",
                    skipped,
                    len(damage),
                    len(found),
                )
            if found:
                prev_last = found[-1].n
                max_n = max(max_n, prev_last)
            live: list[_Entry] = []
            for e in found:
                if not self._gone(e.n):
                    live.append(e)
                elif e.n >= self._acked_below:
                    self._dead.add(e.n)  # still on disk: the ack log must keep saying it is gone
            self._disk_bytes += size
            if not live:
                p.unlink()
                self._disk_bytes -= size
                continue
            self._files[segno] = io.FileIO(p, "r")
            # what a crashed process left may sit in the page cache only: make it durable
            # before ``synced_position`` covers it
            os.fsync(self._files[segno].fileno())
            self._live[segno] = len(live)
            for e in live:
                self._items.append(e)
                self._bytes += e.length
                self._records += e.records
        self._next_segno = (segnos[-1] + 1) if segnos else 1
        # never hand out an ordinal the ack state already counts as gone (a batch that was
        # acknowledged but whose record was torn away must not make a new one look acked)
        last_dead = max(max(self._dead, default=-1), max(self._dead_ends, default=-1))
        self._dead_starts, self._dead_ends = [], []  # what is on disk is in _dead now
        return max(max_n + 1, self._acked_below, last_dead + 1)

    @staticmethod
    def _first_n(p: Path, size: int) -> int | None:
        """The ordinal of the first record of a segment, if that record is intact."""
        if size == 0:
            return None
        with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            parsed = _parse(mm, 0, size)
        return None if parsed is None else parsed[0].n

    def _check_gap(self, prev: int, segno: int, last: int | None, first: int | None) -> None:
        """Count segments missing between ``prev`` and ``segno`` unless all they held is gone."""
        if (
            last is not None
            and first is not None
            and all(self._gone(n) for n in range(last + 1, first))
        ):
            return  # deleted after every batch in it was delivered or dropped
        missing = segno - prev - 1
        self.missing_segments += missing
        log.warning(
            "disk buffer %r: %d segment(s) missing between %s and %s",
            self.name,
            missing,
            self._seg_path(prev).name,
            self._seg_path(segno).name,
        )

    # -- state -------------------------------------------------------------------------------

    @property
    def disk_bytes(self) -> int:
        """Bytes of the segment files (framing and not yet deletable batches included)."""
        return self._disk_bytes

    @property
    def records(self) -> int:
        """Records not yet acknowledged, in flight included."""
        return self._records

    @property
    def in_flight(self) -> int:
        """Batches handed out and not yet acknowledged."""
        return self._sent - self._acked

    @property
    def undelivered_batches(self) -> int:
        """Batches not yet acknowledged: pending and in flight."""
        return len(self._items) - self._acked

    # -- persistence -------------------------------------------------------------------------

    def _write_acks(self, dead: list[int]) -> None:
        """Log the ordinals ``dead`` gone and the new head; fsynced with the next commit.

        One small append per call (a few µs); the log is compacted (rewritten whole, then
        renamed over) once it passes ``_ACK_LOG_MAX`` bytes.
        """
        below = self._items[0].n if self._items else self._next_n
        lines = [b"d %d\n" % n for n in dead if n >= below]
        if below != self._acked_below:
            self._acked_below = below
            self._dead = {n for n in self._dead if n >= below}
            lines.append(b"a %d\n" % below)
        if not lines:
            return
        if self._ack_fd is None or self._ack_log_size > _ACK_LOG_MAX:
            self._compact_acks()
        else:
            data = b"".join(lines)
            os.write(self._ack_fd, data)
            self._ack_log_size += len(data)
        self._ack_dirty = True
        self._dirty = True

    def _compact_acks(self) -> None:
        """Rewrite the ack log as the current state (atomic rename)."""
        data = b"a %d\n" % self._acked_below + b"".join(
            b"r %d %d\n" % (a, b) for a, b in _ranges(self._dead)
        )
        tmp = self.path / (_ACK + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        try:
            os.write(fd, data)
            os.replace(tmp, self.path / _ACK)
        except BaseException:
            os.close(fd)
            raise
        if self._ack_fd is not None:
            os.close(self._ack_fd)
        self._ack_fd = fd
        self._ack_log_size = len(data)

    def _release(self, entry: _Entry) -> None:
        """One batch left the buffer: delete its segment once nothing there is held."""
        left = self._live[entry.segno] - 1
        if left:
            self._live[entry.segno] = left
            return
        del self._live[entry.segno]
        if entry.segno != self._active:
            self._delete(entry.segno)

    def _delete(self, segno: int) -> None:
        f = self._files.pop(segno, None)
        if f is not None:
            f.close()
        p = self._seg_path(segno)
        with contextlib.suppress(FileNotFoundError):
            self._disk_bytes -= p.stat().st_size
            p.unlink()

    def _roll(self) -> None:
        """Start a new segment; the old one is fsynced by the next group commit."""
        old = self._active
        if old is not None:
            self._unsynced_fds.append(os.dup(self._files[old].fileno()))
            if old not in self._live:
                self._delete(old)
        segno = self._next_segno
        self._next_segno += 1
        self._files[segno] = io.FileIO(self._seg_path(segno), "a+")
        self._active = segno
        self._active_size = 0
        self._dir_dirty = True

    def _write(self, batch: EncodedBatch) -> _Entry:
        if self._active is None or self._active_size >= self.segment_size:
            self._roll()
        assert self._active is not None
        n = self._next_n
        head, meta = _encode(n, batch)
        fd = self._files[self._active].fileno()
        parts = [head, meta, batch.payload]
        total = len(head) + len(meta) + len(batch.payload)
        done = os.writev(fd, parts)
        if done < total:  # a short write (rare): write the rest in one piece
            rest = (head + meta + batch.payload)[done:]
            while rest:
                rest = rest[os.write(fd, rest) :]
        offset = self._active_size + len(head) + len(meta)
        entry = _Entry(
            n,
            self._active,
            offset,
            len(batch.payload),
            batch.records,
            batch.codec,
            batch.seq,
            batch.first_id,
            batch.last_id,
        )
        self._active_size += total
        self._disk_bytes += total
        self._live[self._active] = self._live.get(self._active, 0) + 1
        self._next_n = n + 1
        self.appended_position = self._next_n
        self._last_seq = batch.seq
        self._appended_records += batch.records
        self._dirty = True
        return entry

    async def sync(self) -> None:
        """Fsync what was written so far (off the event loop); a group commit."""
        async with self._sync_lock:
            if not self._dirty:
                return
            position, seq, records = self._next_n, self._last_seq, self._appended_records
            fds, self._unsynced_fds = self._unsynced_fds, []
            active = self._files.get(self._active) if self._active is not None else None
            if active is not None and not active.closed:
                fds.append(os.dup(active.fileno()))
            paths: list[Path] = []
            if self._ack_dirty:
                paths.append(self.path / _ACK)
            if self._dir_dirty or self._ack_dirty:
                paths.append(self.path)  # new segment files and the ack rename
            self._dirty = self._dir_dirty = self._ack_dirty = False
            try:
                await asyncio.to_thread(_fsync_all, fds, paths)
            except BaseException:
                self._dirty = self._dir_dirty = self._ack_dirty = True
                raise
            self.synced_position = max(self.synced_position, position)
            if seq != -1:
                self.synced_seq = seq
            self.synced_records = max(self.synced_records, records)
            self._write_synced_state()

    def _write_synced_state(self) -> None:
        """Publish what the last group commit made durable in ``synced`` (one small write).

        Diagnostics for operators and tests (the buffer never reads it back): the file
        survives a crash of the process, so after a ``kill -9`` it still says which batches
        were durable. Not fsynced itself: after a power cut it may lag behind.
        """
        data = b"synced_position=%d synced_seq=%d synced_records=%d pid=%d\n" % (
            self.synced_position,
            self.synced_seq,
            self.synced_records,
            os.getpid(),
        )
        try:
            fd = os.open(self.path / _SYNCED, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.pwrite(fd, data.ljust(_SYNCED_SIZE), 0)
            finally:
                os.close(fd)
        except OSError as e:
            log.warning("disk buffer %r: cannot write %s: %s", self.name, _SYNCED, e)

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sync_interval)
            try:
                await self.sync()
            except OSError as e:
                log.error("disk buffer %r: fsync failed: %s", self.name, e)

    # -- producer side -----------------------------------------------------------------------

    async def _push(self, batch: EncodedBatch) -> None:
        entry = self._write(batch)
        self._items.append(entry)
        self._bytes += entry.length
        self._records += entry.records
        self._readable.set()
        if self.sync_interval == 0:
            await self.sync()
        elif self._sync_task is None:
            self._sync_task = asyncio.get_running_loop().create_task(
                self._sync_loop(), name=f"diskbuffer-sync-{self.name}"
            )

    def _size(self, item: _Entry) -> int:
        return item.length

    def _evicted(self, items: list[_Entry]) -> None:
        for e in items:
            self._dead.add(e.n)
        # a drop is persisted like an ack (it never replays), before any segment goes: a
        # crash in between must not look like a missing segment
        self._write_acks([e.n for e in items])
        for e in items:
            self._release(e)

    # -- consumer side -----------------------------------------------------------------------

    def get_nowait(self) -> EncodedBatch | None:
        """The oldest batch not yet in flight (read from disk, now in flight), or ``None``.

        After ``close()`` this is always ``None``: what is held waits on disk.
        """
        if self.closed or self._sent >= len(self._items):
            return None
        entry = self._items[self._sent]
        fd = self._files[entry.segno].fileno()
        payload = os.pread(fd, entry.length, entry.offset)
        if len(payload) != entry.length:
            raise OSError(
                f"disk buffer {self.name!r}: {self._seg_path(entry.segno)} was truncated "
                f"under a held batch (seq={entry.seq})"
            )
        batch = EncodedBatch(
            payload=payload,
            records=entry.records,
            codec=entry.codec,
            seq=entry.seq,
            first_id=entry.first_id,
            last_id=entry.last_id,
        )
        entry.batch = batch
        self._by_id[id(batch)] = entry
        self._sent += 1
        if self._sent == len(self._items) and not self.sealed:
            self._readable.clear()
        return batch

    async def get(self) -> EncodedBatch | None:
        """Wait for a batch to send; ``None`` once sealed (or closed) and nothing is left."""
        while self.closed or self._sent >= len(self._items):
            if self.sealed or self.closed:
                return None
            await self._readable.wait()
        return self.get_nowait()

    def ack(self, batch: EncodedBatch) -> None:
        """Release an in-flight ``batch``; batches leave in order, whatever order acks come in.

        Raises:
            ValueError: ``batch`` is not in flight here (a bug in the caller).
        """
        entry = self._by_id.get(id(batch))
        if entry is None or entry.batch is not batch:
            raise ValueError(f"buffer {self.name!r}: batch seq={batch.seq} is not in flight")
        if entry.acked:
            raise ValueError(f"buffer {self.name!r}: batch seq={batch.seq} was acknowledged twice")
        entry.acked = True
        self._acked += 1
        self._records -= entry.records
        self._dead.add(entry.n)  # persisted now: even acked behind an older one, never again
        gone: list[_Entry] = []
        while self._sent and self._items[0].acked:
            head = self._items.popleft()
            self._acked -= 1
            self._sent -= 1
            self._bytes -= head.length
            if head.batch is not None:
                self._by_id.pop(id(head.batch), None)
            gone.append(head)
        # logged before any segment goes: a crash in between is no missing segment
        self._write_acks([entry.n])
        for head in gone:
            self._release(head)
        self._room.set()

    def rewind(self) -> None:
        """Make every unacknowledged in-flight batch pending again, in order."""
        if self._acked:
            kept: deque[_Entry] = deque()
            for e in self._items:
                if e.acked:
                    self._bytes -= e.length
                    self._release(e)
                else:
                    kept.append(e)
            self._items = kept
            self._acked = 0
        for e in self._items:
            e.batch = None
        self._by_id.clear()
        self._sent = 0
        if self._items:
            self._readable.set()

    async def close(self) -> None:
        """Seal, wake every waiter, fsync and close the files; what is held stays on disk."""
        if self.closed:
            return
        self.closed = True
        self.seal()
        self._room.set()
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
            self._sync_task = None
        try:
            await self.sync()
        finally:
            for f in self._files.values():
                f.close()
            self._files.clear()
            if self._ack_fd is not None:
                os.close(self._ack_fd)
                self._ack_fd = None
            self._release_folder()

    def _release_folder(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __repr__(self) -> str:
        return (
            f"DiskBuffer({self.name!r}, path={str(self.path)!r}, batches={len(self._items)}, "
            f"bytes={self._bytes}, max_size={self.max_size}, when_full={self.when_full!r})"
        )
