"""Access control of the consumer API against the real server: token x operation x topic.

Every cell of ``MATRIX`` is one request to the running API (a WebSocket upgrade for
``subscribe``, a POST for ``publish``, a GET of ``/healthz``); the test collects every cell
whose answer differs and reports them all at once. Then the paths a matrix cannot show:
a command allowed by ``write`` reaches the command router (its reply comes back), commands
without tokens need ``local_commands``, and without tokens a client from another address
is refused. What these rules leave on a real device (a pymodbus server's register changed
or not) is in ``test_api_commands.py``.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import aiohttp
import pytest
from api_harness import bearer, receive_json, running
from servers import free_port

from plantbus.broker.api import ConsumerApi
from plantbus.broker.config import ApiConfig, load_config
from plantbus.broker.runtime import Runtime

TOKENS = {
    "reader": "reader-secret-1",
    "app": "app-secret-2",  # from a token_file
    "operator": "operator-secret-3",
}

CONFIG = """
[node]
name = "edge"
state_dir = "{dir}/state"

[api]
listen = "127.0.0.1:{port}"

[[api.tokens]]
name = "reader"
token = "reader-secret-1"
subscribe = ["plant/#"]

[[api.tokens]]
name = "app"
token_file = "app.token"
subscribe = ["plant/#", "analytics/#"]
publish = ["analytics/#"]

[[api.tokens]]
name = "operator"
token = "operator-secret-3"
subscribe = ["plant/+"]
publish = ["analytics/press/#"]
write = ["plant/press"]

[[devices.sim]]
name = "press"
topic = "plant/press"
interval = "50ms"
points = [{ name = "n", signal = "counter" }]

[[sinks.file]]
path = "out.lp"
subscribe = ["plant/#", "analytics/#"]
flush_interval = "50ms"
"""

# columns: no token, a wrong token, then the roles; "ok" = 200 (101 for a subscribe)
MATRIX = """
op         topic                none  wrong  reader  app  operator
subscribe  plant/#              401   401    ok      ok   403
subscribe  plant/press          401   401    ok      ok   ok
subscribe  analytics/#          401   401    403     ok   403
subscribe  #                    401   401    403     403  403
subscribe  $reply/plant/press   401   401    403     403  ok
subscribe  $cmd/plant/press     401   401    403     403  403
subscribe  other/x              401   401    403     403  403
publish    plant/press          401   401    403     403  403
publish    analytics/press/z    401   401    403     ok   ok
publish    analytics/line/z     401   401    403     ok   403
publish    other/x              401   401    403     403  403
publish    $cmd/plant/press     401   401    403     403  ok
publish    $cmd/plant/other     401   401    403     403  403
publish    $reply/plant/press   401   401    403     403  403
health     -                    401   401    ok      ok   ok
"""


def _cells() -> list[tuple[str, str, str, str]]:
    lines = [line.split() for line in MATRIX.strip().splitlines()]
    header, rows = lines[0], lines[1:]
    who = header[2:]
    cells = []
    for op, topic, *wants in rows:
        cells.extend((op, topic, w, want) for w, want in zip(who, wants, strict=True))
    return cells


def _token(who: str) -> str | None:
    return {"none": None, "wrong": "not-a-token"}.get(who, TOKENS.get(who))


async def _status(session: aiohttp.ClientSession, d, op: str, topic: str, token: str | None) -> str:  # type: ignore[no-untyped-def]
    headers = bearer(token)
    if op == "subscribe":
        try:
            async with session.ws_connect(d.subscribe_url(topic), headers=headers) as ws:
                hello = await receive_json(ws)
                assert hello["subscribed"] == [topic]
                return "ok"
        except aiohttp.WSServerHandshakeError as e:
            return str(e.status)
    if op == "publish":
        body = json.dumps([{"topic": topic, "fields": {"v": 1.5}}])
        async with session.post(d.publish_url(), data=body, headers=headers) as r:
            doc = await r.json()
            if r.status == 200:
                assert doc["published"] == 1
                return "ok"
            assert doc["status"] == r.status and doc["error"]
            return str(r.status)
    async with session.get(f"{d.url}/healthz", headers=headers) as r:
        return "ok" if r.status == 200 else str(r.status)


async def test_every_token_operation_and_topic(tmp_path: Path) -> None:
    async with (
        running(tmp_path, CONFIG, files={"app.token": TOKENS["app"] + "\n"}) as d,
        aiohttp.ClientSession() as session,
    ):
        cells = _cells()
        wrong = []
        for op, topic, who, want in cells:
            got = await _status(session, d, op, topic, _token(who))
            if got != want:
                wrong.append(f"{who} {op} {topic}: got {got}, want {want}")
        assert not wrong, "\n".join(wrong)
        assert len(cells) == 15 * 5
        # the refusals are counted by status, and a 401 says how to authenticate
        assert d.api.refused[401] == 30
        async with session.get(f"{d.url}/healthz") as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert "missing token" in (await r.json())["error"]


async def test_a_write_acl_lets_a_command_reach_the_device_and_its_reply_back(
    tmp_path: Path,
) -> None:
    async with (
        running(tmp_path, CONFIG, files={"app.token": TOKENS["app"]}) as d,
        aiohttp.ClientSession() as session,
    ):
        op = bearer(TOKENS["operator"])
        async with session.ws_connect(d.subscribe_url("$reply/plant/press"), headers=op) as ws:
            await receive_json(ws)
            body = json.dumps([{"fields": {"n": 5}}])
            async with session.post(d.publish_url("$cmd/plant/press"), data=body, headers=op) as r:
                assert r.status == 200, await r.text()
                (uid,) = (await r.json())["uids"]
            (reply,) = await receive_json(ws)
        # the router answered the command (a sim device takes no commands): it got there
        assert reply["parent"] == uid
        assert reply["topic"] == "$reply/plant/press"
        assert reply["fields"] == {"n": "refused: device 'press' does not take commands"}
        # the app token may publish analytics but not commands: refused, and no reply
        async with session.post(
            d.publish_url("$cmd/plant/press"), data=body, headers=bearer(TOKENS["app"])
        ) as r:
            assert r.status == 403
            assert "needs a `write` entry" in (await r.json())["error"]
        assert d.runtime.commands is not None and d.runtime.commands.commands == 1


LOCAL = """
[node]
name = "edge"
state_dir = "{dir}/state"

