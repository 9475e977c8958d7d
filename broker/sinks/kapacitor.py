"""The ``kapacitor`` sink: line-protocol batches to Kapacitor's ``/kapacitor/v1/write``.

Kapacitor (InfluxData's stream processor) takes InfluxDB 1.x line protocol on
``POST /kapacitor/v1/write?db=…&rp=…&precision=ns``; its stream tasks pick points by
database and retention policy. This sink feeds it directly, beside (or instead of) an
InfluxDB subscription. It is the ``influxdb`` sink's HTTP machinery with Kapacitor's
dialect (``_KapacitorApi``): one keep-alive session, gzip, TLS, basic auth, and the same
answer handling. A sink sharing its subscription, codec and batch settings with an
``influxdb`` sink sits in the same outlet (``broker/outlet.py`` ``group_sinks``), so each
batch is encoded once and both get the same ``EncodedBatch``; each keeps its own buffer,
retries and health.

How Kapacitor's answers map:

- 204: written.
- 400: Kapacitor parses the whole body before it takes any point and refuses the request
  if one line does not parse (nothing is taken), so the influxdb sink's bisection writes
  every good line exactly once and puts the unparsable ones in the dead-letter file with
  Kapacitor's "unable to parse" reason.
- 401 / 403: ``MisconfiguredSinkError`` (credentials): the batches wait, the sink is
  unhealthy.
- 413: split and resent; 429 / 503: ``Retry-After``; other 5xx, connection errors: retried.

Kapacitor creates nothing: any ``db`` / ``rp`` pair is taken (tasks that name it see the
points), so there is nothing to create or find missing.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Annotated, Any, Literal

import aiohttp
from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator

from plantbus.broker.configtypes import Size, TlsConfig
from plantbus.broker.connector import BuildContext
from plantbus.broker.sinks.base import RetryableSinkError, SinkConfig
from plantbus.broker.sinks.influxdb import InfluxDBSink, _gzip_level, check_base_url

__all__ = ["Config", "KapacitorSink", "build"]


class Config(SinkConfig):
    """``[[sinks.kapacitor]]``: keys beyond those every sink has.

    Attributes:
        url: base URL of Kapacitor, e.g. "http://127.0.0.1:9092" (a path prefix is kept).
        database: the ``db`` the points are written as (what Kapacitor tasks select).
        retention_policy: the ``rp`` the points are written as.
        username / password: HTTP basic auth (Kapacitor with ``auth-enabled``).
        gzip: compress request bodies at this level (1-9; true = 1, false/0 = off); level 1
            and only for an off-box Kapacitor.
        dead_letter: the file for lines Kapacitor refused (default
            ``<state_dir>/deadletter/<sink name>.lp``).
        dead_letter_max_size: the dead-letter file's size limit.
        tls: the shared TLS table, for https URLs.
        uid_field: the line-protocol field that carries the record ID (the same as the
            ``influxdb`` sink's, so the two share one encoding).
    """

    codec: Literal["line_protocol"] = "line_protocol"
    url: str = "http://127.0.0.1:9092"
    database: str = Field(min_length=1)
    retention_policy: str = Field(default="autogen", min_length=1)
    username: str | None = None
    password: SecretStr | None = None
    gzip: Annotated[int, BeforeValidator(_gzip_level)] = 0
    dead_letter: Path | None = None
    dead_letter_max_size: Size = 100 * 1024 * 1024
    tls: TlsConfig | None = None
    uid_field: str = Field(default="uid", min_length=1)

    @property
    def create_database(self) -> bool:
        """Kapacitor takes any db / rp: there is nothing to create (the influxdb sink's
        machinery asks)."""
        return False

    @property
    def target(self) -> str:
        return f"db {self.database!r} rp {self.retention_policy!r}"

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        return check_base_url(v)

    @model_validator(mode="after")
    def _check_auth(self) -> Config:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together: set both or neither")
        if self.tls is not None and not self.url.startswith("https:"):
            raise ValueError("tls is set but the url is not https://")
        return self


class _KapacitorApi:
    """Kapacitor: ``/kapacitor/v1/write`` with db/rp/precision, ``/kapacitor/v1/ping``."""

    creates = False
    refusals = frozenset({400})

    @staticmethod
    def all_refused(message: str, lines: int) -> bool:
        """Never taken from the answer: Kapacitor refuses a body with one unparsable line
        whole, in the same words InfluxDB 1.x uses for a body it parsed nothing of, so a
        refused part is always cut further (down to its single bad lines)."""
        return False

    def __init__(self, config: Config):
        self.config = config
        self.write_url = f"{config.url}/kapacitor/v1/write"
        self.ping_url = f"{config.url}/kapacitor/v1/ping"
        self.write_params = {
            "db": config.database,
            "rp": config.retention_policy,
            "precision": "ns",
        }

    def auth_headers(self) -> dict[str, str]:
        cfg = self.config
        if cfg.username is None or cfg.password is None:
            return {}
        secret = f"{cfg.username}:{cfg.password.get_secret_value()}".encode()
        return {"Authorization": "Basic " + base64.b64encode(secret).decode("ascii")}

    def auth_hint(self) -> str:
        return "check username and password (Kapacitor with auth-enabled)"

    def not_found_hint(self) -> str:
        return "is the url Kapacitor's, without /kapacitor/v1?"

    def describe(self) -> str:
        return f"db={self.config.database!r}, rp={self.config.retention_policy!r}"

    def missing_target(self, status: int, message: str) -> bool:
        return False

    async def prepare(self, session: aiohttp.ClientSession, name: str) -> None:
        """Check Kapacitor answers its ping."""
        async with session.get(self.ping_url) as r:
            if r.status not in (200, 204):
                raise RetryableSinkError(
                    f"{self.ping_url} answered HTTP {r.status}: is this Kapacitor?"
                )

    async def ensure_target(self, session: aiohttp.ClientSession, name: str) -> None:
        raise AssertionError("Kapacitor creates nothing")  # missing_target is never true


class KapacitorSink(InfluxDBSink):
    """Writes encoded line-protocol batches to Kapacitor's write endpoint."""

    server_name = "Kapacitor"

    def __init__(self, config: Config, name: str = "kapacitor", dead_letter: Path | None = None):
        super().__init__(config, name, dead_letter)  # type: ignore[arg-type]

    def _make_api(self, config: Any) -> Any:
        return _KapacitorApi(config)


def build(config: Config, ctx: BuildContext) -> KapacitorSink:
    """Build the sink (nothing is contacted until the outlet connects it)."""
    name = config.name or "kapacitor"
    return KapacitorSink(config, name, ctx.state_dir / "deadletter" / f"{name}.lp")
