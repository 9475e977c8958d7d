"""No secret ever leaves plantbus: a real `plantbus run` at debug level, grepped for them.

Every secret is a distinct random string, given inline, through ``<key>_file`` and through
``${VAR}``, to sinks and devices that connect (MQTT with the right password), that are
refused (a wrong password against a real Mosquitto with auth, a real RabbitMQ and a real
asyncua server with users and message security) and that find nobody listening (InfluxDB
1.x and 2.x, Kapacitor, Kafka, OPC UA). Once each of them has failed (seen in ``/healthz``
and the log), the daemon is reloaded (SIGHUP) and stopped; its stderr,
the ``/healthz`` and ``/metrics`` bodies and the output of ``plantbus check`` must hold none
of the secrets, nor the base64 of a basic-auth ``user:password``.

``/metrics`` is scraped from the daemon; the collector is also scraped from an in-process
runtime with the same config (``registry_for``) once every failure has happened.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from servers import free_port, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parent / "bridges"))
sys.path.insert(0, str(Path(__file__).resolve().parent / "opcua"))
from bridge_servers import MosquittoServer, RabbitServer
from opcua_harness import UaServer, base_variables, make_cert

from plantbus.broker.config import load_config
from plantbus.broker.metrics import exposition, registry_for
from plantbus.broker.runtime import Runtime

pytestmark = pytest.mark.slow

PLANTBUS = [sys.executable, "-m", "plantbus.broker.cli"]
MQTT_USER = "plant"
UA_SERVER_URI = "urn:plantbus:test-server"


def _secret(what: str) -> str:
    return f"{what}-{secrets.token_urlsafe(16)}"


@pytest.fixture
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitServer]:
    server = RabbitServer(tmp_path_factory.mktemp("rabbitmq"))
    server.start()
    try:
        yield server
    finally:
        server.close()


class Setup:
    """The config folder, the environment and every secret in them."""

    def __init__(self, tmp_path: Path, mqtt_password: str, mosquitto: int, rabbit: int, ua: UaAuth):
        self.dir = tmp_path
        s = {
            name: _secret(name)
            for name in (
                "api-inline",
                "api-file",
                "api-env",
                "mq-bad-inline",
                "rabbit-env",
                "influx2-env",
                "influx1-file",
                "kapacitor-inline",
                "kafka-file",
                "mqdev-env",
                "opcua-inline",
                "opcua-file",
            )
        }
        s["mq-good-file"] = mqtt_password
        self.secrets = s
        self.api_port = free_port()
        dead = free_port()  # nobody listens there
        (tmp_path / "secrets").mkdir(parents=True)
        for name in ("api-file", "influx1-file", "kafka-file", "mq-good-file", "opcua-file"):
            path = tmp_path / "secrets" / name
            path.write_text(s[name] + "\n")
            path.chmod(0o644)  # world-readable: `check` warns
        self.env = {
            **os.environ,
            "PB_API_TOKEN": s["api-env"],
            "PB_RABBIT_PASSWORD": s["rabbit-env"],
            "PB_INFLUX_TOKEN": s["influx2-env"],
            "PB_MQDEV_PASSWORD": s["mqdev-env"],
        }
        main = tmp_path / "plantbus.toml"
        main.write_text(
            f"""
[node]
name = "edge"
state_dir = "state"
log_level = "debug"
shutdown_timeout = "3s"

[api]
listen = "127.0.0.1:{self.api_port}"
[[api.tokens]]
name = "inline"
token = "{s["api-inline"]}"
[[api.tokens]]
name = "file"
token_file = "secrets/api-file"
[[api.tokens]]
name = "env"
token = "${{PB_API_TOKEN}}"

[[devices.sim]]
name = "count"
interval = "50ms"
points = [{{ name = "n", signal = "counter" }}]

[[sinks.mqtt]]
name = "mq-good"
url = "mqtt://127.0.0.1:{mosquitto}"
username = "{MQTT_USER}"
password_file = "secrets/mq-good-file"
retry_max = "200ms"

[[sinks.amqp]]
name = "rabbit"
url = "amqp://127.0.0.1:{rabbit}/"
exchange = "plant"
username = "guest"
password = "${{PB_RABBIT_PASSWORD}}"
retry_max = "200ms"

