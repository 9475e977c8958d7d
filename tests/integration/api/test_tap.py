"""``plantbus tap`` against a real ``plantbus run`` daemon (both subprocesses).

The daemon runs a counter device into a file sink and serves the API with tokens, over TCP
and a Unix socket. The tap's records are counted by uid and checked against what the file
sink wrote (after the daemon drained); every exit code of the CLI contract is provoked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import free_port, wait_until

CONFIG = """
[node]
name = "edge"
state_dir = "state"

[api]
listen = "127.0.0.1:{port}"
unix = "api.sock"

[[api.tokens]]
name = "viewer"
token_file = "viewer.token"
subscribe = ["plant/#"]

[[devices.sim]]
name = "press"
topic = "plant/press"
interval = "5ms"
batch = 10
points = [{{ name = "n", signal = "counter" }}, {{ name = "label", signal = "counter" }}]

[[sinks.file]]
name = "all"
path = "all.lp"
subscribe = ["plant/#"]
flush_interval = "50ms"
"""

TOKEN = "viewer-token-7f3a"


class Daemon:
    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        (folder / "plantbus.toml").write_text(CONFIG.format(port=self.port))
        (folder / "viewer.token").write_text(TOKEN + "\n")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "plantbus.broker.cli", "run", "-c", "plantbus.toml"],
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"plantbus exited:\n{self.proc.stderr.read()[-4000:]}")  # type: ignore[union-attr]
            req = urllib.request.Request(
                f"{self.url}/healthz", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            try:
                with urllib.request.urlopen(req, timeout=2) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_until(healthy, 60, "the daemon's /healthz")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return str(err)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    try:
        yield d
    finally:
        d.stop()


def tap(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "plantbus.broker.cli", "tap", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_tap_json_lines_are_the_daemons_records(daemon: Daemon, tmp_path: Path) -> None:
    r = tap(
        "--api",
        daemon.url,
        "--token-file",
        str(tmp_path / "viewer.token"),
        "--json",
        "--count",
        "500",
        "plant/#",
    )
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(records) == 500
    uids = [rec["uid"] for rec in records]
    assert len(set(uids)) == 500
    ns = [rec["fields"]["n"] for rec in records]
    assert ns == list(range(ns[0], ns[0] + 500))  # live and complete: no gap, no repeat
    assert {rec["topic"] for rec in records} == {"plant/press"}
    # over the Unix socket, with the token from the environment
    r = tap(
        "--api",
        f"unix:{tmp_path / 'api.sock'}",
        "--json",
        "--count",
        "50",
        "plant/+",
        env={"PLANTBUS_TOKEN": TOKEN},
    )
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 50
    uids += [json.loads(line)["uid"] for line in r.stdout.splitlines()]
    err = daemon.stop()
    assert daemon.proc.returncode == 0, err[-3000:]
    # every record the tap printed is one the daemon wrote to its sink, counted by uid
    written = (tmp_path / "all.lp").read_text()
    assert all(f'uid="{u}"' in written for u in uids)


def test_tap_table(daemon: Daemon) -> None:
    r = tap("--api", daemon.url, "--count", "20", "plant/#", env={"PLANTBUS_TOKEN": TOKEN})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["time", "topic", "quality", "fields", "uid"]
    rows = [line.split() for line in lines[1:]]
    assert len(rows) == 20
    for time_, topic, quality, n, label, uid in rows:
        assert topic == "plant/press" and quality == "good"
        assert n.startswith("n=") and label.startswith("label=") and len(uid) == 36
        assert len(time_) == 12 and time_[2] == ":"


def test_tap_exit_codes(daemon: Daemon, tmp_path: Path) -> None:
    r = tap("--api", daemon.url, "--count", "1", "plant/#")
    assert r.returncode == 2
    assert "refused the subscription (401): missing token" in r.stderr
    r = tap("--api", daemon.url, "--count", "1", "other/#", env={"PLANTBUS_TOKEN": TOKEN})
    assert r.returncode == 2
    assert "(403): token 'viewer' may not subscribe to 'other/#'" in r.stderr
    r = tap("--api", daemon.url, "plant/+x", env={"PLANTBUS_TOKEN": TOKEN})
    assert r.returncode == 2 and "'+' must be a whole level" in r.stderr
    r = tap("--api", daemon.url, "--token-file", str(tmp_path / "nope"), "plant/#")
    assert r.returncode == 2 and "cannot read --token-file" in r.stderr
    r = tap("--api", "ftp://x", "plant/#")
    assert r.returncode == 2
    r = tap("--count", "0", "plant/#")
    assert r.returncode == 2  # argparse: usage
    r = tap("--api", f"http://127.0.0.1:{free_port()}", "plant/#")
    assert r.returncode == 1 and "cannot reach the daemon" in r.stderr
    # the daemon stops while a tap streams: the stream's end is a failure of the tap
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "plantbus.broker.cli",
            "tap",
            "--api",
            daemon.url,
            "--json",
            "plant/#",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PLANTBUS_TOKEN": TOKEN},
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # streaming
        assert json.loads(first)["topic"] == "plant/press"
        daemon.stop()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1
    assert "the daemon closed the stream (code 1001: plantbus is stopping)" in err
