"""``plantbus tap FILTER [FILTER…]``: the records of a running daemon, live, in a terminal.

A client of the consumer API (``plantbus.broker.api``): it subscribes over WebSocket and
prints each record as it arrives, as an aligned table (rich) or, with ``--json``, one JSON
record per line (the API's record shape, for ``jq`` and scripts).

``--api`` is ``http://host:port`` (default ``http://127.0.0.1:8470``), ``https://host:port``
(``--ca`` for the server's CA, ``--cert`` / ``--key`` for a client certificate) or
``unix:/path/to/api.sock``. The token comes from ``--token-file`` or ``PLANTBUS_TOKEN``.

Exit codes (the CLI's contract): 0 when stopped (Ctrl-C, ``--count`` reached), 2 for bad
usage or a request the daemon refuses (no or wrong token, a filter outside the token: 401,
403, 400), 1 when the daemon cannot be reached or closes the stream (e.g. it stops).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlencode

__all__ = ["DEFAULT_API", "TOKEN_ENV", "TapError", "add_arguments", "run", "tap"]

DEFAULT_API = "http://127.0.0.1:8470"
TOKEN_ENV = "PLANTBUS_TOKEN"

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class TapError(Exception):
    """The tap cannot go on: ``code`` is the exit code, the message says why."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``tap`` verb's arguments."""
    p.add_argument("filters", nargs="+", metavar="FILTER", help="topic filters, e.g. 'plant/#'")
    p.add_argument(
        "--api",
        default=DEFAULT_API,
        metavar="URL",
        help=f"the daemon's API: http(s)://host:port or unix:/path (default: {DEFAULT_API})",
    )
    p.add_argument(
        "--token-file", type=Path, metavar="FILE", help=f"the API token (default: ${TOKEN_ENV})"
    )
    p.add_argument("--json", action="store_true", help="one JSON record per line")
    p.add_argument("--count", type=_positive_int, metavar="N", help="stop after N records")
    p.add_argument("--ca", type=Path, metavar="FILE", help="CA of the daemon's certificate")
    p.add_argument("--cert", type=Path, metavar="FILE", help="client certificate (https)")
    p.add_argument("--key", type=Path, metavar="FILE", help="key of the client certificate")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is not None:
        try:
            token = args.token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or e
            message = f"cannot read --token-file {args.token_file}: {reason}"
            raise TapError(EXIT_USAGE, message) from None
        if not token:
            raise TapError(EXIT_USAGE, f"--token-file {args.token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


def _endpoint(api: str, filters: Sequence[str]) -> tuple[str, str | None]:
    """(WebSocket URL, Unix socket path or None) for ``--api``."""
    from plantbus.broker.api import SUBSCRIBE_PATH

    query = urlencode([("filter", f) for f in filters])
    if api.startswith("unix:"):
        path = api[len("unix:") :]
        if not path:
            raise TapError(
                EXIT_USAGE, "--api unix: needs a socket path, e.g. unix:/run/plantbus/api.sock"
            )
        return f"http://plantbus{SUBSCRIBE_PATH}?{query}", path
    if not api.startswith(("http://", "https://")):
        raise TapError(
            EXIT_USAGE, f"--api {api!r}: use http://host:port, https://host:port or unix:/path"
        )
    return f"{api.rstrip('/')}{SUBSCRIBE_PATH}?{query}", None


class _Printer:
    """Writes records as an aligned table or as JSON lines."""

    def __init__(self, out: IO[str], as_json: bool):
        self.out = out
        self.as_json = as_json
        self._header = True
        self._console: Any = None
        if not as_json:
            from rich.console import Console

            # a pipe or file gets whole lines, never cut to a guessed terminal width
            width = None if out.isatty() else 10_000
            self._console = Console(file=out, highlight=False, soft_wrap=False, width=width)
            # rich ends the process with status 1 on a closed pipe (| head); stop as for --json
            self._console.on_broken_pipe = _broken_pipe

    def records(self, records: list[dict[str, Any]]) -> None:
        if self.as_json:
            dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
            self.out.write("".join(dumps(r) + "\n" for r in records))
            self.out.flush()
            return
        from rich.table import Table

        table = Table(box=None, show_header=self._header, pad_edge=False, header_style="bold")
        self._header = False
        table.add_column("time", min_width=12, no_wrap=True)
        table.add_column("topic", min_width=24, no_wrap=True)
        table.add_column("quality", min_width=9, no_wrap=True)
        table.add_column("fields", min_width=30)
        table.add_column("uid", min_width=36, no_wrap=True)
        for r in records:
            quality = r.get("quality", "good")
            style = {"good": "", "uncertain": "yellow", "bad": "red"}.get(quality, "")
            fields = " ".join(f"{k}={_value(v)}" for k, v in r.get("fields", {}).items())
            if r.get("status"):
                fields += " " + " ".join(f"{k}:{v:#x}" for k, v in r["status"].items())
            table.add_row(
                _clock(r.get("time")),
                r.get("topic", ""),
                f"[{style}]{quality}[/]" if style else quality,
                fields,
                r.get("uid", ""),
            )
        self._console.print(table)
        self.out.flush()


def _broken_pipe() -> None:
    raise BrokenPipeError("the reader of the output went away")


def _clock(ns: object) -> str:
    if not isinstance(ns, int):
        return "?"
    t = time.localtime(ns // 1_000_000_000)
    return f"{time.strftime('%H:%M:%S', t)}.{ns // 1_000_000 % 1000:03d}"


def _value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    return str(v)


async def tap(
    api: str,
    filters: Sequence[str],
    *,
    token: str | None = None,
    ssl_context: Any = None,
    as_json: bool = False,
    count: int | None = None,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> int:
    """Subscribe to ``filters`` on the daemon at ``api`` and print records until stopped.

    Returns:
        0 once ``count`` records were printed.

    Raises:
        TapError: with the exit code, when the daemon refuses, cannot be reached or closes.
    """
    import aiohttp

    out = out or sys.stdout
    err = err or sys.stderr
    url, unix = _endpoint(api, filters)
    connector = (
        aiohttp.UnixConnector(path=unix)
        if unix
        else aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else True)
    )
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    printer = _Printer(out, as_json)
    printed = 0
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            ws = await session.ws_connect(url, headers=headers, max_msg_size=0)
        except aiohttp.WSServerHandshakeError as e:
            reason = await _reason(session, url, headers, e)
            code = EXIT_USAGE if e.status in (400, 401, 403) else EXIT_FAILURE
            message = f"the daemon refused the subscription ({e.status}): {reason}"
            raise TapError(code, message) from None
        except aiohttp.ClientConnectorCertificateError as e:
            message = f"TLS: the daemon's certificate was not accepted: {e}"
            raise TapError(EXIT_FAILURE, message) from None
        except (aiohttp.ClientError, OSError) as e:
            where = f"unix:{unix}" if unix else api
            raise TapError(EXIT_FAILURE, f"cannot reach the daemon at {where}: {e}") from None
        async with ws:
            while True:
                msg = await ws.receive()
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                frame = json.loads(msg.data)
                if isinstance(frame, dict):
                    if "dropped" in frame:
                        print(
                            f"tap: {frame['dropped']} records dropped: they came faster than "
                            "they were printed",
                            file=err,
                            flush=True,
                        )
                    continue
                if count is not None and printed + len(frame) >= count:
                    printer.records(frame[: count - printed])
                    return EXIT_OK
                printer.records(frame)
                printed += len(frame)
            if msg.type is aiohttp.WSMsgType.CLOSE:
                why = f"code {msg.data}" + (f": {msg.extra}" if msg.extra else "")
            else:
                why = f"{msg.type.name.lower()}: {msg.data or ws.exception() or 'connection lost'}"
            raise TapError(EXIT_FAILURE, f"the daemon closed the stream ({why})")
    return EXIT_OK  # pragma: no cover - the loop returns or raises


async def _reason(session: Any, url: str, headers: dict[str, str], e: Any) -> str:
    """The daemon's reason for refusing the upgrade (its JSON error body, asked again)."""
    with contextlib.suppress(Exception):
        async with session.get(url, headers=headers) as r:
            doc = await r.json(content_type=None)
            if isinstance(doc, dict) and "error" in doc:
                return str(doc["error"])
    return str(e.message or e)


def run(args: argparse.Namespace) -> int:
    """The ``tap`` verb: the exit code."""
    from plantbus.broker.topics import validate_filter

    try:
        for flt in args.filters:
            try:
                validate_filter(flt)
            except ValueError as e:
                raise TapError(EXIT_USAGE, str(e)) from None
        token = _token(args)
        ssl_context = None
        if args.api.startswith("https://") or args.ca or args.cert:
            from plantbus.broker.api import client_ssl_context

            if args.key is not None and args.cert is None:
                raise TapError(EXIT_USAGE, "--key needs --cert")
            try:
                ssl_context = client_ssl_context(args.ca, args.cert, args.key)
            except (OSError, ValueError) as e:
                raise TapError(EXIT_USAGE, f"cannot load the TLS files: {e}") from None
        coro = tap(
            args.api,
            args.filters,
            token=token,
            ssl_context=ssl_context,
            as_json=args.json,
            count=args.count,
        )
        return asyncio.run(coro)
    except TapError as e:
        print(f"plantbus tap: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        # the reader went away (| head): stop quietly, and keep Python from complaining
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
