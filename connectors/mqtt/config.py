"""Config of the ``mqtt`` device: the broker connection and what to subscribe to.

Only pydantic and the standard library are imported here: ``plantbus check`` validates an
``mqtt`` device without loading paho-mqtt or protobuf.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator

from plantbus.broker.configtypes import Duration, StrictModel, TlsConfig
from plantbus.broker.connector import DeviceConfig
from plantbus.broker.topics import validate_filter

__all__ = ["CODECS", "Config", "JsonField", "Subscription", "Template"]

CODECS = ("json", "line_protocol", "number", "sparkplug_b")

# which optional keys each codec takes: a key that does not apply is an error, not ignored
_CODEC_KEYS: dict[str, frozenset[str]] = {
    "json": frozenset({"fields", "time", "time_format", "timezone"}),
    "line_protocol": frozenset({"precision"}),
    "number": frozenset({"field", "type"}),
    "sparkplug_b": frozenset(),
}
_OPTIONAL = frozenset().union(*_CODEC_KEYS.values())
_SPARKPLUG_NAMES = frozenset({"group_id", "edge_node_id", "device_id"})

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class Template:
    """A text with placeholders filled from the MQTT topic of each message.

    ``{1}`` … ``{n}`` are the levels of the MQTT topic (1 is the first), ``{topic}`` is the
    whole MQTT topic; Sparkplug subscriptions also know ``{group_id}``, ``{edge_node_id}`` and
    ``{device_id}``.

    Args:
        text: the template.
        names: the placeholder names allowed besides levels and ``topic``.
        levels: how many levels every matching topic has (None when the filter ends in ``#``,
            so that any level may exist).

    Raises:
        ValueError: a stray brace, an unknown placeholder, or a level the filter cannot have.
    """

    __slots__ = ("parts", "text")

    def __init__(self, text: str, names: Iterable[str] = (), levels: int | None = None):
        self.text = text
        allowed = set(names)
        parts: list[str | int] = []  # literal text (str) and placeholders (int level / name)
        pos = 0
        names_used: list[str | int] = []
        for m in _PLACEHOLDER.finditer(text):
            parts.append(text[pos : m.start()])
            key = m.group(1)
            if key.isdigit():
                level = int(key)
                if level < 1:
                    raise ValueError(f"{text!r}: topic levels count from {{1}}")
                if levels is not None and level > levels:
                    raise ValueError(
                        f"{text!r}: {{{level}}} is beyond the {levels} levels of the filter"
                    )
                names_used.append(level)
            elif key == "topic" or key in allowed:
                names_used.append(key)
            else:
                known = ", ".join(["{1}…{n}", "{topic}", *(f"{{{n}}}" for n in sorted(allowed))])
                raise ValueError(f"{text!r}: unknown placeholder {{{key}}} (known: {known})")
            parts.append(names_used[-1])  # type: ignore[arg-type]
            pos = m.end()
        tail = text[pos:]
        if "{" in tail or "}" in tail or any("{" in p or "}" in p for p in parts[::2]):
            raise ValueError(f"{text!r}: a brace that is not part of a {{placeholder}}")
        parts.append(tail)
        self.parts = tuple(parts)

    @property
    def constant(self) -> bool:
        return len(self.parts) == 1

    def render(self, levels: list[str], topic: str, extra: dict[str, str] | None = None) -> str:
        """The text for one message.

        Raises:
            LookupError: the topic has no such level.
        """
        if len(self.parts) == 1:
            return self.parts[0]  # type: ignore[return-value]
        out = []
        for i, p in enumerate(self.parts):
            if i % 2 == 0:
                out.append(p)
            elif type(p) is int:
                if p > len(levels):
                    raise LookupError(f"{self.text!r}: topic {topic!r} has no level {p}")
                out.append(levels[p - 1])
            elif p == "topic":
                out.append(topic)
            else:
                out.append((extra or {})[p])  # type: ignore[index]
        return "".join(out)  # type: ignore[arg-type]


def _filter_levels(flt: str) -> int | None:
    """The number of topic levels every topic matching ``flt`` has (None after ``#``)."""
    if flt.startswith("$share/"):
        flt = flt.split("/", 2)[2] if flt.count("/") >= 2 else ""
    levels = flt.split("/")
    return None if levels[-1] == "#" else len(levels)


class JsonField(StrictModel):
    """``{ path = "motor.rpm", type = "int" }``: where a point is in a JSON payload."""

    path: str = Field(min_length=1)
    type: Literal["auto", "float", "int", "bool", "string"] = "auto"


class Subscription(StrictModel):
    """One ``[[devices.mqtt.subscriptions]]`` table: a topic filter and how to read it.

    Attributes:
        filter: MQTT topic filter (``+`` one level, ``#`` the rest; ``$share/group/...`` for a
            shared MQTT 5 subscription).
        qos: 0, 1 or 2 (default: the device's ``qos``).
        codec: ``json``, ``line_protocol``, ``number`` or ``sparkplug_b``.
        topic: plantbus topic template (default: the device's topic).
        measurement: measurement template (default: the device's; for line protocol the
            line's own measurement).
        tags: tag templates added to every record.
        fields: JSON: point name -> path or ``{ path, type }`` (default: every scalar member).
        time: JSON: path of the timestamp (default: the receive time).
        time_format: JSON: ``s``, ``ms`` (default), ``us``, ``ns``, ``rfc3339`` or a strptime
            pattern.
        timezone: JSON: the zone of times written without an offset (default UTC).
        precision: line protocol: the unit of the timestamps (default ``ns``).
        field: number: the point name template (default ``value``).
        type: number: ``float`` (default), ``int``, ``bool`` or ``string``.
        commands: the messages are commands: each record goes to ``$cmd/<topic>`` (the
            command topic of the device whose topic ``topic`` names), where the command
            router writes its fields to that device and answers on ``$reply/<topic>``.
            Needs ``topic``; not with ``sparkplug_b``.
    """

    filter: str = Field(min_length=1)
    qos: Literal[0, 1, 2] | None = None
    codec: Literal["json", "line_protocol", "number", "sparkplug_b"] = "json"
    topic: str | None = None
    measurement: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    fields: dict[str, str | JsonField] | None = None
    time: str | None = None
    time_format: str = "ms"
    timezone: str = "UTC"
    precision: Literal["ns", "us", "ms", "s"] = "ns"
    field: str = Field(default="value", min_length=1)
    type: Literal["float", "int", "bool", "string"] = "float"
    commands: bool = False

    @field_validator("filter")
    @classmethod
    def _valid_filter(cls, v: str) -> str:
        validate_filter(v)
        if "\x00" in v:
            raise ValueError(f"filter {v!r} holds a NUL character")
        if v.startswith("$share/") and v.count("/") < 2:
            raise ValueError(f"shared subscription {v!r}: use $share/<group>/<filter>")
        return v

    @model_validator(mode="after")
    def _check(self) -> Subscription:
        allowed = _CODEC_KEYS[self.codec]
        extra = sorted((self.model_fields_set & _OPTIONAL) - allowed)
        if extra:
            takes = ", ".join(sorted(allowed)) or "no codec keys"
            raise ValueError(
                f"{', '.join(extra)} does not apply to codec {self.codec!r} (it takes: {takes})"
            )
        if self.commands:
            if self.codec == "sparkplug_b":
                raise ValueError(
                    "commands does not apply to codec 'sparkplug_b' (Sparkplug commands are "
                    "NCMD/DCMD messages a host sends, not ones it takes)"
                )
            if self.topic is None:
                raise ValueError(
                    "commands = true needs topic: the topic of the device the commands are "
                    'for (e.g. topic = "edge/press"; their records go to $cmd/<topic>)'
                )
            if self.topic.startswith("$"):
                raise ValueError(
                    f"topic {self.topic!r}: give the device's topic; commands = true puts "
                    "$cmd/ in front of it"
                )
        levels = _filter_levels(self.filter)
        names = _SPARKPLUG_NAMES if self.codec == "sparkplug_b" else frozenset()
        for what, text in self.templates():
            try:
                Template(text, names, levels)
            except ValueError as e:
                raise ValueError(f"{what}: {e}") from None
        self._check_names()
        if self.codec == "json":
            from plantbus.codecs.json_fields import parse_path
            from plantbus.codecs.payload import TimeSpec

            TimeSpec(self.time_format, self.timezone)
            for name, spec in (self.fields or {}).items():
                path = spec if isinstance(spec, str) else spec.path
                try:
                    parse_path(path)
                except ValueError as e:
                    raise ValueError(f"fields.{name}: {e}") from None
            if self.time is not None:
                parse_path(self.time)
            if self.fields is not None and not self.fields:
                raise ValueError("fields is empty: leave it out to take every member")
        if self.codec == "sparkplug_b" and self.filter.split("/", 1)[0] not in (
            "spBv1.0",
            "#",
            "+",
        ):
            raise ValueError(f"a sparkplug_b filter starts with spBv1.0/, not {self.filter!r}")
        return self

    def _check_names(self) -> None:
        from plantbus.codecs.line_protocol import check_name

        for name in self.fields or {}:
            reason = check_name(name, "field_key")
            if reason:
                raise ValueError(
                    f"point name {name!r} cannot be written in line protocol: {reason}"
                )
        if "{" not in self.field:
            reason = check_name(self.field, "field_key")
            if reason:
                raise ValueError(
                    f"field {self.field!r} cannot be written in line protocol: {reason}"
                )
        for key in self.tags:
            reason = check_name(key, "tag_key")
            if reason:
                raise ValueError(f"tag key {key!r} cannot be written in line protocol: {reason}")
            if key == "device":
                raise ValueError(
                    "the tag 'device' is reserved: plantbus sets it to the device name"
                )
        if self.measurement is not None and "{" not in self.measurement:
            reason = check_name(self.measurement, "measurement")
            if reason:
                raise ValueError(
                    f"measurement {self.measurement!r} cannot be written in line protocol: {reason}"
                )

    def templates(self) -> list[tuple[str, str]]:
        """``(key path, template text)`` of every templated key."""
        out = [(f"tags.{k}", v) for k, v in self.tags.items()]
        if self.topic is not None:
            out.append(("topic", self.topic))
        if self.measurement is not None:
            out.append(("measurement", self.measurement))
        if self.codec == "number":
            out.append(("field", self.field))
        return out

    def json_fields(self) -> dict[str, tuple[str, str]] | None:
        """``fields`` as ``name -> (path, type)``."""
        if self.fields is None:
            return None
        return {
            name: (spec, "auto") if isinstance(spec, str) else (spec.path, spec.type)
            for name, spec in self.fields.items()
        }


def _protocol(v: Any) -> Any:
    # TOML users write protocol = 5 as often as "5"
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return v


class Config(DeviceConfig):
    """``[[devices.mqtt]]``: an MQTT subscriber device.

    Attributes:
        url: ``mqtt://host:port`` (default port 1883) or ``mqtts://host:port`` (TLS, 8883).
        protocol: ``"3.1.1"`` (default) or ``"5"``.
        client_id: the MQTT client id (default ``plantbus-<node>-<device>``); keep it stable
            for persistent sessions.
        username / password: MQTT authentication.
        persistent_session: keep the session (subscriptions, QoS 1/2 messages not yet
            acknowledged) on the broker across disconnects: MQTT 3.1.1 ``clean_session =
            false``; MQTT 5 ``clean_start = false`` with ``session_expiry``.
        session_expiry: MQTT 5: how long the broker keeps a persistent session.
        keepalive: MQTT keepalive.
        connect_timeout: how long to wait for the broker's CONNACK / SUBACK.
        qos: default QoS of the subscriptions.
        max_pending: received messages waiting for the bus, at most; QoS 0 messages beyond
            it are dropped and counted (QoS 1/2 ones are bounded by the broker's flow control
            instead, since they are acknowledged only once on the bus).
        tls: the shared TLS table (ca, certificate, private_key, verify); implies TLS.
        subscriptions: at least one.
    """

    url: str = "mqtt://127.0.0.1:1883"
    protocol: Annotated[Literal["3.1.1", "5"], BeforeValidator(_protocol)] = "3.1.1"
    client_id: str | None = Field(default=None, min_length=1, max_length=65535)
    username: str | None = None
    password: SecretStr | None = None
    persistent_session: bool = False
    session_expiry: Duration = 86400.0
    keepalive: Duration = 30.0
    connect_timeout: Duration = 10.0
    qos: Literal[0, 1, 2] = 1
    max_pending: int = Field(default=100_000, ge=1)
    tls: TlsConfig | None = None
    subscriptions: list[Subscription] = Field(min_length=1)

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f'invalid url {v!r}: use "mqtt://host:port" or "mqtts://host:port"')
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"invalid url {v!r}: just the scheme, host and port")
        if parts.username or parts.password:
            raise ValueError(f"invalid url {v!r}: put credentials in username / password")
        try:
            _ = parts.port
        except ValueError as e:
            raise ValueError(f"invalid url {v!r}: {e}") from None
        return v

    @field_validator("keepalive", "connect_timeout", "session_expiry")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be longer than 0s")
        return v

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.password is not None and self.username is None:
            raise ValueError("password without username")
        if self.tls is not None and self.tls.private_key and not self.tls.certificate:
            raise ValueError("tls.private_key without tls.certificate")
        if self.keepalive > 65535:
            raise ValueError("keepalive is at most 65535s (18h12m15s)")
        return self

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def use_tls(self) -> bool:
        return self.tls is not None or self.url.startswith("mqtts:")
