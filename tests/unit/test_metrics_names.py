"""docs/metrics.md lists exactly the metric families the collector yields (names are a contract).

Every row of the page's tables names a family, its type and its labels (the per-device and
per-sink tables name their label in the heading); the collector of a runtime with a device,
a sink and the consumer API must yield the same set.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from plantbus.broker.api import ConsumerApi
from plantbus.broker.config import parse_config
from plantbus.broker.metrics import RuntimeCollector
from plantbus.broker.runtime import Runtime

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"

CONFIG = """
[node]
name = "m"
state_dir = "state"
[[devices.sim]]
name = "s"
points = [{ name = "n", signal = "counter" }]
[[sinks.file]]
name = "lp"
path = "out.lp"
"""

Family = tuple[str, frozenset[str]]  # type, label names


def _documented() -> dict[str, Family]:
    out: dict[str, Family] = {}
    section_labels: frozenset[str] = frozenset()
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section_labels = frozenset(re.findall(r"\(`(\w+)` label\)", line))
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.fullmatch(r"`(plantbus_\w+)`", cells[0])
        if not m or not line.startswith("|"):
            continue
        name, kind = m[1], cells[1]
        # a table with a labels column names them there; else the heading names the label
        labels = set(section_labels)
        if len(cells) == 4:
            labels |= set(re.findall(r"`(\w+)`", cells[2]))
        elif name == "plantbus_sink_dropped_records":
            labels.add("reason")  # named in its meaning: label `reason`
        assert name not in out, f"{name} is listed twice"
        out[name] = (kind, frozenset(labels))
    return out


def _collected(tmp_path: Path) -> dict[str, Family]:
    config = parse_config(CONFIG, tmp_path / "plantbus.toml")

    async def collect() -> dict[str, Family]:
        runtime = Runtime(config)
        api = ConsumerApi(config.api, runtime)
        await runtime.start()
        try:
            return {
                f.name: (f.type, frozenset(f._labelnames))  # type: ignore[attr-defined]
                for f in RuntimeCollector(runtime, api).collect()
            }
        finally:
            await runtime.shutdown()

    return asyncio.run(collect())


def test_docs_list_exactly_the_exported_families(tmp_path: Path) -> None:
    documented = _documented()
    collected = _collected(tmp_path)
    assert len(documented) > 30  # the page was parsed at all
    assert set(documented) == set(collected), (
        f"undocumented: {sorted(set(collected) - set(documented))}; "
        f"documented but not exported: {sorted(set(documented) - set(collected))}"
    )
    for name, (kind, labels) in collected.items():
        assert documented[name] == (kind, labels), name
