"""A fault-injecting HTTP endpoint for tests: answers with errors, hangs or cuts the connection
for the next N requests, then forwards to the real server (or answers 204 with no upstream).

Faults a real server cannot produce on demand (429 with Retry-After, a hung peer, a cut
connection) come from here; the normal path still runs against the real server::

    async with FaultProxy(influxdb.url) as proxy:
        proxy.fail(503, times=3)
        proxy.fail(429, retry_after="1")
        proxy.hang()
        proxy.cut()
        ...  # point the client at proxy.url

Faults apply, in the order queued, to requests whose path is in ``paths`` (default
``/write``); other requests (``/ping``, ``/query``) always pass through. Every request is
logged in ``requests`` for assertions on paths, parameters and headers.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
from aiohttp import web

__all__ = ["Fault", "FaultProxy", "Request"]

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "content-encoding",  # the server decompressed the body already; we forward it plain
    "host",
    "te",
    "upgrade",
}


@dataclass(frozen=True)
class Fault:
    """One injected misbehaviour.

    Attributes:
        kind: ``status`` (answer ``status`` with ``body``), ``hang`` (never answer, until
            ``seconds`` pass or the proxy closes, then cut), or ``cut`` (close the connection
            after reading the request, without an answer).
        status / body / retry_after: the answer of a ``status`` fault.
        seconds: how long a ``hang`` lasts (``None``: until the proxy closes).
    """

    kind: Literal["status", "hang", "cut"]
    status: int = 503
    body: str = ""
    retry_after: str | None = None
    seconds: float | None = None


@dataclass
class Request:
    """One request the proxy saw, and what it did with it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    outcome: str  # "forwarded <status>", "fault status <status>", "fault hang", "fault cut",
    # or "answered 204" (no upstream)
    time: float = field(default_factory=time.monotonic)


class FaultProxy:
    """An aiohttp server on a free loopback port in front of ``upstream``.

    Args:
        upstream: base URL of the real server; ``None`` answers every passing request 204
            (a recording endpoint).
        paths: request paths that faults apply to (``None``: every path).
        keep_bodies: keep request bodies in ``requests`` (decompressed).
    """

    def __init__(
        self,
        upstream: str | None = None,
        *,
        paths: tuple[str, ...] | None = ("/write",),
        keep_bodies: bool = False,
    ):
        self.upstream = upstream.rstrip("/") if upstream else None
        self.paths = paths
        self.keep_bodies = keep_bodies
        self.requests: list[Request] = []
        self.faults_served = 0
        self.forwarded = 0
        self._faults: deque[Fault] = deque()
        self._closing = asyncio.Event()
        self._seen = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- faults ------------------------------------------------------------------------------

    def inject(self, fault: Fault, times: int = 1) -> None:
        self._faults.extend([fault] * times)

    def fail(
        self, status: int = 503, *, times: int = 1, body: str = "", retry_after: str | None = None
    ) -> None:
        """Answer the next ``times`` matching requests with ``status``."""
        text = body or f'{{"error":"injected {status}"}}'
        self.inject(Fault("status", status=status, body=text, retry_after=retry_after), times)

    def hang(self, *, times: int = 1, seconds: float | None = None) -> None:
        """Never answer the next ``times`` matching requests (then cut them)."""
        self.inject(Fault("hang", seconds=seconds), times)

    def cut(self, *, times: int = 1) -> None:
        """Close the connection of the next ``times`` matching requests without an answer."""
        self.inject(Fault("cut"), times)

    def clear(self) -> int:
        """Drop the faults still queued (an outage ends); returns how many there were."""
        n = len(self._faults)
        self._faults.clear()
        return n

    @property
    def faults_left(self) -> int:
        return len(self._faults)

    def matching(self, path: str = "/write") -> list[Request]:
        return [r for r in self.requests if r.path == path]

    async def wait_requests(self, n: int, path: str = "/write", limit: float = 10.0) -> None:
        """Wait until ``n`` requests to ``path`` were seen (at most ``limit`` seconds)."""
        async with asyncio.timeout(limit), self._seen:
            await self._seen.wait_for(lambda: len(self.matching(path)) >= n)

    # -- server ------------------------------------------------------------------------------

    async def start(self) -> FaultProxy:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        if self.upstream:
            self._client = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def close(self) -> None:
        self._closing.set()
        if self._client is not None:
            await self._client.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _log(self, request: web.Request, body: bytes, outcome: str) -> None:
        self.requests.append(
            Request(
                request.method,
                request.path,
                dict(request.query),
                dict(request.headers),
                body if self.keep_bodies else b"",
                outcome,
            )
        )
        async with self._seen:
            self._seen.notify_all()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        applies = self.paths is None or request.path in self.paths
        if applies and self._faults:
            fault = self._faults.popleft()
            self.faults_served += 1
            what = (
                f"fault status {fault.status}" if fault.kind == "status" else f"fault {fault.kind}"
            )
            await self._log(request, body, what)
            if fault.kind == "status":
                headers = {"Content-Type": "application/json"}
                if fault.retry_after is not None:
                    headers["Retry-After"] = fault.retry_after
                return web.Response(status=fault.status, text=fault.body, headers=headers)
            if fault.kind == "hang":
                try:
                    async with asyncio.timeout(fault.seconds):
                        await self._closing.wait()
                except TimeoutError:
                    pass
            return self._cut(request)
        if self._client is None:
            await self._log(request, body, "answered 204")
            return web.Response(status=204)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        async with self._client.request(
            request.method,
            f"{self.upstream}{request.rel_url}",
            data=body if body else None,
            headers=headers,
        ) as r:
            payload = await r.read()
            out_headers = {
                k: v
                for k, v in r.headers.items()
                if k.lower() not in _HOP_BY_HOP or k.lower() == "content-encoding"
            }
        self.forwarded += 1
        await self._log(request, body, f"forwarded {r.status}")
        return web.Response(status=r.status, body=payload, headers=out_headers)

    @staticmethod
    def _cut(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            transport.abort()
        # aiohttp has nothing left to answer on: leave the handler without a response
        raise asyncio.CancelledError
