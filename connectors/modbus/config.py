"""``[[devices.modbus]]``: the config keys (a contract: extend, don't rename).

Everything that can be checked without touching the device is checked here, so that
``plantbus check`` reports it with the file and key path: transport keys, unit ranges, the
point map (types per area, ``bit``/``length``/orders/scale only where they mean something,
address ranges, encodable and unique names, a point larger than one request).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from plantbus.broker.configtypes import Duration, StrictModel
from plantbus.broker.connector import DeviceConfig, ValueKind, WritablePointConfig

__all__ = [
    "BIT_AREAS",
    "MAX_BITS_PER_REQUEST",
    "MAX_REGISTERS_PER_REQUEST",
    "REGISTER_AREAS",
    "TYPE_REGISTERS",
    "WRITABLE_AREAS",
    "Area",
    "Config",
    "Order",
    "PointConfig",
    "PointType",
    "SerialConfig",
    "Transport",
]

Transport = Literal["tcp", "rtu", "rtu-over-tcp"]
Area = Literal["coil", "discrete", "holding", "input"]
PointType = Literal[
    "bool", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "string"
]
Order = Literal["big", "little"]

BIT_AREAS = frozenset({"coil", "discrete"})
REGISTER_AREAS = frozenset({"holding", "input"})
WRITABLE_AREAS = frozenset({"coil", "holding"})

MAX_REGISTERS_PER_REQUEST = 125
"""Modbus Application Protocol v1.1b3, 6.3/6.4: 1 to 125 registers per read."""
MAX_BITS_PER_REQUEST = 2000
"""Modbus Application Protocol v1.1b3, 6.1/6.2: 1 to 2000 coils or discrete inputs per read."""
LAST_ADDRESS = 0xFFFF

TYPE_REGISTERS: dict[str, int] = {
    "bool": 1,
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "int64": 4,
    "uint64": 4,
    "float64": 4,
}
"""Registers a value of each type occupies (a string: its ``length``)."""

_NUMERIC = frozenset(TYPE_REGISTERS) - {"bool"}
_MULTI_REGISTER = frozenset(t for t, n in TYPE_REGISTERS.items() if n > 1)


class SerialConfig(StrictModel):
    """``serial = { port, baudrate, parity, stopbits, bytesize }`` of an ``rtu`` device.

    Defaults follow the Modbus over Serial Line spec v1.02: 19200 baud, even parity, 1 stop
    bit, 8 data bits.
    """

    port: str = Field(min_length=1)
    baudrate: int = Field(default=19200, gt=0, le=4_000_000)
    parity: Literal["N", "E", "O"] = "E"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8

    def char_time(self) -> float:
        """Seconds one character takes on the line (start + data + parity + stop bits)."""
        bits = 1 + self.bytesize + (self.parity != "N") + self.stopbits
        return bits / self.baudrate

    def default_frame_delay(self) -> float:
        """The spec's silent interval between frames: 3.5 characters, 1.75 ms above 19200 baud."""
        if self.baudrate > 19200:
            return 0.00175
        return 3.5 * self.char_time()


