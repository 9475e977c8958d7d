"""Stand-ins for servers that cannot run here, backed by a real one where they can be.

* ``InfluxV2Facade``: the write API of InfluxDB 2.x (``/api/v2/write``, token auth, 2.x
  error JSON) in front of a real InfluxDB 1.6.7. InfluxDB 2.x is not installable here, and
  VictoriaMetrics (the real server the 2.x tests write to) never refuses a line: it skips
  bad lines and answers 204. The facade answers as InfluxDB 2.x does: a body with an
  unparsable line is refused whole (400 ``invalid``, nothing written), points the storage
  engine refuses (field type conflict, beyond retention) make a 422 partial write of the
  others, an unknown bucket or org is a 404, a wrong token a 401, a read-only one a 403, a
  body over ``max_body`` a 413. What is written, and every type conflict, is the real
  InfluxDB's decision.
* ``KapacitorStandIn``: Kapacitor's ``/kapacitor/v1/ping`` and ``/kapacitor/v1/write``
  (Kapacitor is not installable here). It records each write's path, parameters, headers
  and (decompressed) body and answers 204; like Kapacitor it refuses a body with an
  unparsable line whole (400 ``{"error": "unable to parse '…': …"}``, nothing taken). The
  bodies it took can be written to a real InfluxDB's ``/write`` (the same protocol) to
  check the payload.

Lines are checked with the project's own line-protocol decoder (it follows InfluxData's
reference parser), one line at a time so each bad line gets its reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from plantbus.broker.sinks.influxdb import split_lines
from plantbus.codecs.line_protocol_decoder import decode

__all__ = ["InfluxV2Facade", "KapacitorStandIn", "Posted", "unparsable"]


def unparsable(body: bytes) -> list[tuple[str, str]]:
    """(line, reason) for each line of ``body`` that does not parse."""
    bad = []
    for line in split_lines(body):
        try:
            decode(line)
        except ValueError as e:
            bad.append((line.decode("utf-8", "replace").rstrip("\n"), str(e)))
    return bad


@dataclass(frozen=True)
class Posted:
    """One request a stand-in answered, with its (decompressed) body and the status."""

    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    status: int


class _StandIn:
    def __init__(self) -> None:
        self.requests: list[Posted] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self):  # type: ignore[no-untyped-def]
        app = web.Application(client_max_size=256 * 1024 * 1024)
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self):  # type: ignore[no-untyped-def]
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _answer(
        self,
        request: web.Request,
        body: bytes,
        status: int,
        doc: object = None,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        self.requests.append(
            Posted(request.path, dict(request.query), dict(request.headers), body, status)
        )
        if doc is None:
            return web.Response(status=status, headers=headers)
        return web.json_response(doc, status=status, headers=headers)

    def writes(self) -> list[Posted]:
        return [r for r in self.requests if r.path.endswith("/write")]


class InfluxV2Facade(_StandIn):
    """InfluxDB 2.x's ``/api/v2/write`` in front of a real InfluxDB 1.x (see the module doc).

    Args:
        influx_url: the real InfluxDB 1.x; a bucket is a database there.
        org: the one organization; other org names are a 404.
        token: the token with write permission (``None``: no auth).
        read_token: a token without write permission (403).
        max_body: bodies longer than this (decompressed) are a 413.
    """

    def __init__(
        self,
        influx_url: str,
        *,
        org: str = "plant",
        token: str | None = "s3cr3t-token",
        read_token: str | None = None,
        max_body: int | None = None,
    ):
        super().__init__()
        self.influx_url = influx_url.rstrip("/")
        self.org = org
        self.token = token
        self.read_token = read_token
        self.max_body = max_body
        self._client: aiohttp.ClientSession | None = None

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/ping", self._ping)
        app.router.add_post("/api/v2/write", self._write)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        await super().close()

    async def _ping(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def _write(self, request: web.Request) -> web.Response:
        body = await request.read()
        auth = request.headers.get("Authorization", "")
        if self.token is not None and auth != f"Token {self.token}":
            if self.read_token is not None and auth == f"Token {self.read_token}":
                doc = {"code": "forbidden", "message": "insufficient permissions for write"}
                return self._answer(request, body, 403, doc)
            doc = {"code": "unauthorized", "message": "unauthorized access"}
            return self._answer(request, body, 401, doc)
        org, bucket = request.query.get("org", ""), request.query.get("bucket", "")
        if org != self.org:
            doc = {"code": "not found", "message": f'organization name "{org}" not found'}
            return self._answer(request, body, 404, doc)
        if request.query.get("precision") != "ns":
            doc = {"code": "invalid", "message": "this facade takes precision=ns only"}
            return self._answer(request, body, 400, doc)
        if self.max_body is not None and len(body) > self.max_body:
            doc = {
                "code": "request too large",
                "message": "unable to read data: points batch is too large",
            }
            return self._answer(request, body, 413, doc)
        bad = unparsable(body)
        if bad:
            # 2.x parses the whole body first and writes nothing if a line fails
            text = "\n".join(f"unable to parse '{line}': {reason}" for line, reason in bad)
            return self._answer(request, body, 400, {"code": "invalid", "message": text})
        if self._client is None:
            self._client = aiohttp.ClientSession()
        async with self._client.post(
            f"{self.influx_url}/write", params={"db": bucket, "precision": "ns"}, data=body
        ) as r:
            status, text = r.status, await r.text()
        if status == 204:
            return self._answer(request, body, 204)
        error = str(json.loads(text).get("error", text)) if text.startswith("{") else text
        if status == 404:
            doc = {"code": "not found", "message": f'bucket "{bucket}" not found'}
            return self._answer(request, body, 404, doc)
        if status == 400 and error.startswith("partial write"):
            doc = {
                "code": "unprocessable entity",
                "message": f"failure writing points to database: {error}",
            }
            return self._answer(request, body, 422, doc)
        return self._answer(request, body, status, {"code": "internal error", "message": error})


class KapacitorStandIn(_StandIn):
    """Kapacitor's ping and write endpoints, recording every write (see the module doc).

    Args:
        username / password: basic auth it requires (``None``: none).

    Attributes:
        faults: (status, JSON body, headers) answers for the next writes, in order.
    """

    def __init__(self, *, username: str | None = None, password: str | None = None):
        super().__init__()
        self.username = username
        self.password = password
        self.faults: list[tuple[int, dict[str, str], dict[str, str]]] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/kapacitor/v1/ping", self._ping)
        app.router.add_post("/kapacitor/v1/write", self._write)

    def _authorized(self, request: web.Request) -> bool:
        if self.username is None:
            return True
        try:
            auth = aiohttp.BasicAuth.decode(request.headers.get("Authorization", ""))
        except ValueError:
            return False
        return (auth.login, auth.password) == (self.username, self.password)

    async def _ping(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers={"X-Kapacitor-Version": "stand-in"})

    async def _write(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not self._authorized(request):
            return self._answer(request, body, 401, {"error": "authentication failed"})
        if self.faults:
            status, doc, headers = self.faults.pop(0)
            return self._answer(request, body, status, doc, headers)
        if "db" not in request.query or "rp" not in request.query:
            return self._answer(request, body, 400, {"error": "database and rp are required"})
        bad = unparsable(body)
        if bad:
            line, reason = bad[0]
            doc = {"error": f"unable to parse '{line}': {reason}"}
            return self._answer(request, body, 400, doc)
        return self._answer(request, body, 204)

    def bodies(self) -> list[bytes]:
        """The bodies it took (204), in order."""
        return [r.body for r in self.writes() if r.status == 204]
