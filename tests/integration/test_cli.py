"""The `plantbus` command as a user runs it: real processes, exit codes, messages, signals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from servers import InfluxServer, free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
PLANTBUS = [sys.executable, "-m", "plantbus.broker.cli"]

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

PRESS = """
[[devices.sim]]
name = "press7"
topic = "plant/h1/press7"
interval = "10ms"
points = [{ name = "n", signal = "counter" }]
"""


def cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PLANTBUS, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def write_config(tmp_path: Path, main: str = MAIN, **conf_d: str) -> Path:
    path = tmp_path / "plantbus.toml"
    path.write_text(textwrap.dedent(main))
    if conf_d:
        (tmp_path / "conf.d").mkdir(exist_ok=True)
        for name, text in conf_d.items():
            (tmp_path / "conf.d" / f"{name}.toml").write_text(textwrap.dedent(text))
    return path


class Daemon:
    """`plantbus run` in the background, its stderr in a file that tests can poll."""

    def __init__(self, config: Path, cwd: Path):
        self.log = cwd / "plantbus.log"
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            [*PLANTBUS, "run", "-c", str(config)],
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=self._log_file,
            text=True,
        )

    @property
    def text(self) -> str:
        return self.log.read_text()

    def wait_log(self, needle: str, timeout: float = 30) -> None:
        def seen() -> bool:
            if needle in self.text:
                return True
            if self.proc.poll() is not None:
                raise AssertionError(f"plantbus exited ({self.proc.returncode}):\n{self.text}")
            return False

        wait_until(seen, timeout, repr(needle))

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log_file.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


@pytest.fixture
def daemons() -> list[Daemon]:
    started: list[Daemon] = []
    yield started  # type: ignore[misc]
    for d in started:
        d.kill()


def emitted(log: str, device: str) -> int:
    m = re.search(rf"drained: device {device} emitted=(\d+)", log)
    assert m, log
    return int(m.group(1))


# -- version and usage ------------------------------------------------------------------------


def test_version_through_the_installed_entry_point(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "plantbus"
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=False)
    assert out.returncode == 0
    assert re.fullmatch(r"plantbus \d+\.\d+\.\d+\S*\n", out.stdout)


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["bogus"],
        ["run", "--no-such-option"],
        ["check", "-c"],
        ["demo", "--duration", "-1"],
        ["demo", "--duration", "soon"],
        ["run", "--log-level", "loud"],
        ["tap"],  # a filter is required
        ["tap", "#", "--count", "0"],
    ],
    ids=lambda a: " ".join(a) or "no-args",
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str]) -> None:
    out = cli(*args, cwd=tmp_path)
    assert out.returncode == 2, out
    assert "usage: plantbus" in out.stderr
    assert "Traceback" not in out.stderr


# -- check --------------------------------------------------------------------------------------


def test_check_ok_counts_devices_and_sinks(tmp_path: Path) -> None:
    config = write_config(tmp_path, press=PRESS, oven=PRESS.replace("press7", "oven2"))
    out = cli("check", "-c", str(config), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "config OK: 2 devices, 1 sink\n"
    assert not (tmp_path / "out").exists(), "check must not touch any sink or device"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (
            {"press": PRESS.replace("interval", "intervall")},
            "conf.d/press.toml: devices.sim[0].intervall: unknown key (did you mean 'interval'?)",
        ),
        (
            {"press": PRESS.replace('"10ms"', '"10 parsecs"')},
            "conf.d/press.toml: devices.sim[0].interval: invalid duration '10 parsecs'",
        ),
        (
            {"press": PRESS + "\n[[devices.sim]\n"},
            "conf.d/press.toml: line 8, column",
        ),
        (
            {"press": PRESS, "press-copy": PRESS},
            "conf.d/press.toml: devices.sim[0].name: duplicate device name 'press7' "
            "(first defined in conf.d/press-copy.toml",
        ),
        (
            {"press": PRESS.replace("[[devices.sim]]", "[[devices.simulator]]")},
            "conf.d/press.toml: devices.simulator: unknown device kind 'simulator'",
        ),
    ],
    ids=["unknown-key", "bad-duration", "toml-syntax", "duplicate-name", "unknown-kind"],
)
def test_check_bad_config_exits_2_naming_file_and_key(
    tmp_path: Path, files: dict[str, str], expected: str
) -> None:
    config = write_config(tmp_path, **files)
    out = cli("check", "-c", str(config), cwd=tmp_path)
    assert out.returncode == 2, out
    assert expected in out.stderr
    assert "Traceback" not in out.stderr
    assert re.search(r"config invalid: \d+ errors?\n$", out.stderr)
    assert out.stdout == ""


def test_check_bad_main_file_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, MAIN.replace('name = "edge"', 'name = "edge"\nnmae = "x"'))
    out = cli("check", "-c", str(config), cwd=tmp_path)
    assert out.returncode == 2
    assert "plantbus.toml: node.nmae: unknown key" in out.stderr
    assert "Traceback" not in out.stderr


def test_check_missing_file_exits_2(tmp_path: Path) -> None:
    out = cli("check", "-c", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert out.returncode == 2
    assert "nope.toml" in out.stderr
    assert "Traceback" not in out.stderr


# -- run ----------------------------------------------------------------------------------------


def test_run_bad_config_exits_2_without_traceback(tmp_path: Path) -> None:
    config = write_config(tmp_path, press=PRESS.replace("interval", "intervall"))
    out = cli("run", "-c", str(config), cwd=tmp_path)
    assert out.returncode == 2
    assert "conf.d/press.toml: devices.sim[0].intervall: unknown key" in out.stderr
    assert "Traceback" not in out.stderr


BROKEN_SINK = '''
"""A sink kind whose build always fails, registered by the wrapper below."""
from plantbus.broker.sinks.base import SinkConfig


class Config(SinkConfig):
    pass


def build(config, ctx):
    raise PermissionError(13, "Permission denied", "/var/lib/plantbus/out.lp")
'''

WRAPPER = """
import sys
from plantbus.broker import registry
registry.SINK_KINDS["broken"] = "broken_sink"
from plantbus.broker.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_run_with_a_sink_that_cannot_be_built_exits_1(tmp_path: Path) -> None:
    (tmp_path / "broken_sink.py").write_text(BROKEN_SINK)
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    config = write_config(tmp_path, MAIN + '\n[[sinks.broken]]\nname = "archive"\n', press=PRESS)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, str(tmp_path / "wrapper.py"), "run", "-c", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 1, out.stderr
    assert (
        "cannot start: plantbus.toml: sinks.broken[0]: sink 'archive' could not be built: "
        "PermissionError: [Errno 13] Permission denied: '/var/lib/plantbus/out.lp'"
    ) in out.stderr
    assert "Traceback" not in out.stderr
    assert "running:" not in out.stderr  # nothing was started