class PointConfig(WritablePointConfig):
    """One point: a field of every record of the device.

    Attributes:
        name: the field name (line-protocol encodable, unique in the device).
        area: ``coil``, ``discrete`` (input), ``holding`` (register) or ``input`` (register).
        address: the protocol address, 0-based (register 40001 of a manual is holding 0).
        type: the value's type; ``bool`` for coils and discrete inputs (the default there),
            ``uint16`` by default for registers.
        length: registers of a ``string`` (2 characters each); only for strings.
        bit: read one bit (0 = least significant) of a 16-bit register, as a ``bool``.
        byte_order: order of the two bytes within each register (default: the device's).
        word_order: order of the registers of a 32- or 64-bit value (default: the device's).
        scale / offset: a numeric value is delivered as ``raw × scale + offset`` (a float)
            when either is set.
        writable: commands may write it (coils and holding registers only; see
            ``WritablePointConfig``); ``write_limits`` bounds the value before scaling.
        read_back: read it back after a write, into the reply (default: the device's).
    """

    name: str = Field(min_length=1)
    area: Area = "holding"
    address: int = Field(ge=0, le=LAST_ADDRESS)
    type: PointType | None = None
    length: int | None = Field(default=None, ge=1, le=MAX_REGISTERS_PER_REQUEST)
    bit: int | None = Field(default=None, ge=0, le=15)
    byte_order: Order | None = None
    word_order: Order | None = None
    scale: float | None = None
    offset: float | None = None

    @field_validator("name")
    @classmethod
    def _encodable(cls, v: str) -> str:
        # imported here: the codec module is only needed once a config names a point
        from plantbus.codecs.line_protocol import check_name

        reason = check_name(v, "field_key")
        if reason is not None:
            raise ValueError(f"point name {v!r} cannot be written in line protocol: it {reason}")
        return v

    @field_validator("scale", "offset")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"must be a finite number, not {v}")
        return v

    @model_validator(mode="after")
    def _check(self) -> PointConfig:
        where = f"point {self.name!r}"
        kind = self.kind
        set_keys = self.model_fields_set
        if self.writable and self.area not in WRITABLE_AREAS:
            what = "discrete inputs" if self.area == "discrete" else "input registers"
            raise ValueError(
                f"{where}: writable applies only to coils and holding registers; "
                f"{what} are read-only in Modbus"
            )
        if self.write_limits is not None and self.value_kind in ("bool", "str"):
            raise ValueError(f"{where}: write_limits applies only to numbers, not to {kind!r}")
        if self.area in BIT_AREAS:
            if kind != "bool":
                raise ValueError(f'{where}: a {self.area} is one bit: its type is "bool"')
            extra = sorted(
                set_keys & {"length", "bit", "byte_order", "word_order", "scale", "offset"}
            )
            if extra:
                raise ValueError(
                    f"{where}: {', '.join(extra)} does not apply to a {self.area} (one bit)"
                )
            return self
        if self.bit is not None and kind != "bool":
            raise ValueError(
                f'{where}: bit reads one bit of a 16-bit register, so its type is "bool", '
                f"not {kind!r}"
            )
        if kind == "string":
            if self.length is None:
                raise ValueError(
                    f"{where}: a string needs length (in registers, 2 characters each)"
                )
        elif self.length is not None:
            raise ValueError(f'{where}: length applies only to type "string", not {kind!r}')
        if self.word_order is not None and kind not in _MULTI_REGISTER:
            raise ValueError(
                f"{where}: word_order applies only to 32- and 64-bit types, not {kind!r}"
            )
        if (self.scale is not None or self.offset is not None) and kind not in _NUMERIC:
            raise ValueError(f"{where}: scale and offset apply only to numbers, not {kind!r}")
        if self.scale == 0:
            raise ValueError(f"{where}: scale 0 would make every value {self.offset or 0.0}")
        last = self.address + self.registers - 1
        if last > LAST_ADDRESS:
            raise ValueError(
                f"{where}: registers {self.address}-{last} run past the last address {LAST_ADDRESS}"
            )
        return self

    @property
    def kind(self) -> str:
        """The type, with its default filled in."""
        if self.type is not None:
            return self.type
        if self.area in BIT_AREAS or self.bit is not None:
            return "bool"
        return "uint16"

    @property
    def value_kind(self) -> ValueKind:
        """What a command may write: a scaled number is a float, else the type's kind."""
        kind = self.kind
        if kind in ("bool", "string"):
            return "bool" if kind == "bool" else "str"
        if self.scale is not None or self.offset is not None or kind.startswith("float"):
            return "float"
        return "int"

    @property
    def registers(self) -> int:
        """Registers (or bits, for coils and discrete inputs) the point occupies."""
        if self.area in BIT_AREAS:
            return 1
        if self.kind == "string":
            return self.length or 1
        return TYPE_REGISTERS[self.kind]


