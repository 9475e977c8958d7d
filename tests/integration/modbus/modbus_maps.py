"""Register maps for the Modbus tests: what a server holds, the points reading it, and the
values those points must decode to.

Register contents are made here from the value with ``struct`` and the README's definition
of the orders (big-endian value bytes, split into registers; ``word_order = "little"``
reverses the registers, ``byte_order = "little"`` swaps the two bytes of each register), not
with the connector's decoder. ``test_modbus_codec`` checks this reference against pymodbus's
own ``convert_to_registers`` for both word orders.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from modbus_servers import UnitMap

__all__ = ["TypedMap", "encode", "typed_map", "values_equal"]

_FMT = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "int64": "q",
    "uint64": "Q",
    "float32": "f",
    "float64": "d",
}

VALUES: dict[str, list[Any]] = {
    "int16": [-32768, -1, 0, 1, 32767, -12345],
    "uint16": [0, 1, 0x8000, 65535, 0x1234],
    "int32": [-(2**31), -1, 0, 2**31 - 1, -123456789],
    "uint32": [0, 2**32 - 1, 0x12345678, 0x80000000],
    "int64": [-(2**63), -1, 2**63 - 1, -1234567890123456789],
    "uint64": [0, 2**64 - 1, 0x0102030405060708, 2**63],
    "float32": [
        0.0,
        -0.0,
        1.5,
        -3.4028234663852886e38,
        3.4028234663852886e38,
        1.401298464324817e-45,  # the smallest subnormal
        math.inf,
        -math.inf,
        math.nan,
        3.14159,
    ],
    "float64": [
        0.0,
        -1.7976931348623157e308,
        1.7976931348623157e308,
        5e-324,
        math.nan,
        -math.inf,
        2.718281828459045,
    ],
}

ORDERS = [("big", "big"), ("big", "little"), ("little", "big"), ("little", "little")]


def _swap(reg: int) -> int:
    return ((reg & 0xFF) << 8) | (reg >> 8)


def encode(value: Any, type_: str, byte_order: str = "big", word_order: str = "big") -> list[int]:
    """Registers holding ``value`` of ``type_`` in the given orders (the README's definition)."""
    raw = struct.pack(">" + _FMT[type_], value)
    regs = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    if word_order == "little":
        regs.reverse()
    if byte_order == "little":
        regs = [_swap(r) for r in regs]
    return regs


def encode_string(text: bytes, length: int, byte_order: str = "big") -> list[int]:
    raw = text.ljust(2 * length, b"\0")
    regs = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, 2 * length, 2)]
    return [_swap(r) for r in regs] if byte_order == "little" else regs


def expected(value: Any, type_: str) -> Any:
    """What a point of ``type_`` decodes ``value`` to (float32 rounds)."""
    if type_ == "float32":
        return struct.unpack(">f", struct.pack(">f", value))[0]
    return value


def values_equal(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN and the sign of zero significant."""
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return type(a) is type(b) and a == b


@dataclass
class TypedMap:
    """Registers and bits of one unit, the points reading them and their expected values."""

    unit: int
    holding: list[int | None] = field(default_factory=list)
    input: list[int | None] = field(default_factory=list)
    coil: list[bool | None] = field(default_factory=list)
    discrete: list[bool | None] = field(default_factory=list)
    points: list[dict[str, Any]] = field(default_factory=list)
    expect: dict[str, Any] = field(default_factory=dict)

    def add(self, area: str, regs: list[int], point: dict[str, Any], value: Any) -> None:
        table: list[int | None] = getattr(self, area)
        point = {"area": area, "address": len(table), **point}
        table.extend(regs)
        self.points.append(point)
        self.expect[point["name"]] = value

    def unit_map(self) -> UnitMap:
        return UnitMap(
            self.unit,
            coil=self.coil,
            discrete=self.discrete,
            holding=self.holding,
            input=self.input,
        )


def _numeric(area: str) -> Iterator[tuple[list[int], dict[str, Any], Any]]:
    for type_, values in VALUES.items():
        multi = type_ not in ("int16", "uint16")
        orders = ORDERS if multi else [("big", "big"), ("little", "big")]
        for byte_order, word_order in orders:
            for i, v in enumerate(values):
                name = f"{area[0]}_{type_}_{byte_order[0]}{word_order[0]}_{i}"
                point: dict[str, Any] = {"name": name, "type": type_, "byte_order": byte_order}
                if multi:
                    point["word_order"] = word_order
                yield encode(v, type_, byte_order, word_order), point, expected(v, type_)


def typed_map(unit: int = 1) -> TypedMap:
    """Every type in every byte and word order, strings, bits, scaling, coils and inputs."""
    m = TypedMap(unit)
    for area in ("holding", "input"):
        for regs, point, value in _numeric(area):
            m.add(area, regs, point, value)
    # strings: NUL-padded, filling their length exactly, UTF-8, byte-swapped
    for name, text, length, order in [
        ("s_hello", "Hello, plant!", 8, "big"),
        ("s_full", "ABCD", 2, "big"),
        ("s_utf8", "Grüße µ", 6, "big"),
        ("s_swapped", "Swapped!", 5, "little"),
    ]:
        regs = encode_string(text.encode(), length, order)
        m.add(
            "holding",
            regs,
            {"name": name, "type": "string", "length": length, "byte_order": order},
            text,
        )
    # bits of a register, as transmitted and byte-swapped; a register as a bool
    word = 0x8001 | 0x0100  # bits 0, 8 and 15
    for order in ("big", "little"):
        address = len(m.holding)
        m.holding.append(word)
        value = _swap(word) if order == "little" else word
        for bit in (0, 1, 8, 15):
            name = f"bit_{order[0]}_{bit}"
            m.points.append(
                {
                    "name": name,
                    "area": "holding",
                    "address": address,
                    "bit": bit,
                    "byte_order": order,
                }
            )
            m.expect[name] = bool(value >> bit & 1)
    m.add("holding", [0], {"name": "reg_false", "type": "bool"}, False)
    m.add("holding", [7], {"name": "reg_true", "type": "bool"}, True)
    # scale and offset: raw × scale + offset, always a float
    m.add(
        "holding",
        encode(-100, "int16"),
        {"name": "scaled", "type": "int16", "scale": 0.1, "offset": 5},
        -100 * 0.1 + 5.0,
    )
    m.add("holding", [1234], {"name": "scaled_u", "scale": 0.01}, 1234 * 0.01 + 0.0)
    m.add(
        "holding",
        encode(-2.5, "float32"),
        {"name": "scaled_f", "type": "float32", "offset": 1.5},
        -2.5 * 1.0 + 1.5,
    )
    m.add(
        "input",
        encode(70000, "uint32", "big", "little"),
        {"name": "scaled_i", "type": "uint32", "word_order": "little", "scale": 2},
        70000 * 2.0 + 0.0,
    )
    # coils and discrete inputs
    for area, count in (("coil", 37), ("discrete", 21)):
        table: list[bool | None] = getattr(m, area)
        for i in range(count):
            bit = (i * 7) % 3 == 0
            table.append(bit)
            name = f"{area}_{i}"
            m.points.append({"name": name, "area": area, "address": i})
            m.expect[name] = bit
    return m
