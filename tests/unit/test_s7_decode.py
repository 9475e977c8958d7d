"""Decoding S7 values: every type against python-snap7's own encoders, and bad bytes."""

from __future__ import annotations

import math
import struct
from datetime import datetime

import pytest
from snap7 import util

from plantbus.connectors.s7.address import parse_address
from plantbus.connectors.s7.decode import DecodeError, decoder, real_value


def _decode(address: str, buf: bytearray, type_name: str | None = None) -> object:
    a = parse_address(address, type_name)
    return decoder(a)(buf, a.offset)


@pytest.mark.parametrize(
    ("address", "type_name", "setter", "value", "expected"),
    [
        ("DB1.DBB3", "sint", util.set_sint, -128, -128),
        ("DB1.DBB3", "usint", util.set_usint, 255, 255),
        ("DB1.DBB3", None, util.set_byte, 0x7F, 0x7F),
        ("DB1.DBB3", "char", util.set_char, "é", "é"),
        ("DB1.DBW4", None, util.set_word, 0xFFFF, 0xFFFF),
        ("DB1.DBW4", "int", util.set_int, -32768, -32768),
        ("DB1.DBW4", "uint", util.set_uint, 40000, 40000),
        ("DB1.DBD8", None, util.set_dword, 0xFFFFFFFF, 0xFFFFFFFF),
        ("DB1.DBD8", "dint", util.set_dint, -(2**31), -(2**31)),
        ("DB1.DBD8", "udint", util.set_udint, 2**32 - 1, 2**32 - 1),
        ("DB1.DBD8", "real", util.set_real, 21.5, 21.5),
        ("DB1.DBD8", "real", util.set_real, 0.1, 0.1),
        ("DB1.DBD8", "real", util.set_real, -1.17549435e-38, -1.1754944e-38),
        ("DB1.DBD8", "real", util.set_real, 3.4028235e38, 3.4028235e38),
        ("DB1.DBD8", "lreal", util.set_lreal, 0.1, 0.1),
        ("DB1.DBD8", "lreal", util.set_lreal, -1e300, -1e300),
        ("DB1.DBD8", "lint", util.set_lint, -(2**63), -(2**63)),
        ("DB1.DBD8", "ulint", util.set_ulint, 2**64 - 1, 2**64 - 1),
        ("DB1.DBD8", "lword", util.set_lword, 2**64 - 2, 2**64 - 2),
        (
            "DB1.DBB8",
            "date_and_time",
            util.set_dt,
            datetime(1999, 12, 31, 23, 59, 59, 999000),
            "1999-12-31T23:59:59.999",
        ),
        (
            "DB1.DBB8",
            "dt",
            util.set_dt,
            datetime(2089, 1, 1, 0, 0, 0),
            "2089-01-01T00:00:00.000",
        ),
        (
            "DB1.DBB8",
            "dtl",
            util.set_dtl,
            datetime(2024, 2, 29, 23, 0, 1, 999999),
            "2024-02-29T23:00:01.999999000",
        ),
    ],
)
def test_values_decode_as_python_snap7_encodes_them(
    address: str, type_name: str | None, setter: object, value: object, expected: object
) -> None:
    buf = bytearray(32)
    a = parse_address(address, type_name)
    setter(buf, a.offset, value)  # type: ignore[operator]
    got = _decode(address, buf, type_name)
    assert got == expected and type(got) is type(expected)


def test_bools_are_each_their_own_bit() -> None:
    buf = bytearray(2)
    util.set_bool(buf, 1, 5, True)
    assert [_decode(f"DB1.DBX1.{b}", buf) for b in range(8)] == [b == 5 for b in range(8)]
    assert _decode("DB1.DBX0.5", buf) is False


def test_strings_use_their_current_length() -> None:
    buf = bytearray(64)
    util.set_string(buf, 0, "Bohrung Ø12", 20)
    assert _decode("DB1.DBB0", buf, "string[20]") == "Bohrung Ø12"
    util.set_string(buf, 0, "", 20)
    assert _decode("DB1.DBB0", buf, "string[20]") == ""
    util.set_wstring(buf, 22, "Überlast ⚠", 12)
    assert _decode("DB1.DBB22", buf, "wstring[12]") == "Überlast ⚠"


def test_a_string_longer_than_the_point_reads_is_refused() -> None:
    buf = bytearray(64)
    util.set_string(buf, 0, "a longer recipe name", 30)
    with pytest.raises(DecodeError, match=r"holds 20 characters but the point reads 10"):
        _decode("DB1.DBB0", buf, "string[10]")
    buf[0:2] = bytes([5, 9])  # current length above the declared maximum
    with pytest.raises(DecodeError, match="above its maximum"):
        _decode("DB1.DBB0", buf, "string[10]")


@pytest.mark.parametrize(
    "raw",
    [
        "24 13 01 00 00 00 00 01",  # month 13
        "24 02 30 00 00 00 00 01",  # 30 February
        "2a 01 01 00 00 00 00 01",  # BCD digit above 9
        "24 01 01 00 00 00 00 a1",  # the milliseconds' last digit above 9
    ],
)
def test_invalid_date_and_time_is_refused(raw: str) -> None:
    with pytest.raises(DecodeError):
        _decode("DB1.DBB0", bytearray.fromhex(raw), "date_and_time")


def test_invalid_dtl_is_refused() -> None:
    buf = bytearray(struct.pack(">HBBBBBBI", 2024, 1, 1, 2, 0, 0, 0, 1_000_000_000))
    with pytest.raises(DecodeError, match="nanoseconds"):
        _decode("DB1.DBB0", buf, "dtl")


def test_real_values_are_the_shortest_decimal_of_the_float32() -> None:
    for typed in (1.013, 21.5, 0.1, 123456.7, 3.3333333, 1e-7, 299792458.0):
        (f32,) = struct.unpack(">f", struct.pack(">f", typed))
        value = real_value(f32)
        assert struct.pack(">f", value) == struct.pack(">f", typed)  # the same REAL
        assert len(repr(value)) <= len(repr(typed))
    assert real_value(struct.unpack(">f", struct.pack(">f", 1.013))[0]) == 1.013
    assert math.isnan(real_value(float("nan")))
    assert real_value(float("-inf")) == float("-inf")
