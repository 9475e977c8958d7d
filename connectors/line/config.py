"""Config of the ``line`` device: where the text comes from and how a frame is parsed.

Only pydantic and the standard library are imported here (``plantbus check`` stays light);
the regex, the CSV columns and the time formats are validated here, at check time.
"""

from __future__ import annotations

import codecs
import re
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from plantbus.broker.configtypes import Duration, Size, StrictModel
from plantbus.broker.connector import DeviceConfig

__all__ = ["ColumnConfig", "Config", "CsvConfig", "GroupConfig", "parse_address"]

ColumnType = Literal["float", "int", "bool", "string", "tag", "time", "skip"]
_TYPES = ("float", "int", "bool", "string", "tag", "time", "skip")
_ADDRESS = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\[\]]*):(?P<port>\d{1,5})$")


def parse_address(text: str) -> tuple[str, int]:
    """``"host:port"`` (``[v6]:port``) -> (host, port).

    Raises:
        ValueError: not a host:port.
    """
    m = _ADDRESS.match(text)
    if not m or int(m["port"]) > 65535:
        raise ValueError(f'invalid address {text!r}: use "host:port", e.g. "10.0.0.9:4001"')
    return m["host"].strip("[]"), int(m["port"])


class ColumnConfig(StrictModel):
    """One regex group or CSV column: ``{ name, type, format, timezone }``.

    Written as a table, or as a string ``"name"`` / ``"name:type"`` (``"-"`` skips a CSV
    column).
    """

    name: str = ""
    type: ColumnType = "float"
    format: str | None = None
    timezone: str = "UTC"

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v == "-":
                return {"type": "skip"}
            name, _, vtype = v.partition(":")
            return {"name": name, "type": vtype} if vtype else {"name": name}
        return v

    @model_validator(mode="after")
    def _check(self) -> ColumnConfig:
        if self.type != "skip" and not self.name:
            raise ValueError("a column needs a name (or type 'skip')")
        if self.type == "time":
            from plantbus.codecs.payload import TimeSpec

            TimeSpec(self.format or "rfc3339", self.timezone)
        elif self.format is not None or "timezone" in self.model_fields_set:
            raise ValueError(f"column {self.name!r}: format and timezone are for time columns")
        if self.type in ("float", "int", "bool", "string", "tag"):
            from plantbus.codecs.line_protocol import check_name

            kind = "tag_key" if self.type == "tag" else "field_key"
            reason = check_name(self.name, kind)
            if reason:
                raise ValueError(f"{self.name!r} cannot be written in line protocol: it {reason}")
            if self.type == "tag" and self.name == "device":
                raise ValueError("the tag 'device' is reserved: plantbus sets it")
        return self

    def column(self) -> Any:
        """The codec's ``Column``."""
        from plantbus.codecs.payload import TimeSpec
        from plantbus.codecs.text import Column

        time = TimeSpec(self.format or "rfc3339", self.timezone) if self.type == "time" else None
        return Column(self.name or "-", self.type, time)


class GroupConfig(StrictModel):
    """The type of a regex group: ``{ type, format, timezone }`` (the key is its name)."""

    type: ColumnType = "float"
    format: str | None = None
    timezone: str = "UTC"


