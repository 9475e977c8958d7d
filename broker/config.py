"""Config loading and validation: the main TOML file plus every ``conf.d/*.toml`` beside it.

``load_config(path)`` reads the main file (``[node]``, ``[api]``, ``[defaults]``, devices,
sinks) and then every ``conf.d/*.toml`` in the folder beside it, sorted by name (device
onboarding: any of them may hold ``[[devices.<kind>]]`` and ``[[sinks.<kind>]]``). Every
device and sink table is validated by the ``Config`` model of its kind's module (found
through ``plantbus.broker.registry``), relative ``Path`` values are resolved against the
folder of the file that names them, and cross-file rules are checked (unique names, valid
topics and filters, names that line protocol can encode).

All mistakes of all files are collected and raised together as one ``ConfigError``; each
message names the file (relative to the main file's folder) and the key path, with array
indexes counted within that file::

    conf.d/press7.toml: devices.modbus[0].points[2].type: must be one of ...
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import socket
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    Field,
    SecretBytes,
    SecretStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from plantbus.broker import registry
from plantbus.broker.configtypes import Duration, QueueConfig, Size, StrictModel, TlsConfig
from plantbus.broker.connector import BuildContext, DeviceConfig
from plantbus.broker.secrets import (
    Redactor,
    expand_env,
    others_may_read,
    read_secret_file,
    register,
)
from plantbus.broker.sinks.base import SinkConfig
from plantbus.broker.topics import validate_filter, validate_topic

__all__ = [
    "ApiConfig",
    "ApiQueueConfig",
    "ApiTokenConfig",
    "ConfigError",
    "DefaultsConfig",
    "DeviceEntry",
    "NodeConfig",
    "PlantbusConfig",
    "SinkEntry",
    "check_config",
    "is_loopback_host",
    "load_config",
    "parse_config",
    "read_token",
]

CONF_D = "conf.d"
"""The folder beside the main file whose ``*.toml`` files are read too."""

_MAIN_ONLY = ("node", "api", "defaults")
_ANY_FILE = ("devices", "sinks")


class ConfigError(Exception):
    """The config is invalid. ``errors`` holds one ``file: key.path: message`` line per mistake."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))

    @property
    def messages(self) -> list[str]:
        """The same list as ``errors``."""
        return self.errors


# -- models of the main file ------------------------------------------------------------------


class NodeConfig(StrictModel):
    """``[node]``: who this node is. Only the main file may hold it."""

    name: str = Field(default_factory=socket.gethostname, min_length=1)
    tags: dict[str, str] = Field(default_factory=dict)  # added to every record
    state_dir: Path = Path("/var/lib/plantbus")  # disk buffers, certificates
    log_level: Literal["debug", "info", "warning", "error"] = "info"  # `--log-level` wins
    log_format: Literal["text", "json"] = "text"  # `--log-format` wins
    shutdown_timeout: Duration = 10.0  # how long a drain (SIGTERM) may take

    @field_validator("shutdown_timeout")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be longer than 0s")
        return v

    @field_validator("name")
    @classmethod
    def _one_topic_level(cls, v: str) -> str:
        # the node name is the first level of every default device topic
        if any(c in v for c in "/+#\x00") or v.startswith("$"):
            raise ValueError(
                f"node name {v!r} must be a single topic level: no '/', '+', '#' and no leading '$'"
            )
        return v


_LISTEN = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\[\]]*):(?P<port>\d{1,5})$")


CMD_TOPIC_PREFIX = "$cmd/"
"""Commands to devices travel on ``$cmd/<device topic>`` (``plantbus.broker.commands``)."""


class ApiTokenConfig(StrictModel):
    """``[[api.tokens]]``: a bearer token and the topics its holder may use.

    ``subscribe`` and ``publish`` hold MQTT filters of topics; ``write`` holds filters of
    *device topics* that commands may be sent to (publishing on ``$cmd/<device topic>``;
    ``publish`` never covers ``$cmd/…``), which also lets the holder subscribe to the
    replies on ``$reply/<device topic>``.
    """

    name: str = ""  # shown in logs and messages instead of the token; default "tokens[<i>]"
    token: SecretStr | None = None  # or token_file, or "${VAR}" (as every secret key)
    subscribe: list[str] = Field(default_factory=list)
    publish: list[str] = Field(default_factory=list)
    write: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _given(self) -> ApiTokenConfig:
        if self.token is None:
            raise ValueError("give the token as `token` or `token_file`")
        return self

    @field_validator("subscribe", "publish", "write")
    @classmethod
    def _filters(cls, v: list[str]) -> list[str]:
        for flt in v:
            validate_filter(flt)
        return v

    @field_validator("publish")
    @classmethod
    def _no_commands(cls, v: list[str]) -> list[str]:
        for flt in v:
            if flt.startswith(CMD_TOPIC_PREFIX) or flt == "$cmd":
                raise ValueError(
                    f"publish filter {flt!r}: publish never covers command topics; "
                    "list the device topics in `write` instead"
                )
        return v

    @field_validator("write")
    @classmethod
    def _device_topics(cls, v: list[str]) -> list[str]:
        for flt in v:
            if flt.startswith("$"):
                raise ValueError(
                    f"write filter {flt!r}: `write` lists device topics (a command to "
                    f"'plant/press7' is published on '$cmd/plant/press7'), without '$cmd/'"
                )
        return v


def read_token(entry: ApiTokenConfig) -> str:
    """The token of ``entry`` (from ``token``, ``token_file`` or the environment), stripped.

    Raises:
        ValueError: the token is empty (the message never holds the token).
    """
    value = entry.token.get_secret_value().strip() if entry.token is not None else ""
    if not value:
        raise ValueError("the token is empty")
    return value


class ApiQueueConfig(QueueConfig):
    """``[api] queue = { size, policy }``: each WebSocket client's subscription queue."""

    size: int = Field(default=10_000, ge=1)
    policy: Literal["block", "drop_oldest", "drop_newest"] = "drop_oldest"


