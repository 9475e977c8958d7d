"""Brokers for the bridge tests: each started once per session, only when a test asks for it.

Mosquitto and RabbitMQ (each a plain listener + a TLS listener that wants a client
certificate; RabbitMQ with its own epmd) and tansu (advertising a session ``TcpProxy`` in
front of it, so that every Kafka connection can be cut), all on free loopback ports in temp
dirs, stopped by PID.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bridge_servers, bridge_harness

from bridge_harness import AmqpBridge, Bridge, KafkaBridge, MqttBridge
from bridge_servers import (
    Certs,
    MosquittoServer,
    RabbitServer,
    TansuServer,
    TcpProxy,
    make_certs,
)
from servers import free_port


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[MosquittoServer]:
    server = MosquittoServer(tmp_path_factory.mktemp("mosquitto"), certs=certs)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[RabbitServer]:
    server = RabbitServer(tmp_path_factory.mktemp("rabbitmq"), certs=certs)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def tansu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TansuServer, TcpProxy]]:
    proxy_port = free_port()
    server = TansuServer(tmp_path_factory.mktemp("tansu"), advertised_port=proxy_port)
    server.start()
    proxy = TcpProxy(server.port, port=proxy_port).start()
    try:
        yield server, proxy
    finally:
        proxy.close()
        server.stop()


@pytest_asyncio.fixture(loop_scope="function")
async def bridge(request: pytest.FixtureRequest) -> AsyncIterator[Bridge]:
    """The bridge named by the test's parameter, against its session broker."""
    kind = request.param
    b: Bridge
    if kind == "mqtt":
        b = MqttBridge(request.getfixturevalue("mosquitto"))
    elif kind == "amqp":
        b = AmqpBridge(request.getfixturevalue("rabbitmq"))
    elif kind == "kafka":
        server, proxy = request.getfixturevalue("tansu")
        b = KafkaBridge(server, proxy)
    else:
        raise ValueError(kind)
    try:
        yield b
    finally:
        await b.close()
