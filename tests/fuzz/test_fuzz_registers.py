"""Fuzz: values decoded from PLC memory: S7 bytes and Modbus registers.

* S7 (``connectors/s7/decode.py``): every type, from any bytes of its size: a value of the
  point's Python type or ``DecodeError`` (bad BCD, a STRING header that lies, 31 February);
  REAL values are the shortest decimal of their float32.
* Modbus (``compile_decoder``): registers (any 16-bit values, as a device may send) of every
  type, byte and word order, bit, scale and offset: one value per point, of its type.
"""

from __future__ import annotations

import math
import random
import struct

import pytest
from fuzzkit import FUZZ, within
from hypothesis import example, given
from hypothesis import strategies as st

from plantbus.connectors.modbus.codec import Point, compile_decoder
from plantbus.connectors.s7.address import parse_address
from plantbus.connectors.s7.decode import DecodeError, decoder

pytestmark = pytest.mark.fuzz

S7_TYPES = {
    "DB1.DBX0.3": (None, bool),
    "DB1.DBB0": ("sint", int),
    "DB1.DBB0:usint": ("usint", int),
    "DB1.DBB0:char": ("char", str),
    "DB1.DBW0": ("int", int),
    "DB1.DBW0:word": ("word", int),
    "DB1.DBD0": ("real", float),
    "DB1.DBD0:dint": ("dint", int),
    "DB1.DBD0:udint": ("udint", int),
    "DB1.DBB0:lreal": ("lreal", float),
    "DB1.DBB0:lint": ("lint", int),
    "DB1.DBB0:ulint": ("ulint", int),
    "DB1.DBB0:dt": ("date_and_time", str),
    "DB1.DBB0:dtl": ("dtl", str),
    "DB1.DBB0:string": ("string[10]", str),
    "DB1.DBB0:wstring": ("wstring[6]", str),
}
DECODERS = []
for text, (type_name, kind) in S7_TYPES.items():
    address = parse_address(text.split(":")[0], type_name)
    DECODERS.append((text, address.size, decoder(address), kind))


@FUZZ
@given(st.sampled_from(range(len(DECODERS))), st.binary(min_size=16, max_size=16))
@example(12, bytes.fromhex("24023012000000000000000000000000"))  # 2024-02-30: no such day
@example(14, b"\x0a\xff" + bytes(14))  # a STRING header longer than its maximum
@example(6, struct.pack(">f", math.nan) + bytes(12))
def test_s7_values(which: int, raw: bytes) -> None:
    text, size, decode, kind = DECODERS[which]
    buf = bytearray(raw[:size].ljust(size, b"\0"))
    with within():
        try:
            v = decode(buf, 0)
        except DecodeError as e:
            assert str(e)
            return
    assert type(v) is kind, (text, v)
    if text == "DB1.DBD0" and math.isfinite(v):
        assert struct.unpack(">f", struct.pack(">f", v))[0] == struct.unpack(">f", buf[:4])[0]


_MODBUS_TYPES = {
    "bool": 1,
    "uint16": 1,
    "int16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "int64": 4,
    "uint64": 4,
    "float64": 4,
    "string": 3,
}
_PY = {"bool": bool, "string": str, "float32": float, "float64": float}


def _plan(seed: int) -> tuple[str, int, list[Point], object]:
    """A read of 1-4 points (every type, order, bit, scale) and its compiled decoder."""
    rng = random.Random(seed)
    area = rng.choice(["holding", "input", "coil", "discrete"])
    bits = area in ("coil", "discrete")
    points = []
    at = 0
    for i in range(rng.randint(1, 4)):
        kind = "bool" if bits else rng.choice(sorted(_MODBUS_TYPES))
        size = 1 if bits else _MODBUS_TYPES[kind]
        scaled = kind not in ("bool", "string") and rng.random() < 0.5
        points.append(
            Point(
                name=f"p{i}",
                area=area,
                address=100 + at,
                type=kind,
                size=size,
                index=i,
                bit=rng.choice([None, 0, 7, 8, 15]) if kind == "bool" and not bits else None,
                byte_order=rng.choice(["big", "little"]),
                word_order=rng.choice(["big", "little"]),
                scale=rng.choice([0.1, -2.0, 1e308]) if scaled else None,
                offset=rng.choice([0.0, -273.15]) if scaled else None,
            )
        )
        at += size + rng.randint(0, 2)
    return area, at, points, compile_decoder(area, 100, at, points)


# compiled once, as the connector does per read plan; the inputs are the registers
PLANS = [_plan(i) for i in range(400)]


@FUZZ
@given(
    st.sampled_from(range(len(PLANS))), st.lists(st.integers(0, 0xFFFF), min_size=20, max_size=20)
)
def test_modbus_registers(which: int, words: list[int]) -> None:
    area, count, points, decode = PLANS[which]
    regs: list = (
        [bool(w & 1) for w in words[:count]] if area in ("coil", "discrete") else words[:count]
    )
    fields: dict[str, object] = {}
    with within():
        decode(regs, fields)  # type: ignore[operator]
    assert sorted(fields) == sorted(p.name for p in points)
    for p in points:
        v = fields[p.name]
        if p.scale is not None:
            assert type(v) is float
        else:
            assert type(v) is _PY.get(p.type, int), (p, v)
