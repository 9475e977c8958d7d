"""The line-protocol decoder (MQTT line-protocol payloads) against InfluxData's corpus v2.2.

Every decode case of the corpus runs: a case that expects points must give exactly those points
(tags sorted, fields in input order, value kinds kept: ``1`` float vs ``1i`` int vs ``1u``
uint), a case that expects an error must raise ``LineProtocolError``. Error texts are not
compared (the corpus says only the fact of an error is normative). The corpus lives in the
shared folder beside the repository; a missing corpus fails the run rather than skipping it.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from plantbus.codecs.line_protocol_decoder import LineProtocolError, Unsigned, decode

CORPUS = (
    Path(__file__).resolve().parents[2]
    / ".."
    / "shared"
    / "reference"
    / "line-protocol-corpus"
    / "corpus-line-protocol-v2.2.json"
)
PREC_NS = {"1ns": 1, "1µs": 10**3, "1ms": 10**6, "1s": 10**9, "1m": 60 * 10**9, "1h": 3600 * 10**9}


def _load() -> dict[str, Any]:
    # fail (not skip) when the corpus is missing: CI lays shared/ beside the clone
    if not CORPUS.exists():
        return {}
    return json.loads(CORPUS.read_text(encoding="utf-8"))["decode"]  # type: ignore[no-any-return]


DECODE = _load()


def _bytes(v: Any) -> bytes:
    return base64.b64decode(v["binary"]) if isinstance(v, dict) else v.encode("utf-8")


def _expected_value(v: dict[str, Any]) -> tuple[str, Any]:
    ((kind, x),) = v.items()
    if kind == "float":
        return ("float", float(x))
    if kind in ("string", "binary"):
        return ("string", _bytes({"binary": x} if kind == "binary" else x))
    return (kind, x)


def _kind(v: Any) -> tuple[str, Any]:
    if isinstance(v, bool):
        return ("bool", v)
    if isinstance(v, Unsigned):
        return ("uint", int(v))
    if isinstance(v, int):
        return ("int", v)
    if isinstance(v, float):
        return ("float", v)
    return ("string", v.encode("utf-8"))


def _expected(points: list[dict[str, Any]]) -> list[Any]:
    return [
        (
            p["time"],
            _bytes(p["name"]),
            [(_bytes(t["key"]), _bytes(t["value"])) for t in p.get("tags") or []],
            [(_bytes(f["key"]), _expected_value(f["value"])) for f in p.get("fields") or []],
        )
        for p in points
    ]


def _actual(points: list[Any]) -> list[Any]:
    return [
        (
            p.time_ns,
            p.measurement.encode("utf-8"),
            [(k.encode("utf-8"), v.encode("utf-8")) for k, v in p.tags],
            [(k.encode("utf-8"), _kind(v)) for k, v in p.fields],
        )
        for p in points
    ]


def test_corpus_is_present_and_complete() -> None:
    assert CORPUS.exists(), f"line-protocol corpus missing at {CORPUS}"
    assert len(DECODE) == 6615


@pytest.mark.parametrize("key", sorted(DECODE))
def test_decode_corpus(key: str) -> None:
    case = DECODE[key]
    inp, out = case["input"], case["output"]
    args = (_bytes(inp["text"]), PREC_NS[inp["precision"]], inp["defaultTime"])
    if "error" in out:
        with pytest.raises(LineProtocolError):
            decode(*args)
    else:
        assert _actual(decode(*args)) == _expected(out["result"])


# -- beyond the corpus ------------------------------------------------------------------------


def test_raw_newline_in_string_and_escaped_newline_both_read() -> None:
    # InfluxDB 1.x writes (and our encoder writes) raw newlines inside quotes; v2.2 writes \n
    (p1,) = decode(b'm s="a\nb" 1')
    (p2,) = decode(b'm s="a\\nb" 1')
    assert p1.fields == p2.fields == (("s", "a\nb"),)


def test_error_names_line_and_column() -> None:
    with pytest.raises(LineProtocolError, match=r"line 2, column 5: field 'v': invalid value"):
        decode(b"m v=1\nm v=x 5\n")


def test_text_input_and_several_lines_keep_order() -> None:
    pts = decode('a,t=1 v=1i 10\n# note\n\nb v=true,s="x" 20\r\n')
    assert [(p.measurement, p.time_ns) for p in pts] == [("a", 10), ("b", 20)]
    assert pts[1].fields == (("v", True), ("s", "x"))


def test_not_utf8_is_an_error() -> None:
    with pytest.raises(LineProtocolError, match="not UTF-8"):
        decode(b"m v=\xff")
