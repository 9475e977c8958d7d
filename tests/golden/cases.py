"""Loading the golden cases (``tests/golden/<case>/case.toml``) into records.

Shared by ``test_golden.py`` and the InfluxDB read-back check of the same cases in
``tests/integration/test_lp_influx_roundtrip.py``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from plantbus.broker.record import Quality, Record, Series

__all__ = ["CASES", "HERE", "load_case"]

HERE = Path(__file__).resolve().parent
CASES = sorted(p.parent.name for p in HERE.glob("*/case.toml"))
_CASE_KEYS = {"about", "uid_field", "series", "records"}
_RECORD_KEYS = {"series", "fields", "time_ns", "id", "quality", "status", "marks"}


def load_case(name: str) -> tuple[dict[str, Any], list[Record]]:
    """Parse ``<name>/case.toml`` into its settings and records."""
    case = tomllib.loads((HERE / name / "case.toml").read_text(encoding="utf-8"))
    assert set(case) <= _CASE_KEYS, f"unknown keys {set(case) - _CASE_KEYS}"
    assert case.get("about"), "say what the case is about"
    specs = case["series"] if isinstance(case["series"], list) else [case["series"]]
    series = {
        s.get("name", ""): Series(s.get("topic", "plant/test"), s["measurement"], s.get("tags"))
        for s in specs
    }
    records = []
    for i, r in enumerate(case["records"], 1):
        assert set(r) <= _RECORD_KEYS, f"record {i}: unknown keys {set(r) - _RECORD_KEYS}"
        rec = Record(
            series[r.get("series", "")],
            dict(r["fields"]),
            r.get("time_ns", 1_700_000_000_000_000_000 + i),
            r.get("id", f"01900000-0000-7000-8000-{i:012d}"),
        )
        for m in r.get("marks", []):
            rec.mark(m["point"], Quality.from_label(m["quality"]), m["code"])
        if "quality" in r:
            rec.quality = Quality.from_label(r["quality"])
        if "status" in r:
            rec.status = dict(r["status"])
        records.append(rec)
    return case, records
