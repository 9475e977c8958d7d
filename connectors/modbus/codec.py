"""Register and bit decoding: one compiled function per planned read.

Modbus carries registers as 16-bit big-endian words. A point's ``byte_order`` says how the
two bytes of each register are ordered, its ``word_order`` how the registers of a 32- or
64-bit value are ordered ("big": the first register holds the most significant word). With
V0..V3 the value's bytes, most significant first, the four layouts of a 32-bit value are:

============  ============  ===============================================
byte_order    word_order    registers on the wire
============  ============  ===============================================
big           big           ``V0V1 V2V3`` (ABCD, the Modbus default)
big           little        ``V2V3 V0V1`` (CDAB, "word swapped")
little        big           ``V1V0 V3V2`` (BADC, "byte swapped")
little        little        ``V3V2 V1V0`` (DCBA)
============  ============  ===============================================

Packing a read's registers once big-endian (``big``) and once little-endian (``little``,
i.e. each register's bytes swapped) makes every layout one ``struct.unpack_from``: ABCD is
``>`` on ``big``, DCBA is ``<`` on ``big``, BADC is ``>`` on ``little`` and CDAB is ``<`` on
``little``. 64-bit values follow the same rule over four registers.

The decoder of a read is generated Python (like the ``sim`` device's fields maker): one
assignment per point into the record's fields dict, so decoding 125 points costs a few µs.
Point names enter the generated source only as ``repr()`` string literals; no config text
is ever executed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from plantbus.connectors.modbus.config import BIT_AREAS, Config, PointConfig

__all__ = [
    "Decoder",
    "EncodeError",
    "Point",
    "compile_decoder",
    "decode_string",
    "encode_registers",
    "resolve_points",
]

Decoder = Callable[[Sequence[int] | Sequence[bool], dict[str, object]], None]
"""``decode(registers_or_bits, fields)``: add the read's point values to ``fields``."""

_FORMATS = {
    "int32": "i",
    "uint32": "I",
    "float32": "f",
    "int64": "q",
    "uint64": "Q",
    "float64": "d",
}


@dataclass(frozen=True, slots=True)
class Point:
    """A point with the device's defaults applied: what the planner and decoder work with.

    Attributes:
        index: position in the device's ``points`` (config order).
        size: registers (or bits) occupied from ``address`` on.
    """

    name: str
    area: str
    address: int
    type: str
    size: int
    index: int
    bit: int | None = None
    byte_order: str = "big"
    word_order: str = "big"
    scale: float | None = None
    offset: float | None = None

    @property
    def end(self) -> int:
        """One past the last register (or bit) of the point."""
        return self.address + self.size


def resolve_points(config: Config) -> list[Point]:
    """The device's points with its ``byte_order`` / ``word_order`` defaults filled in."""
    return [_resolve(p, i, config) for i, p in enumerate(config.points)]


def _resolve(p: PointConfig, index: int, config: Config) -> Point:
    return Point(
        name=p.name,
        area=p.area,
        address=p.address,
        type=p.kind,
        size=p.registers,
        index=index,
        bit=p.bit,
        byte_order=p.byte_order or config.byte_order,
        word_order=p.word_order or config.word_order,
        scale=p.scale,
        offset=p.offset,
    )


def decode_string(data: bytes) -> str:
    """A string point's text: up to the first NUL, UTF-8 (invalid bytes replaced)."""
    return data.split(b"\0", 1)[0].decode("utf-8", "replace")


def _swap(expr: str) -> str:
    return f"(({expr} >> 8) | (({expr} & 0xFF) << 8))"


def _register_expr(p: Point, rel: int, env: dict[str, object]) -> tuple[str, set[str]]:
    """The expression of point ``p`` at register offset ``rel``, and the buffers it needs."""
    reg = f"regs[{rel}]"
    little_bytes = p.byte_order == "little"
    if p.type == "bool":
        if p.bit is None:
            return f"{reg} != 0", set()
        # a byte-swapped register's bit b is bit (b + 8) % 16 of the word as transmitted
        bit = (p.bit + 8) % 16 if little_bytes else p.bit
        return f"({reg} >> {bit}) & 1 == 1", set()
    if p.type == "uint16":
        return (_swap(reg) if little_bytes else reg), set()
    if p.type == "int16":
        value = _swap(reg) if little_bytes else reg
        return f"(({value} ^ 0x8000) - 0x8000)", set()
    if p.type == "string":
        buf = "little" if little_bytes else "big"
        return f"_text({buf}[{2 * rel}:{2 * (rel + p.size)}])", {buf}
    fmt = _FORMATS[p.type]
    words_little = p.word_order == "little"
    # see the module doc: the byte-swapped buffer when the two orders differ, and a
    # little-endian unpack when the words are little
    buf = "little" if p.byte_order != p.word_order else "big"
    endian = "<" if words_little else ">"
    name = f"_u_{'le' if words_little else 'be'}_{fmt}"
    env[name] = struct.Struct(endian + fmt).unpack_from
    return f"{name}({buf}, {2 * rel})[0]", {buf}


