"""The ``influxdb`` sink: line-protocol batches to InfluxDB over HTTP (1.x API).

One ``aiohttp.ClientSession`` with keep-alive per sink. At connect the sink checks
``/ping``, creates the database (``CREATE DATABASE`` is idempotent) and the retention policy
if it is configured and missing; an existing policy is left as it is. Writes go to
``/write?db=…&rp=…&precision=ns``.

How answers map onto the outlet's retry rules:

====================================  =========================================================
204 / 200                             written
400 (partial write, type conflict,    ``PermanentSinkError`` with InfluxDB's text: the batch is
unparsable line)                      counted as rejected, the next one goes on
401 / 403                             ``RetryableSinkError``: credentials or privileges (a
                                      config problem; retried with capped backoff)
404 database not found,               the database (and retention policy) is created again and
500 retention policy not found        the batch written once more at once; if that is not
                                      allowed, ``RetryableSinkError``
413                                   ``PermanentSinkError``: the batch is larger than
                                      InfluxDB's ``max-body-size``
429 / 503                             ``RetryableSinkError`` honouring ``Retry-After``
other 5xx, connection errors          ``RetryableSinkError``
====================================  =========================================================

The protocol dialect lives in ``_V1Api`` (URLs, parameters, how to create what is missing),
so the 2.x/3.x API (org, bucket, token) can come in as a sibling without touching the rest.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import gzip as gzip_module
import json
import logging
import ssl
import time
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

import aiohttp
from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator

from plantbus.broker.configtypes import StrictModel, TlsConfig
from plantbus.broker.connector import BuildContext
from plantbus.broker.sinks.base import (
    EncodedBatch,
    PermanentSinkError,
    RetryableSinkError,
    SinkConfig,
)
from plantbus.broker.units import parse_duration

__all__ = ["Config", "InfluxDBSink", "RetentionPolicy", "build"]

log = logging.getLogger(__name__)

_ERROR_TEXT_LIMIT = 2000  # characters of an error body kept for logs
_GZIP_OFF_LOOP = 256 * 1024  # compress larger payloads in a thread (zlib releases the GIL)
_MIN_RP_DURATION = 3600.0  # InfluxDB refuses retention policies shorter than one hour


def _rp_duration(v: object) -> float:
    if isinstance(v, str) and v.strip().upper() in ("INF", "0", "0S"):
        return 0.0
    if isinstance(v, bool) or not isinstance(v, str | int | float):
        raise ValueError('a retention duration is a string such as "7d", or "INF"')
    seconds = float(v) if isinstance(v, int | float) else parse_duration(v)
    if seconds != 0 and seconds < _MIN_RP_DURATION:
        raise ValueError('a retention duration must be at least "1h" (or "INF" to keep forever)')
    return seconds


class RetentionPolicy(StrictModel):
    """``retention_policy = { name, duration, default }``, created if missing.

    Attributes:
        name: the policy's name; writes go to it.
        duration: how long InfluxDB keeps points, at least "1h"; "INF" keeps them forever.
        default: make it the database's default policy when it is created.
    """

    name: str = Field(min_length=1)
    duration: Annotated[float, BeforeValidator(_rp_duration)]
    default: bool = False

    @property
    def influxql_duration(self) -> str:
        return "INF" if self.duration == 0 else f"{round(self.duration)}s"


class Config(SinkConfig):
    """``[[sinks.influxdb]]``: keys beyond those every sink has.

    Attributes:
        url: base URL of InfluxDB, e.g. "http://127.0.0.1:8086" (a path prefix is kept).
        database: the database to write to (created if missing).
        retention_policy: a policy to write to, created if missing; ``None`` writes to the
            database's default policy.
        username / password: HTTP basic auth (InfluxDB 1.x with ``auth-enabled``).
        gzip: compress request bodies (level 1). It costs CPU: use it off-box only.
        tls: the shared TLS table, for https URLs.
        uid_field: the line-protocol field that carries the record ID.
        max_in_flight: batches written at once (default 2). InfluxDB keys a point by
            series and timestamp, so the order in which batches arrive does not change what
            is stored, and with a second write queued InfluxDB does not wait while plantbus
            encodes the next batch or reads the answer. The one exception: the same series
            and timestamp written twice with different values, where the last write wins;
            plantbus stamps each record of a device with its own timestamp, so that only
            happens with a device's own repeated timestamps.
    """

    MAX_IN_FLIGHT_LIMIT: ClassVar[int] = 16

    codec: Literal["line_protocol"] = "line_protocol"
    url: str = "http://127.0.0.1:8086"
    database: str = Field(min_length=1)
    retention_policy: RetentionPolicy | None = None
    username: str | None = None
    password: SecretStr | None = None
    gzip: bool = False
    tls: TlsConfig | None = None
    uid_field: str = Field(default="uid", min_length=1)
    max_in_flight: int = Field(default=2, ge=1)

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f'invalid url {v!r}: use "http://host:port" or "https://host:port"')
        if parts.query or parts.fragment:
            raise ValueError(f"invalid url {v!r}: no query or fragment, just the base URL")
        try:
            _ = parts.port
        except ValueError as e:
            raise ValueError(f"invalid url {v!r}: {e}") from None
        return v.rstrip("/")

    @model_validator(mode="after")
    def _check_auth(self) -> Config:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together: set both or neither")
        if self.tls is not None and not self.url.startswith("https:"):
            raise ValueError("tls is set but the url is not https://")
        return self


def ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """An SSL client context from the shared ``tls = {...}`` table."""
    ctx = ssl.create_default_context(cafile=str(tls.ca) if tls.ca else None)
    if tls.certificate:
        ctx.load_cert_chain(str(tls.certificate), str(tls.private_key) if tls.private_key else None)
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _ident(name: str) -> str:
    """An InfluxQL double-quoted identifier."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_message(text: str) -> str:
    """InfluxDB's ``{"error": "..."}`` text, or the raw body (shortened)."""
    text = text.strip()
    try:
        doc = json.loads(text)
    except ValueError:
        return text[:_ERROR_TEXT_LIMIT]
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return str(doc["error"])[:_ERROR_TEXT_LIMIT]
    return text[:_ERROR_TEXT_LIMIT]


