"""The file sink: appends batches, rotates by size (never splitting a batch), keeps max_files,
reopens without losing its place, and leaves no partial batch behind a failed write."""

from __future__ import annotations

import asyncio
import re
import resource
import signal
from pathlib import Path

import pytest
from pydantic import ValidationError

from plantbus.broker.bus import Bus
from plantbus.broker.connector import BuildContext
from plantbus.broker.ids import new_ids
from plantbus.broker.outlet import Outlet
from plantbus.broker.record import Record, Series
from plantbus.broker.registry import load_sink_module
from plantbus.broker.sinks.base import EncodedBatch, RetryableSinkError
from plantbus.broker.sinks.file import Config, FileSink
from plantbus.codecs import line_protocol

CTX = BuildContext(node_name="edge-07", node_tags={}, state_dir=Path("/nonexistent"))
SERIES = Series("plant/h1/press7", "press7", {"device": "press7"})
UID = re.compile(r'uid="([^"]+)"')
T0 = 1_700_000_000_000_000_000


def records(n: int, start: int = 0) -> list[Record]:
    ids = new_ids(n)
    return [Record(SERIES, {"n": 100_000 + start + i}, T0 + start + i, ids[i]) for i in range(n)]


def file_config(path: Path, **kw: object) -> Config:
    kw.setdefault("name", "file")
    return Config.model_validate({"path": str(path), **kw})


def build(cfg: Config) -> FileSink:
    sink = load_sink_module("file").build(cfg, CTX)
    assert isinstance(sink, FileSink)
    return sink


async def deliver(cfg: Config, batches: list[list[Record]]) -> Outlet:
    bus = Bus()
    outlet = Outlet("o", bus, [(cfg, build(cfg))])
    task = asyncio.create_task(outlet.run())
    for b in batches:
        await bus.publish(b)
    await outlet.stop(10.0)
    await task
    return outlet


def files_oldest_first(path: Path) -> list[Path]:
    rotated = sorted(
        path.parent.glob(path.name + ".*"), key=lambda p: int(p.suffix[1:]), reverse=True
    )
    return [*rotated, path] if path.exists() else rotated


def uids_in(files: list[Path]) -> list[str]:
    return [u for f in files for u in UID.findall(f.read_text())]


def batch_bytes_of(n: int) -> int:
    """Encoded size of a batch of ``n`` records (all lines have the same length)."""
    return len(line_protocol.encode(records(n)))


async def test_rotates_by_size_and_every_record_is_there_once(tmp_path):
    path = tmp_path / "var" / "plantbus.lp"
    one = batch_bytes_of(10)
    cfg = file_config(path, batch_size=10, flush_interval="60s", max_size=one * 3, max_files=10)
    sent = [records(10, start=i * 10) for i in range(20)]
    outlet = await deliver(cfg, sent)
    files = files_oldest_first(path)
    # 20 batches, 3 per file: 6 full files and one with the last 2 batches
    assert [f.name for f in files] == [f"plantbus.lp.{i}" for i in range(6, 0, -1)] + [
        "plantbus.lp"
    ]
    assert [f.stat().st_size for f in files] == [one * 3] * 6 + [one * 2]
    assert uids_in(files) == [r.id for b in sent for r in b]
    assert outlet.metrics()["records_out"] == 200


async def test_keeps_max_files_rotated_files(tmp_path):
    path = tmp_path / "plantbus.lp"
    one = batch_bytes_of(10)
    cfg = file_config(path, batch_size=10, flush_interval="60s", max_size=one * 2, max_files=2)
    sent = [records(10, start=i * 10) for i in range(9)]
    await deliver(cfg, sent)
    files = files_oldest_first(path)
    assert [f.name for f in files] == ["plantbus.lp.2", "plantbus.lp.1", "plantbus.lp"]
    # the 5 files written held batches 0-1, 2-3, 4-5, 6-7, 8: the oldest two were deleted
    assert uids_in(files) == [r.id for b in sent[4:] for r in b]


async def test_max_files_zero_starts_the_file_over(tmp_path):
    path = tmp_path / "plantbus.lp"
    one = batch_bytes_of(10)
    cfg = file_config(path, batch_size=10, flush_interval="60s", max_size=one * 2, max_files=0)
    sent = [records(10, start=i * 10) for i in range(5)]
    await deliver(cfg, sent)
    assert files_oldest_first(path) == [path]
    assert uids_in([path]) == [r.id for r in sent[4]]