class ApiConfig(StrictModel):
    """``[api]``: the local API for consumer apps, ``/metrics`` and ``/healthz``."""

    enabled: bool = True
    listen: str | None = "127.0.0.1:8470"  # "host:port", "[::1]:8470"; "" to use only `unix`
    unix: Path | None = None  # a Unix socket path, alone or beside `listen`
    tokens: list[ApiTokenConfig] = Field(default_factory=list)
    local_commands: bool = False  # without tokens: local clients may publish on $cmd/...
    queue: ApiQueueConfig = Field(default_factory=ApiQueueConfig)
    max_request_size: Size = 16 * 1024 * 1024  # a publish body or WebSocket frame at most
    tls: TlsConfig | None = None  # on `listen`: certificate + private_key (+ ca: client certs)

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if not v:
            return None
        m = _LISTEN.match(v)
        if not m or int(m["port"]) > 65535:
            raise ValueError(
                f'invalid listen address {v!r}: use "host:port", e.g. "127.0.0.1:8470"'
            )
        return v

    @field_validator("max_request_size")
    @classmethod
    def _room_for_a_record(cls, v: int) -> int:
        if v < 1024:
            raise ValueError("must be at least 1KiB")
        return v

    @model_validator(mode="after")
    def _somewhere(self) -> ApiConfig:
        if self.enabled and self.listen is None and self.unix is None:
            raise ValueError("the API is enabled but has neither `listen` nor `unix`")
        return self

    @property
    def listen_address(self) -> tuple[str, int] | None:
        """``listen`` split into (host, port), IPv6 brackets removed; None if not listening."""
        if self.listen is None:
            return None
        m = _LISTEN.match(self.listen)
        assert m is not None  # validated
        return m["host"].strip("[]"), int(m["port"])


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (of ``listen``) only accepts connections from this machine.

    ``localhost`` and loopback addresses (127.0.0.0/8, ::1) do; an empty host or ``0.0.0.0``
    (every interface), any other address and any other name (which DNS could point anywhere)
    do not.
    """
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _partial(
    name: str, base: type[BaseModel], exclude: Iterable[str], doc: str
) -> type[StrictModel]:
    """A model with ``base``'s fields minus ``exclude``, each optional and unset by default.

    Built from the field definitions themselves so a key added to DeviceConfig or
    SinkConfig can be defaulted without touching this file, with the same validation.
    """
    fields: dict[str, Any] = {}
    for key, info in base.model_fields.items():
        if key in exclude:
            continue
        ann = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        fields[key] = (ann | None, None)
    return create_model(name, __base__=StrictModel, __doc__=doc, **fields)


DeviceDefaults = _partial(
    "DeviceDefaults",
    DeviceConfig,
    ("name", "topic", "measurement", "tags"),
    "``[defaults.devices]``: keys every device takes unless it sets them itself.",
)
SinkDefaults = _partial(
    "SinkDefaults",
    SinkConfig,
    ("name",),
    "``[defaults.sinks]``: keys every sink takes unless it sets them itself.",
)


class DefaultsConfig(StrictModel):
    """``[defaults]``: values for keys common to all devices / all sinks.

    A key set on a device or sink replaces the default as a whole (tables are not merged).
    """

    devices: DeviceDefaults = Field(default_factory=DeviceDefaults)  # type: ignore[valid-type]
    sinks: SinkDefaults = Field(default_factory=SinkDefaults)  # type: ignore[valid-type]


# -- the loaded config --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Entry:
    """One ``[[devices.<kind>]]`` or ``[[sinks.<kind>]]`` table, validated.

    Two entries are equal when their kind and validated config are (where they were
    written is ignored), which is what a reload needs to tell which ones changed.

    Attributes:
        kind: the device or sink kind, e.g. ``"modbus"``.
        config: the validated ``Config`` model of that kind's module.
        source: the absolute path of the file that holds the table.
        index: the table's index within that file's ``<kind>`` array.
        where: ``"conf.d/press7.toml: devices.modbus[0]"``, for messages and logs.
    """

    kind: str
    config: Any
    source: Path
    index: int
    where: str = field(default="")

    @property
    def name(self) -> str:
        return str(self.config.name)

    @property
    def config_hash(self) -> str:
        """A stable digest of kind + config (hex SHA-256), e.g. to log which entries changed.

        Secret values (passwords, tokens) are left out, so that the digest reveals nothing
        about them; ``==`` compares them too.
        """
        blob = json.dumps([self.kind, _canonical(self.config)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _Entry)
        return self.kind == other.kind and self.config == other.config

    def __hash__(self) -> int:
        # configs hold dicts (tags), so pydantic's own hash cannot be used
        return hash(self.config_hash)


@dataclass(frozen=True, eq=False)
class DeviceEntry(_Entry):
    """A device: ``config`` is a ``DeviceConfig`` subclass. Device names are unique."""

    config: DeviceConfig

    @property
    def key(self) -> str:
        return self.name

    def build(self, ctx: BuildContext) -> Any:
        """The connector: ``build(config, ctx)`` of the kind's module."""
        return registry.load_device_module(self.kind).build(self.config, ctx)


@dataclass(frozen=True, eq=False)
class SinkEntry(_Entry):
    """A sink: ``config`` is a ``SinkConfig`` subclass, its ``name`` always filled in."""

    config: SinkConfig

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.name

    def build(self, ctx: BuildContext) -> Any:
        """The sink: ``build(config, ctx)`` of the kind's module."""
        return registry.load_sink_module(self.kind).build(self.config, ctx)


