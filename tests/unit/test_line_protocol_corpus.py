"""The encoder against InfluxData's line-protocol conformance corpus (v2.2, encode cases).

Each encode case gives a point (measurement, sorted tags, typed fields, time) and the exact line
the reference Go encoder writes. We build a Series and a Record from the point, encode it, take
our ``uid`` field off, and compare section by section: measurement, tags, field keys and time
must match byte for byte; field values too, except floats, where Go writes ``1`` and
``6.632243e+06`` and we write Python's ``1.0`` and ``6632243.0`` (both read back as the same
float64), so floats are compared as numbers.

Cases where the DESIGN deliberately differs are listed in ``DIFFERENT`` with the reason and
checked for what we do instead; nothing else is skipped.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from plantbus.broker.record import Record, Series
from plantbus.codecs import line_protocol as lp

CORPUS = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "reference"
    / "line-protocol-corpus"
    / "corpus-line-protocol-v2.2.json"
)
ENCODE: dict[str, Any] = (
    json.loads(CORPUS.read_text(encoding="utf-8"))["encode"] if CORPUS.exists() else {}
)
UID = "corpus-uid"

# key -> (why we differ, what we write instead: the expected line without the uid field)
DIFFERENT = {
    # DESIGN: "In string fields InfluxDB 1.x and 2.x keep a raw newline ... the encoder writes
    # them raw" (verified on 1.6.7); the v2.2 corpus writes the two characters \n instead.
    "65a52922c8cba2673eff7194628cc1e0": (
        "raw newline in a string field (the server wins over the v2.2 corpus)",
        'cpu,host=serverA,region=us-east str="foo\nbar",value=1.0 1000000000',
    ),
    # DESIGN: "Empty tag values are omitted" (Series drops them); the corpus calls it an error.
    "72fe529da6084a44692fe27cc2f105d1": (
        "empty tag value: omitted by contract, an error for the corpus",
        "cpu value=42.0 0",
    ),
}


def _text(v: Any) -> str:
    if isinstance(v, dict):  # {"binary": base64}: never in the encode cases, see test below
        return base64.b64decode(v["binary"]).decode("utf-8", "surrogateescape")
    return str(v)


def _record(point: dict[str, Any]) -> Record:
    tags = {_text(t["key"]): _text(t["value"]) for t in point.get("tags") or []}
    fields: dict[str, Any] = {}
    for f in point["fields"]:
        ((kind, x),) = f["value"].items()
        fields[_text(f["key"])] = {
            "float": float,
            "int": int,
            "bool": bool,
            "string": _text,
        }[kind](x)
    return Record(Series("corpus", _text(point["name"]), tags), fields, point["time"], UID)


def split_line(line: str) -> tuple[str, list[tuple[str, str]], str]:
    """Cut a line into its raw (still escaped) key, fields and time, by the corpus's rules.

    In the measurement and tags a backslash escapes only comma, equals sign and space; inside
    string values it escapes whatever follows. Raw text is compared, so nothing is unescaped.
    """
    i, n = 0, len(line)

    def scan(stops: str) -> str:
        nonlocal i
        start = i
        while i < n and line[i] not in stops:
            i += 2 if line[i] == "\\" and i + 1 < n and line[i + 1] in ", =" else 1
        return line[start:i]

    key = scan(" ")
    i += 1
    fields = []
    while True:
        fkey = scan("=")
        i += 1
        start = i
        if line[i] == '"':
            i += 1
            while line[i] != '"':
                i += 2 if line[i] == "\\" else 1
            i += 1
        else:
            while line[i] not in ", ":
                i += 1
        fields.append((fkey, line[start:i]))
        i += 1
        if line[i - 1] == " ":
            return key, fields, line[i:]


def test_split_line() -> None:
    # the comparison helper itself: escapes in names, quotes and commas inside strings
    assert split_line('m\\ x,a\\ b=c\\,d f\\=g=1.0,s="x \\" y,z",e=2i 5') == (
        "m\\ x,a\\ b=c\\,d",
        [("f\\=g", "1.0"), ("s", '"x \\" y,z"'), ("e", "2i")],
        "5",
    )


def test_corpus_is_there() -> None:
    assert CORPUS.exists(), f"the conformance corpus is missing: {CORPUS}"
    assert len(ENCODE) == 115
    # what we convert: nothing binary, no uint, no NaN (the README's census of the file)
    kinds = {k for c in ENCODE.values() for f in c["input"]["point"]["fields"] for k in f["value"]}
    assert kinds == {"float", "int", "bool", "string"}


def test_deliberate_differences_are_few_and_real() -> None:
    assert set(DIFFERENT) <= set(ENCODE)
    assert len(DIFFERENT) <= 3


@pytest.mark.parametrize("key", sorted(ENCODE))
def test_encode_case(key: str) -> None:
    case = ENCODE[key]
    rec = _record(case["input"]["point"])
    line = lp.encode_record(rec)
    ours = None if line is None else line.replace(f',uid="{UID}"', "", 1)

    if key in DIFFERENT:
        _, instead = DIFFERENT[key]
        assert ours == instead
        return
    out = case["output"]
    if "error" in out:
        assert line is None, f"the corpus refuses this point ({out['error']}), we wrote {line!r}"
        return
    want = _text(out["result"])
    assert ours is not None, f"we refused a point the corpus encodes as {want!r}"
    if ours == want:
        return
    # only float formatting may differ
    ok, of, ot = split_line(ours)
    wk, wf, wt = split_line(want)
    assert (ok, ot) == (wk, wt)
    assert [k for k, _ in of] == [k for k, _ in wf]
    kinds = [next(iter(f["value"])) for f in case["input"]["point"]["fields"]]
    for kind, (_, a), (_, b) in zip(kinds, of, wf, strict=True):
        if kind == "float":
            assert float(a) == float(b), (a, b)
        else:
            assert a == b
