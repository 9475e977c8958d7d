"""Fuzz: the disk buffer's recovery of damaged state (segments and the ack log).

A real buffer writes batches over several segments and acknowledges some (out of order
too); its files are the seed. Each input damages that state: bit flips, cuts, inserts and
duplications in a segment or the ack log, a segment removed, a segment of random bytes,
an ack log of random lines. Opening the buffer must recover without raising and without
hanging, and what it hands out must be exactly some of the original unacknowledged
batches, in order (the CRC makes damage skip a batch, never alter it); new appends go on
after them. Runs on tmpfs (``/dev/shm``) when there is one: recovery fsyncs.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzzkit import FUZZ, mutate, within
from hypothesis import example, given
from hypothesis import strategies as st

from plantbus.broker.diskbuffer import DiskBuffer
from plantbus.broker.sinks.base import EncodedBatch

pytestmark = pytest.mark.fuzz

SCRATCH = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else None


def _batch(seq: int) -> EncodedBatch:
    payload = f"m,seq={seq} v={seq}i\n".encode() * (1 + seq % 3)
    return EncodedBatch(
        payload, 1 + seq % 3, "line_protocol", seq, f"0190first{seq}", f"0190last{seq}"
    )


ORIGINAL = [_batch(i) for i in range(12)]
KEY = {b.seq: (b.payload, b.records, b.codec, b.first_id, b.last_id) for b in ORIGINAL}


async def _seed(path: Path) -> set[int]:
    """A buffer's files after 12 appends over ~4 segments, some batches acked; the acked seqs."""
    buf = DiskBuffer(path, 1 << 20, "block", sync_interval=0, segment_size=100)
    for b in ORIGINAL:
        await buf.append(b)
    out = [buf.get_nowait() for _ in range(8)]
    for b in (out[0], out[1], out[4], out[6]):  # 4 and 6 acked behind a held one
        buf.ack(b)  # type: ignore[arg-type]
    await buf.close()
    return {0, 1, 4, 6}


@pytest.fixture(scope="module")
def seed_state() -> Iterator[tuple[dict[str, bytes], set[int]]]:
    d = Path(tempfile.mkdtemp(dir=SCRATCH))
    try:
        acked = asyncio.run(_seed(d / "buf"))
        files = {p.name: p.read_bytes() for p in sorted((d / "buf").iterdir())}
        assert sum(n.endswith(".seg") for n in files) >= 3
        yield files, acked
    finally:
        shutil.rmtree(d)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(dir=SCRATCH))
    yield d
    shutil.rmtree(d)


def _damage(files: dict[str, bytes], seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    out = dict(files)
    for _ in range(rng.randint(1, 3)):
        names = sorted(out)
        k = rng.randrange(8)
        if k <= 2:  # mutate a segment
            segs = [n for n in names if n.endswith(".seg")]
            if segs:
                n = rng.choice(segs)
                out[n] = mutate(out[n], rng.randrange(2**32), max_ops=3)
        elif k == 3:  # mutate the ack log
            out["ack"] = mutate(out.get("ack", b""), rng.randrange(2**32), max_ops=3)
        elif k == 4:  # an ack log of random lines
            out["ack"] = b"".join(
                rng.choice([b"a", b"d", b"r", b"x", b""])
                + b" "
                + b" ".join(
                    str(rng.choice([0, 3, 7, 11, 12, -1, 2**63, 2**64, 10**18, 10**30])).encode()
                    for _ in range(rng.randint(0, 3))
                )
                + b"\n"
                for _ in range(rng.randint(1, 4))
            )
        elif k == 5:  # a segment removed
            segs = [n for n in names if n.endswith(".seg")]
            if segs:
                del out[rng.choice(segs)]
        elif k == 6:  # a segment of random bytes (numbered anywhere)
            out[f"{rng.choice([0, 2, 5, 99, 10**11]):012d}.seg"] = rng.randbytes(rng.randrange(80))
        else:  # an empty segment or an empty ack log
            out[rng.choice([*names, "000000000007.seg"])] = b""
    return out


@FUZZ
@given(st.integers(0, 2**64))
@example(0)
def test_recovery(
    seed_state: tuple[dict[str, bytes], set[int]],
    loop: asyncio.AbstractEventLoop,
    workdir: Path,
    seed: int,
) -> None:
    files, acked = seed_state
    path = workdir / "buf"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir()
    damaged = _damage(files, seed)
    for name, data in damaged.items():
        (path / name).write_bytes(data)
    with within():
        buf = DiskBuffer(path, 1 << 20, "block", sync_interval=0, segment_size=100)
        try:
            got = []
            while (b := buf.get_nowait()) is not None:
                got.append(b)
            # only original, unaltered batches, in their order; acked ones may come back
            # only when the ack log was damaged (at least once, never lost)
            assert [b.seq for b in got] == sorted({b.seq for b in got})
            for b in got:
                assert (b.payload, b.records, b.codec, b.first_id, b.last_id) == KEY[b.seq]
            if damaged.get("ack") == files["ack"]:
                assert not {b.seq for b in got} & acked, "an acknowledged batch came back"
            for b in got:
                buf.ack(b)
            new = EncodedBatch(b"m v=1i\n", 1, "line_protocol", 100, "a", "b")
            assert loop.run_until_complete(buf.append(new))
            assert buf.get_nowait() == new
        finally:
            loop.run_until_complete(buf.close())


@FUZZ
@given(st.lists(st.binary(max_size=120), min_size=1, max_size=3), st.binary(max_size=60))
@example([b""], b"r 0 1000000000000000000\n")  # found: a range of 10^18 ordinals, a hang
@example([b""], b"a 100000000000000000000000\n")  # found: beyond u64, appends then failed
@example([b""], b"d -5\nr 9 2\n")
def test_recovery_from_noise(
    loop: asyncio.AbstractEventLoop, workdir: Path, segments: list[bytes], ack: bytes
) -> None:
    path = workdir / "noise"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir()
    for i, data in enumerate(segments):
        (path / f"{i + 1:012d}.seg").write_bytes(b"PBDB\x01" + data if i % 2 else data)
    (path / "ack").write_bytes(ack)
    with within():
        buf = DiskBuffer(path, 1 << 20, "block", sync_interval=0)
        try:
            assert buf.get_nowait() is None  # nothing in noise passes the CRC
        finally:
            loop.run_until_complete(buf.close())