def test_run_sigterm_drains_the_file_sink_and_exits_0(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    d = Daemon(write_config(tmp_path, press=PRESS), tmp_path)
    daemons.append(d)
    out = tmp_path / "out" / "plantbus.lp"
    wait_until(lambda: out.exists() and out.stat().st_size > 0, 30, "lines in the file sink")
    d.signal(signal.SIGTERM)
    assert d.wait() == 0, d.text
    log = d.text
    assert "SIGTERM received: draining (at most 10s)" in log
    n = emitted(log, "press7")
    lines = out.read_text().splitlines()
    assert len(lines) == n
    assert re.search(rf"drained: sink lp delivered={n} undelivered=0 ", log)
    assert "Traceback" not in log


def test_second_sigint_forces_exit_1(tmp_path: Path, daemons: list[Daemon]) -> None:
    # an InfluxDB that is not there: the drain would wait the whole shutdown_timeout
    main = MAIN.replace('name = "edge"', 'name = "edge"\nshutdown_timeout = "60s"') + (
        f'\n[[sinks.influxdb]]\nname = "gone"\nurl = "http://127.0.0.1:{free_port()}"\n'
        'database = "x"\nretry_initial = "50ms"\nretry_max = "100ms"\n'
    )
    d = Daemon(write_config(tmp_path, main, press=PRESS), tmp_path)
    daemons.append(d)
    d.wait_log("running:")
    wait_until(lambda: "gone" in d.text and "fail" in d.text.lower(), 30, "a failing sink")
    d.signal(signal.SIGINT)
    d.wait_log("SIGINT received: draining (at most 60s; Ctrl-C again to force)")
    d.signal(signal.SIGINT)
    assert d.wait(timeout=15) == 1, d.text
    assert "forced exit" in d.text


def test_sighup_adds_a_device_without_restarting_the_others(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    config = write_config(tmp_path, press=PRESS)
    d = Daemon(config, tmp_path)
    daemons.append(d)
    d.wait_log("running:")
    (tmp_path / "conf.d" / "oven.toml").write_text(PRESS.replace("press7", "oven2"))
    d.signal(signal.SIGHUP)
    d.wait_log("reload: device oven2 added")
    assert "press7 restarted" not in d.text
    out = tmp_path / "out" / "plantbus.lp"
    wait_until(lambda: b"oven2," in out.read_bytes(), 30, "oven2 records in the file")
    d.signal(signal.SIGTERM)
    assert d.wait() == 0, d.text
    lines = out.read_bytes().splitlines()
    press = [ln for ln in lines if ln.startswith(b"press7,")]
    # press7 ran through the reload as one unbroken counter sequence
    values = [int(re.search(rb" n=(\d+)i", ln).group(1)) for ln in press]  # type: ignore[union-attr]
    assert values == list(range(emitted(d.text, "press7")))
    assert emitted(d.text, "oven2") == sum(1 for ln in lines if ln.startswith(b"oven2,"))


# -- demo ---------------------------------------------------------------------------------------


def demo_device_count() -> int:
    from plantbus.broker.demo import demo_config, load_simulators

    simulators, _ = load_simulators()
    return len(demo_config(Path("unused"), None, simulators).devices)


def test_demo_package_copy_matches_the_repository_config() -> None:
    packaged = (REPO / "broker" / "demo.toml").read_text()
    assert packaged == (REPO / "config" / "demo.toml").read_text(), (
        "broker/demo.toml is the packaged copy of config/demo.toml: copy it over"
    )


def test_demo_without_view_runs_for_its_duration_and_exits_0(tmp_path: Path) -> None:
    out = cli("demo", "--no-view", "--duration", "2", "--dir", "demo-out", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    m = re.search(
        r"demo stopped: (\d+) records in \d+s from (\d+) devices; demo delivered=(\d+) "
        r"queued=0",
        out.stdout,
    )
    assert m, out.stdout
    # the sim devices of demo.toml plus those of every protocol simulator registered
    assert int(m.group(2)) == demo_device_count()
    assert m.group(1) == m.group(3) and int(m.group(1)) > 100
    lines = (tmp_path / "demo-out" / "plantbus.lp").read_text().splitlines()
    assert len(lines) == int(m.group(1))
    assert "demo ran 2s: draining" in out.stderr


def test_demo_with_influx_writes_to_the_plantbus_database(
    tmp_path: Path, influxdb: InfluxServer
) -> None:
    influxdb.query('DROP DATABASE "plantbus"')
    try:
        out = cli(
            "demo",
            "--no-view",
            "--duration",
            "2",
            "--dir",
            "d",
            "--influx",
            influxdb.url,
            cwd=tmp_path,
        )
        assert out.returncode == 0, out.stderr
        m = re.search(
            r"demo stopped: (\d+) records .* influxdb delivered=(\d+) queued=0", out.stdout
        )
        assert m and m.group(1) == m.group(2), out.stdout
        rows = influxdb.rows('SELECT count("uid") FROM /.*/', "plantbus")
        assert len(rows) >= 3  # press7, oven2, vib3 and the protocol simulators' devices
        assert sum(int(r["count"]) for r in rows) == int(m.group(1))
    finally:
        influxdb.query('DROP DATABASE "plantbus"')


def test_demo_with_a_bad_influx_url_exits_2(tmp_path: Path) -> None:
    out = cli("demo", "--no-view", "--influx", "localhost:8086", cwd=tmp_path)
    assert out.returncode == 2
    assert "sinks.influxdb[0].url: invalid url 'localhost:8086'" in out.stderr
    assert "Traceback" not in out.stderr