@dataclass(frozen=True)
class PlantbusConfig:
    """The whole validated config of a node.

    Attributes:
        path: the main file (absolute).
        files: every file read, main file first, then conf.d in name order.
        node, api, defaults: the main file's tables.
        devices / sinks: in file order, then in order within each file.
        warnings: ``file: WARNING: ...`` lines about a valid config (a file holding secrets
            that other users may read), for ``plantbus check`` and the log of ``run``.
    """

    path: Path
    files: list[Path]
    node: NodeConfig
    api: ApiConfig
    defaults: DefaultsConfig
    devices: list[DeviceEntry]
    sinks: list[SinkEntry]
    warnings: list[str] = field(default_factory=list)

    def build_context(self, **extra: Any) -> BuildContext:
        """The node's BuildContext for ``build(config, ctx)`` of devices and sinks."""
        return BuildContext(
            node_name=self.node.name,
            node_tags=dict(self.node.tags),
            state_dir=self.node.state_dir,
            extra=extra,
        )

    def device(self, name: str) -> DeviceEntry:
        """The device called ``name``; KeyError if there is none."""
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)


# -- public entry points ------------------------------------------------------------------------


def load_config(path: str | Path, *, include_conf_d: bool = True) -> PlantbusConfig:
    """Read and validate the main config file and the ``conf.d/*.toml`` files beside it.

    Args:
        path: the main file, e.g. ``/etc/plantbus/plantbus.toml``.
        include_conf_d: read ``conf.d/`` beside the main file (False for self-contained
            configs such as the demo's).

    Raises:
        ConfigError: listing every mistake of every file.
    """
    main = Path(path).absolute()
    loader = _Loader(main)
    loader.read_main()
    if include_conf_d:
        loader.read_conf_d()
    return loader.finish()


def parse_config(text: str, source: str | Path) -> PlantbusConfig:
    """Validate config ``text`` as if it were the main file ``source`` (no conf.d is read).

    Relative paths resolve against the folder of ``source``; messages name it.

    Raises:
        ConfigError: listing every mistake.
    """
    loader = _Loader(Path(source).absolute())
    loader.add_text(loader.main, text)
    return loader.finish()


def check_config(path: str | Path) -> list[str]:
    """The messages of everything wrong with the config at ``path``; empty when it is valid.

    For ``plantbus check``: it never raises, so the CLI can print the messages and exit 2
    without a traceback.
    """
    try:
        load_config(path)
    except ConfigError as e:
        return e.errors
    except Exception as e:  # a bug in a kind's validator must still not end in a traceback
        return [f"{path}: internal error while checking the config: {type(e).__name__}: {e}"]
    return []


# -- the loader ---------------------------------------------------------------------------------

Key = str | int
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_TOML_POS = re.compile(
    r"^(?P<msg>.*) \(at (?:line (?P<line>\d+), column (?P<col>\d+)|end of document)\)$"
)