class CsvConfig(StrictModel):
    """``csv = { separator, quote, columns }``."""

    separator: str = ","
    quote: str = '"'
    columns: list[ColumnConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> CsvConfig:
        if len(self.separator) != 1 or len(self.quote) != 1 or self.separator == self.quote:
            raise ValueError("separator and quote must be two different single characters")
        return self


class Config(DeviceConfig):
    """``[[devices.line]]``: a device that sends text frames over TCP or a serial port.

    Exactly one of ``connect``, ``listen`` and ``serial``; exactly one of ``regex`` and ``csv``.

    Attributes:
        connect: ``"host:port"``: plantbus connects to the device (TCP client).
        listen: ``"host:port"``: devices connect to plantbus (TCP server, any number).
        serial: a serial port (``/dev/ttyUSB0``), with ``baudrate``, ``bytesize``, ``parity``,
            ``stopbits``.
        delimiter: what ends a frame (default ``"\\n"``; a ``\\r`` before it is stripped
            with ``strip``).
        encoding: text encoding of the frames (default utf-8).
        strip: strip whitespace around frames (default true); empty frames are skipped.
        max_frame: a frame longer than this without a delimiter is dropped and counted.
        regex: a pattern with named groups; ``columns`` types them (default float).
        columns: regex: group name -> type (``"int"``) or ``{ type, format, timezone }``.
        csv: ``{ separator, quote, columns }``; columns as ``"name"``, ``"name:type"``, ``"-"``
            or tables.
        ignore: regexes of frames to skip without counting them (banners, headers).
        request: text sent every ``interval`` (devices that answer a poll command);
            unset: just listen.
        idle_timeout: no data for this long means the link is dead: reconnect (a TCP client,
            a serial port) or close that peer (TCP server). Unset: wait forever.
        connect_timeout: TCP connect timeout.
        peer_tag: TCP server: tag each record with the peer's IP address under this key.
    """

    connect: str | None = None
    listen: str | None = None
    serial: str | None = None
    baudrate: int = Field(default=9600, gt=0)
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["none", "even", "odd", "mark", "space"] = "none"
    stopbits: Literal[1, 1.5, 2] = 1
    delimiter: str = Field(default="\n", min_length=1)
    encoding: str = "utf-8"
    strip: bool = True
    max_frame: Size = 65536
    regex: str | None = None
    columns: dict[str, ColumnType | GroupConfig] | None = None
    csv: CsvConfig | None = None
    ignore: list[str] = Field(default_factory=list)
    request: str | None = None
    idle_timeout: Duration | None = None
    connect_timeout: Duration = 10.0
    peer_tag: str | None = None

    @field_validator("connect", "listen")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None:
            parse_address(v)
        return v

    @field_validator("encoding")
    @classmethod
    def _encoding(cls, v: str) -> str:
        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown encoding {v!r}") from None
        return v

    @field_validator("ignore")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"invalid regex {p!r}: {e}") from None
        return v

    @field_validator("max_frame")
    @classmethod
    def _max_frame(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1 byte")
        return v

    @model_validator(mode="after")
    def _check(self) -> Config:
        sources = [k for k in ("connect", "listen", "serial") if getattr(self, k) is not None]
        if len(sources) != 1:
            raise ValueError(
                "set exactly one of connect (TCP client), listen (TCP server) and serial"
                + (f"; got {', '.join(sources)}" if sources else "")
            )
        serial_keys = {"baudrate", "bytesize", "parity", "stopbits"} & self.model_fields_set
        if serial_keys and self.serial is None:
            raise ValueError(f"{', '.join(sorted(serial_keys))}: only for a serial port")
        if self.peer_tag is not None and self.listen is None:
            raise ValueError("peer_tag: only for a TCP server (listen)")
        if self.request is not None and self.listen is not None:
            raise ValueError("request: only for connect or serial (a server has many peers)")
        if (self.regex is None) == (self.csv is None):
            raise ValueError("set exactly one of regex and csv")
        if self.columns is not None and self.regex is None:
            raise ValueError("columns types the groups of a regex; CSV has csv.columns")
        if self.idle_timeout is not None and self.idle_timeout <= 0:
            raise ValueError("idle_timeout must be longer than 0s")
        if self.peer_tag is not None:
            from plantbus.codecs.line_protocol import check_name

            reason = check_name(self.peer_tag, "tag_key")
            if reason or self.peer_tag == "device":
                raise ValueError(f"peer_tag {self.peer_tag!r} cannot be a tag key")
        try:
            self.decoder()
        except ValueError as e:
            raise ValueError(str(e)) from None
        return self

    def column_configs(self) -> dict[str, ColumnConfig]:
        """``columns`` as ``ColumnConfig``s named by their keys.

        Raises:
            ValueError: a column that is not valid (the message names it).
        """
        out = {}
        for name, spec in (self.columns or {}).items():
            data = {"type": spec} if isinstance(spec, str) else spec.model_dump(exclude_unset=True)
            try:
                out[name] = ColumnConfig.model_validate({"name": name, **data})
            except ValidationError as e:
                msg = e.errors()[0]["msg"].removeprefix("Value error, ")
                raise ValueError(f"columns.{name}: {msg}") from None
        return out

    def decoder(self) -> Any:
        """The ``TextDecoder`` of this config.

        Raises:
            ValueError: the regex or the columns are not usable.
        """
        from plantbus.codecs.text import TextDecoder

        if self.regex is not None:
            cols = {name: c.column() for name, c in self.column_configs().items()}
            return TextDecoder.regex(self.regex, cols)
        assert self.csv is not None
        names = [c.name for c in self.csv.columns if c.type != "skip"]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"csv.columns: {', '.join(map(repr, dup))} used twice")
        return TextDecoder.csv(
            [c.column() for c in self.csv.columns], self.csv.separator, self.csv.quote
        )

    @property
    def delimiter_bytes(self) -> bytes:
        return self.delimiter.encode(self.encoding)

    @property
    def request_bytes(self) -> bytes | None:
        return None if self.request is None else self.request.encode(self.encoding)