def compile_decoder(area: str, address: int, count: int, points: Sequence[Point]) -> Decoder:
    """A function that decodes the reply of one read into a fields dict.

    Args:
        area: the read's area.
        address: the read's first address.
        count: registers (or bits) read.
        points: the points the read covers (each within ``address .. address + count``).
    """
    env: dict[str, object] = {"_text": decode_string}
    lines: list[str] = []
    buffers: set[str] = set()
    for p in points:
        rel = p.address - address
        if rel < 0 or rel + p.size > count:
            raise ValueError(f"point {p.name!r} is outside the read {address}+{count}")
        if area in BIT_AREAS:
            expr = f"regs[{rel}]"
        else:
            expr, needs = _register_expr(p, rel, env)
            buffers |= needs
        if p.scale is not None or p.offset is not None:
            scale = 1.0 if p.scale is None else float(p.scale)
            offset = 0.0 if p.offset is None else float(p.offset)
            expr = f"{expr} * {scale!r} + {offset!r}"
        lines.append(f"    fields[{p.name!r}] = {expr}")
    head = ["def _decode(regs, fields):"]
    if "big" in buffers:
        env["_pack_be"] = struct.Struct(f">{count}H").pack
        head.append("    big = _pack_be(*regs)")
    if "little" in buffers:
        env["_pack_le"] = struct.Struct(f"<{count}H").pack
        head.append("    little = _pack_le(*regs)")
    source = "\n".join(head + (lines or ["    pass"])) + "\n"
    exec(compile(source, f"<modbus decoder {area} {address}+{count}>", "exec"), env)
    return env["_decode"]  # type: ignore[return-value]


# -- encoding (write-back) -----------------------------------------------------------------------

_INT_RANGES = {
    "int16": (-(1 << 15), (1 << 15) - 1),
    "uint16": (0, (1 << 16) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
    "uint32": (0, (1 << 32) - 1),
    "int64": (-(1 << 63), (1 << 63) - 1),
    "uint64": (0, (1 << 64) - 1),
}
_INT_FORMATS = {"int16": "h", "uint16": "H", **_FORMATS}


class EncodeError(ValueError):
    """A value that the point's type cannot hold; the message is the command's reason."""


def _raw(p: Point, value: float | int) -> float | int:
    """The value with the point's scale and offset applied in reverse."""
    if p.scale is None and p.offset is None:
        return value
    scale = 1.0 if p.scale is None else p.scale
    offset = 0.0 if p.offset is None else p.offset
    return (value - offset) / scale


def encode_registers(p: Point, value: object) -> list[int]:
    """The registers that hold ``value`` at point ``p`` (a register point, not a bit).

    The reverse of the decoder: scale and offset undone (``(value - offset) / scale``,
    rounded to the nearest integer for integer types), packed big-endian, then the words
    and the bytes within each word reordered by ``word_order`` and ``byte_order``.

    Raises:
        EncodeError: the value does not fit the type (``out of range: …``), or is not of it.
    """
    kind = p.type
    if kind == "string":
        if not isinstance(value, str):
            raise EncodeError(f"refused: point {p.name!r} takes a string, not {value!r}")
        data = value.encode("utf-8")
        room = 2 * p.size
        if len(data) > room:
            raise EncodeError(
                f"out of range: {len(data)} bytes do not fit the {room} of point {p.name!r}"
            )
        data = data.ljust(room, b"\0")
    elif kind == "bool":
        data = struct.pack(">H", 1 if value else 0)
    else:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise EncodeError(f"refused: point {p.name!r} takes a number, not {value!r}")
        raw = _raw(p, value)
        limits = _INT_RANGES.get(kind)
        if limits is not None:
            raw = round(raw)
            if not limits[0] <= raw <= limits[1]:
                raise EncodeError(
                    f"out of range: {value!r} is {raw} on the device, outside {kind} "
                    f"[{limits[0]}, {limits[1]}]"
                )
        try:
            data = struct.pack(">" + _INT_FORMATS[kind], raw)
        except (OverflowError, struct.error):
            raise EncodeError(f"out of range: {value!r} does not fit {kind}") from None
    words = [data[i : i + 2] for i in range(0, len(data), 2)]
    if p.word_order == "little" and kind in _FORMATS:
        words.reverse()
    little_bytes = p.byte_order == "little"
    return [
        (w[1] << 8 | w[0]) if little_bytes else (w[0] << 8 | w[1])  # type: ignore[index]
        for w in words
    ]
