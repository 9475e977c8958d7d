"""browse an OPC UA server and print a [[devices.opcua]] table of its variables

``plantbus discover opcua URL`` walks the address space from the Objects folder (or
``--root``) along hierarchical references, lists every variable (node id, browse path, data
type) and prints a ready ``conf.d`` snippet. Properties (``HasProperty``: engineering units,
ranges) are metadata and left out, as are the server's own nodes in namespace 0 unless
``--all-namespaces``.

This module is imported when the CLI builds its parser, so asyncua is imported only in
``discover``.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plantbus.broker.connector import DiscoverError
from plantbus.connectors.opcua.config import POLICIES, parse_node_id

if TYPE_CHECKING:
    from asyncua import Client

__all__ = ["Variable", "add_arguments", "browse", "discover", "snippet"]

BROWSE_BATCH = 100  # nodes per Browse request


@dataclass
class Variable:
    """A variable found while browsing."""

    node: str
    path: list[str]
    data_type: str = "?"
    array: bool = False
    structure: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``plantbus discover opcua``."""
    parser.add_argument("url", help="the server, opc.tcp://host:port[/path]")
    parser.add_argument("--name", default="opcua1", help="device name in the snippet")
    parser.add_argument(
        "--root", default="i=85", help="node id to browse from (default i=85, the Objects folder)"
    )
    parser.add_argument("--depth", type=int, default=10, help="levels to descend (default 10)")
    parser.add_argument(
        "--limit", type=int, default=1000, help="stop after this many variables (default 1000)"
    )
    parser.add_argument(
        "--all-namespaces", action="store_true", help="also list the server's own nodes (ns=0)"
    )
    parser.add_argument("--mode", choices=("poll", "subscribe"), default="poll")
    parser.add_argument("--interval", default="1s", help='poll or publishing interval ("1s")')
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    parser.add_argument("--username")
    secret = parser.add_mutually_exclusive_group()
    secret.add_argument(
        "--password-file", type=Path, help="a file holding the password (its first line)"
    )
    secret.add_argument("--password", help="(visible to other local users in the process list)")
    sec = parser.add_argument_group("security (all of --certificate, --private-key, --trust)")
    sec.add_argument("--policy", choices=POLICIES, default="Basic256Sha256")
    sec.add_argument(
        "--security-mode", choices=("Sign", "SignAndEncrypt"), default="SignAndEncrypt"
    )
    sec.add_argument("--certificate", type=Path, help="client certificate (PEM or DER)")
    sec.add_argument("--private-key", type=Path, help="client private key (PEM or DER)")
    sec.add_argument(
        "--trust", type=Path, action="append", help="trusted server certificate or folder"
    )


def _security(args: argparse.Namespace) -> Any:
    given = [args.certificate, args.private_key, args.trust]
    if not any(given):
        return None
    if not all(given):
        raise DiscoverError("security needs all of --certificate, --private-key and --trust")
    from plantbus.connectors.opcua.config import SecurityConfig

    return SecurityConfig(
        policy=args.policy,
        mode=args.security_mode,
        certificate=args.certificate.absolute(),
        private_key=args.private_key.absolute(),
        trust=[p.absolute() for p in args.trust],
    )


def _password(args: argparse.Namespace) -> str | None:
    from plantbus.broker.secrets import read_secret_file, register

    password: str | None = args.password
    if args.password_file is not None:
        try:
            password = read_secret_file(args.password_file)
        except ValueError as e:
            raise DiscoverError(f"--password-file: {e}") from None
    if password:
        register(password)  # masked in whatever the log handler writes
    return password