class _V1Api:
    """InfluxDB 1.x: ``/write`` with db/rp/precision, InfluxQL ``/query`` for set-up."""

    def __init__(self, config: Config):
        self.config = config
        self.write_url = f"{config.url}/write"
        self.query_url = f"{config.url}/query"
        self.ping_url = f"{config.url}/ping"
        params = {"db": config.database, "precision": "ns"}
        if config.retention_policy is not None:
            params["rp"] = config.retention_policy.name
        self.write_params = params
        self.create_refused = False  # warned once that the user may not create the database

    def missing_target(self, status: int, message: str) -> bool:
        """Whether an error says the database or retention policy is gone (re-create it)."""
        if status == 404 and "database not found" in message:
            return True
        return status == 500 and "retention policy not found" in message

    async def _query(
        self, session: aiohttp.ClientSession, q: str, *, read_only: bool = False
    ) -> tuple[int, str, dict[str, Any]]:
        """Run one InfluxQL statement: (HTTP status, error message or "", first result)."""
        params = {"q": q}
        if read_only:
            async with session.get(self.query_url, params=params) as r:
                body = await r.text()
        else:
            async with session.post(self.query_url, params=params) as r:
                body = await r.text()
        if r.status != 200:
            return r.status, _error_message(body), {}
        try:
            result = json.loads(body)["results"][0]
            error = str(result.get("error", ""))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return r.status, f"unexpected answer to {q!r}: {body[:200]}", {}
        return r.status, error, result

    async def prepare(self, session: aiohttp.ClientSession, name: str) -> None:
        """Check InfluxDB answers, then create the database and retention policy if missing."""
        async with session.get(self.ping_url) as r:
            if r.status not in (200, 204):
                raise RetryableSinkError(
                    f"{self.config.url}/ping answered HTTP {r.status}: is this InfluxDB?"
                )
        await self.ensure_target(session, name)

    async def ensure_target(self, session: aiohttp.ClientSession, name: str) -> None:
        cfg = self.config
        db = cfg.database
        status, error, _ = await self._query(session, f"CREATE DATABASE {_ident(db)}")
        if status == 401:
            raise RetryableSinkError(
                f"InfluxDB refused the credentials (HTTP 401: {error}): check username/password"
            )
        if status == 403:
            # a write-only user may not create databases; the database may well exist
            log.log(
                logging.DEBUG if self.create_refused else logging.WARNING,
                "sink %s: may not create database %r (%s); assuming it exists",
                name,
                db,
                error,
            )
            self.create_refused = True
        elif status != 200 or error:
            raise RetryableSinkError(f"CREATE DATABASE {db!r} failed (HTTP {status}): {error}")
        if cfg.retention_policy is not None:
            await self._ensure_rp(session, cfg.retention_policy, name)

    async def _ensure_rp(
        self, session: aiohttp.ClientSession, rp: RetentionPolicy, name: str
    ) -> None:
        db = self.config.database
        status, error, result = await self._query(
            session, f"SHOW RETENTION POLICIES ON {_ident(db)}", read_only=True
        )
        if status != 200 or error:
            raise RetryableSinkError(
                f"SHOW RETENTION POLICIES on {db!r} failed (HTTP {status}): {error}"
            )
        existing = _rp_rows(result)
        if rp.name in existing:
            duration, default = existing[rp.name]
            if duration != rp.duration or (rp.default and not default):
                log.info(
                    "sink %s: retention policy %r on %r exists (duration %gs, default %s); "
                    "left as it is",
                    name,
                    rp.name,
                    db,
                    duration,
                    default,
                )
            return
        q = (
            f"CREATE RETENTION POLICY {_ident(rp.name)} ON {_ident(db)} "
            f"DURATION {rp.influxql_duration} REPLICATION 1"
        )
        if rp.default:
            q += " DEFAULT"
        status, error, _ = await self._query(session, q)
        if status != 200 or error:
            raise RetryableSinkError(
                f"creating retention policy {rp.name!r} on {db!r} failed (HTTP {status}): {error}"
            )
        log.info(
            "sink %s: created retention policy %r on %r (%s%s)",
            name,
            rp.name,
            db,
            rp.influxql_duration,
            ", default" if rp.default else "",
        )


