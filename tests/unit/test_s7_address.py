"""S7 addresses: the usual STEP 7 forms, their types and sizes, and clear refusals."""

from __future__ import annotations

import pytest

from plantbus.connectors.s7.address import parse_address, parse_type


@pytest.mark.parametrize(
    ("text", "type_name", "area", "db", "offset", "bit", "stype", "size", "canonical"),
    [
        ("DB1.DBX0.1", None, "DB", 1, 0, 1, "bool", 1, "DB1.DBX0.1"),
        ("DB1.DBB2", None, "DB", 1, 2, None, "byte", 1, "DB1.DBB2"),
        ("DB1.DBW4", None, "DB", 1, 4, None, "word", 2, "DB1.DBW4"),
        ("DB1.DBW4", "int", "DB", 1, 4, None, "int", 2, "DB1.DBW4:INT"),
        ("DB1.DBD6", None, "DB", 1, 6, None, "dword", 4, "DB1.DBD6"),
        ("DB1.DBD6", "dint", "DB", 1, 6, None, "dint", 4, "DB1.DBD6:DINT"),
        ("DB1.DBD6", "REAL", "DB", 1, 6, None, "real", 4, "DB1.DBD6:REAL"),
        ("DB1.DBD10:LREAL", None, "DB", 1, 10, None, "lreal", 8, "DB1.DBB10:LREAL"),
        ("DB1.DBB10", "lreal", "DB", 1, 10, None, "lreal", 8, "DB1.DBB10:LREAL"),
        ("DB7.DBB20:STRING[16]", None, "DB", 7, 20, None, "string[16]", 18, None),
        ("DB7.DBB20", "string", "DB", 7, 20, None, "string[254]", 256, None),
        ("DB7.DBB20", "wstring[10]", "DB", 7, 20, None, "wstring[10]", 24, None),
        ("DB2.DBB8", "date_and_time", "DB", 2, 8, None, "date_and_time", 8, None),
        ("DB2.DBB8:DT", None, "DB", 2, 8, None, "date_and_time", 8, None),
        ("DB2.DBB8:DTL", None, "DB", 2, 8, None, "dtl", 12, None),
        ("DB2.DBB8", "char", "DB", 2, 8, None, "char", 1, "DB2.DBB8:CHAR"),
        ("DB2.DBB8", "sint", "DB", 2, 8, None, "sint", 1, None),
        ("DB2.DBD8", "udint", "DB", 2, 8, None, "udint", 4, None),
        ("DB2.DBD8", "lint", "DB", 2, 8, None, "lint", 8, None),
        ("M10.2", None, "M", 0, 10, 2, "bool", 1, "M10.2"),
        ("MX10.2", None, "M", 0, 10, 2, "bool", 1, "M10.2"),
        ("MB10", None, "M", 0, 10, None, "byte", 1, "MB10"),
        ("MW20", None, "M", 0, 20, None, "word", 2, "MW20"),
        ("MD30", "real", "M", 0, 30, None, "real", 4, "MD30:REAL"),
        ("I0.0", None, "I", 0, 0, 0, "bool", 1, "I0.0"),
        ("IB0", None, "I", 0, 0, None, "byte", 1, "IB0"),
        ("IW2", "int", "I", 0, 2, None, "int", 2, "IW2:INT"),
        ("QX0.0", None, "Q", 0, 0, 0, "bool", 1, "Q0.0"),
        ("QD4", None, "Q", 0, 4, None, "dword", 4, "QD4"),
        ("E1.7", None, "I", 0, 1, 7, "bool", 1, "I1.7"),  # German: Eingang
        ("AW4", None, "Q", 0, 4, None, "word", 2, "QW4"),  # German: Ausgang
        ("%db1.dbw4", None, "DB", 1, 4, None, "word", 2, "DB1.DBW4"),
        (" DB1.DBD6 : real ", None, "DB", 1, 6, None, "real", 4, "DB1.DBD6:REAL"),
    ],
)
def test_addresses_parse(
    text: str,
    type_name: str | None,
    area: str,
    db: int,
    offset: int,
    bit: int | None,
    stype: str,
    size: int,
    canonical: str | None,
) -> None:
    a = parse_address(text, type_name)
    assert (a.area, a.db, a.offset, a.bit, a.type.name, a.size) == (
        area,
        db,
        offset,
        bit,
        stype,
        size,
    )
    assert a.end == offset + size
    if canonical is not None:
        assert str(a) == canonical
    # the canonical form reads back as the same address
    assert parse_address(str(a)) == a


@pytest.mark.parametrize(
    ("text", "type_name", "message"),
    [
        ("DB1.DBW4", "real", "type real is 4 bytes but a W address is 2: use DB1.DBD4"),
        ("DB1.DBD4", "int", "type int is 2 bytes but a D address is 4: use DB1.DBW4"),
        ("MB4", "word", "type word is 2 bytes but a B address is 1: use MW4"),
        ("DB1.DBX0", None, "a bit address needs its bit, e.g. .0 to .7"),
        ("DB1.DBX0.8", None, "bit must be 0 to 7, not 8"),
        ("M10", None, "needs a bit (M10.0) or a size (MB10, MW10, MD10)"),
        ("DB0.DBB0", None, "DB number must be 1 to 65535, not 0"),
        ("DB1.DBB0", "bool", "a bool needs a bit address such as DB1.DBX0.0"),
        ("DB1.DBX0.0", "int", "is a bit, so its type is bool, not int"),
        ("DB1.DBD0:REAL", "int", "says real but type says int: give the type once"),
        ("DB1.DBW0.1", None, "only a bit address (X) takes a bit number"),
        ("DB1.DBB0:FOO", None, "unknown S7 type 'FOO'"),
        ("DB1.DBB0:", None, "nothing after ':'"),
        ("DB1.DBB0", "string[300]", "string length must be 1 to 254 characters, not 300"),
        ("DB1.DBW65535", "int", "int at byte 65535 ends beyond byte 65535"),
        ("DB1.DBB70000", None, "byte offset must be at most 65535"),
        ("T1", None, "is not an S7 address (e.g. DB1.DBX0.1"),
        ("DB1.W4", None, "is not an S7 address"),
    ],
)
def test_bad_addresses_say_what_is_wrong(text: str, type_name: str | None, message: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_address(text, type_name)
    assert message in str(e.value)


def test_types() -> None:
    assert parse_type("LReal").size == 8
    assert parse_type("dt").name == "date_and_time"
    assert parse_type("string[1]").size == 3
    assert parse_type("wstring").chars == 254
    assert parse_type("wstring[16382]").size == 4 + 2 * 16382
    with pytest.raises(ValueError, match="unknown S7 type 'float'"):
        parse_type("float")
