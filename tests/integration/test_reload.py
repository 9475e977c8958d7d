"""SIGHUP hot reload of a real `plantbus run`: what changed restarts, nothing else does.

A `counter` device writes into a file sink throughout. Meanwhile another device's conf.d
file changes, a device and a sink are added, both are removed again, `[node]` changes and
an invalid file is dropped in. The counter's sequence in the file must be unbroken (0..N-1,
N from the daemon's own `drained:` line), and every step must be reported as it happened.
A second daemon with its API on shows that `[api]` and `[node]` changes are reported with
the keys that changed and are not applied: the API keeps answering where it listened.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from servers import free_port, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cli import Daemon, emitted, write_config

pytestmark = pytest.mark.slow

MAIN = """
[node]
name = "edge"
state_dir = "state"
[api]
enabled = false

[[sinks.file]]
name = "lp"
path = "out/plantbus.lp"
flush_interval = "50ms"
"""

COUNT = """
[[devices.sim]]
name = "count"
interval = "10ms"
points = [{ name = "n", signal = "counter" }]
"""

OTHER = """
[[devices.sim]]
name = "other"
interval = "{interval}"
points = [{{ name = "v", signal = "sine" }}]
"""

EXTRA_SINK = """
[[sinks.file]]
name = "extra"
path = "out/extra.lp"
# its own outlet: a sink that batches like `lp` would join lp's outlet, and that outlet
# would then be handed over (losslessly) to a new lp+extra outlet
flush_interval = "100ms"
"""


def _count_values(out: Path) -> list[int]:
    lines = [ln for ln in out.read_bytes().splitlines() if ln.startswith(b"count,")]
    return [int(re.search(rb" n=(\d+)i", ln).group(1)) for ln in lines]  # type: ignore[union-attr]


def test_sighup_restarts_only_what_changed_and_refuses_bad_config(tmp_path: Path) -> None:
    config = write_config(tmp_path, MAIN, count=COUNT, other=OTHER.format(interval="50ms"))
    conf_d = tmp_path / "conf.d"
    d = Daemon(config, tmp_path)
    try:
        d.wait_log("running: 2 devices")
        steps = 0

        def reload(expect: str) -> None:
            nonlocal steps
            steps += 1
            d.signal(signal.SIGHUP)
            wait_until(lambda: d.text.count("SIGHUP received") >= steps, 30, "SIGHUP")
            d.wait_log(expect)

        # a changed file: only its device restarts
        (conf_d / "other.toml").write_text(OTHER.format(interval="20ms"))
        reload("reload: device other restarted")
        # added: a device and a sink
        (conf_d / "third.toml").write_text(OTHER.format(interval="50ms").replace("other", "third"))
        (conf_d / "sink.toml").write_text(EXTRA_SINK)
        reload("reload: device third added")
        d.wait_log("reload: outlet extra started")
        extra = conf_d / "out" / "extra.lp"  # a relative path is relative to its file
        wait_until(lambda: extra.exists() and b"third," in extra.read_bytes(), 30, "extra sink")
        # removed again
        (conf_d / "third.toml").unlink()
        (conf_d / "sink.toml").unlink()
        reload("reload: device third removed")
        d.wait_log("reload: outlet extra stopped")
        # [node] changes need a restart
        config.write_text(MAIN.replace('name = "edge"', 'name = "edge2"'))
        reload("reload: [node] changed (node.name); restart plantbus to apply it")
        # an invalid file: refused with file and key path, the running config stays
        (conf_d / "bad.toml").write_text(OTHER.format(interval="-5s").replace("other", "bad"))
        reload("reload refused: keeping the running config")
        refused = [ln for ln in d.text.splitlines() if "reload refused:" in ln]
        assert any("bad.toml" in ln and "interval" in ln for ln in refused), refused
        out = tmp_path / "out" / "plantbus.lp"
        before = len(_count_values(out))
        wait_until(lambda: len(_count_values(out)) > before + 10, 30, "count keeps running")

        d.signal(signal.SIGTERM)
        assert d.wait(timeout=60) == 0, d.text
        text = d.text
        # the unchanged device and outlet were never touched by any of the reloads
        assert "reload: device count" not in text
        assert "reload: outlet lp " not in text
        assert "drained: device bad" not in text
        # the counter ran through every reload as one unbroken sequence
        assert _count_values(out) == list(range(emitted(text, "count")))
    finally:
        d.kill()


DISK_MAIN = """
[node]
name = "edge"
state_dir = "state"
[api]
enabled = false

[[devices.sim]]
name = "count"
interval = "1ms"
points = [{{ name = "n", signal = "counter" }}]

