"""Real servers for the tests and benchmarks, each on free loopback ports in a temp dir.

Started once per test session (see conftest.py), stopped by PID. A missing server binary is
a setup failure (``make test`` installs the Debian packages first), never a silent skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

__all__ = ["InfluxServer", "VictoriaMetricsServer", "free_port", "wait_until"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class InfluxServer:
    """An influxd 1.x (Debian's 1.6.7) with its own config, data dir and ports.

    Args:
        base: folder for config, data and log (a temp dir by default).
        auth: start with ``auth-enabled = true`` (create a user with ``create_admin``).
    """

    def __init__(self, base: Path | None = None, *, auth: bool = False):
        self.base = Path(base or tempfile.mkdtemp(prefix="plantbus-influx-"))
        self._own_base = base is None
        self.auth = auth
        self.port = 0
        self.rpc_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._auth_header: dict[str, str] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _config(self) -> str:
        if shutil.which("influxd") is None:
            raise RuntimeError("influxd not found: run `make test` (it installs Debian's influxdb)")
        text = subprocess.run(
            ["influxd", "config"], capture_output=True, text=True, check=True
        ).stdout
        d = str(self.base)
        repl = [
            ("/var/lib/influxdb", d),
            ('bind-address = ":8086"', f'bind-address = "127.0.0.1:{self.port}"'),
            ('bind-address = "127.0.0.1:8088"', f'bind-address = "127.0.0.1:{self.rpc_port}"'),
            ("log-enabled = true", "log-enabled = false"),
            ("query-log-enabled = true", "query-log-enabled = false"),
            ("store-enabled = true", "store-enabled = false"),
            ("reporting-enabled = true", "reporting-enabled = false"),
        ]
        if self.auth:
            repl.append(("auth-enabled = false", "auth-enabled = true"))
        for a, b in repl:
            text = text.replace(a, b)
        return text

    def start(self, timeout: float = 30.0) -> InfluxServer:
        """Start influxd (on new ports the first time, the same ports on a restart)."""
        if not self.port:
            self.port, self.rpc_port = free_port(), free_port()
            self.base.mkdir(parents=True, exist_ok=True)
            (self.base / "influxdb.conf").write_text(self._config())
        log = open(self.base / "influxd.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            ["influxd", "-config", str(self.base / "influxdb.conf")],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                tail = (self.base / "influxd.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"influxd exited with {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=1) as r:
                    return bool(r.status == 204)
            except OSError:
                return False

        wait_until(up, timeout, "influxd /ping")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        """Stop influxd by PID (SIGKILL after ``timeout``, or at once with ``sig=SIGKILL``)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def close(self) -> None:
        self.stop()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> InfluxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- HTTP helpers (sync: tests call them outside the code under test's loop) -------------

    def set_credentials(self, username: str, password: str) -> None:
        import base64

        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        self._auth_header = {"Authorization": f"Basic {token}"}

    def _request(self, path: str, params: dict[str, str], body: bytes | None) -> tuple[int, str]:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        req = urllib.request.Request(url, data=body, method="POST", headers=self._auth_header)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode()

    def query(self, q: str, db: str | None = None, epoch: str = "ns") -> dict:  # type: ignore[type-arg]
        """Run an InfluxQL statement through /query; returns the parsed JSON."""
        params = {"q": q, "epoch": epoch}
        if db:
            params["db"] = db
        status, text = self._request("/query", params, None)
        if status != 200:
            raise RuntimeError(f"/query {q!r} -> {status}: {text}")
        return json.loads(text)  # type: ignore[no-any-return]

    def write(self, db: str, body: bytes, rp: str | None = None) -> tuple[int, str]:
        params = {"db": db, "precision": "ns"}
        if rp:
            params["rp"] = rp
        return self._request("/write", params, body)

    def rows(self, q: str, db: str) -> list[dict]:  # type: ignore[type-arg]
        """Rows of a SELECT as dicts (column -> value), over all series."""
        res = self.query(q, db)["results"][0]
        if "error" in res:
            raise RuntimeError(res["error"])
        out = []
        for series in res.get("series", []):
            cols = series["columns"]
            tags = series.get("tags", {})
            for values in series["values"]:
                row = dict(zip(cols, values, strict=True))
                row.update(tags)
                out.append(row)
        return out

    def count(self, db: str, measurement: str, field: str = "uid") -> int:
        rows = self.rows(f'SELECT count("{field}") FROM "{measurement}"', db)
        return int(rows[0]["count"]) if rows else 0


class VictoriaMetricsServer:
    """A single-node VictoriaMetrics (Debian's ``/usr/bin/victoria-metrics``) in a temp dir.

    It takes line protocol on ``/write`` and ``/api/v2/write``; ``export`` reads series back
    after a forced flush (VictoriaMetrics keeps numbers only, at millisecond precision).

    Args:
        base: folder for data and log (a temp dir by default).
    """

    BINARY = "victoria-metrics"

    def __init__(self, base: Path | None = None):
        self.base = Path(base or tempfile.mkdtemp(prefix="plantbus-vm-"))
        self._own_base = base is None
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> VictoriaMetricsServer:
        if shutil.which(self.BINARY) is None:
            raise RuntimeError(
                "victoria-metrics not found: run `make test` (it installs Debian's package)"
            )
        if not self.port:
            self.port = free_port()
            self.base.mkdir(parents=True, exist_ok=True)
        log = open(self.base / "vm.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [
                self.BINARY,
                f"-httpListenAddr=127.0.0.1:{self.port}",
                f"-storageDataPath={self.base / 'data'}",
                "-retentionPeriod=1",  # month; the tests write "now"
                "-search.latencyOffset=0s",  # points are searchable at once after a flush
                "-search.disableCache",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                tail = (self.base / "vm.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"victoria-metrics exited with {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_until(up, timeout, "victoria-metrics /health")
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """Stop it by PID (SIGKILL after ``timeout``)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def close(self) -> None:
        self.stop()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def flush(self) -> None:
        """Make every point taken so far searchable (``/internal/force_flush``)."""
        with urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=30) as r:
            r.read()

    def export(self, match: str) -> list[dict]:  # type: ignore[type-arg]
        """The series matching a selector from ``/api/v1/export`` (after a flush): dicts with
        ``metric`` (labels), ``values`` and ``timestamps`` (ms)."""
        self.flush()
        q = urllib.parse.urlencode({"match[]": match})
        with urllib.request.urlopen(f"{self.url}/api/v1/export?{q}", timeout=30) as r:
            text = r.read().decode()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def points(
        self, match: str, at_least: int = 1, timeout: float = 30.0
    ) -> dict[tuple[tuple[str, str], ...], dict[int, float]]:
        """labels (sorted pairs) -> {timestamp ms: value} of the matching series, once at
        least ``at_least`` points are searchable (a flushed point can take a moment)."""

        def read() -> dict[tuple[tuple[str, str], ...], dict[int, float]] | None:
            out: dict[tuple[tuple[str, str], ...], dict[int, float]] = {}
            for series in self.export(match):
                labels = tuple(sorted(series["metric"].items()))
                got = out.setdefault(labels, {})
                got.update(zip(series["timestamps"], series["values"], strict=True))
            return out if sum(map(len, out.values())) >= at_least else None

        return wait_until(read, timeout, f"{at_least} points of {match} in VictoriaMetrics", 0.2)  # type: ignore[no-any-return]


def env_pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
