"""A real runtime with its consumer API, in the test's event loop, on a free loopback port.

``running(tmp_path, config_text)`` writes the config (``{port}`` and ``{dir}`` filled in),
loads it as ``plantbus run`` does, starts the API and the runtime, and stops both (the
runtime drains) when the block ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
from servers import free_port

from plantbus.broker.api import PUBLISH_PATH, SUBSCRIBE_PATH, ConsumerApi
from plantbus.broker.config import load_config
from plantbus.broker.runtime import Runtime

__all__ = ["Daemon", "bearer", "eventually", "receive_json", "running"]


@dataclass
class Daemon:
    runtime: Runtime
    api: ConsumerApi
    url: str
    dir: Path

    def subscribe_url(self, *filters: str, **options: Any) -> str:
        query = [("filter", f) for f in filters] + [(k, str(v)) for k, v in options.items()]
        return f"{self.url}{SUBSCRIBE_PATH}?{urlencode(query)}"

    def publish_url(self, topic: str | None = None) -> str:
        return f"{self.url}{PUBLISH_PATH}" + (f"?{urlencode({'topic': topic})}" if topic else "")


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, text: str, *, scheme: str = "http", files: dict[str, str] | None = None
) -> AsyncIterator[Daemon]:
    port = free_port()
    for name, content in (files or {}).items():
        (tmp_path / name).write_text(content)
    path = tmp_path / "plantbus.toml"
    path.write_text(text.replace("{port}", str(port)).replace("{dir}", str(tmp_path)))
    config = load_config(path)
    runtime = Runtime(config, config_path=path)
    api = ConsumerApi(config.api, runtime)
    await api.start()
    try:
        await runtime.start()
        try:
            yield Daemon(runtime, api, f"{scheme}://127.0.0.1:{port}", tmp_path)
        finally:
            await runtime.shutdown()
    finally:
        await api.stop()


async def receive_json(ws: aiohttp.ClientWebSocketResponse, within: float = 30.0) -> Any:
    """The next frame, parsed (an array of records or a control object)."""
    msg = await ws.receive(timeout=within)
    if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
        raise AssertionError(f"expected a frame, got {msg.type!r} {msg.data!r} {msg.extra!r}")
    return json.loads(msg.data)


async def eventually(check: Any, within: float, what: str, interval: float = 0.05) -> Any:
    """Await ``check()`` (a coroutine function) until it returns a truthy value, or fail."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)
