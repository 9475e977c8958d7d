"""JSON strategies shared by the JSON-shaped targets: any JSON value, and record-shaped
documents whose members are sometimes of the wrong type, NaN, huge or oddly encoded."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**70) | st.just(-(2**63)) | st.just(10**40),
    st.floats(),  # NaN and ±Infinity too: json.dumps writes them, the decoders must refuse
    st.text(max_size=12),
    st.sampled_from(["\ud800", "a\udfffb", "good", "bad", "uncertain", "plant/a", "$SYS/x"]),
)
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def _maybe(right: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the right type, sometimes any JSON value."""
    return st.one_of(right, right, right, json_values)


_field_values = st.one_of(
    st.floats(), st.integers(), st.booleans(), st.text(max_size=8), json_values
)
_keys = st.text(max_size=8) | st.sampled_from(["\ud800", "temp", "uid", "quality"])

record_docs = st.fixed_dictionaries(
    {},
    optional={
        "uid": _maybe(st.text(max_size=26)),
        "topic": _maybe(st.sampled_from(["plant/h1/press7", "a", "", "a/+/b", "a//b", "$x", "#"])),
        "measurement": _maybe(st.text(max_size=8)),
        "time": _maybe(st.integers(-(2**64), 2**64)),
        "tags": _maybe(st.dictionaries(_keys, _maybe(st.text(max_size=6)), max_size=3)),
        "fields": _maybe(st.dictionaries(_keys, _field_values, max_size=4)),
        "status": _maybe(st.dictionaries(_keys, _maybe(st.integers(-(2**40), 2**40)), max_size=3)),
        "quality": _maybe(st.sampled_from(["good", "uncertain", "bad", "GOOD", ""])),
        "parent": _maybe(st.text(max_size=26)),
        "extra": json_values,
    },
)


def dumps(doc: Any, *, ascii: bool = True) -> bytes:
    """JSON text of ``doc``; NaN/Infinity written as JavaScript does (``allow_nan``)."""
    return json.dumps(doc, ensure_ascii=ascii, allow_nan=True).encode("utf-8", "surrogatepass")


record_payloads = st.one_of(
    st.builds(dumps, record_docs),
    st.builds(dumps, st.lists(record_docs, max_size=4)),
    st.builds(dumps, json_values),
)
"""Payloads of JSON records: one object, an array, or any JSON value."""