class Config(DeviceConfig):
    """``[[devices.modbus]]``: the device keys plus transport, unit and point map.

    Attributes:
        transport: ``tcp`` (Modbus TCP), ``rtu`` (serial line) or ``rtu-over-tcp`` (RTU
            frames through a TCP gateway or serial server).
        host / port: of ``tcp`` and ``rtu-over-tcp`` (port 502 by default).
        serial: the serial line of ``rtu`` (see ``SerialConfig``).
        unit: the unit id (slave address); devices with the same endpoint (host and port,
            or serial port) share one connection.
        timeout: how long to wait for a reply (and for a connection).
        max_registers_per_request: at most this many registers per read (1-125).
        max_gap: unused registers a merged read may span (16 bits each for coils and
            discrete inputs); 0 merges only points that touch or overlap.
        byte_order / word_order: defaults for the points.
        frame_delay: silence on the line before each request (default: 3.5 characters on
            a serial line, none over TCP).
        read_back: after a command wrote a point, read it back (one more request per
            written point, or per touching group) and put the value in the reply; a point
            may set its own ``read_back``.
        points: the point map.
    """

    transport: Transport = "tcp"
    host: str | None = Field(default=None, min_length=1)
    port: int = Field(default=502, ge=1, le=65535)
    serial: SerialConfig | None = None
    unit: int = Field(default=1, ge=0, le=255)
    timeout: Duration = 1.0
    max_registers_per_request: int = Field(
        default=MAX_REGISTERS_PER_REQUEST, ge=1, le=MAX_REGISTERS_PER_REQUEST
    )
    max_gap: int = Field(default=0, ge=0, le=MAX_REGISTERS_PER_REQUEST - 1)
    byte_order: Order = "big"
    word_order: Order = "big"
    frame_delay: Duration | None = None
    read_back: bool = False
    points: list[PointConfig] = Field(min_length=1)

    @field_validator("timeout")
    @classmethod
    def _positive_timeout(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("timeout must be longer than 0s")
        return v

    @field_validator("points")
    @classmethod
    def _unique_names(cls, points: list[PointConfig]) -> list[PointConfig]:
        first: dict[str, int] = {}
        for i, p in enumerate(points):
            if p.name in first:
                raise ValueError(
                    f"point name {p.name!r} is used twice (points[{first[p.name]}] and points[{i}])"
                )
            first[p.name] = i
        return points

    @model_validator(mode="after")
    def _check_transport(self) -> Config:
        set_keys = self.model_fields_set
        if self.transport == "rtu":
            if self.serial is None:
                raise ValueError('transport "rtu" needs serial = { port = "/dev/ttyUSB0", ... }')
            extra = [k for k in ("host", "port") if k in set_keys and getattr(self, k) is not None]
            if extra:
                verb = "do" if len(extra) > 1 else "does"
                raise ValueError(
                    f'{" and ".join(extra)} {verb} not apply to transport "rtu" (set serial.port)'
                )
            if not 1 <= self.unit <= 247:
                raise ValueError(
                    f"unit {self.unit}: a serial line addresses units 1-247 (0 is broadcast, "
                    "which no device answers)"
                )
        else:
            if self.host is None:
                raise ValueError(f"transport {self.transport!r} needs host")
            if self.serial is not None:
                raise ValueError(f"serial does not apply to transport {self.transport!r}")
        for i, p in enumerate(self.points):
            if p.kind == "string" and p.registers > self.max_registers_per_request:
                raise ValueError(
                    f"points[{i}] ({p.name!r}): a string of {p.registers} registers does not "
                    f"fit in one request (max_registers_per_request = "
                    f"{self.max_registers_per_request})"
                )
        return self

    def effective_frame_delay(self) -> float:
        """``frame_delay``, or its default for the transport."""
        if self.frame_delay is not None:
            return float(self.frame_delay)
        if self.transport == "rtu" and self.serial is not None:
            return self.serial.default_frame_delay()
        return 0.0

    def endpoint_label(self) -> str:
        """``tcp 10.0.0.7:502`` / ``rtu /dev/ttyUSB0``: where the device is, for messages."""
        if self.transport == "rtu" and self.serial is not None:
            return f"rtu {self.serial.port}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{self.transport} {host}:{self.port}"
