"""Config of the ``opcua`` device: the keys, their defaults and the checks ``plantbus check`` runs.

Nothing here imports asyncua: ``plantbus check`` validates node ids, URLs and security
settings with this module alone (asyncua takes a while to import and is an optional extra).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from plantbus.broker.configtypes import Duration, StrictModel
from plantbus.broker.connector import DeviceConfig, WritablePointConfig

__all__ = [
    "POLICIES",
    "Config",
    "NodeRef",
    "PointConfig",
    "SecurityConfig",
    "parse_node_id",
]

POLICIES = ("Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss")
"""Security policies, spelled as in their OPC UA URIs (``…/SecurityPolicy#Basic256Sha256``)."""

Policy = Literal["Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"]

MAX_POINTS = 100_000
_UINT32_MAX = 2**32 - 1
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_KINDS = {"i": "numeric", "s": "string", "g": "GUID", "b": "opaque (base64)"}


@dataclass(frozen=True, slots=True)
class NodeRef:
    """A parsed node id: namespace (index, or URI with ``nsu=``), identifier kind and value.

    Attributes:
        namespace: the namespace index, or its URI when written ``nsu=…`` (resolved against
            the server's namespace array when connecting, since indexes may change when a
            server is reconfigured, URIs do not).
        kind: ``i`` numeric, ``s`` string, ``g`` GUID, ``b`` opaque (ByteString).
        value: the identifier: int, str, ``uuid.UUID`` or bytes.
    """

    namespace: int | str
    kind: Literal["i", "s", "g", "b"]
    value: int | str | uuid.UUID | bytes

    def __str__(self) -> str:
        ns = f"nsu={self.namespace};" if isinstance(self.namespace, str) else ""
        if isinstance(self.namespace, int) and self.namespace:
            ns = f"ns={self.namespace};"
        value = self.value
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii")
        return f"{ns}{self.kind}={value}"


def parse_node_id(text: str) -> NodeRef:
    """Parse the OPC UA string form of a node id (Part 6, 5.3.1.10).

    ``ns=<index>;<kind>=<value>`` or ``nsu=<uri>;<kind>=<value>``, the namespace part
    optional (namespace 0), kind ``i`` (UInt32), ``s`` (string: the rest of the text, ``;``
    included), ``g`` (GUID) or ``b`` (base64).

    Raises:
        ValueError: naming what is wrong, with an example of the expected form.
    """
    if not isinstance(text, str) or not text:
        raise ValueError('a node id must be a string such as "ns=2;s=Line1.Temp"')
    namespace: int | str = 0
    rest = text
    if rest.startswith(("ns=", "nsu=")):
        head, sep, rest = rest.partition(";")
        if not sep:
            raise ValueError(
                f"node id {text!r} has a namespace but no identifier "
                '(expected e.g. "ns=2;s=Line1.Temp" or "ns=3;i=1001")'
            )
        key, _, ns = head.partition("=")
        if key == "ns":
            if not ns.isascii() or not ns.isdigit() or int(ns) > 65535:
                raise ValueError(
                    f"node id {text!r}: namespace index {ns!r} must be an integer 0-65535"
                )
            namespace = int(ns)
        else:
            if not ns:
                raise ValueError(f"node id {text!r}: the namespace URI after nsu= is empty")
            namespace = ns
    kind, sep, value = rest.partition("=")
    if not sep or kind not in _KINDS:
        raise ValueError(
            f"node id {text!r} is not of the form [ns=<index>;]<i|s|g|b>=<identifier> "
            '(e.g. "ns=2;s=Line1.Temp", "ns=3;i=1001")'
        )
    if kind == "i":
        if not value.isascii() or not value.isdigit() or int(value) > _UINT32_MAX:
            raise ValueError(
                f"node id {text!r}: a numeric identifier must be an integer 0-{_UINT32_MAX}"
            )
        return NodeRef(namespace, "i", int(value))
    if not value:
        raise ValueError(f"node id {text!r}: the {_KINDS[kind]} identifier is empty")
    if kind == "s":
        return NodeRef(namespace, "s", value)
    if kind == "g":
        if not _GUID.match(value):
            raise ValueError(
                f"node id {text!r}: a GUID identifier must look like "
                "09087e75-8e5e-499b-954f-f2a9603db28a"
            )
        return NodeRef(namespace, "g", uuid.UUID(value))
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"node id {text!r}: an opaque identifier must be base64 "
            "(e.g. b=M/RbKBsRVkePCePcx24oRA==)"
        ) from None
    return NodeRef(namespace, "b", raw)