[api]
listen = "127.0.0.1:{port}"
unix = "{dir}/api.sock"
%s

[[devices.sim]]
name = "press"
topic = "plant/press"
interval = "1s"
points = [{ name = "n", signal = "counter" }]
"""


async def _command(session: aiohttp.ClientSession, url: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    body = json.dumps([{"topic": "$cmd/plant/press", "fields": {"n": 1}}])
    async with session.post(url, data=body) as r:
        return r.status, await r.json()


async def test_without_tokens_commands_need_local_commands(tmp_path: Path) -> None:
    async with running(tmp_path, LOCAL % "") as d, aiohttp.ClientSession() as session:
        status, doc = await _command(session, d.publish_url())
        assert status == 403
        assert "api.local_commands is false" in doc["error"]
        # anything else is fine for a local client, over TCP and over the Unix socket
        async with session.post(d.publish_url("analytics/x"), data=b'[{"fields": {"v": 1}}]') as r:
            assert r.status == 200
        unix = aiohttp.UnixConnector(path=str(tmp_path / "api.sock"))
        async with aiohttp.ClientSession(connector=unix) as over_unix:
            async with over_unix.get("http://plantbus/healthz") as r:
                assert r.status == 200
            status, _ = await _command(over_unix, "http://plantbus/v1/publish")
            assert status == 403
    other = tmp_path / "other"
    other.mkdir()
    async with (
        running(other, LOCAL % "local_commands = true") as d,
        aiohttp.ClientSession() as session,
        session.ws_connect(d.subscribe_url("$reply/plant/press")) as ws,
    ):
        await receive_json(ws)
        status, doc = await _command(session, d.publish_url())
        assert status == 200, doc
        (reply,) = await receive_json(ws)
        assert reply["parent"] == doc["uids"][0]


def _outward_address() -> str | None:
    """An address of this machine that is not loopback (the route to a documentation net)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        host = s.getsockname()[0]
    return None if host.startswith("127.") else str(host)


async def test_without_tokens_a_client_from_another_address_is_refused(tmp_path: Path) -> None:
    # `plantbus check` refuses such a listener (tests/unit/test_api_config.py); the server
    # refuses the clients too, should it be built from a config that was not checked
    host = _outward_address()
    if host is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    port = free_port()
    path = tmp_path / "plantbus.toml"
    path.write_text(f'[node]\nname = "edge"\nstate_dir = "{tmp_path}"\n')
    runtime = Runtime(load_config(path))
    api = ConsumerApi(ApiConfig(listen=f"0.0.0.0:{port}"), runtime)
    await api.start()
    try:
        await runtime.start()
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://{host}:{port}/healthz") as r:
                    assert r.status == 403
                    assert "loopback and Unix-socket clients only" in (await r.json())["error"]
                async with session.get(f"http://127.0.0.1:{port}/healthz") as r:
                    assert r.status == 200
        finally:
            await runtime.shutdown()
    finally:
        await api.stop()
