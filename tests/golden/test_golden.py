"""Golden cases: a declarative input in, the exact line protocol (and counters) out.

Each folder under ``tests/golden/`` is one case (Telegraf-style):

* ``case.toml``: ``about``, optional ``uid_field``, a ``[series]`` table (or ``[[series]]``
  with a ``name`` each) and ``[[records]]`` with ``fields``, ``time_ns`` and optionally
  ``id``, ``series``, ``quality``, ``status`` (set as is) and ``marks`` (applied with
  ``Record.mark``, the way connectors flag points).
* ``expected.lp``: the exact bytes ``encode`` must return; an empty file means nothing is written.
* ``expected_stats.toml`` (optional): the ``EncodeStats`` counters it must report.
* ``expected.json`` (optional): the JSON codec's output for the same records, compared parsed.

To add a case: make the folder, write ``case.toml``, and check the output by hand before saving
it as ``expected.lp``; the case is picked up without touching this file.
"""

from __future__ import annotations

import copy
import json
import tomllib
from typing import Any

import pytest
from golden.cases import CASES, HERE, load_case  # tests/ is on sys.path (conftest.py)

from plantbus.broker.record import Record
from plantbus.codecs import json as json_codec
from plantbus.codecs import line_protocol as lp


def _snapshot(records: list[Record]) -> list[tuple[Any, ...]]:
    return [
        (r.series, copy.deepcopy(r.fields), r.time_ns, r.id, r.quality, copy.deepcopy(r.status))
        for r in records
    ]


def test_enough_cases() -> None:
    assert len(CASES) >= 30, CASES


@pytest.mark.parametrize("name", CASES)
def test_golden_line_protocol(name: str) -> None:
    case, records = load_case(name)
    uid_field = case.get("uid_field", "uid")
    before = _snapshot(records)
    stats = lp.EncodeStats()
    got = lp.encode(records, stats, uid_field)
    want = (HERE / name / "expected.lp").read_bytes()
    assert got == want, f"\n got: {got!r}\nwant: {want!r}"
    assert _snapshot(records) == before, "the encoder modified a record"

    # one record at a time gives the same lines
    singles = [lp.encode_record(r, uid_field) for r in records]
    assert b"".join(s.encode() + b"\n" for s in singles if s is not None) == got

    stats_file = HERE / name / "expected_stats.toml"
    if stats_file.exists():
        want_stats = tomllib.loads(stats_file.read_text(encoding="utf-8"))
        have = {k: getattr(stats, k) for k in want_stats}
        assert have == want_stats
    else:
        assert (stats.records, stats.lines) == (len(records), len(records))
        assert stats.non_finite == stats.empty == stats.invalid == 0


@pytest.mark.parametrize("name", [n for n in CASES if (HERE / n / "expected.json").exists()])
def test_golden_json(name: str) -> None:
    _, records = load_case(name)
    before = _snapshot(records)
    got = json.loads(json_codec.encode(records))
    want = json.loads((HERE / name / "expected.json").read_text(encoding="utf-8"))
    assert got == want
    assert _snapshot(records) == before, "the encoder modified a record"
