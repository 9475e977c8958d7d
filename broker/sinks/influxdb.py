"""The ``influxdb`` sink: line-protocol batches to InfluxDB over HTTP (1.x API).

One ``aiohttp.ClientSession`` with keep-alive per sink. At connect the sink checks
``/ping``, creates the database (``CREATE DATABASE`` is idempotent) and the retention policy
if it is configured and missing; an existing policy is left as it is. Writes go to
``/write?db=…&rp=…&precision=ns``.

How answers map onto the outlet's retry rules:

====================================  =========================================================
204 / 200                             written
400 (partial write, type conflict,    the bad lines are isolated by bisection (below), every
unparsable line, beyond retention)    good line is written, the bad ones go to the dead-letter
                                      file with InfluxDB's reason; ``PartialWriteError``
                                      counts them as rejected, the rest as delivered
401 / 403                             ``MisconfiguredSinkError``: credentials or privileges;
                                      retried with capped backoff, the batches wait, the sink
                                      is marked unhealthy and the error logged once
404 database not found,               with ``create_database`` (the default) the database (and
500 retention policy not found        retention policy) is created again and the batch written
                                      once more at once; without it, or if the user may not,
                                      ``MisconfiguredSinkError`` saying so
413                                   the batch is split in halves at line boundaries and the
                                      halves sent (recursively); a single line larger than
                                      ``max-body-size`` goes to the dead-letter file
429 / 503                             ``RetryableSinkError`` honouring ``Retry-After``
other 5xx, connection errors          ``RetryableSinkError``
====================================  =========================================================

Isolating bad lines: InfluxDB 1.x writes the good points of a batch it answers with 400
(a partial write), so rewriting them is harmless (same series and timestamp: the same point).
The batch is cut at line boundaries (a raw newline inside a quoted string value is not one)
and each half that InfluxDB refuses again is cut again, until single lines are left. A part
whose answer says every point in it was dropped (``dropped=N`` with N its lines, or
unparsable with nothing parsed) is not cut further. k bad lines among n cost at most about
2·k·log2(n) requests and log2(n) times the batch's bytes; past ``ISOLATE_MAX_REQUESTS``
requests for one batch, or half the sink's ``timeout``, the parts not yet isolated go to the
dead-letter file whole, marked "not isolated" (their good lines are in InfluxDB already).

The protocol dialect lives in ``_V1Api`` (URLs, parameters, how to create what is missing)
and its sibling ``_V2Api``: with ``bucket`` (and ``org``, ``token``) set, batches go to the
InfluxDB 2.x/3.x API ``/api/v2/write?org=…&bucket=…&precision=ns`` with
``Authorization: Token …``, the same line-protocol bytes and the same answer handling; error
bodies are then v2's ``{"code": …, "message": …}``. The 2.x API creates nothing (a bucket
belongs to an org and is made with its retention by the operator): a 404 is an error.
"""

from __future__ import annotations

import asyncio
import base64
import gzip as gzip_module
import json
import logging
import re
import ssl
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

import aiohttp
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from plantbus.broker.configtypes import Duration, Size, StrictModel, TlsConfig
from plantbus.broker.connector import BuildContext
from plantbus.broker.sinks.base import (
    EncodedBatch,
    MisconfiguredSinkError,
    PartialWriteError,
    PermanentSinkError,
    RetryableSinkError,
    SinkConfig,
    retry_after_seconds,
)
from plantbus.broker.sinks.deadletter import DeadLetterFile
from plantbus.broker.units import parse_duration

__all__ = [
    "CQ_FUNCTIONS",
    "Config",
    "Downsample",
    "InfluxDBSink",
    "RetentionPolicy",
    "build",
    "influxql_duration",
]

log = logging.getLogger(__name__)

_ERROR_TEXT_LIMIT = 2000  # characters of an error body kept for logs
_GZIP_OFF_LOOP = 256 * 1024  # compress larger payloads in a thread (zlib releases the GIL)
_MIN_RP_DURATION = 3600.0  # InfluxDB refuses retention policies shorter than one hour

ISOLATE_MAX_REQUESTS = 256
"""Requests one batch may spend isolating its bad lines after a 400 (see the module doc).

About 2·log2(n) requests isolate one bad line among n: 256 isolate ~14 scattered bad lines
in a 5000-line batch, or any number of bad lines that come in runs (a run whose lines were
all dropped costs no more requests). Rewrites of good lines are idempotent in InfluxDB."""

# one line of line protocol: the measurement and tags (escaped characters taken as pairs) up
# to the first unescaped space, then fields and timestamp, where a string value (a quote
# right after "=") may hold a raw newline; the line ends at the first newline outside one.
# A quote elsewhere (in a tag value or field key) is just a character.
_LINE = re.compile(rb'(?:\\.|[^\\ \n])*(?: (?:\\.|="(?:\\.|[^"\\])*"|[^\n])*)?\n?', re.DOTALL)
_DROPPED = re.compile(r"dropped=(\d+)\s*$")

