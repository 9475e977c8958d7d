"""The local API for consumer apps: WebSocket subscribe, HTTP publish, ``/healthz``.

An aiohttp server on ``[api] listen`` (TCP, optionally TLS) and/or ``[api] unix`` (a Unix
socket), built by the CLI beside the runtime (``serve``). Everything travels in the JSON
record shape of ``plantbus.codecs.json``; the README's "Consumer API" section is the
user-facing description of the paths and messages.

Paths:

* ``GET /v1/subscribe?filter=F[&filter=G…][&queue_size=N][&queue_policy=P]`` upgrades to a
  WebSocket. The first frame is ``{"subscribed": [filters], "queue": {"size", "policy"}}``
  (the subscription exists from then on). Then every bus delivery to the client's queue
  arrives as one text frame holding a JSON array of records (what queued while a frame was
  being sent goes out together, ``MAX_FRAME_RECORDS`` at most per frame). A JSON *object*
  frame is a control frame: ``{"dropped": n, "dropped_total": N}`` comes before the
  records that follow a gap, when the client's queue (``queue = { size, policy }``, default
  ``drop_oldest``) had to drop ``n`` records because the client read too slowly. A text
  frame the client sends is a publish (as ``POST /v1/publish``), answered in order by
  ``{"published": n, "uids": [...]}`` or ``{"error": reason, "status": code}``. When
  plantbus stops, what is queued is sent and the socket is closed with code 1001.
* ``POST /v1/publish[?topic=T]``: a JSON array of records (or one record) into the bus.
  ``uid`` and ``time`` are filled in where missing (a new UUIDv7, the time of arrival),
  ``topic`` from ``?topic=``; ``measurement`` defaults to the topic's last level. All or
  nothing: any bad record is a 400 naming it, a topic the token may not publish to a 403,
  and then nothing of the request was published. 200 answers
  ``{"published": n, "uids": [...]}`` (records of one topic in a row are published as one
  bus batch).
* ``GET /healthz``: every component's state: ``{"status", "failing", "devices_down",
  "devices", "sinks", "api"}``; HTTP 503 while a sink is failing (retrying or unhealthy),
  an outlet is restarting after a fault, or plantbus is starting or stopping; 200 otherwise
  (``status`` is ``degraded`` while a device is backing off after a fault, else ``ok``).

Access (``[[api.tokens]]``): a request carries ``Authorization: Bearer <token>``. With
tokens configured, a request without a known token is a 401, and a topic outside the
token's ``subscribe`` / ``publish`` / ``write`` lists a 403. ``publish`` never covers
``$cmd/…``: a command to the device topic D (a record on ``$cmd/D``) needs a ``write``
entry matching D, which also lets the token subscribe to the replies on ``$reply/D``.
Without tokens, only loopback and Unix-socket clients are served (others get 403; ``plantbus
check`` refuses a non-loopback ``listen`` without tokens), they may use every topic, and
commands are refused unless ``local_commands = true``.

* ``GET /metrics``: Prometheus metrics, added by ``plantbus run`` through
  ``plantbus.broker.metrics.add_route`` (``docs/metrics.md``); the access rules below apply.

Adding routes (``/metrics``, a bench's endpoints): call ``add_route`` before ``start``::

    api = ConsumerApi(config.api, runtime)
    api.add_route("GET", "/metrics", handler)              # any valid token (or local client)
    api.add_route("GET", "/ping", ping, public=True)       # no authentication at all

A handler is a plain aiohttp handler; ``role_of(request)`` gives the caller's ``Role`` (its
``name`` and topic lists). ``app`` is the ``aiohttp.web.Application`` for anything else
(e.g. ``app.router.add_static``); its middleware authenticates every route not added as
``public``. ``publish_json(role, body)`` publishes like ``POST /v1/publish`` from Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import ipaddress
import json
import logging
import os
import socket
import ssl
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from plantbus.broker.bus import Bus, QueuePolicy, Subscription
from plantbus.broker.commands import CMD_PREFIX, REPLY_PREFIX
from plantbus.broker.config import ApiConfig, read_token
from plantbus.broker.configtypes import TlsConfig
from plantbus.broker.ids import new_ids
from plantbus.broker.record import Record
from plantbus.broker.runtime import BuildError, Runtime
from plantbus.broker.secrets import redact_data
from plantbus.broker.supervisor import Phase
from plantbus.broker.topics import covers, matches, validate_filter
from plantbus.codecs import json as json_codec
from plantbus.codecs.line_protocol import EncodeStats

__all__ = [
    "DEFAULT_PORT",
    "HEALTH_PATH",
    "MAX_FRAME_RECORDS",
    "PUBLISH_PATH",
    "SUBSCRIBE_PATH",
    "ApiError",
    "ConsumerApi",
    "Role",
    "client_ssl_context",
    "load_roles",
    "serve",
    "server_ssl_context",
]

log = logging.getLogger("plantbus.api")

DEFAULT_PORT = 8470
SUBSCRIBE_PATH = "/v1/subscribe"
PUBLISH_PATH = "/v1/publish"
HEALTH_PATH = "/healthz"

MAX_FRAME_RECORDS = 1000
"""Records per WebSocket frame at most (about 250 kB of JSON of a typical record).

