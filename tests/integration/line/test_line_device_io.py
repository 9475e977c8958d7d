"""The ``line`` device over real I/O: a TCP peer in the test (device as client and as server)
and a serial port over a socat pty pair."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
import tty
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from plantbus.broker.connector import BuildContext
from plantbus.broker.record import Record
from plantbus.connectors.line import Config
from plantbus.connectors.line.connector import LineConnector

CTX = BuildContext(node_name="edge", node_tags={}, state_dir=Path("/nonexistent"))
CSV = {"separator": ";", "columns": ["sensor:tag", "temp", "n:int"]}


class Sink:
    def __init__(self) -> None:
        self.records: list[Record] = []
        self.batches = 0
        self._changed = asyncio.Event()

    async def emit(self, records: list[Record]) -> None:
        self.records.extend(records)
        self.batches += 1
        self._changed.set()

    async def wait_for(self, n: int, within: float = 10.0) -> list[Record]:
        deadline = time.monotonic() + within
        while len(self.records) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(self.records)} of {n} records after {within}s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return self.records


def device(**kw: Any) -> LineConnector:
    kw.setdefault("name", "dev")
    kw.setdefault("csv", CSV)
    return LineConnector(Config.model_validate(kw), CTX)


@contextlib.asynccontextmanager
async def running(conn: LineConnector, sink: Sink) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(conn.run(sink.emit))
    ready = asyncio.create_task(conn.ready.wait())
    try:
        await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        yield task
    finally:
        ready.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def test_tcp_client_reads_frames_split_anywhere_and_survives_garbage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    peer_writer: list[asyncio.StreamWriter] = []
    connected = asyncio.Event()

    async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        peer_writer.append(w)
        connected.set()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = device(connect=f"127.0.0.1:{port}", delimiter="\r\n")
    sink = Sink()
    try:
        async with running(conn, sink) as task:
            await asyncio.wait_for(connected.wait(), 5)
            w = peer_writer[0]
            # one frame split over three writes, garbage between good frames
            for chunk in (b"S1;21.", b"5;3\r", b"\nS2;22.0;4\r\n", b"\x00\x01binary\r\nS3;x\r\n"):
                w.write(chunk)
                await w.drain()
                await asyncio.sleep(0)
            w.write(b"S1;23.0;5\r\n")
            await w.drain()
            recs = await sink.wait_for(3)
            assert [(r.series.tag_dict["sensor"], r.fields) for r in recs] == [
                ("S1", {"temp": 21.5, "n": 3}),
                ("S2", {"temp": 22.0, "n": 4}),
                ("S1", {"temp": 23.0, "n": 5}),
            ]
            assert conn.malformed == 2 and not task.done()
            assert "line device dev: " in caplog.text and "did not parse" in caplog.text
            # the peer hangs up: the device raises for the supervisor to reconnect
            w.close()
            with pytest.raises(ConnectionError, match="closed the connection"):
                await asyncio.wait_for(task, 5)
    finally:
        server.close()


async def test_tcp_client_idle_timeout_and_poll_request() -> None:
    got = asyncio.Queue[bytes]()

    async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(100):
            await got.put(data)  # the device's poll requests; never answered

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = device(
        connect=f"127.0.0.1:{port}", idle_timeout="300ms", request="P\r\n", interval="50ms"
    )
    try:
        task = asyncio.create_task(conn.run(Sink().emit))
        assert await asyncio.wait_for(got.get(), 5) == b"P\r\n"
        with pytest.raises(ConnectionError, match=r"no data for 0.3s \(idle_timeout\)"):
            await asyncio.wait_for(task, 5)
    finally:
        server.close()


async def test_tcp_server_takes_many_peers_with_peer_tag() -> None:
    conn = device(listen="127.0.0.1:0", peer_tag="peer")
    sink = Sink()
    async with running(conn, sink) as task:
        assert conn.port
        writers = []
        for i in range(3):
            _, w = await asyncio.open_connection("127.0.0.1", conn.port)
            writers.append(w)
            w.write(f"S{i};{20 + i}.5;{i}\nbad frame\n".encode())
            await w.drain()
        recs = await sink.wait_for(3)
        assert sorted(r.series.tag_dict["sensor"] for r in recs) == ["S0", "S1", "S2"]
        assert {r.series.tag_dict["peer"] for r in recs} == {"127.0.0.1"}
        # one peer leaving does not stop the server or the others
        writers[0].close()
        writers[1].write(b"S1;30.0;9\n")
        await writers[1].drain()
        await sink.wait_for(4)
        assert not task.done() and conn.malformed == 3
        for w in writers[1:]:
            w.close()


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Two linked pseudo-terminals from socat: the device opens one, the test writes the other."""
    if shutil.which("socat") is None:
        raise RuntimeError("socat not found: run `make test` (scripts/install-test-deps.sh)")
    a, b = tmp_path / "ttyA", tmp_path / "ttyB"
    proc = subprocess.Popen(
        ["socat", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not (a.exists() and b.exists()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"socat did not make the ptys: {proc.stderr}")
            time.sleep(0.02)
        yield a, b
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def test_serial_port_over_a_socat_pty_pair(pty_pair: tuple[Path, Path]) -> None:
    dev_side, test_side = pty_pair
    conn = device(
        serial=str(dev_side),
        baudrate=19200,
        regex=r"^(?P<status>ST|US),GS,(?P<weight>[-+0-9.]+)\s*(?P<unit>\w+)$",
        columns={"status": "string", "unit": "tag"},
        csv=None,
        delimiter="\r\n",
        ignore=["^SCALE"],
    )
    sink = Sink()
    fd = os.open(test_side, os.O_RDWR | os.O_NOCTTY)
    # socat makes the links before it sets raw mode on them: setting our side raw
    # ourselves keeps the line discipline from rewriting "\r\n" when the test is quick
    tty.setraw(fd)
    try:
        async with running(conn, sink):
            os.write(fd, b"SCALE READY\r\nST,GS,+0012.50 kg\r\nST,GS,")
            os.write(fd, b"+0012.75 kg\r\n??\r\nUS,GS,-0000.10 g\r\n")
            recs = await sink.wait_for(3)
        assert [(r.fields, r.series.tag_dict["unit"]) for r in recs] == [
            ({"status": "ST", "weight": 12.5}, "kg"),
            ({"status": "ST", "weight": 12.75}, "kg"),
            ({"status": "US", "weight": -0.1}, "g"),
        ]
        assert conn.malformed == 1
    finally:
        os.close(fd)


async def test_serial_port_missing_raises_with_its_name(tmp_path: Path) -> None:
    conn = device(serial=str(tmp_path / "ttyNONE"))
    with pytest.raises(ConnectionError, match=r"serial port .*ttyNONE"):
        await conn.run(Sink().emit)