async def discover(args: argparse.Namespace) -> str:
    """Connect, browse, and return the snippet.

    Raises:
        DiscoverError: a bad argument, or the server could not be reached or browsed.
    """
    from plantbus.broker.supervisor import describe_error
    from plantbus.connectors.opcua import session
    from plantbus.connectors.opcua.config import Config
    from plantbus.connectors.opcua.security import SecurityError, load_identity

    try:
        Config.model_validate(
            {"name": args.name, "url": args.url, "points": [{"name": "x", "node": "i=1"}]}
        )
        parse_node_id(args.root)
    except ValueError as e:
        raise DiscoverError(_first_line(e)) from None
    security = _security(args)
    try:
        identity = load_identity(security) if security is not None else None
    except SecurityError as e:
        raise DiscoverError(str(e)) from None
    session.quiet_library_logs()
    password = _password(args)
    try:
        client = await session.open_session(
            args.url,
            request_timeout=args.timeout,
            client_name="plantbus discover",
            username=args.username,
            password=password,
            identity=identity,
        )
    except Exception as e:
        raise DiscoverError(f"cannot connect to {args.url}: {describe_error(e)}") from None
    try:
        found, truncated = await browse(
            client, args.root, args.depth, args.limit, args.all_namespaces
        )
    except DiscoverError:
        raise
    except Exception as e:
        raise DiscoverError(f"browsing {args.url} failed: {describe_error(e)}") from None
    finally:
        await session.close(client, min(args.timeout, 2.0))
    return snippet(args, found, truncated, security)


def _status_name(code: int) -> str:
    from plantbus.connectors.opcua.session import status_name

    return status_name(code)


def _first_line(e: Exception) -> str:
    # pydantic's message lists the error after a header line; the reason is what matters
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)


async def browse(
    client: Client, root: str, depth: int, limit: int, all_namespaces: bool
) -> tuple[list[Variable], bool]:
    """The variables under ``root`` (breadth first), and whether ``limit`` cut the list."""
    from asyncua import ua

    hierarchical = ua.NodeId(ua.ObjectIds.HierarchicalReferences)
    has_property = ua.NodeId(ua.ObjectIds.HasProperty)
    mask = ua.NodeClass.Object | ua.NodeClass.Variable
    start = ua.NodeId.from_string(root)
    seen = {start}
    level: list[tuple[ua.NodeId, list[str]]] = [(start, [])]
    found: list[Variable] = []
    for _ in range(depth):
        following: list[tuple[ua.NodeId, list[str]]] = []
        for b in range(0, len(level), BROWSE_BATCH):
            batch = level[b : b + BROWSE_BATCH]
            params = ua.BrowseParameters(
                NodesToBrowse=[
                    ua.BrowseDescription(
                        NodeId=node,
                        BrowseDirection=ua.BrowseDirection.Forward,
                        ReferenceTypeId=hierarchical,
                        IncludeSubtypes=True,
                        NodeClassMask=int(mask),
                        ResultMask=int(ua.BrowseResultMask.All),
                    )
                    for node, _ in batch
                ]
            )
            results = await client.uaclient.browse(params)
            for (browsed, path), result in zip(batch, results, strict=True):
                code = result.StatusCode.value
                if code >= 0x80000000 and browsed == start:
                    raise DiscoverError(f"cannot browse {root}: {_status_name(code)}")
                refs = list(result.References)
                cont = result.ContinuationPoint
                while cont:
                    more = await client.uaclient.browse_next(
                        ua.BrowseNextParameters(ContinuationPoints=[cont])
                    )
                    refs += more[0].References
                    cont = more[0].ContinuationPoint
                for ref in refs:
                    # references carry ExpandedNodeIds: compare and keep plain NodeIds
                    ex = ref.NodeId
                    node = ua.NodeId(ex.Identifier, ex.NamespaceIndex, ex.NodeIdType)
                    if ref.ReferenceTypeId == has_property or node in seen:
                        continue
                    if node.NamespaceIndex == 0 and not all_namespaces:
                        continue
                    seen.add(node)
                    here = [*path, ref.BrowseName.Name or node.to_string()]
                    if ref.NodeClass == ua.NodeClass.Variable:
                        if len(found) >= limit:
                            await _types(client, found)
                            return found, True
                        found.append(Variable(node.to_string(), here))
                    following.append((node, here))
        if not following:
            break
        level = following
    await _types(client, found)
    return found, False