[[sinks.influxdb]]
name = "influx2"
url = "http://127.0.0.1:{dead}"
org = "o"
bucket = "b"
token = "${{PB_INFLUX_TOKEN}}"
"""
        )
        main.chmod(0o644)
        conf_d = tmp_path / "conf.d"
        conf_d.mkdir()
        other = conf_d / "more.toml"
        other.write_text(
            f"""
[[sinks.mqtt]]
name = "mq-bad"
url = "mqtt://127.0.0.1:{mosquitto}"
username = "{MQTT_USER}"
password = "{s["mq-bad-inline"]}"
retry_max = "200ms"

[[sinks.influxdb]]
name = "influx1"
url = "http://127.0.0.1:{dead}"
database = "plant"
username = "writer"
password_file = "../secrets/influx1-file"

[[sinks.kapacitor]]
name = "kapacitor"
url = "http://127.0.0.1:{dead}"
database = "plant"
username = "writer"
password = "{s["kapacitor-inline"]}"

[[sinks.kafka]]
name = "kafka"
bootstrap_servers = ["127.0.0.1:{dead}"]
username = "writer"
password_file = "../secrets/kafka-file"
retry_max = "200ms"

[[devices.mqtt]]
name = "mqdev"
url = "mqtt://127.0.0.1:{mosquitto}"
username = "{MQTT_USER}"
password = "${{PB_MQDEV_PASSWORD}}"
subscriptions = [{{ filter = "in/#" }}]

[[devices.opcua]]
name = "plc"
url = "opc.tcp://127.0.0.1:{dead}"
username = "operator"
password = "{s["opcua-inline"]}"
timeout = "500ms"
reconnect_initial = "100ms"
reconnect_max = "200ms"
points = [{{ name = "a", node = "ns=2;i=1" }}]

