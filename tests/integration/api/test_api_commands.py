"""Commands through the real consumer API to a real Modbus device (a pymodbus server): what
the access rules mean on the device itself. ``test_api_access.py`` has the ACL matrix
(status codes per token and topic, with a device that takes no commands); here the outcome
is read in the server's own datastore: a refused command (403: a token whose ``publish``
covers every topic but that has no ``write``; no tokens without ``api.local_commands``)
leaves the register as it was, an allowed one (``write``; ``local_commands = true``)
changes it, over HTTP and over the WebSocket.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from api_harness import Daemon, bearer, receive_json, running

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "modbus"))

from modbus_servers import ServerThread, UnitMap

PUBLISHER = "publisher-secret-1"
OPERATOR = "operator-secret-2"

DEVICE = """
[[devices.modbus]]
name = "press"
topic = "plant/press"
host = "127.0.0.1"
port = {modbus}
interval = "100ms"
points = [
  { name = "setpoint", area = "holding", address = 0, writable = true },
  { name = "run", area = "coil", address = 0, writable = true },
]
"""

TOKENS = (
    """
[node]
name = "edge"
state_dir = "{dir}/state"

[api]
listen = "127.0.0.1:{port}"

[[api.tokens]]
name = "publisher"   # publishes and subscribes anywhere, commands nowhere
token = "publisher-secret-1"
subscribe = ["#"]
publish = ["#"]

[[api.tokens]]
name = "operator"
token = "operator-secret-2"
write = ["plant/press"]
"""
    + DEVICE
)

LOCAL = (
    """
[node]
name = "edge"
state_dir = "{dir}/state"

[api]
listen = "127.0.0.1:{port}"
%s
"""
    + DEVICE
)


@pytest.fixture
def server() -> Iterator[ServerThread]:
    with ServerThread([UnitMap(1, holding=[0] * 4, coil=[False] * 4)]) as srv:
        yield srv


def held(server: ServerThread) -> tuple[int, bool]:
    """What the unit holds: the setpoint register and the run coil (its own datastore)."""
    return server.get_values(1, "holding", 0, 1)[0], server.get_values(1, "coil", 0, 1)[0]


async def post_command(
    session: aiohttp.ClientSession, d: Daemon, fields: dict[str, Any], token: str | None
) -> tuple[int, dict[str, Any]]:
    body = json.dumps([{"fields": fields}])
    url = d.publish_url("$cmd/plant/press")
    async with session.post(url, data=body, headers=bearer(token)) as r:
        return r.status, await r.json()


async def ws_command(
    ws: aiohttp.ClientWebSocketResponse, fields: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Send a command frame on a WebSocket subscribed to the reply topic: its answer, and
    the reply record (``None`` when the answer is an error: no command, so no reply)."""
    await ws.send_str(json.dumps([{"topic": "$cmd/plant/press", "fields": fields}]))
    answer: dict[str, Any] | None = None
    reply: dict[str, Any] | None = None
    while answer is None or ("uids" in answer and reply is None):
        frame = await receive_json(ws)
        if isinstance(frame, dict):
            answer = frame
        else:  # records: the device's own polls may come too where the filter covers them
            replies = [r for r in frame if r["topic"] == "$reply/plant/press"]
            if replies:
                (reply,) = replies
    return answer, reply


def commands_handled(d: Daemon) -> int:
    assert d.runtime.commands is not None
    return d.runtime.commands.commands


async def test_only_a_write_acl_changes_the_device(tmp_path: Path, server: ServerThread) -> None:
    text = TOKENS.replace("{modbus}", str(server.port))
    async with running(tmp_path, text) as d, aiohttp.ClientSession() as session:
        # publish = ["#"] covers every topic, but never a command: 403, the unit unchanged
        status, doc = await post_command(session, d, {"setpoint": 99, "run": True}, PUBLISHER)
        assert status == 403 and "needs a `write` entry" in doc["error"]
        async with session.ws_connect(d.subscribe_url("plant/#"), headers=bearer(PUBLISHER)) as ws:
            await receive_json(ws)
            answer, reply = await ws_command(ws, {"setpoint": 98})
        assert answer["status"] == 403 and reply is None
        assert held(server) == (0, False)
        # the write ACL: written, answered, and the unit holds it
        async with session.ws_connect(
            d.subscribe_url("$reply/plant/press"), headers=bearer(OPERATOR)
        ) as ws:
            await receive_json(ws)
            status, doc = await post_command(session, d, {"setpoint": 7}, OPERATOR)
            assert status == 200, doc
            (reply,) = await receive_json(ws)
            assert reply["parent"] == doc["uids"][0] and reply["fields"] == {"setpoint": "ok"}
            assert held(server) == (7, False)
            answer, reply = await ws_command(ws, {"setpoint": 8, "run": True})
            assert reply is not None and reply["parent"] == answer["uids"][0]
            assert reply["fields"] == {"setpoint": "ok", "run": "ok"}
        assert held(server) == (8, True)
        # commands run in order: had a refused one reached the router it would count here
        assert commands_handled(d) == 2


async def test_without_tokens_only_local_commands_change_the_device(
    tmp_path: Path, server: ServerThread
) -> None:
    text = LOCAL.replace("{modbus}", str(server.port))
    async with running(tmp_path, text % "") as d, aiohttp.ClientSession() as session:
        status, doc = await post_command(session, d, {"setpoint": 99}, None)
        assert status == 403 and "api.local_commands is false" in doc["error"]
        async with session.ws_connect(d.subscribe_url("plant/#")) as ws:
            await receive_json(ws)
            answer, reply = await ws_command(ws, {"setpoint": 98})
        assert answer["status"] == 403 and reply is None
        assert held(server) == (0, False)
        assert commands_handled(d) == 0
    other = tmp_path / "local"
    other.mkdir()
    async with (
        running(other, text % "local_commands = true") as d,
        aiohttp.ClientSession() as session,
        session.ws_connect(d.subscribe_url("$reply/plant/press")) as ws,
    ):
        await receive_json(ws)
        status, doc = await post_command(session, d, {"setpoint": 5, "run": True}, None)
        assert status == 200, doc
        (reply,) = await receive_json(ws)
        assert reply["parent"] == doc["uids"][0]
        assert reply["fields"] == {"setpoint": "ok", "run": "ok"}
        assert held(server) == (5, True)
