"""A fault-injecting TCP proxy in front of an S7 server, for faults a server cannot produce.

It forwards both directions; the server-to-client stream is cut into TPKT frames so that
a fault applies to one reply to a read request (S7 ACK_DATA, function 0x04), never to the
connection handshake::

    async with S7Proxy(server_port) as proxy:
        proxy.delay_reply(1.0)      # hold the next read reply for 1 s (the client times out)
        proxy.duplicate_reply()     # send the next read reply twice (a stale reply follows)
        proxy.delay_write_reply(1.0)  # hold the next write reply for 1 s
        await proxy.fault_done.wait()
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Literal

__all__ = ["S7Proxy"]


def _is_read_reply(frame: bytes) -> bool:
    # TPKT (4) + COTP DT (3) + S7 header: 0x32, ACK_DATA, ..., 12 bytes, then the function
    return _is_reply_to(frame, 0x04)


def _is_reply_to(frame: bytes, function: int) -> bool:
    return len(frame) >= 20 and frame[7] == 0x32 and frame[8] == 0x03 and frame[19] == function


class S7Proxy:
    """A proxy on a free loopback port in front of ``127.0.0.1:upstream_port``.

    Attributes:
        port: where clients connect.
        connections: client connections accepted so far.
        read_replies: read replies forwarded (a duplicate counts twice).
        fault_done: set once a queued fault has been applied (a delay: when it starts).
        fault_connection: the number (1-based) of the connection the last fault hit.
    """

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = 0
        self.connections = 0
        self.read_replies = 0
        self.fault_done = asyncio.Event()
        self.fault_connection = 0
        self._faults: deque[tuple[Literal["delay", "duplicate"], float]] = deque()
        self._write_delays: deque[float] = deque()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def delay_reply(self, seconds: float) -> None:
        """Hold the next read reply for ``seconds`` before forwarding it."""
        self.fault_done.clear()
        self._faults.append(("delay", seconds))

    def delay_write_reply(self, seconds: float) -> None:
        """Hold the next write reply (S7 function 0x05) for ``seconds`` before forwarding it."""
        self.fault_done.clear()
        self._write_delays.append(seconds)

    def duplicate_reply(self) -> None:
        """Forward the next read reply twice."""
        self.fault_done.clear()
        self._faults.append(("duplicate", 0.0))

    async def start(self) -> S7Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> S7Proxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.close()
            return
        up = asyncio.create_task(self._pump_raw(client_r, server_w))
        down = asyncio.create_task(self._pump_frames(server_r, client_w, number))
        self._tasks.update((up, down))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (up, down):
                t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            self._tasks.difference_update((up, down))
            for w in (client_w, server_w):
                w.close()

    @staticmethod
    async def _pump_raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    async def _pump_frames(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                header = await reader.readexactly(4)
                frame = header + await reader.readexactly(int.from_bytes(header[2:4], "big") - 4)
                copies = 1
                if self._write_delays and _is_reply_to(frame, 0x05):
                    seconds = self._write_delays.popleft()
                    self.fault_connection = number
                    self.fault_done.set()
                    await asyncio.sleep(seconds)
                if _is_read_reply(frame) and self._faults:
                    kind, seconds = self._faults.popleft()
                    self.fault_connection = number
                    self.fault_done.set()
                    if kind == "delay":
                        await asyncio.sleep(seconds)
                    else:
                        copies = 2
                for _ in range(copies):
                    if _is_read_reply(frame):
                        self.read_replies += 1
                    writer.write(frame)
                await writer.drain()