async def test_reopening_appends_and_counts_the_existing_size(tmp_path):
    path = tmp_path / "plantbus.lp"
    one = batch_bytes_of(10)
    cfg = file_config(path, batch_size=10, flush_interval="60s", max_size=one * 3)
    first = [records(10, start=i * 10) for i in range(2)]
    await deliver(cfg, first)
    second = [records(10, start=100 + i * 10) for i in range(2)]
    await deliver(cfg, second)  # a restart: the third batch fills the file, the fourth rotates
    files = files_oldest_first(path)
    assert [f.stat().st_size for f in files] == [one * 3, one]
    assert uids_in(files) == [r.id for b in first + second for r in b]


async def test_a_batch_is_never_split_and_an_oversized_one_gets_its_own_file(tmp_path):
    path = tmp_path / "plantbus.lp"
    sink = build(file_config(path, max_size=100))
    await sink.connect()
    small = EncodedBatch(b"m v=1 1\n", 1, "line_protocol", seq=1)
    big = EncodedBatch(b"m v=2 2\n" * 30, 30, "line_protocol", seq=2)
    no_newline = EncodedBatch(b"m v=3 3", 1, "line_protocol", seq=3)
    for b in (small, big, no_newline):
        await sink.write(b)
    await sink.close()
    assert (path.with_name("plantbus.lp.2")).read_bytes() == small.payload
    assert (path.with_name("plantbus.lp.1")).read_bytes() == big.payload
    assert path.read_bytes() == b"m v=3 3\n"  # a batch always ends its last line
    assert sink.rotations == 2


async def test_a_large_write_cancelled_by_a_timeout_is_not_written_twice(tmp_path):
    path = tmp_path / "plantbus.lp"
    sink = build(file_config(path))
    await sink.connect()
    payload = b"m,device=d v=1.5 1700000000000000000\n" * 200_000  # 7.6 MB: written in a thread
    big = EncodedBatch(payload, 200_000, "line_protocol", seq=1, first_id="a", last_id="b")
    attempt = asyncio.create_task(sink.write(big))
    await asyncio.sleep(0)  # the thread has started the write
    attempt.cancel()  # what the outlet's timeout does
    with pytest.raises(asyncio.CancelledError):
        await attempt
    await sink.write(big)  # the outlet's retry of the same batch
    await sink.close()
    assert path.stat().st_size == len(payload)


async def test_a_failed_write_leaves_no_partial_batch(tmp_path):
    path = tmp_path / "plantbus.lp"
    sink = build(file_config(path))
    await sink.connect()
    first = EncodedBatch(b"m v=1 1\n" * 100, 100, "line_protocol", seq=1)
    second = EncodedBatch(b"m v=2 2\n" * 100, 100, "line_protocol", seq=2)
    await sink.write(first)
    # a file size limit makes the kernel write part of the batch, then fail (EFBIG), the way a
    # full disk would (ENOSPC)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(first.payload) + 50, hard))
    try:
        with pytest.raises(RetryableSinkError, match=r"writing .* failed"):
            await sink.write(second)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert path.read_bytes() == first.payload
    await sink.write(second)  # the retry, once there is room
    await sink.close()
    assert path.read_bytes() == first.payload + second.payload


async def test_unwritable_path_is_a_retryable_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    sink = build(file_config(blocker / "plantbus.lp"))
    with pytest.raises(RetryableSinkError, match="cannot open"):
        await sink.connect()
    await sink.close()


def test_config_defaults_and_errors():
    cfg = Config.model_validate({})
    assert (cfg.path, cfg.max_size, cfg.max_files) == (Path("var/plantbus.lp"), 100 * 2**20, 10)
    assert Config.model_validate({"max_size": "1MiB"}).max_size == 2**20
    with pytest.raises(ValidationError, match="line_protocol"):
        Config.model_validate({"codec": "json"})
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        Config.model_validate({"max_files": -1})
    with pytest.raises(ValidationError, match="Extra inputs"):
        Config.model_validate({"max_bytes": "1MiB"})