def _keypath(parts: Iterable[Key]) -> str:
    """``["devices", "modbus", 0, "points", 2, "type"]`` -> ``devices.modbus[0].points[2].type``."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            key = p if _BARE_KEY.match(p) else json.dumps(p, ensure_ascii=False)
            out += f".{key}" if out else key
    return out


def _suggest(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _toml_type(v: object) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a float"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, Mapping):
        return "a table"
    if isinstance(v, list | tuple):
        return "an array"
    if isinstance(v, datetime | date | time):
        return "a date-time"
    return type(v).__name__


def _describe(v: object) -> str:
    """How a TOML value is named in a message: ``the string 'five'``, ``a table``."""
    if isinstance(v, bool):
        return f"the boolean {str(v).lower()}"
    if isinstance(v, int):
        return f"the integer {v}"
    if isinstance(v, float):
        return f"the float {v!r}"
    if isinstance(v, str):
        return f"the string {v!r}"
    if isinstance(v, datetime | date | time):
        return f"the date-time {v.isoformat()}"
    return _toml_type(v)


@dataclass
class _File:
    path: Path
    shown: str
    order: int
    # key paths whose whole value is ${VAR} references (a secret there is not in the file)
    from_env: set[tuple[Key, ...]] = field(default_factory=set)
    # key paths of the secrets written in the file itself
    inline: list[str] = field(default_factory=list)
    # (key path, file) of every file a secret was read from (<key>_file, private keys)
    secret_files: list[tuple[str, Path]] = field(default_factory=list)
    # secret key path -> the `<key>_file` key it was read from, for messages
    read_from: dict[tuple[Key, ...], str] = field(default_factory=dict)


class _Loader:
    """Collects the tables of every file, then validates them all, collecting every error."""

    def __init__(self, main: Path):
        self.main = main
        self.base = main.parent
        self.files: list[_File] = []
        self.errors: list[tuple[int, str]] = []
        self.main_tables: dict[str, Any] = {}
        # (file, "devices"/"sinks", kind, index within the file's array, raw table)
        self.raw_entries: list[tuple[_File, str, str, int, Any]] = []
        self._modules: dict[tuple[str, str], type[BaseModel] | None] = {}
        # the secrets of this load, masked in its messages (and, through `register`, in logs)
        self.redactor = Redactor()
        self._shapes: dict[tuple[Any, ...], tuple[frozenset[str], frozenset[str]]] = {}

    def _secret(self, value: str) -> str:
        self.redactor.add(value)
        register(value)
        return value

    # reading

    def _file(self, path: Path) -> _File:
        try:
            shown = path.relative_to(self.base).as_posix()
        except ValueError:
            shown = str(path)
        f = _File(path, shown, len(self.files))
        self.files.append(f)
        return f

    def error(self, f: _File, parts: Sequence[Key], msg: str) -> None:
        where = _keypath(parts)
        msg = self.redactor.redact(msg)  # a value echoed in a message may be (or hold) a secret
        self.errors.append(
            (f.order, f"{f.shown}: {where}: {msg}" if where else f"{f.shown}: {msg}")
        )

    def read_main(self) -> None:
        text = self._read(self._file(self.main))
        if text is not None:
            self._parse(self.files[-1], text)

    def add_text(self, path: Path, text: str) -> None:
        self._parse(self._file(path), text)

    def read_conf_d(self) -> None:
        folder = self.base / CONF_D
        try:
            if not folder.exists():
                return
            # editors leave hidden lock and backup files (.#press7.toml) beside the real ones
            names = sorted(
                p.name
                for p in folder.iterdir()
                if p.name.endswith(".toml") and not p.name.startswith(".")
            )
        except OSError as e:
            self.error(self._file(folder), (), f"cannot read the folder: {e.strerror or e}")
            return
        for name in names:
            f = self._file(folder / name)
            text = self._read(f)
            if text is not None:
                self._parse(f, text)

    def _read(self, f: _File) -> str | None:
        try:
            data = f.path.read_bytes()
        except OSError as e:
            self.error(f, (), f"cannot read {f.path}: {e.strerror or e}")
            return None
        data = data.removeprefix(b"\xef\xbb\xbf")  # a BOM, as some Windows editors write
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            self.error(f, (), f"not UTF-8 text: invalid byte 0x{data[e.start]:02x} on line {line}")
            return None

    def _parse(self, f: _File, text: str) -> None:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            m = _TOML_POS.match(str(e))
            if m and m["line"]:
                self.error(
                    f, (), f"line {m['line']}, column {m['col']}: TOML syntax error: {m['msg']}"
                )
            elif m:
                self.error(f, (), f"at the end of the file: TOML syntax error: {m['msg']}")
            else:
                self.error(f, (), f"TOML syntax error: {e}")
            return
        except RecursionError:
            # tomllib parses nested arrays and inline tables recursively (~1000 levels)
            self.error(f, (), "TOML syntax error: arrays or inline tables nested too deeply")
            return
        except ValueError as e:
            # not a TOMLDecodeError: tomllib lets int()'s limit through (a 5000-digit number)
            why = "a number of more than 4300 digits" if "4300 digits" in str(e) else str(e)
            self.error(f, (), f"TOML syntax error: {why}")
            return
        try:
            doc = expand_env(
                doc, (), os.environ, lambda parts, msg: self.error(f, parts, msg), f.from_env
            )
        except RecursionError:  # nested almost as deeply as tomllib takes
            self.error(f, (), "TOML syntax error: arrays or inline tables nested too deeply")
            return
        is_main = f.path == self.main
        allowed = (*_MAIN_ONLY, *_ANY_FILE) if is_main else _ANY_FILE
        for key, value in doc.items():
            if key in _ANY_FILE:
                self._collect(f, key, value)
            elif key in _MAIN_ONLY and is_main:
                self.main_tables[key] = value
            elif key in _MAIN_ONLY:
                self.error(f, (key,), f"only the main file ({self.main.name}) may hold [{key}]")
            else:
                self.error(f, (key,), "unknown key" + _suggest(key, allowed))

    def _collect(self, f: _File, section: str, value: Any) -> None:
        what = "device" if section == "devices" else "sink"
        kinds = registry.DEVICE_KINDS if section == "devices" else registry.SINK_KINDS
        if not isinstance(value, dict):
            self.error(f, (section,), f"must be a table of {what} kinds, not {_describe(value)}")
            return
        for kind, tables in value.items():
            if kind not in kinds:
                known = ", ".join(sorted(kinds))
                self.error(
                    f,
                    (section, kind),
                    f"unknown {what} kind {kind!r}{_suggest(kind, kinds)}; known kinds: {known}",
                )
                continue
            if isinstance(tables, dict):
                self.error(
                    f,
                    (section, kind),
                    f"must be an array of tables ([[{section}.{kind}]]), not a single table",
                )
                continue
            if not isinstance(tables, list):
                self.error(
                    f,
                    (section, kind),
                    f"must be an array of tables ([[{section}.{kind}]]), not {_describe(tables)}",
                )
                continue
            for i, table in enumerate(tables):
                self.raw_entries.append((f, section, kind, i, table))

    # validation

    def finish(self) -> PlantbusConfig:
        main_file = self.files[0]
        # each table on its own, so that a mistake in one still lets the others be checked
        node: NodeConfig | None = self._main_table(NodeConfig, "node")
        api: ApiConfig | None = self._main_table(ApiConfig, "api")
        defaults: DefaultsConfig = self._main_table(DefaultsConfig, "defaults") or DefaultsConfig()

        devices: list[DeviceEntry] = []
        sinks: list[SinkEntry] = []
        kind_counts: dict[str, int] = {}
        for _f, section, kind, _, _ in self.raw_entries:
            if section == "sinks":
                kind_counts[kind] = kind_counts.get(kind, 0) + 1
        kind_seen: dict[str, int] = {}
        for f, section, kind, index, raw in self.raw_entries:
            model = self._config_model(f, section, kind)
            prefix: tuple[Key, ...] = (section, kind, index)
            if section == "sinks":
                kind_seen[kind] = kind_seen.get(kind, 0) + 1
            if model is None:
                continue
            base_defaults = defaults.devices if section == "devices" else defaults.sinks
            raw = self._secrets(model, raw, f, prefix)
            data, from_defaults = _with_defaults(raw, base_defaults)
            config = self._validate(model, data, f, prefix, from_defaults)
            if config is None:
                continue
            config = _resolve_paths(config, f.path.parent)
            where = f"{f.shown}: {_keypath(prefix)}"
            if section == "devices":
                devices.append(DeviceEntry(kind, config, f.path, index, where))
            else:
                if not config.name:
                    name = kind if kind_counts[kind] == 1 else f"{kind}-{kind_seen[kind]}"
                    config = config.model_copy(update={"name": name})
                sinks.append(SinkEntry(kind, config, f.path, index, where))

        if node is not None:
            self._check_tags(main_file, ("node", "tags"), node.tags)
        if api is not None:
            self._check_api(main_file, api)
        self._check_devices(devices, node)
        self._check_sinks(sinks)
        self._check_buffer_folders(sinks, node)
        for d in devices:
            self._note_secret_paths(self._file_of(d), ("devices", d.kind, d.index), d.config)
        for s in sinks:
            self._note_secret_paths(self._file_of(s), ("sinks", s.kind, s.index), s.config)
        if api is not None:
            self._note_secret_paths(main_file, ("api",), api)

        if self.errors:
            # group by file, in reading order; within a file, in the order found
            raise ConfigError([msg for _, msg in sorted(self.errors, key=lambda e: e[0])])
        assert node is not None and api is not None  # else there were errors
        return PlantbusConfig(
            path=self.main,
            files=[f.path for f in self.files],
            node=node,
            api=api,
            defaults=defaults,
            devices=devices,
            sinks=sinks,
            warnings=self._warnings(),
        )

    def _main_table(self, model: type[BaseModel], key: str) -> Any:
        raw = self._secrets(model, self.main_tables.get(key, {}), self.files[0], (key,))
        config = self._validate(model, raw, self.files[0], (key,))
        return None if config is None else _resolve_paths(config, self.base)

    # secrets

    def _secrets(self, model: type[BaseModel], raw: Any, f: _File, prefix: tuple[Key, ...]) -> Any:
        """``raw`` with every ``<key>_file`` of a secret key replaced by ``<key>`` = its content.

        Secret keys are the fields typed ``SecretStr`` of the model at each level (found
        from the model, so a new connector's ``password`` field takes ``password_file`` with
        no code of its own). Each secret value is registered for redaction, and where it
        came from is noted for the permission warnings.
        """
        return self._walk_secrets(model, (), raw, f, prefix)

    def _walk_secrets(
        self, model: type[BaseModel], rel: tuple[Key, ...], node: Any, f: _File, prefix: tuple
    ) -> Any:
        if isinstance(node, list):
            return [self._walk_secrets(model, (*rel, i), v, f, prefix) for i, v in enumerate(node)]
        if not isinstance(node, dict):
            return node
        fields, secrets = self._secret_fields(model, rel)
        if not fields:
            return node
        out: dict[str, Any] = {}
        for key, value in node.items():
            parts = (*prefix, *rel, key)
            stem = key.removesuffix("_file")
            if stem != key and stem in secrets and key not in fields:
                self._secret_file(f, parts, node, key, value, out)
            elif key in secrets and isinstance(value, str):
                self._secret(value)
                if parts not in f.from_env:
                    f.inline.append(_keypath(parts))
                out.setdefault(key, value)
            else:
                out[key] = self._walk_secrets(model, (*rel, key), value, f, prefix)
        return out

    def _secret_fields(
        self, model: type[BaseModel], rel: tuple[Key, ...]
    ) -> tuple[frozenset[str], frozenset[str]]:
        """(every key, the secret keys) of the tables that may stand at ``rel`` in ``model``.

        Cached by shape (array indexes left out): a device's thousand points are one lookup.
        """
        shape = (model, tuple(None if isinstance(p, int) else p for p in rel))
        cached = self._shapes.get(shape)
        if cached is None:
            models = [
                a
                for a in _annotations_at(model, rel)
                if isinstance(a, type) and issubclass(a, BaseModel)
            ]
            fields = frozenset(name for m in models for name in m.model_fields)
            secrets = frozenset(
                name
                for m in models
                for name, info in m.model_fields.items()
                if any(a in (SecretStr, SecretBytes) for a in _expand([info.annotation]))
            )
            cached = self._shapes[shape] = (fields, secrets)
        return cached

    def _secret_file(
        self,
        f: _File,
        parts: tuple[Key, ...],
        node: Mapping[str, Any],
        key: str,
        value: Any,
        out: dict[str, Any],
    ) -> None:
        """Read ``<stem>_file`` (at ``parts``) into ``out[stem]``, or report why it cannot be."""
        stem = key.removesuffix("_file")
        stem_parts = (*parts[:-1], stem)
        # an unreadable file is reported once; the key still gets a value so that the table's
        # other rules (a password needs a username) are checked, and the error stops the load
        unreadable = "\x00unreadable"
        if stem in node:
            source = " (it comes from the environment)" if stem_parts in f.from_env else ""
            self.error(f, stem_parts, f"give `{stem}` or `{key}`, never both{source}")
            return
        if not isinstance(value, str) or not value:
            got = "an empty string" if value == "" else _describe(value)
            self.error(f, parts, f"must be the path of a file holding the {stem}, not {got}")
            out[stem] = unreadable
            return
        path = Path(value)
        if not path.is_absolute():
            path = f.path.parent / path
        try:
            out[stem] = self._secret(read_secret_file(path))
        except ValueError as e:
            self.error(f, parts, str(e))
            out[stem] = unreadable
            return
        f.secret_files.append((_keypath(parts), path))
        f.read_from[stem_parts] = key

    def _note_secret_paths(self, f: _File, parts: tuple[Key, ...], value: Any) -> None:
        """Note the files named by keys that hold key material (``private_key``, ``key_files``).

        Models list such fields in a ``secret_paths`` class attribute.
        """
        if isinstance(value, BaseModel):
            for name in getattr(value, "secret_paths", ()):
                paths = getattr(value, name, None)
                if isinstance(paths, PurePath):
                    f.secret_files.append((_keypath((*parts, name)), Path(paths)))
                elif isinstance(paths, list | tuple):
                    for i, p in enumerate(paths):
                        f.secret_files.append((_keypath((*parts, name, i)), Path(p)))
            for name in type(value).model_fields:
                self._note_secret_paths(f, (*parts, name), getattr(value, name))
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                self._note_secret_paths(f, (*parts, i), v)

    def _warnings(self) -> list[str]:
        """A WARNING line per file holding secrets that other users may read."""
        out: list[str] = []
        for f in self.files:
            if f.inline:
                mode = others_may_read(f.path)
                if mode is not None:
                    out.append(
                        f"{f.shown}: WARNING: holds secrets ({', '.join(f.inline)}) and other "
                        f"users may read it (mode {mode:04o}): chmod o-r {f.path}, or move them "
                        "to <key>_file / ${VAR}"
                    )
            keys: dict[Path, list[str]] = {}
            for where, path in f.secret_files:
                keys.setdefault(Path(os.path.normpath(path)), []).append(where)
            for path, wheres in keys.items():
                mode = others_may_read(path)
                if mode is not None:
                    out.append(
                        f"{f.shown}: WARNING: other users may read the secret file "
                        f"{str(path)!r} (mode {mode:04o}) of {', '.join(wheres)}: "
                        f"chmod o-r {path}"
                    )
        return out

    def _config_model(self, f: _File, section: str, kind: str) -> type[BaseModel] | None:
        if (section, kind) not in self._modules:
            load = (
                registry.load_device_module if section == "devices" else registry.load_sink_module
            )
            model: type[BaseModel] | None = None
            try:
                model = load(kind).Config
            except Exception as e:  # an optional dependency or a broken module: say which kind
                what = "device" if section == "devices" else "sink"
                self.error(
                    f,
                    (section, kind),
                    f"cannot load the {what} kind {kind!r}: {type(e).__name__}: {e}",
                )
            self._modules[(section, kind)] = model
        return self._modules[(section, kind)]

    def _validate(
        self,
        model: type[BaseModel],
        data: Any,
        f: _File,
        prefix: Sequence[Key],
        from_defaults: Mapping[str, str] | None = None,
    ) -> Any:
        try:
            return model.model_validate(data)
        except ValidationError as e:
            for parts, msg in _messages(e.errors(), data, model):
                if from_defaults and parts and parts[0] in from_defaults:
                    msg += f" (value from {from_defaults[parts[0]]} in {self.files[0].shown})"
                self.error(f, (*prefix, *parts), msg)
        except Exception as e:  # a validator that raised something pydantic does not wrap
            self.error(f, prefix, f"cannot validate: {type(e).__name__}: {e}")
        return None

    # cross checks

    def _file_of(self, entry: _Entry) -> _File:
        return next(f for f in self.files if f.path == entry.source)

    def _at(self, entry: _Entry) -> str:
        section = "devices" if isinstance(entry, DeviceEntry) else "sinks"
        return f"{self._file_of(entry).shown} at {_keypath((section, entry.kind, entry.index))}"

    def _check_devices(self, devices: list[DeviceEntry], node: NodeConfig | None) -> None:
        first: dict[str, DeviceEntry] = {}
        for d in devices:
            f = self._file_of(d)
            prefix: tuple[Key, ...] = ("devices", d.kind, d.index)
            c = d.config
            if c.name in first:
                self.error(
                    f,
                    (*prefix, "name"),
                    f"duplicate device name {c.name!r} "
                    f"(first defined in {self._at(first[c.name])})",
                )
            else:
                first[c.name] = d
            if c.topic is not None:
                self._check_topic(f, (*prefix, "topic"), c.topic)
            elif node is not None:
                self._check_topic(f, (*prefix, "name"), f"{node.name}/{c.name}", default=True)
            if c.measurement is not None:
                self._check_lp(
                    f, (*prefix, "measurement"), c.measurement, "measurement", "measurement"
                )
                self._check_lp(f, (*prefix, "name"), c.name, "device name", "tag_value")
            else:
                # the name is the measurement then, besides the `device` tag value
                self._check_lp(f, (*prefix, "name"), c.name, "device name", "measurement")
            self._check_tags(f, (*prefix, "tags"), c.tags)
            for i, point in enumerate(getattr(c, "points", None) or ()):
                pname = getattr(point, "name", None)
                if isinstance(pname, str):
                    self._check_lp(
                        f, (*prefix, "points", i, "name"), pname, "point name", "field_key"
                    )
            self._check_read_back_names(f, prefix, c)

    def _check_read_back_names(self, f: _File, prefix: tuple[Key, ...], c: DeviceConfig) -> None:
        """A reply's ``<point>.read_back`` field must not be another point's name too."""
        from plantbus.broker.commands import READ_BACK_ERROR_SUFFIX, READ_BACK_SUFFIX

        points = getattr(c, "points", None) or ()
        device_read_back = bool(getattr(c, "read_back", False))
        read_back = set()
        for point in points:
            own = getattr(point, "read_back", None)
            if getattr(point, "writable", False) and (device_read_back if own is None else own):
                read_back.add(point.name)
        if not read_back:
            return
        for i, point in enumerate(points):
            pname = getattr(point, "name", None)
            if not isinstance(pname, str):
                continue
            for suffix in (READ_BACK_SUFFIX, READ_BACK_ERROR_SUFFIX):
                base = pname[: -len(suffix)]
                if pname.endswith(suffix) and base in read_back:
                    self.error(
                        f,
                        (*prefix, "points", i, "name"),
                        f"point name {pname!r} is the reply field that reports the "
                        f"read-back of writable point {base!r}; rename one of them",
                    )

    def _check_topic(
        self, f: _File, parts: Sequence[Key], topic: str, default: bool = False
    ) -> None:
        try:
            validate_topic(topic)
        except ValueError as e:
            if default:
                self.error(f, parts, f"the default topic is invalid: {e} (set `topic`)")
            else:
                self.error(f, parts, str(e))
            return
        # a default topic cannot start with '$': the node name may not
        if topic.startswith("$"):
            self.error(
                f,
                parts,
                f"topic {topic!r} starts with '$', which is reserved for system topics "
                "($cmd/..., $reply/...)",
            )

    def _check_tags(self, f: _File, parts: Sequence[Key], tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            if key == "device":
                self.error(
                    f,
                    (*parts, key),
                    "the tag 'device' is reserved: plantbus sets it to the device name",
                )
                continue
            self._check_lp(f, parts, key, "tag key", "tag_key")
            self._check_lp(f, (*parts, key), value, "tag value", "tag_value")

    def _check_lp(self, f: _File, parts: Sequence[Key], text: str, what: str, kind: str) -> None:
        # imported here: the codec is only needed once a config names something
        from plantbus.codecs.line_protocol import check_name

        reason = check_name(text, kind)
        if reason is not None:
            self.error(f, parts, f"{what} {text!r} cannot be written in line protocol: it {reason}")

    def _check_api(self, f: _File, api: ApiConfig) -> None:
        """Tokens readable and distinct, no open listener without them, TLS files loadable."""
        if not api.enabled:
            return
        seen: dict[str, int] = {}
        for i, entry in enumerate(api.tokens):
            key = f.read_from.get(("api", "tokens", i, "token"), "token")
            try:
                value = read_token(entry)
            except ValueError as e:
                self.error(f, ("api", "tokens", i, key), str(e))
                continue
            if value in seen:
                self.error(
                    f,
                    ("api", "tokens", i, key),
                    f"the same token as api.tokens[{seen[value]}]: each token names one role",
                )
            else:
                seen[value] = i
        address = api.listen_address
        if address is not None and not api.tokens and not is_loopback_host(address[0]):
            self.error(
                f,
                ("api", "listen"),
                f"{api.listen!r} accepts connections from other machines, but no [[api.tokens]] "
                "are configured: without tokens the API serves loopback and Unix-socket clients "
                'only (listen on "127.0.0.1:<port>", or add tokens)',
            )
        if api.local_commands and api.tokens:
            self.error(
                f,
                ("api", "local_commands"),
                "applies only without [[api.tokens]]; with tokens, give a token a `write` "
                "list of the device topics it may command",
            )
        if api.tls is not None:
            self._check_server_tls(f, ("api", "tls"), api.tls, listening=address is not None)

    def _check_server_tls(
        self, f: _File, parts: tuple[Key, ...], tls: TlsConfig, *, listening: bool
    ) -> None:
        import ssl

        if not listening:
            self.error(f, parts, "TLS applies to `listen`, and the API has none")
            return
        missing = [k for k in ("certificate", "private_key") if getattr(tls, k) is None]
        for k in missing:
            self.error(f, (*parts, k), "missing required key: a TLS server needs it")
        if missing:
            return
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
        except (OSError, ssl.SSLError) as e:
            self.error(
                f,
                (*parts, "certificate"),
                f"cannot load the certificate {str(tls.certificate)!r} with the private key "
                f"{str(tls.private_key)!r}: {getattr(e, 'strerror', None) or e}",
            )
        if tls.ca is not None:
            try:
                ctx.load_verify_locations(cafile=str(tls.ca))
            except (OSError, ssl.SSLError) as e:
                self.error(
                    f,
                    (*parts, "ca"),
                    f"cannot load the CA file {str(tls.ca)!r}: {getattr(e, 'strerror', None) or e}",
                )

    def _check_sinks(self, sinks: list[SinkEntry]) -> None:
        first: dict[tuple[str, str], SinkEntry] = {}
        for s in sinks:
            f = self._file_of(s)
            prefix: tuple[Key, ...] = ("sinks", s.kind, s.index)
            if s.key in first:
                self.error(
                    f,
                    (*prefix, "name"),
                    f"duplicate {s.kind} sink name {s.name!r} "
                    f"(first defined in {self._at(first[s.key])})",
                )
            else:
                first[s.key] = s
            if "/" in s.name or s.name.startswith("."):
                # the name may become a folder name (disk buffers) and a metrics label
                self.error(
                    f,
                    (*prefix, "name"),
                    f"sink name {s.name!r} must not contain '/' nor start with '.'",
                )
            for i, flt in enumerate(s.config.subscribe):
                try:
                    validate_filter(flt)
                except ValueError as e:
                    self.error(f, (*prefix, "subscribe", i), str(e))
            self._check_keys(f, prefix, getattr(s.config, "encrypt", None))

    def _check_buffer_folders(self, sinks: list[SinkEntry], node: NodeConfig | None) -> None:
        """Two disk buffers in one folder would interleave their segments: one owner each."""
        from plantbus.broker.outlet import buffer_dir

        state_dir = (node or NodeConfig()).state_dir
        owner: dict[Path, SinkEntry] = {}
        for s in sinks:
            b = getattr(s.config, "buffer", None)
            if b is None or b.kind != "disk" or not s.config.enabled:
                continue
            folder = Path(os.path.abspath(b.path or buffer_dir(state_dir, s.kind, s.name)))
            if folder in owner:
                first = owner[folder]
                self.error(
                    self._file_of(s),
                    ("sinks", s.kind, s.index, "buffer", "path"),
                    f"disk buffer folder {str(folder)!r} is already the buffer of "
                    f"{first.kind} sink {first.name!r} ({self._at(first)}); "
                    "each disk-buffered sink needs its own folder",
                )
            else:
                owner[folder] = s

    def _check_keys(self, f: _File, prefix: tuple[Key, ...], encrypt: Any) -> None:
        """Each key file of a sink's ``encrypt`` table must hold a 256-bit key."""
        if encrypt is None:
            return
        from plantbus.broker.crypto import KeyError_, load_key

        for i, path in enumerate(encrypt.key_files):
            try:
                load_key(path)
            except KeyError_ as e:
                self.error(f, (*prefix, "encrypt", "key_files", i), str(e))


