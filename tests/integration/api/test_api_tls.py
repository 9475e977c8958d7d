"""TLS on the API listener, with and without client certificates, and ``tap`` over https.

Certificates come from ``bridge_servers.make_certs`` (a test CA, a server certificate for
127.0.0.1 / localhost, a client certificate). The server is the real API in the test's
loop; ``plantbus tap`` runs as a subprocess (asyncio's, so the loop keeps serving).
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
from pathlib import Path

import aiohttp
import pytest
from api_harness import bearer, receive_json, running

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bridges"))
from bridge_servers import Certs, make_certs

from plantbus.broker.api import client_ssl_context

CONFIG = """
[node]
name = "edge"
state_dir = "{dir}/state"

[api]
listen = "127.0.0.1:{port}"
tls = { certificate = "certs/server.pem", private_key = "certs/server.key"%s }

[[api.tokens]]
name = "viewer"
token = "tls-viewer-token"
subscribe = ["plant/#"]

[[devices.sim]]
name = "press"
topic = "plant/press"
interval = "10ms"
points = [{ name = "n", signal = "counter" }]
"""

TOKEN = bearer("tls-viewer-token")


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path / "certs")


async def _subscribe_once(url: str, ctx: ssl.SSLContext | bool) -> list[dict]:  # type: ignore[type-arg]
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
        session.ws_connect(url, headers=TOKEN) as ws,
    ):
        await receive_json(ws)
        return await receive_json(ws)  # type: ignore[no-any-return]


async def _tap(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "plantbus.broker.cli",
        "tap",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PLANTBUS_TOKEN": "tls-viewer-token"},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_tls_listener(tmp_path: Path, certs: Certs) -> None:
    async with running(tmp_path, CONFIG % "", scheme="https") as d:
        url = d.subscribe_url("plant/press")
        records = await _subscribe_once(url, client_ssl_context(certs.ca))
        assert records[0]["topic"] == "plant/press"
        # a client that does not trust the test CA does not get in
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await _subscribe_once(url, True)
        # plain HTTP to the TLS port gets nothing
        with pytest.raises(aiohttp.ClientError):
            await _subscribe_once(url.replace("https://", "http://"), False)
        # tap speaks TLS
        code, out, err = await _tap(
            "--api", d.url, "--ca", str(certs.ca), "--json", "--count", "5", "plant/#"
        )
        assert code == 0, err
        assert [json.loads(line)["topic"] for line in out.splitlines()] == ["plant/press"] * 5
        code, _, err = await _tap("--api", d.url, "--count", "1", "plant/#")
        assert code == 1 and "certificate was not accepted" in err


async def test_client_certificates_required_with_a_ca(tmp_path: Path, certs: Certs) -> None:
    text = CONFIG % ', ca = "certs/ca.pem"'
    async with running(tmp_path, text, scheme="https") as d:
        url = d.subscribe_url("plant/press")
        with_cert = client_ssl_context(certs.ca, certs.client_cert, certs.client_key)
        records = await _subscribe_once(url, with_cert)
        assert records[0]["topic"] == "plant/press"
        # the handshake fails without a client certificate (TLS 1.3 reports it on first read)
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            await _subscribe_once(url, client_ssl_context(certs.ca))
        # and a certificate still does not replace the token
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=with_cert)) as session,
            session.get(f"{d.url}/healthz") as r,
        ):
            assert r.status == 401
        code, out, err = await _tap(
            "--api",
            d.url,
            "--ca",
            str(certs.ca),
            "--cert",
            str(certs.client_cert),
            "--key",
            str(certs.client_key),
            "--json",
            "--count",
            "3",
            "plant/#",
        )
        assert code == 0, err
        assert len(out.splitlines()) == 3
        code, _, err = await _tap("--api", d.url, "--ca", str(certs.ca), "--count", "1", "plant/#")
        assert code == 1, err