def _rp_rows(result: dict[str, Any]) -> dict[str, tuple[float, bool]]:
    """name -> (duration in seconds, is default) from a SHOW RETENTION POLICIES result."""
    out: dict[str, tuple[float, bool]] = {}
    for series in result.get("series", []):
        cols = series.get("columns", [])
        for values in series.get("values", []):
            row = dict(zip(cols, values, strict=False))
            try:
                seconds = parse_duration(str(row.get("duration", "0s")))
            except ValueError:
                seconds = -1.0
            out[str(row.get("name"))] = (seconds, bool(row.get("default")))
    return out


class InfluxDBSink:
    """Writes encoded line-protocol batches to one InfluxDB database."""

    codec = "line_protocol"

    def __init__(self, config: Config, name: str = "influxdb"):
        self.config = config
        self.name = name
        self._api = _V1Api(config)
        self._session: aiohttp.ClientSession | None = None
        self._headers = {"Content-Type": "text/plain; charset=utf-8"}
        if config.gzip:
            self._headers["Content-Encoding"] = "gzip"
        # compressed bodies of the batches in flight, kept for their retries
        self._gzipped: list[tuple[EncodedBatch, bytes]] = []
        self.recreated = 0  # times the database or policy vanished and was made again

    def _new_session(self) -> aiohttp.ClientSession:
        cfg = self.config
        headers = {}
        if cfg.username is not None and cfg.password is not None:
            # InfluxDB 1.x takes basic auth on /write and /query alike
            secret = f"{cfg.username}:{cfg.password.get_secret_value()}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(secret).decode("ascii")
        ssl_arg: ssl.SSLContext | bool = ssl_context(cfg.tls) if cfg.tls is not None else True
        connector = aiohttp.TCPConnector(limit=4, ssl=ssl_arg, keepalive_timeout=30)
        # the outlet bounds each write; these only bound the phases of one request
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.timeout, sock_read=cfg.timeout)
        return aiohttp.ClientSession(
            connector=connector, headers=headers, timeout=timeout, raise_for_status=False
        )

    async def connect(self) -> None:
        """Open the HTTP session and make sure the database and retention policy exist."""
        if self._session is None or self._session.closed:
            self._session = self._new_session()
        try:
            await self._api.prepare(self._session, self.name)
        except aiohttp.ClientError as e:
            raise RetryableSinkError(f"cannot reach InfluxDB at {self.config.url}: {e}") from e

    async def _body(self, batch: EncodedBatch) -> bytes:
        if not self.config.gzip:
            return batch.payload
        for held, body in self._gzipped:
            if held is batch:
                return body
        if len(batch.payload) > _GZIP_OFF_LOOP:
            body = await asyncio.to_thread(gzip_module.compress, batch.payload, 1)
        else:
            body = gzip_module.compress(batch.payload, 1)
        self._gzipped.append((batch, body))
        # as many as batches may be in flight; one pushed out while still being retried is
        # just compressed again
        del self._gzipped[: -self.config.max_in_flight]
        return body

    async def write(self, batch: EncodedBatch) -> None:
        """Write one batch; raises ``RetryableSinkError`` or ``PermanentSinkError``."""
        session = self._session
        if session is None or session.closed:
            raise RetryableSinkError("not connected")
        body = await self._body(batch)
        try:
            status, message, headers = await self._post(session, body)
            if status >= 300 and self._api.missing_target(status, message):
                log.warning(
                    "sink %s: %s; creating it again and writing batch %d once more",
                    self.name,
                    message,
                    batch.seq,
                )
                await self._api.ensure_target(session, self.name)
                self.recreated += 1
                status, message, headers = await self._post(session, body)
        except aiohttp.ClientError as e:
            raise RetryableSinkError(f"{self._api.write_url}: {_describe(e)}") from e
        if status in (200, 204):
            return
        raise self._error(status, message, headers, batch)

    async def _post(
        self, session: aiohttp.ClientSession, body: bytes
    ) -> tuple[int, str, dict[str, str]]:
        async with session.post(
            self._api.write_url, params=self._api.write_params, data=body, headers=self._headers
        ) as r:
            if r.status in (200, 204):
                return r.status, "", {}
            text = await r.text(errors="replace")
            return r.status, _error_message(text), {"Retry-After": r.headers.get("Retry-After", "")}

    def _error(
        self, status: int, message: str, headers: dict[str, str], batch: EncodedBatch
    ) -> Exception:
        what = f"InfluxDB answered HTTP {status}"
        if status == 400:
            return PermanentSinkError(f"{what}: {message}")
        if status in (401, 403):
            return RetryableSinkError(
                f"{what} (authentication/authorization; check username, password and the "
                f"user's WRITE privilege on {self.config.database!r}): {message}"
            )
        if status == 404:
            # the database is gone and could not be created again (no admin rights?): an
            # operator can fix that, so the batch waits rather than being thrown away
            return RetryableSinkError(
                f"{what}: {message} (create the database, or give the user admin rights "
                "so plantbus can)"
            )
        if status == 413:
            return PermanentSinkError(
                f"{what}: batch of {len(batch.payload)} bytes ({batch.records} records) is "
                f"larger than InfluxDB accepts; lower batch_bytes (now "
                f"{self.config.batch_bytes}) or raise max-body-size in InfluxDB's [http] "
                f"section: {message}"
            )
        if status in (429, 503) or status >= 500:
            return RetryableSinkError(
                f"{what}: {message}", retry_after=_retry_after(headers.get("Retry-After"))
            )
        return PermanentSinkError(f"{what}: {message}")

    async def close(self) -> None:
        session, self._session = self._session, None
        self._gzipped.clear()
        if session is not None and not session.closed:
            await session.close()

    def __repr__(self) -> str:
        return f"InfluxDBSink({self.name!r}, {self.config.url!r}, db={self.config.database!r})"


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def build(config: Config, ctx: BuildContext) -> InfluxDBSink:
    """Build the sink (nothing is contacted until the outlet connects it)."""
    return InfluxDBSink(config, config.name or "influxdb")