def _with_defaults(raw: Any, defaults: BaseModel) -> tuple[Any, dict[str, str]]:
    """``raw`` with the keys it lacks taken from the validated ``[defaults.*]`` table.

    Validated values are used (Durations as seconds, paths already resolved against the
    main file's folder), so a default means the same in every file.
    """
    if not isinstance(raw, dict):
        return raw, {}
    section = "defaults.devices" if isinstance(defaults, DeviceDefaults) else "defaults.sinks"
    data = dict(raw)
    used: dict[str, str] = {}
    for key in defaults.model_fields_set:
        if key not in data:
            data[key] = getattr(defaults, key)
            used[key] = f"{section}.{key}"
    return data, used


def _canonical(value: Any) -> Any:
    """``value`` as plain JSON data, exact (no field serializers, which may round)."""
    if isinstance(value, BaseModel):
        return {
            "__model__": type(value).__qualname__,
            **{k: _canonical(getattr(value, k)) for k in type(value).model_fields},
        }
    if isinstance(value, SecretStr | SecretBytes):
        return "**secret**"
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_canonical(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, set | frozenset) else items
    if isinstance(value, float):
        return repr(value)  # exact, and NaN / inf survive json.dumps
    if value is None or isinstance(value, bool | int | str):
        return value
    return f"{type(value).__name__}:{value}"


