"""systemd integration of a real `plantbus run`: the notify protocol, the watchdog, the unit.

The test plays systemd's part: it binds its own ``NOTIFY_SOCKET`` (an abstract-namespace
socket, as systemd itself uses), sets ``WATCHDOG_USEC`` and reads what the daemon sends.

The frozen loop is a real one, not a test hook: the daemon's stderr is a pipe (as journald's
stream is) that the test lets fill up, so the daemon's next log line blocks in ``write()`` on
the event loop, exactly what a stuck journald does to a service. Its pings must stop, and
resume once the pipe is read again. A Modbus device whose server is absent (a device
outage) runs beside it all along and must never stop the pings.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from servers import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "plantbus.service"
SYSUSERS = REPO / "systemd" / "plantbus.sysusers"

WATCHDOG_USEC = 2_000_000  # pings every 1 s; systemd would restart after 2 s without one

CONFIG = """
[node]
name = "wd"
state_dir = "state"
[api]
enabled = false

[[devices.sim]]
name = "count"
topic = "wd/count"
interval = "20ms"
points = [{{ name = "n", signal = "counter" }}]

[[devices.modbus]]
name = "absent"
host = "127.0.0.1"
port = {port}
interval = "100ms"
timeout = "200ms"
points = [{{ name = "v", area = "holding", address = 0, type = "int16" }}]

[[sinks.file]]
name = "lp"
path = "out.lp"
flush_interval = "50ms"
"""


class NotifySocket:
    """The receiving end of ``NOTIFY_SOCKET``: every datagram with its arrival time."""

    def __init__(self) -> None:
        self.name = f"@plantbus-test-{uuid.uuid4().hex}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(b"\0" + self.name[1:].encode())
        self._sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop:
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def times(self, key: str, since: float = 0.0) -> list[float]:
        return [t for t, m in list(self.messages) if key in m.split("\n") and t >= since]

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self._sock.close()


class StderrPipe:
    """The daemon's stderr as a pipe the test reads only when it chooses to."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        # the read end is the test's alone, so non-blocking reads do not affect the daemon
        os.set_blocking(self.read_fd, False)
        self.text = ""

    def read_available(self) -> str:
        while True:
            try:
                chunk = os.read(self.read_fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.text += chunk.decode(errors="replace")
        return self.text

    def fill(self) -> int:
        """Fill the pipe to the brim through a second, non-blocking open of its write end.

        ``/proc/self/fd/N`` opens a new file description of the same pipe (write access from
        the read end's entry works for pipes), so O_NONBLOCK on it leaves the daemon's
        (blocking) stderr as it is.
        """
        fd = os.open(f"/proc/self/fd/{self.read_fd}", os.O_WRONLY | os.O_NONBLOCK)
        written = 0
        try:
            while True:
                try:
                    written += os.write(fd, b"#" * 4096)
                except BlockingIOError:
                    try:
                        written += os.write(fd, b"#")  # the last few bytes
                    except BlockingIOError:
                        break
        finally:
            os.close(fd)
        return written

    def close(self) -> None:
        os.close(self.read_fd)


@pytest.mark.slow
def test_ready_watchdog_cadence_frozen_loop_and_stopping(tmp_path: Path) -> None:
    (tmp_path / "plantbus.toml").write_text(CONFIG.format(port=free_port()))
    notify = NotifySocket()
    stderr = StderrPipe()
    env = {
        **os.environ,
        "NOTIFY_SOCKET": notify.name,
        "WATCHDOG_USEC": str(WATCHDOG_USEC),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("JOURNAL_STREAM", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "plantbus.broker.cli", "run", "-c", "plantbus.toml"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr.write_fd,
    )
    os.close(stderr.write_fd)
    stderr.write_fd = -1
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"plantbus exited:\n{stderr.read_available()}")
            return bool(notify.times("READY=1"))

        wait_until(ready, 60, "READY=1")
        ready_at = notify.times("READY=1")[0]
        # the device outage is real: the Modbus device fails and keeps retrying
        wait_until(
            lambda: "device absent failed" in stderr.read_available(), 30, "the absent device"
        )
        # cadence: a ping every WATCHDOG_USEC/2, none of the gaps near WATCHDOG_USEC
        wait_until(lambda: len(notify.times("WATCHDOG=1")) >= 6, 60, "six watchdog pings")
        pings = notify.times("WATCHDOG=1")
        assert pings[0] >= ready_at
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert all(0.8 < g < WATCHDOG_USEC / 1e6 for g in gaps), gaps
        assert "device absent failed" in stderr.text  # it was down the whole time

        # freeze the loop: a full stderr pipe blocks the daemon's next log line (SIGHUP logs)
        stderr.read_available()
        stderr.fill()
        proc.send_signal(signal.SIGHUP)
        blocked_at = time.monotonic()
        # fill again until nothing fits: tops up what the daemon wrote meanwhile
        wait_until(lambda: stderr.fill() == 0, 10, "a full stderr pipe")
        quiet_from = time.monotonic() + 1.5  # one ping may have been on its way
        wait_until(lambda: time.monotonic() > quiet_from + 3 * WATCHDOG_USEC / 1e6, 30, "quiet")
        assert notify.times("WATCHDOG=1", since=quiet_from) == [], "pings from a frozen loop"
        assert proc.poll() is None
        assert blocked_at < quiet_from

        # reading the pipe thaws the loop: the reload completes and the pings resume
        thawed_at = time.monotonic()
        stop_reading = threading.Event()

        def drain() -> None:
            while not stop_reading.is_set():
                stderr.read_available()
                time.sleep(0.02)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            wait_until(lambda: len(notify.times("WATCHDOG=1", thawed_at)) >= 2, 30, "pings again")
            wait_until(lambda: notify.times("RELOADING=1"), 30, "RELOADING=1")
            reloading = notify.times("RELOADING=1")[0]
            wait_until(lambda: notify.times("READY=1", reloading), 30, "READY=1 after reload")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        finally:
            stop_reading.set()
            reader.join()
        stderr.read_available()
        assert notify.times("STOPPING=1"), notify.messages
        assert re.search(r"watchdog: pings withheld|SIGHUP received", stderr.text)
        assert "device absent failed" in stderr.text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        stderr.close()


def _analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed")
    return path


def test_unit_verifies(tmp_path: Path) -> None:
    analyze = _analyze()
    # verify resolves ExecStart: point it at an executable that exists here
    unit = tmp_path / "plantbus.service"
    text = UNIT.read_text().replace("/opt/plantbus/bin/plantbus", shutil.which("true") or "")
    unit.write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in result.stderr.splitlines() if "plantbus" in line]
    assert result.returncode == 0 and not problems, result.stderr


def test_unit_security_exposure_is_at_most_2(tmp_path: Path) -> None:
    analyze = _analyze()
    unit = tmp_path / "plantbus.service"
    shutil.copy(UNIT, unit)
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


def test_sysusers_file_declares_the_plantbus_system_user() -> None:
    lines = [
        line.split()
        for line in SYSUSERS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0][:3] == ["u", "plantbus", "-"]
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.skip("systemd-sysusers is not installed")
    # --dry-run parses the file and prints what it would create, touching nothing
    result = subprocess.run(
        [sysusers, "--dry-run", str(SYSUSERS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