class PointConfig(WritablePointConfig):
    """One variable read into one field of the device's records.

    Attributes:
        name: the field name.
        node: the variable's node id, e.g. ``ns=2;s=Line1.Temp`` or ``ns=3;i=1001``.
        deadband: subscribe mode: report a change only when it exceeds this absolute amount.
        sampling_interval: subscribe mode: how often the server samples this variable
            (default: the device's ``sampling_interval``).
        queue_size: subscribe mode: samples the server keeps between two publishes
            (default: the device's ``queue_size``).
        writable: commands may write this variable (see ``WritablePointConfig``); the value
            is sent with the variable's own DataType, read from the server.
        write_limits: ``[low, high]``: the inclusive range a command value must be in.
        read_back: read it back after a write, into the reply (default: the device's).
    """

    name: str = Field(min_length=1)
    node: str
    deadband: float | None = Field(default=None, ge=0)
    sampling_interval: Duration | None = None
    queue_size: int | None = Field(default=None, ge=1, le=10_000)

    @field_validator("name")
    @classmethod
    def _encodable(cls, v: str) -> str:
        # the codec is pure and light; imported here like the config loader does
        from plantbus.codecs.line_protocol import check_name

        reason = check_name(v, "field_key")
        if reason is not None:
            raise ValueError(f"point name {v!r} cannot be written in line protocol: it {reason}")
        return v

    @field_validator("node")
    @classmethod
    def _node_id(cls, v: str) -> str:
        parse_node_id(v)
        return v

    @field_validator("deadband")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"must be a finite number, not {v}")
        return v

    @property
    def ref(self) -> NodeRef:
        return parse_node_id(self.node)


class SecurityConfig(StrictModel):
    """``security = { policy, mode, certificate, private_key, trust }``.

    OPC UA secures its own channel (it is not TLS): the client proves itself with an
    application-instance certificate, and the server's certificate must be one in ``trust``
    or be issued by one there.

    Attributes:
        policy: ``Basic256Sha256``, ``Aes128_Sha256_RsaOaep`` or ``Aes256_Sha256_RsaPss``.
        mode: ``Sign`` or ``SignAndEncrypt``.
        certificate: the client's certificate (PEM or DER); its subjectAltName URI is the
            client's application URI.
        private_key: the client's private key (PEM or DER, unencrypted).
        trust: server certificates, or folders of them (``*.der``, ``*.pem``, ``*.crt``),
            that the client accepts: the server's own certificate or the CA that issued it.
    """

    secret_paths: ClassVar[tuple[str, ...]] = ("private_key",)  # `check` warns if world-readable

    policy: Policy = "Basic256Sha256"
    mode: Literal["Sign", "SignAndEncrypt"] = "SignAndEncrypt"
    certificate: Path
    private_key: Path
    trust: list[Path] = Field(min_length=1)