def _resolve_paths(value: Any, base: Path) -> Any:
    """``value`` with every relative ``Path`` in it (at any depth) made relative to ``base``."""
    if isinstance(value, BaseModel):
        updates = {}
        for name in type(value).model_fields:
            old = getattr(value, name)
            new = _resolve_paths(old, base)
            if new is not old:
                updates[name] = new
        return value.model_copy(update=updates) if updates else value
    if isinstance(value, PurePath):
        return value if value.is_absolute() else base / value
    if isinstance(value, list | tuple):
        items = [_resolve_paths(v, base) for v in value]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return type(value)(items)
    if isinstance(value, dict):
        resolved = {k: _resolve_paths(v, base) for k, v in value.items()}
        return value if all(resolved[k] is value[k] for k in value) else resolved
    return value


# -- pydantic errors -> messages ----------------------------------------------------------------

_TYPE_WORDS = {
    "model_type": "a table",
    "model_attributes_type": "a table",
    "dict_type": "a table",
    "dataclass_type": "a table",
    "list_type": "an array",
    "tuple_type": "an array",
    "set_type": "an array",
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "path_type": "a path string",
}


def _clean_loc(loc: Sequence[Key], data: Any) -> list[Key]:
    """The key path of an error with pydantic's union member labels taken out.

    Follows the input itself: a string in ``loc`` that is not a key of the table at that
    point (and is not the last element, a missing key) is the label of a union member,
    e.g. the tag ``'sine'`` in ``('points', 0, 'sine', 'period')``.
    """
    out: list[Key] = []
    node = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(part, int) and isinstance(node, list | tuple):
            out.append(part)
            node = node[part] if 0 <= part < len(node) else None
        elif isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif last and isinstance(node, dict | BaseModel | type(None)):
            out.append(part)
    return out


