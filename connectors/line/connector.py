"""The ``line`` device: legacy devices that send text frames over TCP or a serial port.

Bytes arrive in chunks; ``Framer`` splits them at the delimiter, keeping a partial frame for
the next chunk; ``TextDecoder`` (``plantbus.codecs.text``) parses each frame. The frames of one
chunk are one burst: their records are emitted as one batch, and what did not parse is counted
and logged with its text once per burst (at most every ``LOG_EVERY`` seconds, with the count
since the last line). A bad frame never stops the device.

Sources:

* ``connect``: a TCP client. A closed connection, or silence longer than ``idle_timeout``,
  raises; the supervisor backs off and connects again.
* ``listen``: a TCP server that devices connect to, any number at once. A peer that closes or
  stays silent past ``idle_timeout`` is dropped; the server itself keeps running.
* ``serial``: a serial port (pyserial), read from the event loop through its file descriptor
  (no thread). A port that goes away raises, like a TCP client.

With ``request`` set, that text is sent every ``interval`` (a poll command) to a TCP client
or serial device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from plantbus.broker.connector import BuildContext, Emit
from plantbus.broker.ids import new_ids
from plantbus.broker.record import FieldValue, Quality, Record, Series
from plantbus.broker.topics import validate_topic
from plantbus.codecs.payload import PayloadError, preview
from plantbus.connectors.line.config import Config, parse_address

__all__ = ["LOG_EVERY", "Framer", "LineConnector", "build"]

log = logging.getLogger("plantbus.connectors.line")

LOG_EVERY = 5.0
"""Seconds between two log lines about frames that did not parse, per device."""
_CHUNK = 65536
_SERIES_MAX = 10_000


class Framer:
    """Split a byte stream into frames at ``delimiter``.

    Args:
        delimiter: the frame end.
        max_frame: longest frame kept; a longer run without a delimiter is dropped and
            counted in ``overflows``.
    """

    __slots__ = ("buf", "delimiter", "max_frame", "overflows")

    def __init__(self, delimiter: bytes, max_frame: int):
        self.delimiter = delimiter
        self.max_frame = max_frame
        self.buf = b""
        self.overflows = 0

    def feed(self, data: bytes) -> list[bytes]:
        """The complete frames that ``data`` finishes (delimiters removed)."""
        buf = self.buf + data if self.buf else data
        frames = buf.split(self.delimiter)
        rest = frames.pop()
        if len(rest) > self.max_frame:
            self.overflows += 1
            rest = b""
        self.buf = rest
        if any(len(f) > self.max_frame for f in frames):
            kept = [f for f in frames if len(f) <= self.max_frame]
            self.overflows += len(frames) - len(kept)
            frames = kept
        return frames


def _quality(code: int) -> Quality:
    return Quality.BAD if code & 0x80000000 else Quality.UNCERTAIN


class _Burst:
    __slots__ = ("bad", "bad_first", "problem_first", "problems")

    def __init__(self) -> None:
        self.bad = 0
        self.bad_first = ""
        self.problems = 0
        self.problem_first = ""


class LineConnector:
    """A text-frame device (see the module doc).

    Attributes:
        name: the device name.
        frames: frames received (empty and ignored ones included).
        emitted: records whose emit returned.
        malformed: frames that did not parse (or were too long, or not in the encoding).
        problems: values that could not be converted (their point is Bad, the frame kept).
        peers: open TCP server connections.
        connected: a TCP client or serial port is open (``ready`` as an ``asyncio.Event``);
            a TCP server is listening.
    """

    def __init__(self, config: Config, ctx: BuildContext):
        self.name = config.name
        self.config = config
        topic = ctx.topic(config)
        validate_topic(topic)
        self.topic = topic
        self.measurement = ctx.measurement(config)
        self.tags = ctx.series_tags(config)
        self.series = Series(topic, self.measurement, self.tags)
        self.decoder = config.decoder()
        self.ignore = [re.compile(p) for p in config.ignore]
        self._series: dict[tuple[tuple[str, str], ...], Series] = {}
        self._last_log = {"malformed": -LOG_EVERY, "problems": -LOG_EVERY}
        self._since_log = {"malformed": 0, "problems": 0}
        self._last_ns = 0
        self.frames = 0
        self.emitted = 0
        self.malformed = 0
        self.problems = 0
        self.peers = 0
        self.connected = False
        self.ready = asyncio.Event()
        self.port: int | None = None  # the TCP server's bound port (listen = "...:0")

    # -- frames to records (no I/O: the tests drive it directly too) -------------------------

    def decode(
        self, frames: list[bytes], burst: _Burst | None = None, peer: str | None = None
    ) -> list[Record]:
        """The records of the frames of one burst (read time + 1 ns per frame)."""
        burst = burst or _Burst()
        cfg = self.config
        items: list[tuple[Series, dict[str, FieldValue], int, dict[str, int] | None]] = []
        t0 = time.time_ns()
        if t0 <= self._last_ns:
            t0 = self._last_ns + 1
        for i, raw in enumerate(frames):
            self.frames += 1
            try:
                text = raw.decode(cfg.encoding)
            except UnicodeDecodeError as e:
                self._bad(burst, f"not {cfg.encoding} text ({e.reason}): {preview(raw)}")
                continue
            if cfg.strip:
                text = text.strip()
            if not text or any(p.search(text) for p in self.ignore):
                continue
            try:
                row, problems = self.decoder.decode(text)
            except PayloadError as e:
                self._bad(burst, f"{e}: {preview(text)}")
                continue
            if problems:
                burst.problems += len(problems)
                if not burst.problem_first:
                    burst.problem_first = problems[0]
            tags = row.tags
            if peer is not None:
                tags = (*(tags or ()), (cfg.peer_tag, peer))  # type: ignore[assignment]
            series = self.series if tags is None else self._tagged(tags)
            t = row.time_ns if row.time_ns is not None else t0 + i
            items.append((series, row.fields, t, row.status))
        self._last_ns = t0 + len(frames)
        if not items:
            return []
        out = []
        for (series, fields, t, status), uid in zip(items, new_ids(len(items)), strict=True):
            rec = Record(series, fields, t, uid)
            if status:
                for point, code in status.items():
                    rec.mark(point, _quality(code), code)
            out.append(rec)
        return out

    def _bad(self, burst: _Burst, what: str) -> None:
        burst.bad += 1
        if not burst.bad_first:
            burst.bad_first = what

    def _tagged(self, tags: tuple[tuple[str, str], ...]) -> Series:
        s = self._series.get(tags)
        if s is None:
            merged = dict(tags)
            merged.update(self.tags)  # configured tags and `device` win over the frame's
            if len(self._series) >= _SERIES_MAX:
                self._series.clear()
            s = self._series[tags] = Series(self.topic, self.measurement, merged)
        return s

    def _report(self, burst: _Burst, overflows: int = 0) -> None:
        if overflows:
            burst.bad += overflows
            if not burst.bad_first:
                burst.bad_first = (
                    f"a frame longer than max_frame ({self.config.max_frame} bytes) "
                    "without a delimiter"
                )
        self.malformed += burst.bad
        self.problems += burst.problems
        now = time.monotonic()
        for kind, n_new, first, what in (
            ("malformed", burst.bad, burst.bad_first, "frame{s} did not parse"),
            ("problems", burst.problems, burst.problem_first, "value{s} could not be read"),
        ):
            if not n_new:
                continue
            self._since_log[kind] += n_new
            if now - self._last_log[kind] >= LOG_EVERY:
                n = self._since_log[kind]
                log.warning(
                    "line device %s: %d %s; first: %s",
                    self.name,
                    n,
                    what.format(s="" if n == 1 else "s"),
                    first,
                )
                self._last_log[kind] = now
                self._since_log[kind] = 0

    async def _pump(
        self, chunks: AsyncIterator[bytes], emit: Emit, peer: str | None = None
    ) -> None:
        framer = Framer(self.config.delimiter_bytes, self.config.max_frame)
        async for data in chunks:
            frames = framer.feed(data)
            burst = _Burst()
            records = self.decode(frames, burst, peer) if frames else []
            if records:
                await emit(records)
                self.emitted += len(records)
            self._report(burst, framer.overflows)
            framer.overflows = 0

    # -- sources -------------------------------------------------------------------------------

    async def run(self, emit: Emit) -> None:
        """Read frames and emit their records until cancelled (raises on a lost link)."""
        cfg = self.config
        try:
            if cfg.listen is not None:
                await self._serve(emit)
            elif cfg.connect is not None:
                await self._client(emit)
            else:
                await self._serial(emit)
        finally:
            self.connected = False
            self.ready.clear()

    async def _reads(self, read: Callable[[], Awaitable[bytes]], what: str) -> AsyncIterator[bytes]:
        idle = self.config.idle_timeout
        while True:
            try:
                data = await (asyncio.wait_for(read(), idle) if idle else read())
            except TimeoutError:
                raise ConnectionError(f"{what}: no data for {idle:g}s (idle_timeout)") from None
            if not data:
                raise ConnectionError(f"{what} closed the connection")
            yield data

    async def _client(self, emit: Emit) -> None:
        cfg = self.config
        host, port = parse_address(cfg.connect)  # type: ignore[arg-type]
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), cfg.connect_timeout
            )
        except TimeoutError:
            raise ConnectionError(
                f"connect to {cfg.connect}: no answer within {cfg.connect_timeout:g}s"
            ) from None
        poller = None
        try:
            self._up()
            if cfg.request_bytes is not None:
                poller = asyncio.create_task(self._poll(writer.write))
            await self._pump(self._reads(lambda: reader.read(_CHUNK), cfg.connect), emit)
        finally:
            if poller is not None:
                poller.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, emit: Emit) -> None:
        cfg = self.config
        host, port = parse_address(cfg.listen)  # type: ignore[arg-type]
        handlers: set[asyncio.Task[None]] = set()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                handlers.add(task)
            addr = writer.get_extra_info("peername")
            who = f"peer {addr[0]}:{addr[1]}" if addr else "peer"
            self.peers += 1
            try:
                peer = str(addr[0]) if cfg.peer_tag is not None and addr else None
                await self._pump(self._reads(lambda: reader.read(_CHUNK), who), emit, peer)
            except ConnectionError as e:
                log.info("line device %s: %s", self.name, e)
            except OSError as e:
                log.info("line device %s: %s: %s", self.name, who, e)
            finally:
                self.peers -= 1
                writer.close()
                if task is not None:
                    handlers.discard(task)

        server = await asyncio.start_server(handle, host or None, port)
        self.port = server.sockets[0].getsockname()[1] if server.sockets else port
        try:
            self._up()
            log.info("line device %s: listening on %s", self.name, cfg.listen)
            await asyncio.Future()  # until cancelled
        finally:
            server.close()
            for t in list(handlers):
                t.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(*handlers, return_exceptions=True)

    async def _serial(self, emit: Emit) -> None:
        import serial  # pyserial: only where a serial device runs

        cfg = self.config
        loop = asyncio.get_running_loop()
        parity = {
            "none": serial.PARITY_NONE,
            "even": serial.PARITY_EVEN,
            "odd": serial.PARITY_ODD,
            "mark": serial.PARITY_MARK,
            "space": serial.PARITY_SPACE,
        }[cfg.parity]

        def open_port() -> Any:
            return serial.Serial(
                port=cfg.serial,
                baudrate=cfg.baudrate,
                bytesize=cfg.bytesize,
                parity=parity,
                stopbits=cfg.stopbits,
                timeout=0,  # non-blocking: read from the event loop when the fd is readable
            )

        try:
            port = await loop.run_in_executor(None, open_port)
        except serial.SerialException as e:
            raise ConnectionError(f"serial port {cfg.serial}: {e}") from None
        fd = port.fileno()
        readable = asyncio.Event()
        loop.add_reader(fd, readable.set)

        async def read() -> bytes:
            while True:
                await readable.wait()
                readable.clear()
                try:
                    return os.read(fd, _CHUNK)
                except BlockingIOError:
                    continue
                except OSError as e:  # EIO: the other end of a pty, or a USB adapter, is gone
                    raise ConnectionError(f"serial port {cfg.serial}: {e.strerror}") from None

        poller = None
        try:
            self._up()
            if cfg.request_bytes is not None:
                poller = asyncio.create_task(self._poll(lambda b: os.write(fd, b)))
            await self._pump(self._reads(read, f"serial port {cfg.serial}"), emit)
        finally:
            if poller is not None:
                poller.cancel()
            loop.remove_reader(fd)
            port.close()

    async def _poll(self, write: Callable[[bytes], object]) -> None:
        """Send ``request`` every ``interval`` (fixed rate, on the monotonic clock)."""
        data = self.config.request_bytes
        assert data is not None
        interval = max(self.config.interval, 0.001)
        start = time.monotonic()
        k = 0
        while True:
            write(data)
            k += 1
            await asyncio.sleep(max(0.0, start + k * interval - time.monotonic()))

    def _up(self) -> None:
        self.connected = True
        self.ready.set()


def build(config: Config, ctx: BuildContext) -> LineConnector:
    """Build a ``line`` device from its config."""
    return LineConnector(config, ctx)
