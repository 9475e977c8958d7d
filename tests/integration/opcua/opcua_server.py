"""A real asyncua ``Server`` as its own process, for the opcua tests and the opcua benchmark.

Run as ``python opcua_server.py SPEC.json``; it prints one JSON line when it listens
(``{"ready": true, "port": …}``), then answers one JSON command per stdin line with one
JSON line on stdout. Its own process, so a test can restart it, kill it or freeze it with
SIGSTOP (TCP stays open, nothing answers), and so its CPU is not the benchmark's.

The spec (JSON)::

    {"port": 48400,
     "namespace": "urn:plantbus:test",   # registered as ns=2
     "variables": [{"node": "s=Line1.Temp", "name": "Temp", "parent": "Line1",
                    "type": "Double", "value": 21.5,
                    "readonly": false,                 # readonly: not set_writable
                    "unreadable": false,               # Reads of its Value: BadNotReadable
                    "clamp": [0, 80],                  # writes kept within [low, high]
                    "stall_reads": 2.0}, ...],         # the first Read of its Value after a
                                                       # write stalls the server (seconds)
     "max_nodes_per_read": 7,            # published in OperationLimits and enforced
     "security": {"certificate": "server.der", "private_key": "server.pem",
                  "application_uri": "urn:…", "policies": ["Basic256Sha256_Sign", …],
                  "users": {"operator": "secret"}},
     "writer": {"period": 0.02, "first": 0, "count": 1000}}  # change values on a timer

Commands: ``read`` (the value a node holds and its VariantType),
``write`` (one value, optional status code and source time), ``write_many``
(values sharing one source and one server time), ``add`` (a variable), ``delete`` (a
node; asyncua's server does not tell its monitored items), ``limit`` (publish and
enforce MaxNodesPerRead; 0: none), ``reads`` (sizes of the Read requests for our namespace
since the last ``reads``), ``writer`` (start changing ``count`` variables every ``period``
s, all with one source time; ``period`` 0 stops it), ``stats`` (values the writer wrote and
the CPU seconds of this process), ``stop``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole

TYPES = {
    "Boolean": ua.VariantType.Boolean,
    "Int16": ua.VariantType.Int16,
    "Int32": ua.VariantType.Int32,
    "Int64": ua.VariantType.Int64,
    "UInt16": ua.VariantType.UInt16,
    "UInt32": ua.VariantType.UInt32,
    "Float": ua.VariantType.Float,
    "Double": ua.VariantType.Double,
    "String": ua.VariantType.String,
    "DateTime": ua.VariantType.DateTime,
    "ByteString": ua.VariantType.ByteString,
    "LocalizedText": ua.VariantType.LocalizedText,
}


class Users:
    """Username/password check for the server (asyncua's ``UserManager`` shape)."""

    def __init__(self, users: dict[str, str]):
        self.users = users

    def get_user(
        self, iserver: Any, username: Any = None, password: Any = None, certificate: Any = None
    ) -> User | None:
        if username is None:
            return None  # anonymous is refused when users are configured
        if self.users.get(username) == password:
            return User(role=UserRole.User)
        return None


def _value(spec: dict[str, Any]) -> Any:
    v = spec["value"]
    if spec.get("type") == "DateTime" and isinstance(v, int | float):
        return datetime.fromtimestamp(v / 1e9, UTC)
    if spec.get("type") == "ByteString":
        return bytes.fromhex(v)
    if spec.get("type") == "LocalizedText":
        return ua.LocalizedText(v)
    return v


def _variant(spec: dict[str, Any]) -> ua.Variant:
    if "type" in spec:
        return ua.Variant(_value(spec), TYPES[spec["type"]])
    return ua.Variant(spec["value"])


def _datavalue(
    spec: dict[str, Any], source_ns: int | None, now: datetime | None = None
) -> ua.DataValue:
    now = now or datetime.now(UTC)
    src = datetime.fromtimestamp(source_ns / 1e9, UTC) if source_ns is not None else now
    return ua.DataValue(
        _variant(spec),
        StatusCode=ua.StatusCode(spec.get("status", 0)),
        SourceTimestamp=src,
        ServerTimestamp=now,
    )


class Harness:
    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        users = (spec.get("security") or {}).get("users")
        self.server = Server(user_manager=Users(users)) if users else Server()
        self.idx = 0
        self.read_sizes: list[int] = []
        self.limit = 0  # MaxNodesPerRead enforced (0: none)
        self.written = 0
        self.writer_task: asyncio.Task[None] | None = None
        self.parents: dict[str, Any] = {}
        # a write-only variable (AccessLevel without CurrentRead, which asyncua's server does
        # not enforce on Read) and a device that clamps what it is sent
        self.unreadable: set[ua.NodeId] = set()
        self.clamps: dict[ua.NodeId, tuple[float, float]] = {}
        self.stalls: dict[ua.NodeId, float] = {}  # a PLC busy for seconds after a write
        self.armed: set[ua.NodeId] = set()  # written since: the next Read stalls

    def nodeid(self, text: str) -> ua.NodeId:
        return ua.NodeId.from_string(text if text.startswith("ns=") else f"ns={self.idx};{text}")

    async def setup(self) -> int:
        spec = self.spec
        server = self.server
        await server.init()
        port = spec["port"]
        sec = spec.get("security")
        if sec:
            await server.load_certificate(sec["certificate"])
            await server.load_private_key(sec["private_key"])
            await server.set_application_uri(sec["application_uri"])
            server.set_security_policy([getattr(ua.SecurityPolicyType, p) for p in sec["policies"]])
            if sec.get("users"):
                server.set_identity_tokens([ua.UserNameIdentityToken])
        server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/plantbus/")
        server.set_server_name("plantbus test server")
        self.idx = await server.register_namespace(spec.get("namespace", "urn:plantbus:test"))
        for var in spec.get("variables", []):
            await self.add(var)
        if spec.get("max_nodes_per_read") is not None:
            await self.set_limit(spec["max_nodes_per_read"])
        self._patch_read()
        await server.start()
        return int(port)

    async def add(self, var: dict[str, Any]) -> None:
        """Add the variable ``var`` (a spec entry) under its parent object."""
        pname = var.get("parent", "Objects")
        parent = self.parents.get(pname)
        if parent is None:
            parent = await self.server.nodes.objects.add_object(self.idx, pname)
            self.parents[pname] = parent
        nid = self.nodeid(var["node"])
        node = await parent.add_variable(
            nid, ua.QualifiedName(var["name"], self.idx), _variant(var)
        )
        if not var.get("readonly"):
            await node.set_writable()
        if var.get("unreadable"):
            self.unreadable.add(nid)
        if var.get("clamp"):
            low, high = var["clamp"]
            self.clamps[nid] = (low, high)
        if var.get("stall_reads"):
            self.stalls[nid] = float(var["stall_reads"])
        if "status" in var:
            await self.server.write_attribute_value(nid, _datavalue(var, var.get("source_ns")))

    async def set_limit(self, limit: int) -> None:
        """Publish ``limit`` as MaxNodesPerRead (0: none) and refuse larger Reads."""
        self.limit = limit
        await self.server.write_attribute_value(
            ua.NodeId(ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead),
            ua.DataValue(ua.Variant(limit, ua.VariantType.UInt32)),
        )

    def _patch_read(self) -> None:
        service = self.server.iserver.attribute_service
        original = service.read
        original_write = service.write
        not_readable = ua.DataValue(StatusCode=ua.StatusCode(ua.StatusCodes.BadNotReadable))

        def read(params: ua.ReadParameters) -> list[ua.DataValue]:
            items = params.NodesToRead
            if items and items[0].NodeId.NamespaceIndex == self.idx:
                self.read_sizes.append(len(items))
                if self.limit and len(items) > self.limit:
                    raise ServiceError(ua.StatusCodes.BadTooManyOperations)
            for item in items:
                if item.NodeId in self.armed and item.AttributeId == ua.AttributeIds.Value:
                    self.armed.discard(item.NodeId)
                    time.sleep(self.stalls[item.NodeId])  # the whole server stops answering
            out = original(params)
            if self.unreadable:
                for i, item in enumerate(items):
                    if item.NodeId in self.unreadable and item.AttributeId == ua.AttributeIds.Value:
                        out[i] = not_readable
            return out

        async def write(params: ua.WriteParameters, *args: Any, **kwargs: Any) -> Any:
            for w in params.NodesToWrite:
                if w.NodeId in self.stalls:
                    self.armed.add(w.NodeId)
                span = self.clamps.get(w.NodeId)
                if span is not None and w.Value.Value is not None:
                    v = w.Value.Value
                    w.Value.Value = ua.Variant(min(max(v.Value, span[0]), span[1]), v.VariantType)
            return await original_write(params, *args, **kwargs)

        service.read = read
        service.write = write

    async def writer(self, period: float, first: int, count: int) -> None:
        """Change ``count`` variables every ``period`` s, all with one source time."""
        specs = self.spec["variables"][first : first + count]
        ids = [self.nodeid(v["node"]) for v in specs]
        aspace = self.server.iserver.aspace
        k = 0
        next_t = time.monotonic()
        while True:
            k += 1
            now = datetime.now(UTC)
            for i, nid in enumerate(ids):
                dv = ua.DataValue(
                    ua.Variant(float(k + i), ua.VariantType.Double),
                    SourceTimestamp=now,
                    ServerTimestamp=now,
                )
                await aspace.write_attribute_value(nid, ua.AttributeIds.Value, dv)
            self.written += len(ids)
            next_t += period
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))

    async def command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        if op == "write":
            await self.server.write_attribute_value(
                self.nodeid(cmd["node"]), _datavalue(cmd, cmd.get("source_ns"))
            )
        elif op == "write_many":
            # one source time (given or now) and one server time for all of them
            src, now = cmd.get("source_ns"), datetime.now(UTC)
            for item in cmd["items"]:
                await self.server.write_attribute_value(
                    self.nodeid(item["node"]), _datavalue(item, src, now)
                )
        elif op == "read":
            # what the server holds: the value (JSON-able) and its VariantType
            dv = self.server.read_attribute_value(self.nodeid(cmd["node"]))
            value = dv.Value.Value
            if isinstance(value, datetime):
                aware = value if value.tzinfo else value.replace(tzinfo=UTC)
                value = (
                    (aware - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000
                )
            return {"ok": True, "value": value, "type": dv.Value.VariantType.name}
        elif op == "delete":
            await self.server.delete_nodes([self.server.get_node(self.nodeid(cmd["node"]))])
        elif op == "add":
            await self.add(cmd["variable"])
        elif op == "limit":
            await self.set_limit(cmd["value"])
        elif op == "writer":
            if self.writer_task is not None:
                self.writer_task.cancel()
                self.writer_task = None
            if cmd["period"] > 0:
                self.writer_task = asyncio.create_task(
                    self.writer(cmd["period"], cmd.get("first", 0), cmd["count"])
                )
        elif op == "stats":
            return {"ok": True, "written": self.written, "cpu": time.process_time()}
        elif op == "reads":
            sizes, self.read_sizes = self.read_sizes, []
            return {"ok": True, "sizes": sizes}
        elif op == "stop":
            return {"ok": True, "stop": True}
        else:
            return {"ok": False, "error": f"unknown op {op!r}"}
        return {"ok": True}


async def main(spec: dict[str, Any]) -> None:
    h = Harness(spec)
    port = await h.setup()
    if spec.get("writer"):
        await h.command({"op": "writer", **spec["writer"]})
    print(json.dumps({"ready": True, "port": port, "ns": h.idx}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            try:
                reply = await h.command(json.loads(line))
            except Exception as e:  # the test reads the reason instead of a hang
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            print(json.dumps(reply), flush=True)
            if reply.get("stop"):
                break
    finally:
        if h.writer_task is not None:
            h.writer_task.cancel()
        await h.server.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.CRITICAL)
    asyncio.run(main(json.loads(Path(sys.argv[1]).read_text())))