CQ_FUNCTIONS = frozenset(
    {
        "count",
        "first",
        "integral",
        "last",
        "max",
        "mean",
        "median",
        "min",
        "mode",
        "spread",
        "stddev",
        "sum",
    }
)
"""InfluxQL aggregates and selectors that take a field wildcard and no other argument, so
``downsample`` can apply them to every field (``mean(*)`` gives ``mean_temp``, ...). Each
verified on InfluxDB 1.6.7; the numeric ones skip string and boolean fields. ``distinct``
takes no wildcard; ``top``, ``bottom``, ``percentile`` and ``sample`` need an argument."""
_PARSE_ERROR = "unable to parse '"


def _gzip_level(v: object) -> int:
    # true = level 1 and false = off keep the configs written when gzip was on/off
    if v is True:
        return 1
    if v is False:
        return 0
    if isinstance(v, int) and 0 <= v <= 9:
        return v
    raise ValueError("gzip is a level 1-9 (1 recommended), true (= 1) or false (off)")


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


_INFLUXQL_UNITS = (
    (7 * 86400 * 10**9, "w"),
    (86400 * 10**9, "d"),
    (3600 * 10**9, "h"),
    (60 * 10**9, "m"),
    (10**9, "s"),
    (10**6, "ms"),
    (10**3, "u"),
)


def influxql_duration(seconds: float) -> str:
    """A duration literal as InfluxDB writes it back (its ``FormatDuration``): "1m", "90s".

    The largest unit that divides the duration exactly, so a continuous query plantbus
    creates reads back the same from ``SHOW CONTINUOUS QUERIES``.
    """
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    for size, unit in _INFLUXQL_UNITS:
        if ns % size == 0:
            return f"{ns // size}{unit}"
    return f"{ns}ns"


def _key_error(loc: tuple[str | int, ...], value: object, message: str) -> ValidationError:
    """A validation error at the key path ``loc`` (so ``check`` names the key itself)."""
    error = PydanticCustomError("value_error", "{error}", {"error": message})
    return ValidationError.from_exception_data(
        "config", [InitErrorDetails(type=error, loc=loc, input=value)]
    )


def _cq_function(name: str) -> str:
    if name not in CQ_FUNCTIONS:
        known = ", ".join(sorted(CQ_FUNCTIONS))
        raise ValueError(f"{name!r} is not an InfluxQL aggregate taking a wildcard ({known})")
    return name


class Downsample(StrictModel):
    """One ``downsample`` entry: a continuous query into a longer retention policy.

    ``{ every = "1m", functions = ["mean", "max"], into = { name = "year", duration =
    "365d" } }`` becomes ``CREATE CONTINUOUS QUERY plantbus_year_1m ON <db> BEGIN SELECT
    mean(*), max(*) INTO <db>.year.:MEASUREMENT FROM <db>.<policy>./.*/ GROUP BY time(1m), *
    END``: every measurement, every field, every series (tags kept), where ``<policy>`` is
    the sink's ``retention_policy`` (else the database's default policy).

    Attributes:
        every: the interval aggregated over (at least "1s").
        functions: InfluxQL aggregates applied to every field (``CQ_FUNCTIONS``).
        into: the policy the aggregates go to, created if missing.
        resample_for: recompute the intervals of this last stretch of time on every run
            (InfluxQL ``RESAMPLE FOR``), so points that arrive late (a buffer replayed after
            an outage) are aggregated too; at least ``every``. Default: each interval once,
            just after it ends.
        name: the continuous query's name (default ``plantbus_<into>_<every>``).
    """

    every: Duration
    functions: list[Annotated[str, AfterValidator(_cq_function)]] = Field(min_length=1)
    into: RetentionPolicy
    resample_for: Duration | None = None
    name: str | None = Field(default=None, min_length=1)

    @field_validator("every")
    @classmethod
    def _check_every(cls, v: float) -> float:
        if v < 1.0:
            raise ValueError('must be at least "1s"')
        return v

    @field_validator("functions")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("names a function twice")
        return v

    @model_validator(mode="after")
    def _check_resample(self) -> Downsample:
        if self.resample_for is not None and self.resample_for < self.every:
            raise _key_error(("resample_for",), self.resample_for, "must be at least every")
        return self

    @property
    def cq_name(self) -> str:
        return self.name or f"plantbus_{self.into.name}_{influxql_duration(self.every)}"

    def statement(self, database: str, source_policy: str) -> str:
        """The ``CREATE CONTINUOUS QUERY`` statement reading ``database.source_policy``."""
        db = _ident(database)
        functions = ", ".join(f"{f}(*)" for f in self.functions)
        resample = ""
        if self.resample_for is not None:
            resample = f" RESAMPLE FOR {influxql_duration(self.resample_for)}"
        return (
            f"CREATE CONTINUOUS QUERY {_ident(self.cq_name)} ON {db}{resample} BEGIN "
            f"SELECT {functions} INTO {db}.{_ident(self.into.name)}.:MEASUREMENT "
            f"FROM {db}.{_ident(source_policy)}./.*/ "
            f"GROUP BY time({influxql_duration(self.every)}), * END"
        )


