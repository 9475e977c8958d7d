"""Register decoding: every type in every byte and word order, strings, bits, scaling."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plantbus.connectors.modbus.codec import Point, compile_decoder, decode_string

FMT = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "int64": "q",
    "uint64": "Q",
    "float32": "f",
    "float64": "d",
}


def point(type_: str, address: int = 0, **kw: Any) -> Point:
    size = (
        kw.pop("size", None)
        or {"bool": 1, "string": 1}.get(type_)
        or struct.calcsize(FMT[type_]) // 2
    )
    return Point(
        name=kw.pop("name", "v"),
        area="holding",
        address=address,
        type=type_,
        size=size,
        index=0,
        **kw,
    )


def decode(p: Point, regs: list[int], address: int = 0) -> Any:
    fields: dict[str, object] = {}
    compile_decoder("holding", address, len(regs), [p])(regs, fields)
    return fields[p.name]


def registers(value: Any, type_: str, byte_order: str, word_order: str) -> list[int]:
    """The README's definition, written out independently of the decoder."""
    raw = struct.pack(">" + FMT[type_], value)
    words = [raw[i : i + 2] for i in range(0, len(raw), 2)]
    if word_order == "little":
        words.reverse()
    if byte_order == "little":
        words = [w[::-1] for w in words]
    return [int.from_bytes(w, "big") for w in words]


# 1.0 as float32 is 0x3F800000: the four layouts of the README's table
@pytest.mark.parametrize(
    ("byte_order", "word_order", "regs"),
    [
        ("big", "big", [0x3F80, 0x0000]),  # ABCD
        ("big", "little", [0x0000, 0x3F80]),  # CDAB
        ("little", "big", [0x803F, 0x0000]),  # BADC
        ("little", "little", [0x0000, 0x803F]),  # DCBA
    ],
)
def test_float32_layouts(byte_order: str, word_order: str, regs: list[int]) -> None:
    assert decode(point("float32", byte_order=byte_order, word_order=word_order), regs) == 1.0


def test_int64_word_order_reverses_all_four_registers() -> None:
    regs = [0x0102, 0x0304, 0x0506, 0x0708]
    assert decode(point("uint64"), regs) == 0x0102030405060708
    assert decode(point("uint64", word_order="little"), regs) == 0x0708050603040102
    assert decode(point("uint64", byte_order="little"), regs) == 0x0201040306050807
    assert (
        decode(point("uint64", byte_order="little", word_order="little"), regs)
        == 0x0807060504030201
    )


def test_16_bit_types_and_their_byte_order() -> None:
    assert decode(point("uint16"), [0x8001]) == 0x8001
    assert decode(point("int16"), [0x8001]) == -32767
    assert decode(point("int16"), [0xFFFF]) == -1
    assert decode(point("uint16", byte_order="little"), [0x8001]) == 0x0180
    assert decode(point("int16", byte_order="little"), [0x0080]) == -32768


def test_bits_of_a_register() -> None:
    word = [0b1000_0001_0000_0100]  # bits 2, 8 and 15
    assert [decode(point("bool", bit=b), word) for b in (0, 2, 8, 15)] == [False, True, True, True]
    # byte-swapped: the register's value is 0b0000_0100_1000_0001 (bits 0, 7 and 10)
    swapped = [decode(point("bool", bit=b, byte_order="little"), word) for b in (0, 7, 10, 15)]
    assert swapped == [True, True, True, False]
    assert decode(point("bool"), [0]) is False and decode(point("bool"), [0x100]) is True


def test_strings() -> None:
    assert decode(point("string", size=3), [0x4869, 0x2100, 0x5858]) == "Hi!"  # ends at NUL
    assert decode(point("string", size=2), [0x4142, 0x4344]) == "ABCD"  # fills its length
    assert decode(point("string", size=2, byte_order="little"), [0x4241, 0x4443]) == "ABCD"
    text = "Grüße".encode()
    regs = [int.from_bytes(text.ljust(8, b"\0")[i : i + 2], "big") for i in range(0, 8, 2)]
    assert decode(point("string", size=4), regs) == "Grüße"
    assert decode_string(b"\xff\xfeok") == "\ufffd\ufffdok"


def test_scale_and_offset_make_floats() -> None:
    assert decode(point("int16", scale=0.1), [0xFF9C]) == -100 * 0.1
    assert decode(point("uint16", offset=-40.0), [100]) == 60.0
    value = decode(point("uint32", scale=2.0, offset=1.0), [0, 21])
    assert value == 43.0 and type(value) is float


def test_points_at_offsets_within_one_read() -> None:
    a = point("uint16", address=10, name="a")
    b = point("float32", address=12, name="b", word_order="little")
    c = point("bool", address=11, name="c", bit=0)
    fields: dict[str, object] = {}
    regs = [7, 1, *registers(2.5, "float32", "big", "little")]
    compile_decoder("holding", 10, 4, [a, b, c])(regs, fields)
    assert fields == {"a": 7, "b": 2.5, "c": True}


def test_bit_areas_take_the_bits_as_they_are() -> None:
    p = Point(name="c", area="coil", address=5, type="bool", size=1, index=0)
    fields: dict[str, object] = {}
    compile_decoder("coil", 3, 8, [p])(
        [False, False, True, False, False, False, False, False], fields
    )
    assert fields == {"c": True}


def test_a_point_outside_its_read_is_refused() -> None:
    with pytest.raises(ValueError, match="outside the read"):
        compile_decoder("holding", 0, 1, [point("float32")])


def test_names_are_data_not_code() -> None:
    p = point("uint16", name="x'] = 1; import os; fields['y")
    assert decode(p, [5]) == 5


_VALUES = {
    "int16": st.integers(-(2**15), 2**15 - 1),
    "uint16": st.integers(0, 2**16 - 1),
    "int32": st.integers(-(2**31), 2**31 - 1),
    "uint32": st.integers(0, 2**32 - 1),
    "int64": st.integers(-(2**63), 2**63 - 1),
    "uint64": st.integers(0, 2**64 - 1),
    "float32": st.floats(width=32, allow_nan=True),
    "float64": st.floats(allow_nan=True),
}
_ORDERS = st.sampled_from(["big", "little"])


@given(data=st.data(), byte_order=_ORDERS, word_order=_ORDERS)
def test_every_type_round_trips_in_every_order(
    data: st.DataObject, byte_order: str, word_order: str
) -> None:
    type_ = data.draw(st.sampled_from(sorted(_VALUES)))
    value = data.draw(_VALUES[type_])
    if type_ in ("int16", "uint16"):
        word_order = "big"
    regs = registers(value, type_, byte_order, word_order)
    got = decode(point(type_, byte_order=byte_order, word_order=word_order), regs)
    if isinstance(value, float) and math.isnan(value):
        assert math.isnan(got)
    else:
        assert got == value and (
            not isinstance(value, float) or math.copysign(1, got) == math.copysign(1, value)
        )