async def _types(client: Client, found: list[Variable]) -> None:
    """Fill in each variable's data type name, and whether it is an array or a structure."""
    from asyncua import ua
    from asyncua.common.ua_utils import get_base_data_type

    if not found:
        return
    nodes = [client.get_node(v.node) for v in found]
    types: list[ua.DataValue] = []
    ranks: list[ua.DataValue] = []
    for c in range(0, len(nodes), 500):
        types += await client.read_attributes(nodes[c : c + 500], ua.AttributeIds.DataType)
        ranks += await client.read_attributes(nodes[c : c + 500], ua.AttributeIds.ValueRank)
    described: dict[Any, tuple[str, bool]] = {}
    for dv in types:
        type_id = dv.Value.Value if dv.Value is not None else None
        if type_id is None or type_id in described:
            continue
        node = client.get_node(type_id)
        if type_id.NamespaceIndex == 0 and type_id.Identifier in ua.ObjectIdNames:
            name = ua.ObjectIdNames[type_id.Identifier]
        else:
            name = (await node.read_browse_name()).Name
        try:
            base = (await get_base_data_type(node)).nodeid.Identifier
        except Exception:  # a type outside the standard hierarchy: say nothing about it
            base = None
        described[type_id] = (name, base == ua.ObjectIds.Structure)
    for v, t, r in zip(found, types, ranks, strict=True):
        type_id = t.Value.Value if t.Value is not None else None
        v.data_type, v.structure = described.get(type_id, ("?", False))
        rank = r.Value.Value if r.Value is not None else None
        v.array = isinstance(rank, int) and rank >= 0  # -1 scalar, -2 any, -3 scalar or 1-D


_UNSAFE = re.compile(r"[\r\n]")


def _point_names(found: list[Variable]) -> list[str]:
    """Field names from browse paths: ``Line1.Temp``; unique, and line-protocol encodable."""
    out: list[str] = []
    used: set[str] = set()
    for v in found:
        base = _UNSAFE.sub(" ", ".".join(v.path)).rstrip("\\") or "point"
        name, n = base, 2
        while name in used:
            name, n = f"{base}_{n}", n + 1
        used.add(name)
        out.append(name)
    return out


def _toml(s: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes
    return json.dumps(s, ensure_ascii=False)


def snippet(
    args: argparse.Namespace, found: list[Variable], truncated: bool, security: Any = None
) -> str:
    """The ``[[devices.opcua]]`` table for ``found``."""
    lines = [
        f"# plantbus discover opcua {args.url}: {len(found)} variable"
        f"{'' if len(found) == 1 else 's'} under {args.root}",
    ]
    if truncated:
        lines.append(f"# stopped at --limit {args.limit}: narrow it with --root, or raise --limit")
    if not found:
        lines.append("# no variables found: try --root or --all-namespaces")
        return "\n".join(lines) + "\n"
    lines += [
        "[[devices.opcua]]",
        f"name = {_toml(args.name)}",
        f"url = {_toml(args.url)}",
        f"mode = {_toml(args.mode)}",
        f"interval = {_toml(args.interval)}",
    ]
    if args.username:
        lines.append(f"# username = {_toml(args.username)}")
        if args.password_file is not None:
            lines.append(f"# password_file = {_toml(str(args.password_file.absolute()))}")
        else:
            lines.append('# password = "…"')
    if security is not None:
        trust = ", ".join(_toml(str(p)) for p in security.trust)
        lines += [
            f"security = {{ policy = {_toml(security.policy)}, mode = {_toml(security.mode)}, "
            f"certificate = {_toml(str(security.certificate))}, "
            f"private_key = {_toml(str(security.private_key))}, trust = [{trust}] }}"
        ]
    lines.append("points = [")
    for name, v in zip(_point_names(found), found, strict=True):
        note = v.data_type + ("[] (read as JSON text)" if v.array else "")
        if v.structure and not v.array:
            note += " (a structure: reads as Bad, BadDataEncodingUnsupported)"
        lines.append(f"  {{ name = {_toml(name)}, node = {_toml(v.node)} }},  # {note}")
    lines.append("]")
    return "\n".join(lines) + "\n"
