"""The ``plantbus`` command: ``run``, ``check``, ``demo`` and ``decrypt``.

Exit codes (contract): 0 ok, 2 bad config or usage, 1 runtime failure. A config error is
printed as the loader's messages (each naming the file and the key path), never as a
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from plantbus.broker.config import PlantbusConfig
    from plantbus.broker.runtime import Runtime

__all__ = ["DEFAULT_CONFIG", "EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "main", "setup_logging"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

DEFAULT_CONFIG = Path("/etc/plantbus/plantbus.toml")
LOG_LEVELS = ("debug", "info", "warning", "error")

log = logging.getLogger("plantbus")


def _version() -> str:
    try:
        return version("plantbus")
    except PackageNotFoundError:
        return "unknown"


class _JournalFormatter(logging.Formatter):
    """Prefixes each line with its syslog priority (``<3>``), which journald reads as the level.

    The journal adds the time and the unit itself, so the line carries neither.
    """

    _PRIORITY: ClassVar[dict[int, int]] = {
        logging.CRITICAL: 2,
        logging.ERROR: 3,
        logging.WARNING: 4,
        logging.INFO: 6,
        logging.DEBUG: 7,
    }

    def format(self, record: logging.LogRecord) -> str:
        # a traceback (debug level only) spans lines; each gets the prefix, or journald
        # would file the continuation lines at the default level
        prefix = f"<{self._PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


class _JsonFormatter(logging.Formatter):
    """One JSON object per line (``node.log_format = "json"``), for log shippers.

    Keys: ``ts`` (Unix seconds), ``level``, ``logger``, ``msg``, and ``exc`` when a traceback
    is attached (debug level only), so one event is always one line.
    """

    def __init__(self, journal: bool = False):
        super().__init__()
        self._journal = journal

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            # exc_text: the traceback as the redacting filter left it (secrets masked)
            out["exc"] = record.exc_text or self.formatException(record.exc_info)
        line = json.dumps(out, ensure_ascii=False)
        if self._journal:
            return f"<{_JournalFormatter._PRIORITY.get(record.levelno, 6)}>{line}"
        return line


LOG_FORMATS = ("text", "json")


def setup_logging(level: str, fmt: str = "text") -> None:
    """One line per event on stderr; under systemd, in the journal's own format.

    Args:
        level: ``debug``, ``info``, ``warning`` or ``error``.
        fmt: ``text`` (readable lines) or ``json`` (one object per line). Under journald
            (``JOURNAL_STREAM`` set) both carry a ``<N>`` syslog priority prefix and no time.
    """
    handler = logging.StreamHandler(sys.stderr)
    journal = bool(os.environ.get("JOURNAL_STREAM"))
    if fmt == "json":
        handler.setFormatter(_JsonFormatter(journal))
    elif journal:
        handler.setFormatter(_JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    from plantbus.broker.secrets import RedactingFilter

    # whatever a library logs passes the filter: no password, token or URL password is written
    handler.addFilter(RedactingFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _print_config_errors(messages: Sequence[str]) -> None:
    from plantbus.broker.secrets import redact

    for message in messages:
        print(redact(message), file=sys.stderr)
    n = len(messages)
    print(f"config invalid: {n} error{'s' if n != 1 else ''}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        type=str.lower,
        default=None,
        help="log level (default: the config's, else info)",
    )
    common.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        type=str.lower,
        default=None,
        help="text lines or one JSON object per line (default: the config's, else text)",
    )
    parser = argparse.ArgumentParser(
        prog="plantbus",
        description="Industrial connector and data broker: devices -> bus -> InfluxDB and more.",
    )
    parser.add_argument("--version", action="version", version=f"plantbus {_version()}")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)

    p_run = verbs.add_parser(
        "run", parents=[common], help="run the daemon", description="Run the daemon."
    )
    p_run.add_argument(
        "-c",
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"main config file; its conf.d/ folder is read too (default: {DEFAULT_CONFIG})",
    )

    p_check = verbs.add_parser(
        "check",
        parents=[common],
        help="validate the config without touching any device",
        description="Validate the config (the file and the conf.d/ beside it); exit 0 or 2.",
    )
    p_check.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG)

    p_demo = verbs.add_parser(
        "demo",
        parents=[common],
        help="run the built-in demo with a live view",
        description=(
            "Run simulated devices into a line-protocol file (and InfluxDB with --influx), "
            "showing topics, rates and last values live. Ctrl-C stops it."
        ),
    )
    p_demo.add_argument("--influx", metavar="URL", help="also write to this InfluxDB 1.x URL")
    p_demo.add_argument(
        "--duration", metavar="S", type=_positive_seconds, help="stop by itself after S seconds"
    )
    p_demo.add_argument(
        "--no-view", action="store_true", help="print a summary line every few seconds instead"
    )
    p_demo.add_argument(
        "--dir",
        type=Path,
        default=Path("var/demo"),
        help="where the demo writes its files (default: var/demo)",
    )
    _add_discover(verbs, common)
    _add_decrypt(verbs)
    _add_tap(verbs, common)
    return parser


def _add_tap(verbs: Any, common: argparse.ArgumentParser) -> None:
    from plantbus.broker import tap

    p = verbs.add_parser(
        "tap",
        parents=[common],
        help="print the records of a running daemon live",
        description=(
            "Subscribe to topic filters on a running daemon's API and print its records as "
            "they arrive: a table, or JSON lines with --json. Ctrl-C stops it."
        ),
    )
    tap.add_arguments(p)


def _add_decrypt(verbs: Any) -> None:
    p = verbs.add_parser(
        "decrypt",
        help="open encrypted payloads or files back into records",
        description=(
            "Open an encrypted bridge payload or an encrypted file-sink file "
            "(docs/encryption.md) and print its records: JSON lines or line protocol."
        ),
    )
    p.add_argument(
        "--key",
        dest="keys",
        action="append",
        type=Path,
        required=True,
        metavar="FILE",
        help="a key file of the ring (repeat for every key id the data may use)",
    )
    p.add_argument("input", nargs="?", type=Path, help="payload or file to open (default: stdin)")
    p.add_argument(
        "--raw", action="store_true", help="print the plaintexts as they are (JSON arrays)"
    )


def _cmd_decrypt(args: argparse.Namespace) -> int:
    from plantbus.broker.crypto import EnvelopeError, KeyError_, KeyRing, as_records, open_all

    try:
        ring = KeyRing.from_files(args.keys)
    except KeyError_ as e:
        print(f"plantbus decrypt: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        data = args.input.read_bytes() if args.input else sys.stdin.buffer.read()
    except OSError as e:
        print(f"plantbus decrypt: cannot read {args.input}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    out = sys.stdout.buffer
    try:
        for plaintext in open_all(ring, data):
            out.write(plaintext if args.raw else as_records(plaintext))
    except (EnvelopeError, ValueError) as e:
        out.flush()
        print(f"plantbus decrypt: {args.input or 'stdin'}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    out.flush()
    return EXIT_OK


def _add_discover(verbs: Any, common: argparse.ArgumentParser) -> None:
    from plantbus.broker.registry import DISCOVERERS

    if not DISCOVERERS:
        return
    p_disc = verbs.add_parser(
        "discover",
        parents=[common],
        help="browse a device and print a ready conf.d snippet",
        description="Browse or scan a device and print a conf.d snippet to start from.",
    )
    kinds = p_disc.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind, module in sorted(DISCOVERERS.items()):
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            # a broken or missing discover module must not take `run` and `check` down
            log.debug("discover %s unavailable: %s", kind, exc)
            continue
        sub = kinds.add_parser(kind, parents=[common], help=(mod.__doc__ or "").split("\n")[0])
        mod.add_arguments(sub)


def _cmd_discover(args: argparse.Namespace) -> int:
    from plantbus.broker.connector import DiscoverError
    from plantbus.broker.registry import DISCOVERERS

    setup_logging(args.log_level or "warning")
    mod = importlib.import_module(DISCOVERERS[args.kind])
    try:
        snippet = asyncio.run(mod.discover(args))
    except DiscoverError as exc:
        print(f"discover {args.kind}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(snippet, end="" if snippet.endswith("\n") else "\n")
    return EXIT_OK


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def _cmd_check(args: argparse.Namespace) -> int:
    from plantbus.broker.config import ConfigError, check_config, load_config

    messages = check_config(args.config)
    if messages:
        _print_config_errors(messages)
        return EXIT_USAGE
    try:
        config = load_config(args.config)
    except ConfigError as exc:  # check_config and load_config agree; this is a safety net
        _print_config_errors(exc.messages)
        return EXIT_USAGE
    for warning in config.warnings:
        print(warning, file=sys.stderr)
    devices = len(config.devices)
    sinks = len(config.sinks)
    print(
        f"config OK: {devices} device{'s' if devices != 1 else ''}, "
        f"{sinks} sink{'s' if sinks != 1 else ''}"
    )
    return EXIT_OK


def _log_level(args: argparse.Namespace, config: PlantbusConfig) -> str:
    return str(args.log_level or config.node.log_level)


def _cmd_run(args: argparse.Namespace) -> int:
    from plantbus.broker.config import ConfigError, load_config
    from plantbus.broker.runtime import Runtime

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        _print_config_errors(exc.messages)
        return EXIT_USAGE
    setup_logging(_log_level(args, config), args.log_format or config.node.log_format)
    log.info("plantbus %s starting (config %s, pid %d)", _version(), args.config, os.getpid())
    for warning in config.warnings:
        log.warning("%s", warning)
    runtime = Runtime(config, config_path=args.config, handle_signals=True)
    if not config.api.enabled:
        return run_runtime(runtime, runtime.run())
    from plantbus.broker import metrics
    from plantbus.broker.api import ConsumerApi, serve
    from plantbus.broker.runtime import BuildError

    try:
        api = ConsumerApi(config.api, runtime)
    except BuildError as exc:  # a token file that went away since `check`
        log.error("cannot start: %s", exc)
        return EXIT_FAILURE
    metrics.add_route(api)
    return run_runtime(runtime, serve(runtime, api))


def run_runtime(runtime: Runtime, main: Coroutine[Any, Any, None]) -> int:
    """Run ``main`` (which runs ``runtime``) on a fresh loop; map how it ended to an exit code.

    Returns:
        0 after a drain, 1 when a component could not be built, the drain was forced
        (second Ctrl-C) or something unexpected failed.
    """
    from plantbus.broker.runtime import BuildError, run_async

    try:
        run_async(main)
    except BuildError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_FAILURE
    except (asyncio.CancelledError, KeyboardInterrupt):
        # a forced exit (second Ctrl-C) or an interrupt before the handlers were installed
        log.error("stopped before the drain finished")
        return EXIT_FAILURE
    except Exception:
        log.critical("unexpected failure", exc_info=True)
        return EXIT_FAILURE
    return EXIT_FAILURE if runtime.forced else EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from plantbus.broker.config import ConfigError
    from plantbus.broker.demo import Demo

    try:
        demo = Demo(
            influx=args.influx, duration=args.duration, view=not args.no_view, workdir=args.dir
        )
    except ConfigError as exc:
        _print_config_errors(exc.messages)
        return EXIT_USAGE
    demo.setup_logging(args.log_level or "info")
    return run_runtime(demo.runtime, demo.main())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``plantbus`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit 2 here
    if args.verb == "check":
        return _cmd_check(args)
    if args.verb == "run":
        return _cmd_run(args)
    if args.verb == "discover":
        return _cmd_discover(args)
    if args.verb == "decrypt":
        return _cmd_decrypt(args)
    if args.verb == "tap":
        from plantbus.broker import tap

        return tap.run(args)
    return _cmd_demo(args)


if __name__ == "__main__":
    sys.exit(main())
