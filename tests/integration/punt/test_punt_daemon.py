"""A real ``plantbus run`` with a punt sink: sim -> function process -> results into a file.

After SIGTERM the daemon must exit 0 having scored every record the device emitted, and the
file sink that subscribes to the results must hold one line per record, each naming it.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from servers import wait_until

pytestmark = pytest.mark.slow

CONFIG = """
[node]
name = "edge"
state_dir = "state"
shutdown_timeout = "20s"

[api]
enabled = false

[[devices.sim]]
name = "press"
topic = "plant/press"
interval = "2ms"
batch = 10
points = [{{ name = "n", signal = "counter" }}]

[[sinks.punt]]
name = "scorer"
url = "{url}"
subscribe = ["plant/#"]
result_topic = "analytics/press/z"
batch_size = 500
flush_interval = "50ms"

[[sinks.file]]
name = "scores"
path = "scores.lp"
subscribe = ["analytics/#"]
flush_interval = "50ms"
"""

DRAINED_DEVICE = re.compile(r"drained: device press emitted=(\d+)")
DRAINED_SINK = re.compile(
    r"drained: sink (\w+) delivered=(\d+) undelivered=(\d+) dropped=(\d+) rejected=(\d+)"
)


def test_daemon_scores_every_record_and_drains_the_results(tmp_path: Path, function_server) -> None:  # type: ignore[no-untyped-def]
    fn = function_server()
    (tmp_path / "plantbus.toml").write_text(CONFIG.format(url=fn.url))
    scores = tmp_path / "scores.lp"
    proc = subprocess.Popen(
        [sys.executable, "-m", "plantbus.broker.cli", "run", "-c", "plantbus.toml"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def scored() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"plantbus exited early:\n{proc.stderr.read()[-4000:]}")  # type: ignore[union-attr]
            return scores.exists() and scores.stat().st_size > 100_000

        wait_until(scored, 60, "results in the file", interval=0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-4000:]
    assert "Traceback" not in err
    m = DRAINED_DEVICE.search(err)
    assert m, err[-4000:]
    emitted = int(m.group(1))
    sinks = {s[0]: tuple(map(int, s[1:])) for s in DRAINED_SINK.findall(err)}
    assert sinks["scorer"] == (emitted, 0, 0, 0)
    assert sinks["scores"] == (emitted, 0, 0, 0)
    lines = scores.read_text().splitlines()
    assert len(lines) == emitted
    assert all(line.startswith("zscore,device=press n_z=") for line in lines)