class Config(DeviceConfig):
    """``[[devices.opcua]]``: the device keys plus the server, the mode and the points.

    Attributes:
        url: ``opc.tcp://host:port[/path]``.
        mode: ``poll`` (read all points every ``interval``) or ``subscribe`` (the server
            publishes changes every ``interval``).
        timestamp: the record time: ``source`` (the device's timestamp of each value),
            ``server`` (the server's) or ``read`` (when plantbus read it).
        username / password: user authentication (else anonymous).
        security: message security (else none).
        points: the variables read.
        timeout: the longest wait for one answer; in subscribe mode also the longest silence
            (beyond the keep-alive) before the connection is taken as dead.
        chunk_size: nodes per Read (poll) or CreateMonitoredItems (subscribe) request when
            the server does not publish its own limit (OperationLimits).
        sampling_interval: subscribe mode: default sampling interval of the points
            (default: ``interval``).
        queue_size: subscribe mode: default queue size of the points (default: enough to
            keep every sample between two publishes, ``interval / sampling_interval``).
        connections: spread the points over this many sessions (a long point list on a
            server that answers each session in turn).
        verify_interval: subscribe mode: how often the monitored nodes are checked to still
            exist (a deleted node goes Bad, a node that is back is monitored again); 0: never.
        reconnect_initial / reconnect_max: backoff between reconnect attempts.
        read_back: after a command wrote variables, read their values back (one Read
            request, MaxAge 0) and put them in the reply; a point may set its own.
    """

    url: str
    mode: Literal["poll", "subscribe"] = "poll"
    timestamp: Literal["source", "server", "read"] = "source"
    username: str | None = Field(default=None, min_length=1)
    password: SecretStr | None = None
    security: SecurityConfig | None = None
    points: list[PointConfig] = Field(min_length=1, max_length=MAX_POINTS)
    timeout: Duration = 5.0
    chunk_size: int = Field(default=1000, ge=1, le=MAX_POINTS)
    sampling_interval: Duration | None = None
    queue_size: int | None = Field(default=None, ge=1, le=10_000)
    connections: int = Field(default=1, ge=1, le=64)
    verify_interval: Duration = 30.0
    reconnect_initial: Duration = 0.5
    reconnect_max: Duration = 10.0
    read_back: bool = False

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme != "opc.tcp":
            raise ValueError(f"url {v!r} must start with opc.tcp://")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                f"url {v!r} holds credentials: set them as username and password instead"
            )
        try:
            _ = parts.port  # urlsplit checks the port only when asked for it
        except ValueError:
            raise ValueError(f"url {v!r} has an invalid port") from None
        if not parts.hostname:
            raise ValueError(f"url {v!r} has no host")
        return v

    @field_validator("timeout", "reconnect_initial")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("must be longer than 0s")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.reconnect_max < self.reconnect_initial:
            raise ValueError("reconnect_max must not be shorter than reconnect_initial")
        if self.password is not None and self.username is None:
            raise ValueError("password is set but username is not")
        if self.username is not None and self.password is None:
            raise ValueError(f"username {self.username!r} is set but password is not")
        if self.connections > len(self.points):
            raise ValueError(
                f"connections ({self.connections}) is more than the number of points "
                f"({len(self.points)})"
            )
        if self.mode == "poll":
            self._no_subscribe_keys()
        elif not self.interval > 0:
            raise ValueError('mode = "subscribe" needs an interval longer than 0s')
        names: set[str] = set()
        nodes: dict[str, str] = {}
        for i, p in enumerate(self.points):
            if p.name in names:
                raise ValueError(f"points[{i}]: point name {p.name!r} is used twice")
            names.add(p.name)
            key = str(p.ref)  # canonical, so "ns=2;i=01" and "ns=2;i=1" count as one node
            if key in nodes:
                raise ValueError(
                    f"points[{i}] ({p.name!r}): node {p.node!r} is already read by point "
                    f"{nodes[key]!r}"
                )
            nodes[key] = p.name
        return self

    def _no_subscribe_keys(self) -> None:
        # keys that only mean something to a subscription are errors in poll mode, so a
        # deadband that would silently do nothing is reported instead
        for key in ("sampling_interval", "queue_size", "verify_interval"):
            if key in self.model_fields_set:
                raise ValueError(f'{key} applies only to mode = "subscribe"')
        for i, p in enumerate(self.points):
            for key in sorted(p.model_fields_set & {"deadband", "sampling_interval", "queue_size"}):
                raise ValueError(f'points[{i}].{key} applies only to mode = "subscribe"')
