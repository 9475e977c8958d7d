"""API tokens rotate on reload: a rewritten token file or a role's new lists, no restart.

A real runtime and API (``api_harness``); the reload is the one SIGHUP requests. Three
WebSocket clients are open across it: one whose token file is rewritten (closed, 1008,
with the reason), one whose role loses the filter it subscribed to (closed the same way),
and one whose token is unchanged: its counter stream goes on without a gap.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import aiohttp
import pytest
from api_harness import Daemon, bearer, eventually, receive_json, running

CONFIG = """
[node]
name = "edge"
state_dir = "{dir}/state"

[api]
listen = "127.0.0.1:{port}"

[[api.tokens]]
name = "app"
token_file = "app.token"
subscribe = ["plant/#"]

[[api.tokens]]
name = "narrowed"
token = "narrowed-secret"
subscribe = ["plant/#"]

[[api.tokens]]
name = "keeper"
token = "keeper-secret"
subscribe = ["plant/#"]

[[devices.sim]]
name = "press"
topic = "plant/press"
interval = "10ms"
points = [{ name = "n", signal = "counter" }]
"""


async def _refusal(http: aiohttp.ClientSession, d: Daemon, token: str) -> int:
    """The status a WebSocket upgrade to ``plant/#`` with ``token`` is refused with."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(d.subscribe_url("plant/#"), headers=bearer(token))
    return refused.value.status


async def _counters(ws: aiohttp.ClientWebSocketResponse, out: list[int]) -> None:
    """Collect the counter values the client receives until its socket closes."""
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            break
        frame = json.loads(msg.data)
        if isinstance(frame, list):
            out += [int(r["fields"]["n"]) for r in frame]


async def _closed(ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str]:
    while True:
        msg = await ws.receive(timeout=30)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            return ws.close_code, str(msg.extra or "")


async def test_reload_rotates_api_tokens_without_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with (
        running(tmp_path, CONFIG, files={"app.token": "old-app-secret\n"}) as d,
        aiohttp.ClientSession() as http,
    ):
        app = await http.ws_connect(d.subscribe_url("plant/#"), headers=bearer("old-app-secret"))
        narrowed = await http.ws_connect(
            d.subscribe_url("plant/#"), headers=bearer("narrowed-secret")
        )
        keeper = await http.ws_connect(d.subscribe_url("plant/#"), headers=bearer("keeper-secret"))
        for ws in (app, narrowed, keeper):
            assert "subscribed" in await receive_json(ws)
        got: list[int] = []
        keeping = asyncio.create_task(_counters(keeper, got))
        await eventually(lambda: asyncio.sleep(0, len(got) > 20), 30, "keeper's records")

        (tmp_path / "app.token").write_text("new-app-secret\n")
        config = tmp_path / "plantbus.toml"
        config.write_text(
            config.read_text().replace('name = "narrowed"\ntoken = "narrowed-secret"\n'
            'subscribe = ["plant/#"]', 'name = "narrowed"\ntoken = "narrowed-secret"\n'
            'subscribe = ["plant/other/#"]')
        )  # fmt: skip
        d.runtime.request_reload()

        assert await _closed(app) == (1008, "its token was removed from the configuration")
        assert await _closed(narrowed) == (
            1008,
            "token 'narrowed' may not subscribe to 'plant/#' "
            "(its subscribe list: ['plant/other/#'])",
        )
        assert await _refusal(http, d, "old-app-secret") == 401
        fresh = await http.ws_connect(d.subscribe_url("plant/#"), headers=bearer("new-app-secret"))
        assert "subscribed" in await receive_json(fresh)
        assert isinstance(await receive_json(fresh), list)  # records flow to the new token
        await fresh.close()
        assert await _refusal(http, d, "narrowed-secret") == 403

        n = len(got)
        await eventually(lambda: asyncio.sleep(0, len(got) > n + 20), 30, "keeper goes on")
        await keeper.close()
        await keeping
    # the unchanged token's stream went through the reload without a gap or a repeat
    assert got == list(range(got[0], got[0] + len(got)))
    text = caplog.text
    assert "reload: api tokens applied" in text
    assert "api client 1 (app, 127.0.0.1" in text and "closed: its token was removed" in text
    assert "restart plantbus" not in text  # tokens need no restart
    assert "old-app-secret" not in text and "new-app-secret" not in text


OPEN = """
[node]
name = "edge"
state_dir = "{dir}/state"

[api]
listen = "127.0.0.1:{port}"
max_request_size = 1048576

[[devices.sim]]
name = "press"
topic = "plant/press"
interval = "10ms"
points = [{ name = "n", signal = "counter" }]
"""

TOKEN = """
[[api.tokens]]
name = "app"
token_file = "app.token"
subscribe = ["plant/#"]
"""


async def test_tokens_added_by_a_reload_close_local_clients_and_other_keys_wait(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with (
        running(tmp_path, OPEN, files={"app.token": "app-secret\n"}) as d,
        aiohttp.ClientSession() as http,
    ):
        local = await http.ws_connect(d.subscribe_url("plant/#"))
        assert "subscribed" in await receive_json(local)
        config = tmp_path / "plantbus.toml"
        # tokens (applied now) and a key that needs a restart, in one reload
        config.write_text(config.read_text().replace("1048576", "2097152") + TOKEN)
        d.runtime.request_reload()
        assert await _closed(local) == (1008, "tokens are configured now: connect with one")
        assert await _refusal(http, d, "") == 401
        ws = await http.ws_connect(d.subscribe_url("plant/#"), headers=bearer("app-secret"))
        assert "subscribed" in await receive_json(ws)
        await ws.close()
        assert d.api.config.max_request_size == 1048576  # still the running one
    text = caplog.text
    assert "reload: api tokens applied" in text
    assert "reload: [api] changed (api.max_request_size); restart plantbus to apply it" in text