[[sinks.file]]
name = "lp"
path = "out/plantbus.lp"
flush_interval = "{flush}"
buffer = {{ kind = "disk", sync_interval = "20ms" }}
"""


def test_sighup_changing_a_disk_buffered_sink_loses_no_record(tmp_path: Path) -> None:
    # the old outlet drains into its disk buffer and closes it before the new one can open
    # it; what the counter publishes meanwhile must wait for the successor, not vanish
    config = write_config(tmp_path, DISK_MAIN.format(flush="50ms"))
    out = tmp_path / "out" / "plantbus.lp"
    d = Daemon(config, tmp_path)
    try:
        d.wait_log("running: 1 device")
        for i, flush in enumerate(["60ms", "70ms", "80ms"], start=1):
            before = len(_count_values(out)) if out.exists() else 0
            wait_until(lambda n=before: len(_count_values(out)) > n + 100, 30, "count written")
            config.write_text(DISK_MAIN.format(flush=flush))
            d.signal(signal.SIGHUP)
            wait_until(lambda i=i: d.text.count("reload: outlet lp started") >= i, 30, "reload")
        before = len(_count_values(out))
        wait_until(lambda: len(_count_values(out)) > before + 100, 30, "count after reloads")
        d.signal(signal.SIGTERM)
        assert d.wait(timeout=60) == 0, d.text
        assert d.text.count("reload: outlet lp stopped") == 3
        assert _count_values(out) == list(range(emitted(d.text, "count")))
    finally:
        d.kill()


def test_a_second_daemon_on_the_same_disk_buffer_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, DISK_MAIN.format(flush="50ms"))
    out = tmp_path / "out" / "plantbus.lp"
    first = Daemon(config, tmp_path)
    (tmp_path / "second").mkdir()
    second = None
    try:
        first.wait_log("running: 1 device")
        second = Daemon(config, tmp_path / "second")
        assert second.wait(timeout=60) == 1, second.text
        folder = tmp_path / "state" / "buffers" / "file" / "lp"
        assert (
            f"outlet 'lp' could not be built: FolderInUse: disk buffer folder {folder} is in "
            f"use by another buffer (process {first.proc.pid})"
        ) in second.text
        # the first one never noticed
        before = len(_count_values(out)) if out.exists() else 0
        wait_until(lambda: len(_count_values(out)) > before + 100, 30, "count keeps running")
        first.signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0, first.text
        assert _count_values(out) == list(range(emitted(first.text, "count")))
    finally:
        first.kill()
        if second is not None:
            second.kill()


API_MAIN = """
[node]
name = "edge"
state_dir = "state"
shutdown_timeout = "10s"

[api]
listen = "127.0.0.1:{port}"
queue = {{ size = 1000 }}

[[devices.sim]]
name = "count"
interval = "10ms"
points = [{{ name = "n", signal = "counter" }}]

[[sinks.file]]
name = "lp"
path = "out/plantbus.lp"
flush_interval = "50ms"
"""


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _reads(port: int) -> float:
    status, body = _get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, body
    m = re.search(rb'^plantbus_device_reads_total\{device="count"\} (\S+)$', body, re.M)
    assert m, body
    return float(m.group(1))


def test_sighup_reports_api_and_node_changes_and_keeps_the_running_api(tmp_path: Path) -> None:
    port, other = free_port(), free_port()
    config = write_config(tmp_path, API_MAIN.format(port=port))
    d = Daemon(config, tmp_path)
    try:
        d.wait_log("running: 1 device")
        before = _reads(port)
        changed = (
            API_MAIN.format(port=other)
            .replace("size = 1000", "size = 50")
            .replace('"10s"', '"3s"')
            .replace('name = "edge"', 'name = "edge2"')
        )
        config.write_text(changed)
        d.signal(signal.SIGHUP)
        d.wait_log("reload: [api] changed")
        lines = [ln for ln in d.text.splitlines() if "reload: [" in ln]
        assert len(lines) == 2, lines
        assert lines[0].endswith(
            "WARNING plantbus.runtime: reload: [node] changed (node.name, "
            "node.shutdown_timeout); restart plantbus to apply it (until then the running "
            "[node] settings stay)"
        ), lines
        assert lines[1].endswith(
            "WARNING plantbus.runtime: reload: [api] changed (api.listen, api.queue.size); "
            "restart plantbus to apply it (until then the running [api] settings stay)"
        ), lines
        # the API still answers where it listened, and nothing listens on the new address
        status, body = _get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200, body
        assert json.loads(body)["devices"]["count"]["state"] == "running"
        with pytest.raises(OSError):
            _get(f"http://127.0.0.1:{other}/healthz")
        # the device keeps reading (not restarted: its table did not change)
        wait_until(lambda: _reads(port) > before + 10, 30, "count keeps reading")

        d.signal(signal.SIGTERM)
        assert d.wait(timeout=60) == 0, d.text
        text = d.text
        assert "reload: device count" not in text
        assert "reload: outlet lp " not in text
        # the drain used the running shutdown_timeout, not the reloaded one
        assert "SIGTERM received: draining (at most 10s)" in text
        out = tmp_path / "out" / "plantbus.lp"
        assert _count_values(out) == list(range(emitted(text, "count")))
    finally:
        d.kill()