def _annotations_at(model: type[BaseModel], parts: Sequence[Key]) -> list[Any]:
    """The possible types of the value at ``parts`` inside ``model`` (unions expanded)."""
    current: list[Any] = [model]
    for part in parts:
        nxt: list[Any] = []
        for ann in _expand(current):
            origin = typing.get_origin(ann)
            if isinstance(part, str) and isinstance(ann, type) and issubclass(ann, BaseModel):
                for name, info in ann.model_fields.items():
                    if part in (name, info.alias):
                        nxt.append(info.annotation)
            elif origin in (list, tuple, set, frozenset, dict, Sequence, Mapping):
                args = typing.get_args(ann)
                if args:  # the element type; of a dict, the value type
                    nxt.append(args[0] if origin is tuple else args[-1])
        current = nxt
    return _expand(current)


def _known_keys(model: type[BaseModel], parts: Sequence[Key]) -> set[str]:
    """The keys a table at ``parts`` (relative to ``model``) may hold, for suggestions."""
    keys: set[str] = set()
    for ann in _annotations_at(model, parts):
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.update(ann.model_fields)
    return keys


def _expand(anns: Iterable[Any]) -> list[Any]:
    # Annotated[X, ...] -> X, X | Y -> X, Y, recursively
    out: list[Any] = []
    for ann in anns:
        origin = typing.get_origin(ann)
        if origin is Annotated:
            out.extend(_expand([typing.get_args(ann)[0]]))
        elif origin in (Union, types.UnionType):
            out.extend(_expand(typing.get_args(ann)))
        else:
            out.append(ann)
    return out