[[devices.opcua]]
name = "plc-auth"
url = "{ua.server.url}"
username = "operator"
password_file = "../secrets/opcua-file"
timeout = "2s"
reconnect_initial = "100ms"
reconnect_max = "200ms"
security.certificate = "{ua.client_cert}"
security.private_key = "{ua.client_key}"
security.trust = ["{ua.server_cert}"]
points = [{{ name = "temp", node = "{ua.server.node("s=Line1.Temp")}" }}]
"""
        )
        other.chmod(0o644)
        self.main = main

    def opcua_refused(self) -> bool:
        """Whether both OPC UA devices have failed to connect (each logs it once a try)."""
        text = (self.dir / "plantbus.log").read_text()
        return all(f"opcua {name}: cannot connect" in text for name in ("plc", "plc-auth"))

    def leaks(self, text: str) -> list[str]:
        """The secrets (or a basic-auth header of one) that ``text`` holds."""
        found = []
        for name, value in self.secrets.items():
            forms = [value]
            for user in (MQTT_USER, "guest", "writer", "operator"):
                forms.append(base64.b64encode(f"{user}:{value}".encode()).decode())
            if any(f in text for f in forms):
                found.append(name)
        return found


def _get(url: str, token: str) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


FAILING_SINKS = ("rabbit", "mq-bad", "influx1", "influx2", "kapacitor", "kafka")


def _all_failed(health: dict[str, Any]) -> bool:
    sinks, devices = health["sinks"], health["devices"]
    return (
        all(sinks[n]["last_error"] for n in FAILING_SINKS)
        and sinks["mq-good"]["connected"]
        and devices["mqdev"]["last_error"]
        # an OPC UA device stays up while its server is away, its points reported Bad
        and devices["plc"]["emitted"] > 0
    )


class UaAuth:
    """An asyncua server that takes user ``operator`` with its own password, over security."""

    def __init__(self, folder: Path):
        self.server_cert, server_key, _, _ = make_cert(folder / "server", "ua", UA_SERVER_URI)
        self.client_cert, self.client_key, _, _ = make_cert(
            folder / "client", "edge", "urn:edge:plantbus"
        )
        spec = {
            "variables": base_variables(),
            "security": {
                "certificate": str(self.server_cert),
                "private_key": str(server_key),
                "application_uri": UA_SERVER_URI,
                "policies": ["Basic256Sha256_SignAndEncrypt"],
                "users": {"operator": _secret("opcua-right")},
            },
        }
        self.server = UaServer(spec, folder)


def test_no_secret_in_logs_check_healthz_or_metrics(tmp_path: Path, rabbitmq: RabbitServer) -> None:
    mqtt_password = _secret("mq-good-file")
    mosquitto = MosquittoServer(tmp_path / "mosquitto", users={MQTT_USER: mqtt_password})
    ua = UaAuth(tmp_path / "ua")
    mosquitto.start()
    try:
        ua.server.start()
        setup = Setup(tmp_path / "node", mqtt_password, mosquitto.port, rabbitmq.port, ua)
        _run_daemon(setup)
        _scrape_in_process(setup)
    finally:
        ua.server.stop()
        mosquitto.stop()


def _run_daemon(setup: Setup) -> None:
    check = subprocess.run(
        [*PLANTBUS, "check", "-c", str(setup.main)],
        env=setup.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    check_output = check.stdout + check.stderr
    assert check.returncode == 0, check_output
    # the warnings name each file and key, never a value
    assert "plantbus.toml: WARNING: holds secrets (api.tokens[0].token)" in check_output
    assert (
        "conf.d/more.toml: WARNING: holds secrets (sinks.mqtt[0].password, "
        "sinks.kapacitor[0].password, devices.opcua[0].password)" in check_output
    )
    assert "secrets/kafka-file' (mode 0644) of sinks.kafka[0].password_file" in check_output
    assert setup.leaks(check_output) == []

    log_path = setup.dir / "plantbus.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [*PLANTBUS, "run", "-c", str(setup.main), "--log-level", "debug"],
            cwd=setup.dir,
            env=setup.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        api = f"http://127.0.0.1:{setup.api_port}"
        token = setup.secrets["api-env"]
        health: dict[str, Any] = {}

        def failed_everywhere() -> bool:
            nonlocal health
            assert proc.poll() is None, log_path.read_text()
            try:
                status, body = _get(f"{api}/healthz", token)
            except OSError:
                return False
            health = json.loads(body)
            return status in (200, 503) and _all_failed(health) and setup.opcua_refused()

        try:
            wait_until(failed_everywhere, 60, "every failing sink and device to have failed")
        except TimeoutError:
            raise AssertionError(json.dumps(health, indent=1)) from None
        # each token works, whichever way it was given
        for name in ("api-inline", "api-file", "api-env"):
            assert _get(f"{api}/healthz", setup.secrets[name])[0] in (200, 503), name
        assert _get(f"{api}/healthz", "not-a-token")[0] == 401
        _, healthz = _get(f"{api}/healthz", token)
        metrics_status, metrics = _get(f"{api}/metrics", token)
        assert metrics_status == 200 and "plantbus_sink_retries" in metrics, metrics[:2000]
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "SIGHUP received" in log_path.read_text(), 30, "the reload")
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log_text = log_path.read_text()
    # the failures really happened, and were logged (at debug level, with tracebacks)
    errors = {n: str(health["sinks"][n]["last_error"]) for n in FAILING_SINKS}
    assert "ACCESS_REFUSED" in errors["rabbit"] or "refused" in errors["rabbit"].lower(), errors
    assert "refused the connection" in errors["mq-bad"], errors
    assert " DEBUG " in log_text and "SIGHUP received" in log_text
    assert "WARNING" in log_text and "holds secrets" in log_text
    assert setup.leaks(log_text) == [], log_text[-5000:]
    assert setup.leaks(healthz) == [], healthz
    assert setup.leaks(metrics) == [], metrics


def _scrape_in_process(setup: Setup) -> None:
    """The collector's exposition of a runtime with the same config, once all have failed."""
    from plantbus.broker.api import ConsumerApi

    saved = dict(os.environ)
    os.environ.update(setup.env)
    try:
        config = load_config(setup.main)
    finally:
        os.environ.clear()
        os.environ.update(saved)

    async def scrape() -> tuple[str, str]:
        runtime = Runtime(config, config_path=setup.main)
        api = ConsumerApi(config.api, runtime)  # /healthz's body, without listening
        await runtime.start()
        try:
            deadline = asyncio.get_running_loop().time() + 90
            while not _all_failed(api.health()[1]):
                assert asyncio.get_running_loop().time() < deadline, api.health()
                await asyncio.sleep(0.1)
            body, _ = exposition(registry_for(runtime))
            return body.decode(), json.dumps(api.health()[1])
        finally:
            await runtime.shutdown()

    metrics, health = asyncio.run(scrape())
    assert "plantbus_sink_" in metrics  # a real scrape
    assert setup.leaks(metrics) == [], metrics
    assert setup.leaks(health) == [], health