A client that falls behind gets what queued meanwhile in few large frames instead of many
small ones; the cap keeps each frame well under the 4 MiB message limit clients default to.
"""

HEARTBEAT = 30.0
"""Seconds between WebSocket pings: a client that vanished without closing is dropped."""

STOP_TIMEOUT = 5.0
"""Seconds ``stop`` gives clients to take what is still queued for them before closing."""

_REFUSAL_LOG_INTERVAL = 60.0  # seconds between warnings about refused requests
_ROLE_KEY = web.RequestKey("plantbus_role", object)
_TOKEN_KEY = web.RequestKey("plantbus_token", object)  # the known token matched, or None


class ApiError(Exception):
    """A request the API refuses: ``status`` (400, 401, 403, 413, 503) and the reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


# -- access --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Role:
    """What the holder of one token (or, without tokens, every local client) may do.

    Attributes:
        name: the token's name (never the token), for logs and messages.
        subscribe / publish: MQTT filters of the topics it may subscribe / publish to.
        write: filters of the device topics it may send commands to (``$cmd/<topic>``);
            it may also subscribe to their replies (``$reply/<topic>``).
        everything: no tokens are configured: every topic (loopback clients only).
        commands: with ``everything``, commands too (``api.local_commands``).
    """

    name: str
    subscribe: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    everything: bool = False
    commands: bool = False

    def subscribe_denied(self, flt: str) -> str | None:
        """Why the role may not subscribe to the filter ``flt``, or None when it may."""
        if self.everything:
            return None
        if any(covers(allowed, flt) for allowed in self.subscribe):
            return None
        if flt.startswith(REPLY_PREFIX):
            device = flt[len(REPLY_PREFIX) :]
            if device and any(covers(w, device) for w in self.write):
                return None
        return (
            f"token {self.name!r} may not subscribe to {flt!r} "
            f"(its subscribe list: {list(self.subscribe)})"
        )

    def publish_denied(self, topic: str) -> str | None:
        """Why the role may not publish on ``topic``, or None when it may."""
        if topic.startswith(CMD_PREFIX):
            device = topic[len(CMD_PREFIX) :]
            if self.everything:
                if self.commands:
                    return None
                return (
                    f"commands ({topic!r}) are refused: no [[api.tokens]] are configured and "
                    "api.local_commands is false"
                )
            if any(matches(w, device) for w in self.write):
                return None
            return (
                f"token {self.name!r} may not send commands to {device!r}: publishing on "
                f"'$cmd/…' needs a `write` entry matching the device topic "
                f"(its write list: {list(self.write)})"
            )
        if self.everything or any(matches(p, topic) for p in self.publish):
            return None
        return (
            f"token {self.name!r} may not publish on {topic!r} "
            f"(its publish list: {list(self.publish)})"
        )


def load_roles(config: ApiConfig) -> dict[str, Role]:
    """Token -> role of every ``[[api.tokens]]`` entry.

    Raises:
        BuildError: a token cannot be read (``plantbus check`` reports it first).
    """
    roles: dict[str, Role] = {}
    for i, entry in enumerate(config.tokens):
        name = entry.name or f"tokens[{i}]"
        try:
            token = read_token(entry)
        except ValueError as e:
            raise BuildError(f"api: {name}: {e}") from None
        roles[token] = Role(name, tuple(entry.subscribe), tuple(entry.publish), tuple(entry.write))
    return roles


def _is_local(request: web.BaseRequest) -> bool:
    """The peer is on this machine: a Unix-socket or loopback client."""
    transport = request.transport
    if transport is None:
        return False
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        return True
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, tuple) or not peer:
        return False
    try:
        return ipaddress.ip_address(peer[0]).is_loopback
    except ValueError:
        return False