def _message(err: ErrorDetails, parts: list[Key], model: type[BaseModel]) -> tuple[list[Key], str]:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    got = _describe(err.get("input"))
    if any(a in (SecretStr, SecretBytes) for a in _annotations_at(model, parts)):
        got = "the value given (not shown: it is a secret)"
    if kind == "extra_forbidden":
        key = parts[-1] if parts else ""
        return parts, "unknown key" + _suggest(str(key), _known_keys(model, parts[:-1]))
    if kind == "missing":
        return parts, "missing required key"
    if kind in ("union_tag_not_found", "union_tag_invalid") and isinstance(
        ctx.get("discriminator"), str
    ):
        key = ctx["discriminator"].strip("'")
        if kind == "union_tag_not_found":
            return [*parts, key], "missing required key"
        expected = ctx.get("expected_tags")
        return [*parts, key], f"must be one of {expected}, not {_describe(ctx.get('tag'))}"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return parts, str(ctx["error"])
    if kind in _TYPE_WORDS:
        return parts, f"must be {_TYPE_WORDS[kind]}, not {got}"
    if kind == "int_from_float":
        return parts, f"must be an integer, not {got}"
    if kind in ("string_too_short", "too_short") and ctx.get("min_length") == 1:
        return parts, "must not be empty"
    if kind == "literal_error":
        return parts, f"must be {ctx.get('expected')}, not {got}"
    msg = err["msg"]
    if msg.startswith("Input should be "):
        msg = "must be " + msg.removeprefix("Input should be ")
    return parts, f"{msg}, not {got}"


def _messages(
    errors: list[ErrorDetails], data: Any, model: type[BaseModel]
) -> list[tuple[list[Key], str]]:
    """One message per key path; the alternatives of a union are merged into one line."""
    by_path: dict[str, tuple[list[Key], list[str]]] = {}
    for err in errors:
        parts, msg = _message(err, _clean_loc(err["loc"], data), model)
        entry = by_path.setdefault(_keypath(parts), (parts, []))
        if msg not in entry[1]:
            entry[1].append(msg)
    out: list[tuple[list[Key], str]] = []
    for parts, msgs in by_path.values():
        out.append((parts, _merge(msgs)))
    return out


def _merge(msgs: list[str]) -> str:
    # "must be an integer, not an array" + "must be a string, not an array"
    #   -> "must be an integer or a string, not an array"
    if len(msgs) == 1:
        return msgs[0]
    split = [re.match(r"^must be (.*), (not .*)$", m) for m in msgs]
    if all(split) and len({m[2] for m in split if m}) == 1:
        wanted = [m[1] for m in split if m]
        return f"must be {' or '.join(wanted)}, {split[0][2] if split[0] else ''}"
    return "; ".join(msgs)
