"""From OPC UA DataValues to records: status codes to quality, value types, timestamps."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from asyncua import ua

from plantbus.broker.record import Quality, Series
from plantbus.connectors.opcua.decode import (
    BAD_DATA_ENCODING_UNSUPPORTED,
    BAD_NO_VALUE,
    Decoder,
    Unsupported,
    datetime_ns,
    field_value,
    quality_of,
)

SERIES = Series("plant/p7", "p7", {"device": "p7"})
T1 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
T1_NS = 1714564800_123456000
T2 = T1 + timedelta(milliseconds=5)
READ_NS = 1714564900_000000000


def dv(
    value: object, code: int = 0, source: datetime | None = None, server: datetime | None = None
):
    return ua.DataValue(
        ua.Variant(value),
        StatusCode=ua.StatusCode(code),
        SourceTimestamp=source,
        ServerTimestamp=server,
    )


@pytest.mark.parametrize(
    ("code", "quality"),
    [
        (0x00000000, Quality.GOOD),
        (0x00960000, Quality.GOOD),  # GoodLocalOverride: Good with a sub-code
        (0x40900000, Quality.UNCERTAIN),
        (0x80340000, Quality.BAD),
        (0xC0000000, Quality.BAD),  # reserved severity: treat as Bad
    ],
)
def test_quality_follows_the_severity_bits(code: int, quality: Quality) -> None:
    assert quality_of(code) is quality


class Mode(enum.IntEnum):
    RUNNING = 3


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (21.5, 21.5),
        (7, 7),
        (True, True),
        ("press 7", "press 7"),
        (Mode.RUNNING, 3),
        (T1, T1_NS),
        (T1.replace(tzinfo=None), T1_NS),  # naive means UTC
        (b"\x00\xff", "00ff"),
        (uuid.UUID("09087e75-8e5e-499b-954f-f2a9603db28a"), "09087e75-8e5e-499b-954f-f2a9603db28a"),
        (ua.LocalizedText("Betrieb", "de"), "Betrieb"),
        (ua.QualifiedName("Temp", 2), "2:Temp"),
        (ua.NodeId("Line1.Temp", 2), "ns=2;s=Line1.Temp"),
        (ua.StatusCode(0x80340000), 0x80340000),
        ([1.5, 2.5], "[1.5,2.5]"),
        ([[1, 2], [3, 4]], "[[1,2],[3,4]]"),
        ([T1], f"[{T1_NS}]"),
    ],
)
def test_field_values(value: object, expected: object) -> None:
    got = field_value(value)
    assert got == expected and type(got) is type(expected)


def test_values_without_a_field_form_are_refused_with_a_code() -> None:
    with pytest.raises(Unsupported) as empty:
        field_value(None)
    assert empty.value.code == BAD_NO_VALUE
    with pytest.raises(Unsupported) as structure:
        field_value(ua.Argument(Name="x"))
    assert structure.value.code == BAD_DATA_ENCODING_UNSUPPORTED


def test_datetime_ns_is_exact_to_the_microsecond() -> None:
    assert datetime_ns(T1) == T1_NS
    assert datetime_ns(datetime(1970, 1, 1, tzinfo=UTC)) == 0


def test_source_mode_makes_one_record_per_distinct_timestamp_in_time_order() -> None:
    records = Decoder(SERIES, "source").records(
        [
            ("b", dv(2.0, source=T2)),
            ("a", dv(1.0, source=T1)),
            ("c", dv(3.0, source=T1)),
            ("d", dv(4.0, server=T2)),  # no source time: the server's
            ("e", dv(5.0)),  # no time at all: read time
        ],
        READ_NS,
    )
    assert [(r.time_ns, r.fields) for r in records] == [
        (T1_NS, {"a": 1.0, "c": 3.0}),
        (T1_NS + 5_000_000, {"b": 2.0, "d": 4.0}),
        (READ_NS, {"e": 5.0}),
    ]
    assert len({r.id for r in records}) == 3 and all(r.series is SERIES for r in records)
    assert all(r.quality is Quality.GOOD and r.status is None for r in records)


def test_timestamps_before_1970_mean_none() -> None:
    (record,) = Decoder(SERIES, "source").records(
        [("a", dv(1.0, source=datetime(1601, 1, 1, tzinfo=UTC))), ("b", dv(2.0))], READ_NS
    )
    assert (record.time_ns, record.fields) == (READ_NS, {"a": 1.0, "b": 2.0})


def test_server_and_read_modes() -> None:
    values = [("a", dv(1.0, source=T1, server=T2)), ("b", dv(2.0, source=T2, server=T2))]
    (server,) = Decoder(SERIES, "server").records(values, READ_NS)
    assert (server.time_ns, server.fields) == (T1_NS + 5_000_000, {"a": 1.0, "b": 2.0})
    (read,) = Decoder(SERIES, "read").records(values, READ_NS)
    assert (read.time_ns, read.fields) == (READ_NS, {"a": 1.0, "b": 2.0})


def test_bad_values_are_never_fields_and_uncertain_ones_are_listed() -> None:
    (record,) = Decoder(SERIES, "read").records(
        [
            ("good", dv(1.0)),
            ("stale", dv(5.5, 0x40900000)),
            ("broken", dv(9.9, 0x808B0000)),  # the server still sent a value: dropped
            ("empty", dv(None)),
            ("blob", dv(ua.Argument(Name="x"))),
        ],
        READ_NS,
    )
    assert record.fields == {"good": 1.0, "stale": 5.5}
    assert record.status == {
        "stale": 0x40900000,
        "broken": 0x808B0000,
        "empty": BAD_NO_VALUE,
        "blob": BAD_DATA_ENCODING_UNSUPPORTED,
    }
    assert record.quality is Quality.BAD


def test_an_uncertain_only_record_is_uncertain() -> None:
    (record,) = Decoder(SERIES, "read").records([("a", dv(1.0)), ("b", dv(2.0, 0x40900000))], 1)
    assert record.quality is Quality.UNCERTAIN and record.fields == {"a": 1.0, "b": 2.0}


def test_all_bad_marks_every_point() -> None:
    record = Decoder(SERIES, "source").all_bad(["a", "b"], 0x800A0000, READ_NS)
    assert (record.fields, record.status, record.quality) == (
        {},
        {"a": 0x800A0000, "b": 0x800A0000},
        Quality.BAD,
    )