_V1_KEYS = (
    "database",
    "retention_policy",
    "username",
    "password",
    "create_database",
    "downsample",
)
_V2_KEYS = ("org", "bucket", "token")


class Config(SinkConfig):
    """``[[sinks.influxdb]]``: keys beyond those every sink has.

    The 1.x keys (``database``, ``retention_policy``, ``username``/``password``,
    ``create_database``) and the 2.x/3.x keys (``org``, ``bucket``, ``token``) exclude each
    other: ``bucket`` selects the ``/api/v2/write`` API.

    Attributes:
        url: base URL of InfluxDB, e.g. "http://127.0.0.1:8086" (a path prefix is kept).
        database: the database to write to (created if missing); 1.x API.
        bucket: the bucket to write to (2.x/3.x API; it must exist). InfluxDB 3 takes the
            database name here.
        org: the bucket's organisation (name or ID) for InfluxDB 2.x; 3.x ignores it.
        token: an API token with write permission on the bucket (sent as
            ``Authorization: Token …``).
        retention_policy: a policy to write to, created if missing; ``None`` writes to the
            database's default policy. An existing policy that differs is reported (an
            ERROR naming both), never altered.
        downsample: continuous queries aggregating what is written into longer policies
            (``Downsample``), created with their policies if missing (1.x API).
        username / password: HTTP basic auth (InfluxDB 1.x with ``auth-enabled``).
        create_database: create the database (and retention policy) at connect and when it
            disappears; ``False`` leaves that to the operator (a 404 is then an error).
        gzip: compress request bodies at this level (1-9; true = 1, false/0 = off). It
            costs CPU for a smaller body: use level 1, and only when InfluxDB is off-box.
        dead_letter: the file for lines InfluxDB refused (default
            ``<state_dir>/deadletter/<sink name>.lp``).
        dead_letter_max_size: the dead-letter file's size limit; past it refused lines are
            only counted.
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
    database: str | None = Field(default=None, min_length=1)
    org: str | None = Field(default=None, min_length=1)
    bucket: str | None = Field(default=None, min_length=1)
    token: SecretStr | None = None
    retention_policy: RetentionPolicy | None = None
    downsample: list[Downsample] = Field(default_factory=list)
    username: str | None = None
    password: SecretStr | None = None
    create_database: bool = True
    gzip: Annotated[int, BeforeValidator(_gzip_level)] = 0
    dead_letter: Path | None = None
    dead_letter_max_size: Size = 100 * 1024 * 1024
    tls: TlsConfig | None = None
    uid_field: str = Field(default="uid", min_length=1)
    max_in_flight: int = Field(default=2, ge=1)

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        return check_base_url(v)

    @property
    def v2(self) -> bool:
        """Whether batches go to the 2.x/3.x API (``bucket`` is set)."""
        return self.bucket is not None

    @property
    def target(self) -> str:
        """Where batches go, for messages: ``database 'x'`` or ``bucket 'x'``."""
        return f"bucket {self.bucket!r}" if self.v2 else f"database {self.database!r}"

    @model_validator(mode="after")
    def _check_api(self) -> Config:
        v1 = [k for k in _V1_KEYS if k in self.model_fields_set]
        v2 = [k for k in _V2_KEYS if k in self.model_fields_set]
        if v1 and v2:
            raise ValueError(
                f"{', '.join(v1)} (InfluxDB 1.x API) and {', '.join(v2)} (2.x/3.x API) "
                "exclude each other: use database (+ retention_policy, username/password) "
                "for /write, or bucket (+ org, token) for /api/v2/write"
            )
        if v2 and self.bucket is None:
            raise ValueError(f"{', '.join(v2)} set without bucket: the 2.x/3.x API needs bucket")
        if not v2 and self.database is None:
            raise ValueError("database is required (or bucket, with org and token, for 2.x/3.x)")
        return self

    @model_validator(mode="after")
    def _check_downsample(self) -> Config:
        if not self.downsample:
            return self
        if not self.create_database:
            raise _key_error(
                ("downsample",),
                "",
                "needs create_database = true (plantbus creates the continuous queries and "
                "their policies)",
            )
        names: dict[str, int] = {}
        for i, d in enumerate(self.downsample):
            if self.retention_policy is not None and d.into.name == self.retention_policy.name:
                raise _key_error(
                    ("downsample", i, "into", "name"),
                    d.into.name,
                    "must differ from retention_policy.name (the policy it reads from)",
                )
            if d.cq_name in names:
                raise _key_error(
                    ("downsample", i, "name"),
                    d.cq_name,
                    f"continuous query {d.cq_name!r} is also downsample[{names[d.cq_name]}]'s: "
                    "give one a name",
                )
            names[d.cq_name] = i
            for j, other in enumerate(self.downsample[:i]):
                if other.into.name == d.into.name and other.into != d.into:
                    raise _key_error(
                        ("downsample", i, "into"),
                        d.into.name,
                        f"policy {d.into.name!r} is also downsample[{j}].into, differently",
                    )
        return self

    @model_validator(mode="after")
    def _check_auth(self) -> Config:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together: set both or neither")
        if self.tls is not None and not self.url.startswith("https:"):
            raise ValueError("tls is set but the url is not https://")
        return self


def check_base_url(v: str) -> str:
    """A server's base URL: http(s), a host, an optional port and path prefix, no query."""
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f'invalid url {v!r}: use "http://host:port" or "https://host:port"')
    if parts.query or parts.fragment:
        raise ValueError(f"invalid url {v!r}: no query or fragment, just the base URL")
    if parts.username is not None or parts.password is not None:
        # a password there would be outside every rule for secrets (files, masking, warnings)
        raise ValueError(f"invalid url {v!r}: credentials go in username/password (or token)")
    try:
        _ = parts.port
    except ValueError as e:
        raise ValueError(f"invalid url {v!r}: {e}") from None
    return v.rstrip("/")


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


