"""JSON generators shared by the JSON-shaped targets: any JSON value, and record-shaped
documents whose members are sometimes of the wrong type, NaN, huge or oddly encoded.

Built from a seed that Hypothesis draws, with ``random.Random``: Hypothesis' own recursive
strategies cost 3-5 ms per document, which at 10,000 inputs per target would take the fuzz
directory well past its CI budget; this costs about 0.3 ms. A failure prints the payload
(the test's argument) in full, so the missing shrinking costs little.
"""

from __future__ import annotations

import json
import random
from typing import Any

from hypothesis import strategies as st

_TEXTS = [
    "",
    "a",
    "temp",
    "uid",
    "quality",
    "good",
    "bad",
    "uncertain",
    "GOOD",
    "plant/h1/press7",
    "a/+/b",
    "a//b",
    "#",
    "$SYS/x",
    "\ud800",
    "a\udfffb",
    "é€😀",
    "\x00\n\t",
    " ",
    "x" * 300,
]
_NUMBERS = [
    0,
    -1,
    1,
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    2**64,
    10**40,
    10**400,
    0.5,
    -0.0,
    1e308,
    5e-324,
    float("nan"),
    float("inf"),
    float("-inf"),
    1073741824,
    2151415808,
]


def _text(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return rng.choice(_TEXTS)
    return "".join(
        chr(rng.choice((rng.randrange(32, 127), rng.randrange(0x10FFFF))))
        for _ in range(rng.randrange(6))
    )


def value(rng: random.Random, depth: int = 0) -> Any:
    """Any JSON value (NaN and ±Infinity included), nested up to 3 levels."""
    k = rng.randrange(9 if depth < 3 else 6)
    if k == 0:
        return None
    if k == 1:
        return rng.random() < 0.5
    if k == 2:
        return rng.choice(_NUMBERS)
    if k == 3:
        return rng.randrange(-(2**70), 2**70) if rng.random() < 0.3 else rng.randrange(-1000, 1000)
    if k == 4:
        return rng.uniform(-1e6, 1e6) if rng.random() < 0.5 else rng.choice(_NUMBERS)
    if k == 5:
        return _text(rng)
    if k in (6, 7):
        return {_text(rng): value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [value(rng, depth + 1) for _ in range(rng.randrange(4))]


def _maybe(rng: random.Random, right: Any) -> Any:
    """Mostly the right kind of value, sometimes any JSON value."""
    return right if rng.random() < 0.8 else value(rng)


def _scalar(rng: random.Random) -> Any:
    k = rng.randrange(4)
    return (rng.choice(_NUMBERS), rng.random() < 0.5, _text(rng), rng.uniform(-100, 100))[k]


def record(rng: random.Random) -> dict[str, Any]:
    """A record-shaped document: each member present or not, right or wrong."""
    doc: dict[str, Any] = {}
    if rng.random() < 0.9:
        doc["fields"] = _maybe(
            rng, {_text(rng): _maybe(rng, _scalar(rng)) for _ in range(rng.randrange(4))}
        )
    for key, make in (
        ("uid", lambda: _text(rng)),
        ("topic", lambda: rng.choice(["plant/h1/press7", "plant/a", "a/+/b", "", "$x/y", "a//b"])),
        ("measurement", lambda: _text(rng)),
        ("time", lambda: rng.choice([0, -1, 2**63 - 1, 2**63, 1732790000123456789, 10**30])),
        ("tags", lambda: {_text(rng): _maybe(rng, _text(rng)) for _ in range(rng.randrange(3))}),
        (
            "status",
            lambda: {
                _text(rng): _maybe(
                    rng, rng.choice([*_NUMBERS[:10], 0x40000000, 0x80000000, 0xC0000000])
                )
                for _ in range(rng.randrange(3))
            },
        ),
        ("quality", lambda: rng.choice(["good", "uncertain", "bad", "GOOD", ""])),
        ("parent", lambda: _text(rng)),
    ):
        if rng.random() < 0.3:
            doc[key] = _maybe(rng, make())
    if rng.random() < 0.05:
        doc[_text(rng)] = value(rng)  # an unknown key
    return doc


def dumps(doc: Any) -> bytes:
    """JSON text of ``doc``; NaN/Infinity written as JavaScript does (``allow_nan``)."""
    try:
        text = json.dumps(doc, ensure_ascii=False, allow_nan=True)
    except ValueError:  # an integer of more than 4300 digits
        text = json.dumps(str(doc))
    return text.encode("utf-8", "surrogatepass")


def _payload(seed: int) -> bytes:
    rng = random.Random(seed)
    k = rng.randrange(4)
    if k == 0:
        return dumps(record(rng))
    if k == 1:
        return dumps([record(rng) for _ in range(rng.randrange(4))])
    if k == 2:
        return dumps(value(rng))
    # ensure_ascii: lone surrogates as \\ud800 escapes, the form that parses into a str
    return json.dumps(record(rng), ensure_ascii=True, allow_nan=True).encode()


record_payloads = st.integers(0, 2**64).map(_payload)
"""Payloads of JSON records: one object, an array, or any JSON value."""

seeded_values = st.integers(0, 2**64).map(lambda s: value(random.Random(s)))
"""Any JSON value, as Python data."""
