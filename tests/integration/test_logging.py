"""Logging of a real `plantbus run`: formats, levels, and no log storm while a device is down.

A Modbus device whose server is absent fails and is restarted again and again. Its log must
say so once (an error line), keep the repeats at debug level, and remind at most every
``remind_every`` (5 minutes: longer than this test, so no reminder is expected here).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from servers import free_port, wait_until

CONFIG = """
[node]
name = "logs"
state_dir = "state"
[api]
enabled = false

[[devices.modbus]]
name = "absent"
host = "127.0.0.1"
port = {port}
interval = "100ms"
timeout = "200ms"
points = [{{ name = "v", area = "holding", address = 0, type = "int16" }}]

[[devices.sim]]
name = "count"
interval = "50ms"
points = [{{ name = "n", signal = "counter" }}]

[[sinks.file]]
name = "lp"
path = "out.lp"
"""


def _run(tmp_path: Path, *args: str, journal: bool = False) -> tuple[subprocess.Popen[str], Path]:
    (tmp_path / "plantbus.toml").write_text(CONFIG.format(port=free_port()))
    log = tmp_path / "stderr.log"
    env = dict(os.environ)
    env.pop("JOURNAL_STREAM", None)
    if journal:
        env["JOURNAL_STREAM"] = "8:12345"  # what systemd sets when stderr is the journal
    proc = subprocess.Popen(
        [sys.executable, "-m", "plantbus.broker.cli", "run", "-c", "plantbus.toml", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        text=True,
    )
    return proc, log


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_down_device_logs_one_error_not_one_per_restart_json(tmp_path: Path) -> None:
    proc, log = _run(tmp_path, "--log-format", "json", "--log-level", "debug")
    try:

        def events() -> list[dict[str, object]]:
            # every line is one JSON object (a torn last line is still being written)
            lines = log.read_text().splitlines()
            return [json.loads(line) for line in lines if line.endswith("}")]

        def restarts() -> int:
            return sum(
                1
                for e in events()
                if e["logger"] == "plantbus.supervisor" and "device absent failed" in str(e["msg"])
            )

        wait_until(lambda: restarts() >= 5, 90, "five faults of the absent device")
        _stop(proc)
        assert proc.returncode == 0
        got = events()
        absent = [
            e
            for e in got
            if e["logger"] == "plantbus.supervisor" and "device absent" in str(e["msg"])
        ]
        above_debug = [e for e in absent if e["level"] != "debug"]
        assert len(absent) >= 5
        assert [e["level"] for e in above_debug] == ["error"], above_debug
        assert "Connection refused" in str(above_debug[0]["msg"])
        assert all(set(e) >= {"ts", "level", "logger", "msg"} for e in got)
        assert any(str(e["msg"]).startswith("drained in") for e in got)
    finally:
        _stop(proc)


def test_journal_stream_gets_priority_prefixes_and_no_timestamps(tmp_path: Path) -> None:
    proc, log = _run(tmp_path, journal=True)
    try:
        wait_until(lambda: "device absent failed" in log.read_text(), 60, "the fault line")
        _stop(proc)
        lines = log.read_text().splitlines()
        assert any(line.startswith("<3>ERROR plantbus.supervisor: device absent") for line in lines)
        assert any(line.startswith("<6>INFO plantbus.runtime: running:") for line in lines)
        assert all(line[:1] == "<" and line[2:3] == ">" for line in lines), lines
    finally:
        _stop(proc)