def _error_message(text: str, limit: int | None = _ERROR_TEXT_LIMIT) -> str:
    """InfluxDB's ``{"error": "..."}`` text (1.x, 3.x), the ``message`` of a 2.x
    ``{"code": "...", "message": "..."}``, or the raw body (shortened to ``limit``)."""
    text = text.strip()
    try:
        doc = json.loads(text)
    except ValueError:
        return text[:limit]
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        message = str(doc["error"])
        data = doc.get("data")
        if isinstance(data, list):
            # 3.x lists its refused lines, each with its reason: given as 1.x does, one
            # "unable to parse 'LINE': REASON" per line, so each dead letter gets its own
            message += "".join(
                f"\n{_PARSE_ERROR}{d['original_line']}': {d.get('error_message', '')}"
                for d in data
                if isinstance(d, dict) and isinstance(d.get("original_line"), str)
            )
        return message[:limit]
    if isinstance(doc, dict) and isinstance(doc.get("message"), str):
        code = doc.get("code")
        message = str(doc["message"])
        # the code ("invalid", "unauthorized", "not found", ...) says what kind of refusal
        return (f"{code}: {message}" if isinstance(code, str) and code else message)[:limit]
    return text[:limit]


class _V1Api:
    """InfluxDB 1.x: ``/write`` with db/rp/precision, InfluxQL ``/query`` for set-up."""

    creates = True  # can create a missing database (create_database)
    refusals = frozenset({400})  # statuses that refuse lines (isolated by bisection)

    @staticmethod
    def all_refused(message: str, lines: int) -> bool:
        """Whether a refusal says that none of the part's ``lines`` lines was written:
        1.x answers a batch it parsed nothing of with "unable to parse" (it writes the good
        points of any other and says "partial write"), or counts ``dropped=N``."""
        return message.startswith(_PARSE_ERROR) or _all_dropped(message, lines)

    def __init__(self, config: Config):
        self.config = config
        self.write_url = f"{config.url}/write"
        self.query_url = f"{config.url}/query"
        self.ping_url = f"{config.url}/ping"
        assert config.database is not None  # a 1.x config has one
        params = {"db": config.database, "precision": "ns"}
        if config.retention_policy is not None:
            params["rp"] = config.retention_policy.name
        self.write_params = params
        self.create_refused = False  # warned once that the user may not create the database
        # what exists in InfluxDB and differs from the config (reported, left alone)
        self.mismatches: dict[str, str] = {}
        self._reported: dict[str, str] = {}

    def auth_headers(self) -> dict[str, str]:
        """Headers every request carries: HTTP basic auth when username/password are set."""
        cfg = self.config
        if cfg.username is None or cfg.password is None:
            return {}
        # InfluxDB 1.x takes basic auth on /write and /query alike
        secret = f"{cfg.username}:{cfg.password.get_secret_value()}".encode()
        return {"Authorization": "Basic " + base64.b64encode(secret).decode("ascii")}

    def describe(self) -> str:
        return f"db={self.config.database!r}"

    def auth_hint(self) -> str:
        db = self.config.database
        return f"check username, password and the user's WRITE privilege on {db!r}"

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
        if self.config.create_database:
            await self.ensure_target(session, name)

    async def ensure_target(self, session: aiohttp.ClientSession, name: str) -> None:
        cfg = self.config
        db = cfg.database
        assert db is not None  # a 1.x config has one
        status, error, _ = await self._query(session, f"CREATE DATABASE {_ident(db)}")
        if status == 401:
            raise MisconfiguredSinkError(
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
        if cfg.retention_policy is None and not cfg.downsample:
            return
        result = await self._must(
            session,
            f"SHOW RETENTION POLICIES ON {_ident(db)}",
            f"SHOW RETENTION POLICIES on {db!r}",
            read_only=True,
        )
        policies = _rp_rows(result)
        if cfg.retention_policy is not None:
            await self._ensure_rp(session, cfg.retention_policy, policies, name)
        if cfg.downsample:
            await self._ensure_downsample(session, policies, name)

    async def _must(
        self, session: aiohttp.ClientSession, q: str, what: str, *, read_only: bool = False
    ) -> dict[str, Any]:
        """Run a set-up statement that has to succeed: its result, else raise."""
        status, error, result = await self._query(session, q, read_only=read_only)
        if status in (401, 403):
            # only an operator can fix it: an admin user, or making it by hand
            raise MisconfiguredSinkError(f"{what} refused (HTTP {status}): {error}")
        if status != 200 or error:
            raise RetryableSinkError(f"{what} failed (HTTP {status}): {error}")
        return result

    def report(self, name: str, key: str, text: str) -> None:
        """Report what exists on the server and differs from the config: an ERROR, logged
        once per difference (connect runs again after every failure), and counted."""
        self.mismatches[key] = text
        if self._reported.get(key) != text:
            self._reported[key] = text
            log.error("sink %s: %s", name, text)

    async def _ensure_rp(
        self,
        session: aiohttp.ClientSession,
        rp: RetentionPolicy,
        policies: dict[str, tuple[float, bool]],
        name: str,
    ) -> None:
        """Create ``rp`` if it is not in ``policies``; report it if it differs there."""
        db = self.config.database
        assert db is not None
        key = f"retention policy {rp.name}"
        if rp.name in policies:
            duration, default = policies[rp.name]
            # "default" compared only where the config says it (false is not "make it not")
            wants_default = rp.default if "default" in rp.model_fields_set else default
            if duration != rp.duration or wants_default != default:
                self.report(
                    name,
                    key,
                    f"retention policy {rp.name!r} on {db!r} exists as DURATION "
                    f"{_rp_text(duration)}{' DEFAULT' if default else ''}, the config says "
                    f"DURATION {_rp_text(rp.duration)}{' DEFAULT' if wants_default else ''}: "
                    "left as it is (alter it in InfluxDB, or change the config)",
                )
            else:
                self.mismatches.pop(key, None)
            return
        q = (
            f"CREATE RETENTION POLICY {_ident(rp.name)} ON {_ident(db)} "
            f"DURATION {rp.influxql_duration} REPLICATION 1"
        )
        if rp.default:
            q += " DEFAULT"
        await self._must(session, q, f"creating retention policy {rp.name!r} on {db!r}")
        if rp.default:
            policies.update({k: (d, False) for k, (d, _) in policies.items()})
        policies[rp.name] = (rp.duration, rp.default)
        log.info(
            "sink %s: created retention policy %r on %r (%s%s)",
            name,
            rp.name,
            db,
            rp.influxql_duration,
            ", default" if rp.default else "",
        )

    async def _ensure_downsample(
        self, session: aiohttp.ClientSession, policies: dict[str, tuple[float, bool]], name: str
    ) -> None:
        """Create the ``downsample`` policies and continuous queries where missing; report
        the ones that exist and differ (never dropped or altered)."""
        cfg = self.config
        db = cfg.database
        assert db is not None
        if cfg.retention_policy is not None:
            source = cfg.retention_policy.name
        else:
            defaults = [p for p, (_, default) in policies.items() if default]
            if not defaults:
                self.report(
                    name,
                    "downsample",
                    f"database {db!r} has no default retention policy to downsample from: "
                    "set retention_policy; no continuous query created",
                )
                return
            source = defaults[0]
        seen: set[str] = set()
        for d in cfg.downsample:  # entries may share an into policy (check made them agree)
            if d.into.name not in seen:
                seen.add(d.into.name)
                await self._ensure_rp(session, d.into, policies, name)
        result = await self._must(session, "SHOW CONTINUOUS QUERIES", "SHOW CONTINUOUS QUERIES")
        existing = _cq_rows(result, db)
        for d in cfg.downsample:
            want = d.statement(db, source)
            key = f"continuous query {d.cq_name}"
            have = existing.get(d.cq_name)
            if have is None:
                await self._must(session, want, f"creating continuous query {d.cq_name!r}")
                log.info("sink %s: created continuous query: %s", name, want)
            elif not _same_statement(have, want):
                self.report(
                    name,
                    key,
                    f"continuous query {d.cq_name!r} on {db!r} exists as [{have}], the config "
                    f"makes it [{want}]: left as it is (drop it in InfluxDB to have it made "
                    "again, or change the config)",
                )
            else:
                self.mismatches.pop(key, None)


def _rp_text(seconds: float) -> str:
    return "INF" if seconds == 0 else influxql_duration(seconds)


def _same_statement(a: str, b: str) -> bool:
    """Whether two InfluxQL statements are the same but for quoting and spacing (InfluxDB
    writes a continuous query back with identifiers quoted only where needed)."""
    return " ".join(a.replace('"', "").split()) == " ".join(b.replace('"', "").split())


def _cq_rows(result: dict[str, Any], database: str) -> dict[str, str]:
    """name -> query of ``database``'s continuous queries (SHOW CONTINUOUS QUERIES)."""
    out: dict[str, str] = {}
    for series in result.get("series", []):
        if series.get("name") != database:
            continue
        cols = series.get("columns", [])
        for values in series.get("values", []):
            row = dict(zip(cols, values, strict=False))
            out[str(row.get("name"))] = str(row.get("query", ""))
    return out


class _V2Api:
    """InfluxDB 2.x/3.x (and VictoriaMetrics): ``/api/v2/write`` with org/bucket/precision.

    Nothing is created: a bucket is made by the operator (in 2.x with its org and retention).
    """

    creates = False
    # 2.x answers a partial write (type conflict, beyond retention) with 422
    refusals = frozenset({400, 422})

    @staticmethod
    def all_refused(message: str, lines: int) -> bool:
        """Only ``dropped=N`` says a whole part was refused: 2.x refuses a batch with an
        unparsable line whole (writing none of its good lines), so that answer is cut
        further until the good lines are in."""
        return _all_dropped(message, lines)

    def __init__(self, config: Config):
        self.config = config
        self.write_url = f"{config.url}/api/v2/write"
        self.ping_url = f"{config.url}/ping"
        assert config.bucket is not None
        params = {"bucket": config.bucket, "precision": "ns"}
        if config.org is not None:
            params["org"] = config.org
        self.write_params = params

    def auth_headers(self) -> dict[str, str]:
        if self.config.token is None:
            return {}
        return {"Authorization": "Token " + self.config.token.get_secret_value()}

    def not_found_hint(self) -> str:
        return f"create the {self.config.target} in InfluxDB, or check org"

    def describe(self) -> str:
        return f"bucket={self.config.bucket!r}"

    def auth_hint(self) -> str:
        return f"check token and its write permission on {self.config.target}"

    def missing_target(self, status: int, message: str) -> bool:
        return False

    async def prepare(self, session: aiohttp.ClientSession, name: str) -> None:
        """Check the server answers ``/ping`` (InfluxDB 2.x, 3.x and VictoriaMetrics do)."""
        async with session.get(self.ping_url) as r:
            if r.status not in (200, 204):
                raise RetryableSinkError(
                    f"{self.config.url}/ping answered HTTP {r.status}: is this InfluxDB?"
                )

    async def ensure_target(self, session: aiohttp.ClientSession, name: str) -> None:
        raise AssertionError("the 2.x API creates nothing")  # missing_target is never true


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


def split_lines(payload: bytes) -> list[bytes]:
    """The lines of a line-protocol payload, each with its newline (raw newlines inside
    quoted string values stay in their line)."""
    lines: list[bytes] = []
    pos, end = 0, len(payload)
    match = _LINE.match
    while pos < end:
        m = match(payload, pos)
        stop = m.end() if m is not None else end
        if stop <= pos:  # cannot happen with a valid payload; never loop on a bad one
            stop = end
        lines.append(payload[pos:stop])
        pos = stop
    return lines


def _parse_reasons(message: str) -> dict[bytes, str]:
    """line -> reason from InfluxDB's "unable to parse 'LINE': REASON" list (one per line)."""
    reasons: dict[bytes, str] = {}
    # what comes before the list: 2.x's code ("invalid: "), 1.x's "partial write: "
    message = message[max(message.find(_PARSE_ERROR), 0) :]
    for part in message.split("\n" + _PARSE_ERROR):
        part = part.removeprefix(_PARSE_ERROR)
        line, sep, reason = part.rpartition("': ")
        if sep:
            reasons[line.encode()] = f"unable to parse: {reason}"
    return reasons


def _all_dropped(message: str, lines: int) -> bool:
    """Whether an answer says ``dropped=N`` for all ``lines`` lines of a part."""
    m = _DROPPED.search(message)
    return m is not None and int(m.group(1)) >= lines


class _Isolation:
    """What isolating a batch's bad lines found: lines refused and requests spent."""

    def __init__(self, lines: list[bytes]):
        self.lines = lines
        self.refused: list[tuple[bytes, str]] = []
        self.requests = 0
        self.bisect_requests = 0

    def refuse(self, lo: int, hi: int, status: int, message: str, note: str = "") -> None:
        """Refuse lines ``lo`` to ``hi``; each gets its own reason where InfluxDB gave one."""
        reasons = _parse_reasons(message) if _PARSE_ERROR in message else {}
        short = message[:_ERROR_TEXT_LIMIT]
        for line in self.lines[lo:hi]:
            reason = reasons.get(line.rstrip(b"\n"), short)
            self.refused.append((line, f"{note}HTTP {status}: {reason}"))


class InfluxDBSink:
    """Writes encoded line-protocol batches to one InfluxDB database.

    Attributes:
        recreated: times the database or policy vanished and was made again.
        dead_letter: the file refused lines go to.
        isolate_requests: requests spent splitting batches after 400 and 413 answers.
    """

    codec = "line_protocol"
    server_name = "InfluxDB"  # who answers, in messages

    def __init__(self, config: Config, name: str = "influxdb", dead_letter: Path | None = None):
        self.config = config
        self.name = name
        self._api = self._make_api(config)
        self._session: aiohttp.ClientSession | None = None
        self._headers = {"Content-Type": "text/plain; charset=utf-8"}
        if config.gzip:
            self._headers["Content-Encoding"] = "gzip"
        # compressed bodies of the batches in flight, kept for their retries
        self._gzipped: list[tuple[EncodedBatch, bytes]] = []
        self.recreated = 0
        path = config.dead_letter or dead_letter or Path("deadletter") / f"{name}.lp"
        self.dead_letter = DeadLetterFile(path, config.dead_letter_max_size, f"sink={name}")
        self.isolate_requests = 0

    def _make_api(self, config: Config) -> Any:
        """The protocol dialect: URLs, parameters, auth headers, what it can create."""
        return _V2Api(config) if config.v2 else _V1Api(config)

    def metrics(self) -> dict[str, int | float]:
        """The sink's own counters (the outlet adds them to the sink's metrics)."""
        return {
            "dead_lettered": self.dead_letter.lines,
            "dead_letter_dropped": self.dead_letter.dropped,
            "isolate_requests": self.isolate_requests,
            "recreated": self.recreated,
            "config_mismatches": len(getattr(self._api, "mismatches", ())),
        }

    def _new_session(self) -> aiohttp.ClientSession:
        cfg = self.config
        headers = self._api.auth_headers()
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
            raise RetryableSinkError(
                f"cannot reach {self.server_name} at {self.config.url}: {e}"
            ) from e

    async def _compress(self, data: bytes) -> bytes:
        level = self.config.gzip
        if len(data) > _GZIP_OFF_LOOP:
            return await asyncio.to_thread(gzip_module.compress, data, level)
        return gzip_module.compress(data, level)

    async def _body(self, batch: EncodedBatch) -> bytes:
        if not self.config.gzip:
            return batch.payload
        for held, body in self._gzipped:
            if held is batch:
                return body
        body = await self._compress(batch.payload)
        self._gzipped.append((batch, body))
        # as many as batches may be in flight; one pushed out while still being retried is
        # just compressed again
        del self._gzipped[: -self.config.max_in_flight]
        return body

    async def write(self, batch: EncodedBatch) -> None:
        """Write one batch.

        Raises:
            RetryableSinkError: nothing refused for good; the whole batch may be sent again.
            PartialWriteError: some lines were refused (they are in the dead-letter file).
            PermanentSinkError: none of the batch can be written.
        """
        session = self._session
        if session is None or session.closed:
            raise RetryableSinkError("not connected")
        body = await self._body(batch)
        try:
            status, message, headers = await self._post(session, body)
            if status >= 300 and self._api.missing_target(status, message):
                if not (self._api.creates and self.config.create_database):
                    raise self._error(status, message, headers, batch)
                log.warning(
                    "sink %s: %s; creating it again and writing batch %d once more",
                    self.name,
                    message,
                    batch.seq,
                )
                await self._api.ensure_target(session, self.name)
                self.recreated += 1
                status, message, headers = await self._post(session, body)
            if status == 413 or status in self._api.refusals:
                await self._isolate(session, batch, status, message)
                return
        except aiohttp.ClientError as e:
            raise RetryableSinkError(f"{self._api.write_url}: {_describe(e)}") from e
        if status in (200, 204):
            return
        raise self._error(status, message, headers, batch)

    async def _isolate(
        self, session: aiohttp.ClientSession, batch: EncodedBatch, status: int, message: str
    ) -> None:
        """Split a batch InfluxDB refused (400 or 413) until every good line is written.

        Refused lines go to the dead-letter file and are reported by ``PartialWriteError``;
        if none is left over the batch counts as written. Any other answer on the way
        raises as for a whole batch (the batch is then sent again from its start).
        """
        api = self._api
        found = _Isolation(split_lines(batch.payload))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.timeout / 2
        # depth first, first half first: parts of the batch with the answer they got
        todo: list[tuple[int, int, int, str, dict[str, str]]] = [
            (0, len(found.lines), status, message, {})
        ]
        try:
            while todo:
                lo, hi, st, msg, headers = todo.pop()
                if st in (200, 204):
                    continue
                refusal = st in api.refusals
                if not refusal and st != 413:
                    raise self._error(st, msg, headers, batch)
                if hi - lo == 1 or (refusal and api.all_refused(msg, hi - lo)):
                    found.refuse(lo, hi, st, msg)
                    continue
                over = found.bisect_requests >= ISOLATE_MAX_REQUESTS or loop.time() > deadline
                if refusal and over:
                    found.refuse(lo, hi, st, msg, "not isolated (budget spent): ")
                    continue
                mid = (lo + hi) // 2
                answers = []
                for a, b in ((lo, mid), (mid, hi)):
                    part = b"".join(found.lines[a:b])
                    body = await self._compress(part) if self.config.gzip else part
                    found.requests += 1
                    if refusal:
                        found.bisect_requests += 1
                    answers.append((a, b, *await self._post(session, body, limit=None)))
                todo.extend(reversed(answers))
        finally:
            self.isolate_requests += found.requests
        refused = found.refused
        if not refused:
            log.info(
                "sink %s: batch %d (%d bytes) split into parts %s took (%d requests)",
                self.name,
                batch.seq,
                len(batch.payload),
                self.server_name,
                found.requests,
            )
            return
        kept = self.dead_letter.append(refused, f"batch={batch.seq}")
        where = f"to {self.dead_letter.path}" if kept else "but NOT kept (see the error above)"
        raise PartialWriteError(
            f"{self.server_name} refused {len(refused)} of {len(found.lines)} lines of batch "
            f"{batch.seq} "
            f"(the others are written; {found.requests} more requests); the refused lines "
            f"went {where}; first reason: {refused[0][1][:_ERROR_TEXT_LIMIT]}",
            rejected_records=len(refused),
        )

    async def _post(
        self, session: aiohttp.ClientSession, body: bytes, limit: int | None = _ERROR_TEXT_LIMIT
    ) -> tuple[int, str, dict[str, str]]:
        async with session.post(
            self._api.write_url, params=self._api.write_params, data=body, headers=self._headers
        ) as r:
            if r.status in (200, 204):
                return r.status, "", {}
            text = await r.text(errors="replace")
            retry_after = {"Retry-After": r.headers.get("Retry-After", "")}
            return r.status, _error_message(text, limit), retry_after

    def _error(
        self, status: int, message: str, headers: dict[str, str], batch: EncodedBatch
    ) -> Exception:
        what = f"{self.server_name} answered HTTP {status}"
        message = message[:_ERROR_TEXT_LIMIT]
        if status in self._api.refusals:
            return PermanentSinkError(f"{what}: {message}")
        if status in (401, 403):
            return MisconfiguredSinkError(
                f"{what} (authentication/authorization; {self._api.auth_hint()}): {message}"
            )
        if status == 404 and not self._api.creates:
            return MisconfiguredSinkError(f"{what}: {message} ({self._api.not_found_hint()})")
        if status == 404:
            if not self.config.create_database:
                return MisconfiguredSinkError(
                    f"{what}: {message} (create_database = false: create the database "
                    f"{self.config.database!r} in InfluxDB)"
                )
            # the database is gone and could not be created again (no admin rights?): an
            # operator can fix that, so the batch waits rather than being thrown away
            return MisconfiguredSinkError(
                f"{what}: {message} (create the database, or give the user admin rights "
                "so plantbus can)"
            )
        if status in (429, 503) or status >= 500:
            return RetryableSinkError(
                f"{what}: {message}", retry_after=retry_after_seconds(headers.get("Retry-After"))
            )
        return PermanentSinkError(f"{what}: {message}")

    async def close(self) -> None:
        session, self._session = self._session, None
        self._gzipped.clear()
        if session is not None and not session.closed:
            await session.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.config.url!r}, {self._api.describe()})"


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def build(config: Config, ctx: BuildContext) -> InfluxDBSink:
    """Build the sink (nothing is contacted until the outlet connects it)."""
    name = config.name or "influxdb"
    return InfluxDBSink(config, name, ctx.state_dir / "deadletter" / f"{name}.lp")