# -- TLS -----------------------------------------------------------------------------------------


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """The listener's TLS context: ``certificate`` + ``private_key``; ``ca``: client certs.

    With ``ca`` every client must present a certificate signed by it (``verify = false``:
    a client may come without one, but one it presents must still verify).
    """
    if tls.certificate is None or tls.private_key is None:
        raise ValueError("a TLS server needs `certificate` and `private_key`")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca is not None:
        ctx.load_verify_locations(cafile=str(tls.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.verify else ssl.CERT_OPTIONAL
    return ctx


def client_ssl_context(
    ca: Path | None = None,
    certificate: Path | None = None,
    private_key: Path | None = None,
    verify: bool = True,
) -> ssl.SSLContext:
    """A client's TLS context for the API (``plantbus tap``, tests, consumer apps).

    Args:
        ca: the CA that signed the server's certificate (default: the system's CAs).
        certificate / private_key: a client certificate, for a listener that wants one.
        verify: check the server's certificate and name (only ever off for experiments).
    """
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    if certificate is not None:
        ctx.load_cert_chain(str(certificate), str(private_key) if private_key else None)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- the server ----------------------------------------------------------------------------------


def _close_reason(text: str) -> bytes:
    """A WebSocket close reason: at most 123 bytes of UTF-8."""
    return text.encode()[:123].decode("utf-8", "ignore").encode()


class _Client:
    """One WebSocket subscriber: its subscription and what it was sent."""

    __slots__ = (
        "dropped_reported",
        "filters",
        "frames",
        "id",
        "peer",
        "records",
        "revoked",
        "role",
        "sub",
        "token",
    )

    def __init__(self, id: int, role: Role, token: str | None, peer: str, sub: Subscription):
        self.id = id
        self.role = role
        self.token = token  # the configured token it authenticated with (None: local client)
        self.peer = peer
        self.sub = sub
        self.filters = sub.filters
        self.frames = 0
        self.records = 0
        self.dropped_reported = 0
        self.revoked: str | None = None  # why its access ended (a reload changed the tokens)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ConsumerApi:
    """The consumer API of one runtime.

    Args:
        config: the ``[api]`` table.
        runtime: the runtime whose bus it serves and whose components ``/healthz`` reports.

    Attributes:
        app: the aiohttp application (add routes with ``add_route`` before ``start``).
        bus: the runtime's bus.
        roles: token -> role (empty: no tokens, local clients only).
        addresses: where it listens once started (``(host, port)`` tuples, socket paths).
        records_sent / frames_sent: to WebSocket clients, over all of them.
        dropped: records the queues of clients that left dropped (``metrics`` adds the
            open ones).
        published / publishes: records published and publish requests that succeeded.
        refused: requests answered 4xx/5xx, by status code.
    """

    def __init__(self, config: ApiConfig, runtime: Runtime):
        self.config = config
        self.runtime = runtime
        self.bus: Bus = runtime.bus
        self.roles = load_roles(config)
        # without tokens: every local client
        self._local_role = Role("local", everything=True, commands=config.local_commands)
        self._public: set[Handler] = set()
        self.app = web.Application(
            client_max_size=config.max_request_size, middlewares=[self._middleware]
        )
        self.app.router.add_get(SUBSCRIBE_PATH, self._subscribe)
        self.app.router.add_post(PUBLISH_PATH, self._publish_http)
        self.app.router.add_get(HEALTH_PATH, self._health)
        self._series = json_codec.SeriesCache()
        self._clients: dict[int, _Client] = {}
        self._handlers: set[asyncio.Task[Any]] = set()
        self._next_id = 0
        self._runner: web.AppRunner | None = None
        self._stopping = False
        self.addresses: list[Any] = []
        self.records_sent = 0
        self.frames_sent = 0
        self.dropped = 0
        self.encode_invalid = 0
        self.published = 0
        self.publishes = 0
        self.refused: dict[int, int] = {}
        self._refusal_logged = -_REFUSAL_LOG_INTERVAL

    # -- extension -------------------------------------------------------------------------------

    def add_route(self, method: str, path: str, handler: Handler, *, public: bool = False) -> None:
        """Serve ``handler`` at ``method path`` (before ``start``).

        Args:
            public: no authentication (for probes); otherwise the caller needs a valid
                token (or, without tokens, to be a local client), as for every API path.
        """
        self.app.router.add_route(method, path, handler)
        if public:
            self._public.add(handler)

    @staticmethod
    def role_of(request: web.Request) -> Role | None:
        """The authenticated caller's role (None on a public route without a valid token)."""
        role = request.get(_ROLE_KEY)
        return role if isinstance(role, Role) else None

    def update_tokens(self, config: ApiConfig) -> None:
        """Take the ``[[api.tokens]]`` of a reloaded ``config`` (its other keys need a restart).

        Requests from now on are checked against the new tokens. An open WebSocket client
        whose token is gone, or whose filters its token no longer covers, is closed (1008,
        with the reason); the others keep their stream under their token's new lists.

        Raises:
            BuildError: a token cannot be read; the running tokens stay.
        """
        roles = load_roles(config)
        self.roles = roles
        self.config = self.config.model_copy(update={"tokens": config.tokens})
        for client in self._clients.values():
            if not roles:
                # every client is local (check refuses a non-loopback listen without tokens)
                client.role, client.token = self._local_role, None
                continue
            role = roles.get(client.token) if client.token is not None else None
            if role is None:
                why = (
                    "its token was removed from the configuration"
                    if client.token is not None
                    else "tokens are configured now: connect with one"
                )
            else:
                why = next(
                    (r for f in client.filters if (r := role.subscribe_denied(f)) is not None),
                    "",
                )
                client.role = role
                if not why:
                    continue
            log.warning(
                "api client %d (%s, %s) closed: %s", client.id, client.role.name, client.peer, why
            )
            client.revoked = why
            client.sub.close()
        n = len(roles)
        log.info(
            "api tokens updated: %s",
            f"{n} token{'s' if n != 1 else ''}" if n else "no tokens: local clients only",
        )

    # -- running ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on ``listen`` and/or ``unix``.

        Raises:
            BuildError: an address cannot be listened on (in use, no permission), or the TLS
                files cannot be loaded.
        """
        ssl_ctx = None
        if self.config.tls is not None:
            try:
                ssl_ctx = server_ssl_context(self.config.tls)
            except (OSError, ssl.SSLError, ValueError) as e:
                raise BuildError(f"api: cannot load the TLS certificate: {e}") from None
        self._runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=STOP_TIMEOUT
        )
        await self._runner.setup()
        sites: list[tuple[str, web.BaseSite]] = []
        address = self.config.listen_address
        if address is not None:
            host, port = address
            site = web.TCPSite(self._runner, host or None, port, ssl_context=ssl_ctx)
            sites.append((str(self.config.listen), site))
        if self.config.unix is not None:
            path = self.config.unix
            _prepare_socket_path(path)
            sites.append((str(path), web.UnixSite(self._runner, str(path))))
        for where, s in sites:
            try:
                await s.start()
            except OSError as e:
                await self._runner.cleanup()
                self._runner = None
                raise BuildError(f"api: cannot listen on {where}: {e.strerror or e}") from None
        if self.config.unix is not None:
            # who may connect is decided by the socket's owner and group
            os.chmod(self.config.unix, 0o660)
        self.addresses = list(self._runner.addresses)
        self.runtime.update_api_tokens = self.update_tokens  # applied on reload
        n = len(self.roles)
        log.info(
            "api listening on %s%s (%s)",
            ", ".join(w for w, _ in sites),
            " with TLS" if ssl_ctx is not None else "",
            f"{n} token{'s' if n != 1 else ''}" if n else "no tokens: local clients only",
        )

    @property
    def port(self) -> int | None:
        """The TCP port listened on (useful with ``listen = "127.0.0.1:0"``)."""
        for a in self.addresses:
            if isinstance(a, tuple):
                return int(a[1])
        return None

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:  # noqa: ASYNC109 - a budget
        """Stop serving: clients get what is queued for them, then their sockets close (1001)."""
        self._stopping = True
        self.runtime.update_api_tokens = None
        for client in list(self._clients.values()):
            client.sub.close()  # the sender sends what is queued, then closes the socket
        handlers = [t for t in self._handlers if not t.done()]
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=timeout)
            for task in pending:
                task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.config.unix is not None:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.stat(self.config.unix).st_mode):
                    os.unlink(self.config.unix)

    # -- authentication --------------------------------------------------------------------------

    def _authenticate(self, request: web.Request) -> tuple[Role, str | None]:
        if not self.roles:
            if not _is_local(request):
                raise ApiError(
                    403,
                    "no [[api.tokens]] are configured: the API serves loopback and Unix-socket "
                    "clients only",
                )
            return self._local_role, None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing token: send 'Authorization: Bearer <token>'")
        found: tuple[Role, str | None] | None = None
        given = token.encode()
        for known, role in self.roles.items():
            # compare with every token, in constant time: no timing tells how close a guess was
            if hmac.compare_digest(given, known.encode()):
                found = role, known
        if found is None:
            raise ApiError(401, "unknown token")
        return found

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            try:
                request[_ROLE_KEY], request[_TOKEN_KEY] = self._authenticate(request)
            except ApiError:
                if handler not in self._public:
                    raise
            return await handler(request)
        except ApiError as e:
            return self._refuse(request, e.status, e.reason)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            # aiohttp's own refusals (413 body too large, 404, 405) as JSON too
            return self._refuse(request, e.status, e.text or e.reason)

    def _refuse(self, request: web.Request, status: int, reason: str) -> web.Response:
        self.refused[status] = self.refused.get(status, 0) + 1
        now = time.monotonic()
        if status in (401, 403) and now - self._refusal_logged >= _REFUSAL_LOG_INTERVAL:
            self._refusal_logged = now
            log.warning(
                "refused %s %s from %s with %d: %s (%d refused so far; more at debug level)",
                request.method,
                request.path,
                _peer(request),
                status,
                reason,
                sum(self.refused.get(s, 0) for s in (401, 403)),
            )
        else:
            log.debug("%s %s -> %d: %s", request.method, request.path, status, reason)
        headers = {"WWW-Authenticate": 'Bearer realm="plantbus"'} if status == 401 else None
        return web.json_response(
            {"error": reason, "status": status}, status=status, headers=headers
        )

    # -- publish ---------------------------------------------------------------------------------

    async def publish_json(self, role: Role, body: bytes, topic: str | None = None) -> list[str]:
        """Validate and publish a JSON array of records (or one record) for ``role``.

        All or nothing: every record is checked before the first is published.

        Args:
            role: whose access lists apply.
            body: the JSON text.
            topic: the topic of records that name none.

        Returns:
            The records' uids, in order.

        Raises:
            ApiError: 400 (not JSON records, a record without a topic), 403 (a topic outside
                the role), 503 (plantbus is starting or stopping).
        """
        try:
            docs = json_codec.decode(body)
        except json_codec.DecodeError as e:
            raise ApiError(400, f"not a JSON array of records: {e}") from None
        if not docs:
            return []
        now = time.time_ns()
        uids = new_ids(len(docs))
        records: list[Record] = []
        for i, doc in enumerate(docs):
            rec_topic = doc.get("topic", topic)
            if rec_topic is None:
                raise ApiError(400, f"[{i}]: no 'topic': give it in the record or as ?topic=")
            reason = role.publish_denied(rec_topic)
            if reason is not None:
                raise ApiError(403, f"[{i}]: {reason}")
            try:
                record = json_codec.to_record(
                    doc, topic=rec_topic, time_ns=now, uid=uids[i], series=self._series
                )
            except json_codec.DecodeError as e:
                raise ApiError(400, f"[{i}]: {e}") from None
            records.append(record)
        self._refuse_if_not_running()
        # one bus batch per run of records of one topic (the bus routes a batch by its topic)
        n = len(records)
        start = 0
        while start < n:
            run_topic = records[start].series.topic
            end = start + 1
            while end < n and records[end].series.topic == run_topic:
                end += 1
            await self.bus.publish(records[start:end])
            start = end
        self.published += n
        self.publishes += 1
        return [r.id for r in records]

    def _refuse_if_not_running(self) -> None:
        if self.runtime.stopping or self._stopping:
            raise ApiError(503, "plantbus is stopping")
        if self.runtime.started_at is None:
            raise ApiError(503, "plantbus is starting")

    async def _publish_http(self, request: web.Request) -> web.Response:
        role = request[_ROLE_KEY]
        assert isinstance(role, Role)
        body = await request.read()
        uids = await self.publish_json(role, body, request.query.get("topic"))
        return web.json_response({"published": len(uids), "uids": uids})

    # -- subscribe -------------------------------------------------------------------------------

    def _queue_options(self, query: Any) -> tuple[int, QueuePolicy]:
        default = self.config.queue
        size = default.size
        text = query.get("queue_size")
        if text is not None:
            try:
                size = int(text)
            except ValueError:
                raise ApiError(400, f"queue_size {text!r} is not an integer") from None
            if not 1 <= size <= default.size:
                raise ApiError(400, f"queue_size must be between 1 and {default.size} records")
        policy = QueuePolicy(default.policy)
        text = query.get("queue_policy")
        if text is not None:
            allowed = ["drop_oldest", "drop_newest"]
            if default.policy == "block":
                allowed.append("block")  # only where the operator chose back-pressure
            if text not in allowed:
                raise ApiError(400, f"queue_policy must be one of {allowed}, not {text!r}")
            policy = QueuePolicy(text)
        return size, policy

    async def _subscribe(self, request: web.Request) -> web.StreamResponse:
        role = request[_ROLE_KEY]
        assert isinstance(role, Role)
        filters = request.query.getall("filter", [])
        if not filters:
            raise ApiError(
                400, f"give one or more topic filters: {SUBSCRIBE_PATH}?filter=plant/%23"
            )
        for flt in filters:
            try:
                validate_filter(flt)
            except ValueError as e:
                raise ApiError(400, str(e)) from None
            reason = role.subscribe_denied(flt)
            if reason is not None:
                raise ApiError(403, reason)
        size, policy = self._queue_options(request.query)
        if self._stopping or self.runtime.stopping:
            raise ApiError(503, "plantbus is stopping")
        ws = web.WebSocketResponse(
            heartbeat=HEARTBEAT,
            compress=False,  # local clients: deflate would only cost CPU
            max_msg_size=self.config.max_request_size,
            decode_text=False,
        )
        if not ws.can_prepare(request).ok:
            raise ApiError(400, f"{SUBSCRIBE_PATH} is a WebSocket: send an Upgrade request")
        await ws.prepare(request)
        self._next_id += 1
        sub = self.bus.subscribe(filters, size=size, policy=policy, name=f"api:{self._next_id}")
        token = request.get(_TOKEN_KEY)
        client = _Client(
            self._next_id, role, token if isinstance(token, str) else None, _peer(request), sub
        )
        self._clients[client.id] = client
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        log.info(
            "api client %d (%s, %s) subscribed to %s",
            client.id,
            role.name,
            client.peer,
            ", ".join(filters),
        )
        sender: asyncio.Task[None] | None = None
        try:
            hello = {"subscribed": list(filters), "queue": {"size": size, "policy": policy.value}}
            await ws.send_frame(_dumps(hello), WSMsgType.TEXT)
            sender = asyncio.create_task(self._send_loop(ws, client), name=f"api:{client.id}")
            await self._read_loop(ws, client)
        except (ConnectionError, RuntimeError) as e:  # the client went away mid-send
            log.debug("api client %d: %s", client.id, e)
        finally:
            sub.close()
            if sender is not None:
                if not self._stopping:
                    sender.cancel()  # the client left: nothing more to send
                with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
                    await sender
            self.dropped += sub.dropped
            del self._clients[client.id]
            self._handlers.discard(task)
            log.info(
                "api client %d (%s) left: %d records sent, %d dropped",
                client.id,
                role.name,
                client.records,
                sub.dropped,
            )
            if not ws.closed:
                await ws.close()
        return ws

    async def _send_loop(self, ws: web.WebSocketResponse, client: _Client) -> None:
        """Frames of what the client's queue holds, until its subscription is closed."""
        sub = client.sub
        send = ws.send_frame
        text = WSMsgType.TEXT
        stats = EncodeStats()
        try:
            while True:
                records = await sub.get(MAX_FRAME_RECORDS)
                if client.revoked is not None:
                    # what is queued was taken under the old access: it is not sent
                    if not ws.closed:
                        await ws.close(
                            code=WSCloseCode.POLICY_VIOLATION, message=_close_reason(client.revoked)
                        )
                    return
                if sub.dropped != client.dropped_reported:
                    # the gap comes before these records: say so first
                    n = sub.dropped - client.dropped_reported
                    client.dropped_reported = sub.dropped
                    await send(_dumps({"dropped": n, "dropped_total": sub.dropped}), text)
                if not records:
                    break  # closed and drained
                invalid = stats.invalid
                payload = json_codec.encode(records, stats)
                self.encode_invalid += stats.invalid - invalid
                await send(payload, text)
                client.frames += 1
                client.records += len(records)
                self.frames_sent += 1
                self.records_sent += len(records)
            if not ws.closed:
                await ws.close(code=1001, message=b"plantbus is stopping")
        except (ConnectionError, RuntimeError) as e:
            log.debug("api client %d: send failed: %s", client.id, e)

    async def _read_loop(self, ws: web.WebSocketResponse, client: _Client) -> None:
        """Publish what the client sends, answering each message in order."""
        async for msg in ws:
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                break
            try:
                uids = await self.publish_json(client.role, msg.data)
                answer: dict[str, Any] = {"published": len(uids), "uids": uids}
            except ApiError as e:
                self.refused[e.status] = self.refused.get(e.status, 0) + 1
                answer = {"error": e.reason, "status": e.status}
            await ws.send_frame(_dumps(answer), WSMsgType.TEXT)

    # -- health ----------------------------------------------------------------------------------

    def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of ``/healthz``: 503 while a sink fails or plantbus starts/stops."""
        rt = self.runtime
        devices: dict[str, Any] = {}
        down: list[str] = []
        for name, d in rt.devices.items():
            st = d.supervisor.status
            devices[name] = {
                "kind": d.entry.kind,
                "state": st.phase.value,
                "restarts": st.restarts,
                "last_error": st.last_error,
                "emitted": d.emitted,
            }
            if st.phase is Phase.BACKING_OFF:
                down.append(name)
        sinks: dict[str, Any] = {}
        failing: list[str] = []
        for o in rt.outlets.values():
            st = o.supervisor.status
            status = o.outlet.status()
            for entry, ch in zip(o.entries, o.outlet.channels, strict=True):
                key = ch.name if ch.name not in sinks else f"{entry.kind}.{ch.name}"
                s = status[ch.name]
                sinks[key] = {
                    "kind": entry.kind,
                    "health": s["health"],
                    "connected": s["connected"],
                    "last_error": s["last_error"],
                    "outlet": o.name,
                    "outlet_state": st.phase.value,
                }
                if s["health"] != "ok" or st.phase is Phase.BACKING_OFF:
                    failing.append(key)
        if rt.stopping or self._stopping:
            state = "stopping"
        elif rt.started_at is None:
            state = "starting"
        elif failing:
            state = "failing"
        else:
            state = "degraded" if down else "ok"
        body = {
            "status": state,
            "failing": failing,
            "devices_down": down,
            "devices": devices,
            "sinks": sinks,
            "api": {"clients": len(self._clients)},
        }
        # a last_error is a library's exception text, which may quote a URL or a credential
        return (200 if state in ("ok", "degraded") else 503), redact_data(body)

    async def _health(self, request: web.Request) -> web.Response:
        status, body = self.health()
        return web.json_response(body, status=status)

    # -- metrics ---------------------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """Counters for ``/metrics``: clients, what they were sent and dropped, publishes."""
        open_dropped = sum(c.sub.dropped for c in self._clients.values())
        return {
            "clients": len(self._clients),
            "records_sent": self.records_sent,
            "frames_sent": self.frames_sent,
            "dropped": self.dropped + open_dropped,
            "encode_invalid": self.encode_invalid,
            "published": self.published,
            "publishes": self.publishes,
            "refused": dict(self.refused),
            "per_client": {
                c.id: {
                    "token": c.role.name,
                    "filters": list(c.filters),
                    "queued": len(c.sub),
                    "records_sent": c.records,
                    "dropped": c.sub.dropped,
                }
                for c in self._clients.values()
            },
        }


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _peer(request: web.BaseRequest) -> str:
    transport = request.transport
    if transport is None:
        return "?"
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        host = peer[0]
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return "unix socket"


def _prepare_socket_path(path: Path) -> None:
    """Create the socket's folder; remove a stale socket left by a process that died.

    A socket someone still listens on is left alone (listening then fails: in use).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        return  # not ours to remove: listening fails with a clear "in use"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)
    finally:
        probe.close()


async def serve(runtime: Runtime, api: ConsumerApi) -> None:
    """Run ``runtime`` with ``api`` beside it (what ``plantbus run`` runs).

    The API listens first, so an address in use stops plantbus before any device starts; it
    stops after the runtime's drain, so clients get the records published while draining.

    Raises:
        BuildError: the API cannot listen, or a component cannot be built.
    """
    await api.start()
    try:
        await runtime.run()
    finally:
        await api.stop()
