"""The ``line`` device without I/O: config validation, framing, frames to records, logging."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from plantbus.broker.connector import BuildContext
from plantbus.broker.record import Quality
from plantbus.codecs.payload import BAD_TYPE_MISMATCH
from plantbus.connectors.line import Config
from plantbus.connectors.line.connector import Framer, LineConnector, _Burst

REPO = Path(__file__).resolve().parents[2]
CTX = BuildContext(node_name="edge", node_tags={"site": "ulm"}, state_dir=Path("/nonexistent"))
NS = 1_714_564_800 * 10**9


def config(**kw: Any) -> Config:
    kw.setdefault("name", "scale3")
    kw.setdefault("connect", "127.0.0.1:4001")
    if "csv" not in kw:
        kw.setdefault("regex", r"^W=(?P<weight>[-0-9.]+)$")
    return Config.model_validate(kw)


def test_sources_and_short_column_forms() -> None:
    c = config(
        listen=":5000",
        connect=None,
        regex=None,
        csv={"columns": ["ts:time", "t", "-", {"name": "n", "type": "int"}]},
    )
    assert [col.type for col in c.csv.columns] == ["time", "float", "skip", "int"]  # type: ignore[union-attr]
    assert config(serial="/dev/ttyUSB0", connect=None, baudrate=19200).baudrate == 19200


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"listen": "0.0.0.0:5000"}, "set exactly one of connect (TCP client), listen"),
        ({"connect": None}, "set exactly one of connect"),
        ({"connect": "nohost"}, 'use "host:port"'),
        ({"baudrate": 9600}, "baudrate: only for a serial port"),
        ({"csv": {"columns": ["a"]}, "regex": "(?P<a>.)"}, "set exactly one of regex and csv"),
        ({"regex": "(?P<a>[0-9]+"}, "invalid regex '(?P<a>[0-9]+': missing )"),
        ({"regex": r"(\d+)"}, "has no named group"),
        ({"columns": {"x": "int"}}, "'x' are not named groups of the regex (its groups: weight)"),
        ({"columns": {"weight": "number"}}, "'float', 'int', 'bool', 'string', 'tag', 'time'"),
        ({"columns": {"weight": {"type": "time", "format": "weeks"}}}, "unknown time format"),
        ({"columns": {"weight": {"type": "float", "format": "%H"}}}, "are for time columns"),
        ({"regex": None, "csv": {"columns": ["a", "a"]}}, "'a' used twice"),
        ({"regex": None, "csv": {"columns": ["-"]}}, "no column is a value"),
        ({"regex": None, "csv": {"columns": ["t"], "separator": ",,"}}, "single characters"),
        ({"regex": None, "csv": {"columns": ["a\\"]}}, "ends with a backslash"),
        ({"regex": None, "csv": {"columns": ["device:tag"]}}, "'device' is reserved"),
        ({"encoding": "klingon"}, "unknown encoding 'klingon'"),
        ({"ignore": ["("]}, "invalid regex '('"),
        ({"peer_tag": "peer"}, "peer_tag: only for a TCP server"),
        ({"listen": ":1", "connect": None, "request": "P"}, "request: only for connect or serial"),
        ({"frame": "x"}, "Extra inputs are not permitted"),
    ],
)
def test_config_errors(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        config(**kw)


def test_sample_toml_passes_plantbus_check(tmp_path: Path) -> None:
    main = tmp_path / "plantbus.toml"
    main.write_text('[node]\nname = "edge"\n')
    (tmp_path / "conf.d").mkdir()
    sample = (REPO / "connectors" / "line" / "sample.toml").read_text()
    (tmp_path / "conf.d" / "line.toml").write_text(sample)
    out = subprocess.run(
        [sys.executable, "-m", "plantbus.broker.cli", "check", "-c", str(main)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (out.returncode, out.stdout) == (0, "config OK: 3 devices, 0 sinks\n"), out.stderr


def test_check_reports_file_and_key_of_a_bad_regex(tmp_path: Path) -> None:
    main = tmp_path / "plantbus.toml"
    main.write_text(
        '[node]\nname = "edge"\n[[devices.line]]\nname = "x"\nconnect = "h:1"\nregex = "(?P<a"\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "plantbus.broker.cli", "check", "-c", str(main)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2
    assert "plantbus.toml: devices.line[0]: invalid regex '(?P<a'" in out.stderr
    assert "Traceback" not in out.stderr


# -- framing and decoding -------------------------------------------------------------------


def test_framer_splits_across_chunks_and_drops_overlong_runs() -> None:
    f = Framer(b"\r\n", max_frame=8)
    assert f.feed(b"a=1\r\nb=") == [b"a=1"]
    assert f.feed(b"2\r") == []
    assert f.feed(b"\nc=3\r\n") == [b"b=2", b"c=3"]
    assert f.feed(b"x" * 20) == [] and f.overflows == 1  # no delimiter within max_frame
    assert f.feed(b"12345678901\r\nok\r\n") == [b"ok"] and f.overflows == 2


def test_frames_to_records_with_tags_bad_values_and_ignored_frames(
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = LineConnector(
        config(
            topic="plant/scale3",
            tags={"line": "L1"},
            regex=r"^(?P<sensor>S\d);W=(?P<weight>[^;]*);(?P<ts>\d+)?$",
            columns={"sensor": "tag", "ts": {"type": "time", "format": "s"}},
            ignore=["^#"],
        ),
        CTX,
    )
    burst = _Burst()
    frames = [b"S1;W=12.5;1714564800", b"# banner", b"", b"garbage", b"S2;W=heavy;", b"\xff\xfe"]
    recs = d.decode(frames, burst)
    assert [(r.topic, r.fields, r.series.tag_dict.get("sensor")) for r in recs] == [
        ("plant/scale3", {"weight": 12.5}, "S1"),
        ("plant/scale3", {}, "S2"),
    ]
    assert recs[0].time_ns == NS
    assert (recs[1].quality, recs[1].status) == (Quality.BAD, {"weight": BAD_TYPE_MISMATCH})
    assert recs[0].series.tag_dict == {
        "device": "scale3",
        "line": "L1",
        "sensor": "S1",
        "site": "ulm",
    }
    assert (burst.bad, burst.problems, d.frames) == (2, 1, 6)
    with caplog.at_level(logging.WARNING, "plantbus.connectors.line"):
        d._report(burst)
    assert [r.getMessage() for r in caplog.records] == [
        "line device scale3: 2 frames did not parse; first: does not match the regex: 'garbage'",
        "line device scale3: 1 value could not be read; first: point 'weight': 'heavy' is not a "
        "number in frame 'S2;W=heavy;'",
    ]
    assert (d.malformed, d.problems) == (2, 1)


def test_frames_of_one_burst_get_distinct_increasing_times() -> None:
    d = LineConnector(config(), CTX)
    recs = d.decode([b"W=1", b"W=2", b"W=3"])
    more = d.decode([b"W=4"])
    times = [r.time_ns for r in recs + more]
    assert times == sorted(set(times))
