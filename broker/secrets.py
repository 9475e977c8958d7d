"""Secrets in the config: ``${VAR}`` from the environment, ``<key>_file``, and redaction.

The loader (``plantbus.broker.config``) uses this module in three steps:

* ``expand_env``: every string value of every config file may name environment variables
  as ``${NAME}``; ``$${`` stands for a literal ``${``. An unset variable is a config error
  naming the file, the key path and the variable (never a value).
* ``read_secret_file``: a secret key (every field typed ``SecretStr``: ``password``,
  ``token``) may instead be given as ``<key>_file``, the path of a file holding it.
* ``register``: every secret value loaded is remembered, so that ``redact`` (used by the
  log handler, ``plantbus check`` and ``/healthz``) replaces it with ``***`` wherever a
  library or an error message might have copied it, as does ``redact_url`` for the
  ``user:password@`` part of any URL.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "MASK",
    "RedactingFilter",
    "Redactor",
    "expand_env",
    "others_may_read",
    "read_secret_file",
    "redact",
    "redact_data",
    "redact_url",
    "register",
]

MASK = "***"
"""What a secret is replaced with."""

MIN_REDACTED = 4
"""Secrets shorter than this are not searched for in text: replacing every ``ab`` in every
log line would garble the logs and hide nothing worth hiding."""

_REF = re.compile(r"\$\$\{|\$\{(?P<body>[^}]*)(?P<close>\}?)")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^\s/@:]*):[^\s/@]*@")


# -- ${VAR} ---------------------------------------------------------------------------------------


def _expand(text: str, environ: Mapping[str, str]) -> tuple[str, list[str], bool]:
    """``text`` with its ``${NAME}`` references replaced.

    Returns:
        (the new text, the reasons it cannot be expanded, whether ``text`` is nothing but
        references, i.e. the whole value comes from the environment).
    """
    out: list[str] = []
    errors: list[str] = []
    pos = 0
    refs = 0
    literal = False
    for m in _REF.finditer(text):
        if m.start() > pos:
            literal = True
        out.append(text[pos : m.start()])
        pos = m.end()
        if m.group(0) == "$${":
            out.append("${")
            literal = True
            continue
        name = m["body"]
        if not m["close"]:
            errors.append("an unterminated ${ (write $${ for a literal ${)")
            continue
        if not _NAME.match(name):
            errors.append(
                f"${{{name}}} is not an environment variable reference: a name is letters, "
                "digits and '_' (write $${ for a literal ${)"
            )
            continue
        value = environ.get(name)
        if value is None:
            errors.append(f"the environment variable {name} is not set")
            continue
        refs += 1
        out.append(value)
    if pos < len(text):
        literal = True
    out.append(text[pos:])
    return "".join(out), errors, refs > 0 and not literal


def expand_env(
    node: Any,
    parts: tuple[str | int, ...],
    environ: Mapping[str, str],
    on_error: Callable[[tuple[str | int, ...], str], None],
    from_env: set[tuple[str | int, ...]],
) -> Any:
    """``node`` (parsed TOML) with ``${NAME}`` replaced in every string value, at any depth.

    Args:
        node: a TOML value.
        parts: its key path, for messages.
        environ: the environment (``os.environ``).
        on_error: called with (key path, message) for each reference that cannot be expanded.
        from_env: receives the key path of every value that is only references (so that the
            secret it may hold is not in the file).
    """
    if isinstance(node, str):
        if "$" not in node:
            return node
        value, errors, whole = _expand(node, environ)
        for e in errors:
            on_error(parts, e)
        if errors:
            return node  # as written: a half-expanded value would only add confusing errors
        if whole:
            from_env.add(parts)
        return value
    if isinstance(node, dict):
        return {k: expand_env(v, (*parts, k), environ, on_error, from_env) for k, v in node.items()}
    if isinstance(node, list):
        return [expand_env(v, (*parts, i), environ, on_error, from_env) for i, v in enumerate(node)]
    return node


# -- <key>_file -----------------------------------------------------------------------------------


def read_secret_file(path: Path) -> str:
    """The secret held by the file at ``path``: its text without the trailing newline.

    Raises:
        ValueError: the file cannot be read, is not UTF-8 or holds nothing (the message
            names the file, never its content).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read {str(path)!r}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{str(path)!r} is not UTF-8 text") from None
    value = text.rstrip("\r\n")
    if not value:
        raise ValueError(f"{str(path)!r} is empty")
    return value


def others_may_read(path: Path) -> int | None:
    """The permission bits of ``path`` if users other than its owner and group may read it.

    Group-readable is fine (``0640 root:plantbus`` is how the package installs config);
    None also when the file cannot be stat'ed (reading it reported that already).
    """
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    return mode if mode & stat.S_IROTH else None


# -- redaction ------------------------------------------------------------------------------------


class Redactor:
    """A set of secret values and the pattern that finds any of them in a text."""

    def __init__(self) -> None:
        self._known: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()

    def add(self, value: str) -> None:
        """Mask ``value`` from now on (unless it is shorter than ``MIN_REDACTED``).

        Also the forms it takes inside a ``repr`` of it or of its UTF-8 bytes and inside
        JSON (a library's debug log prints requests as ``Password=b'...'``), where a quote,
        a backslash or a non-ASCII character would be escaped.
        """
        if len(value) < MIN_REDACTED or value in self._known:
            return
        forms = {
            value,
            repr(value)[1:-1],
            repr(value.encode("utf-8"))[2:-1],
            json.dumps(value)[1:-1],
            json.dumps(value, ensure_ascii=False)[1:-1],
        }
        with self._lock:
            self._known.update(forms)
            # longest first, so that a secret containing another is masked whole
            alternatives = sorted(self._known, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(v) for v in alternatives))

    def redact(self, text: str) -> str:
        """``text`` with each of the secrets and every URL password in it masked."""
        pattern = self._pattern
        if pattern is not None:
            text = pattern.sub(MASK, text)
        return redact_url(text)


_process = Redactor()
"""Every secret any config load of this process has read: what the log filter masks."""


def register(value: str) -> None:
    """Remember ``value`` as a secret of this process: ``redact`` masks it from now on."""
    _process.add(value)


def redact_url(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` in it masked."""
    if "://" not in text:
        return text
    return _USERINFO.sub(lambda m: f"{m['head']}{m['user']}:{MASK}@", text)


def redact(text: str) -> str:
    """``text`` with every registered secret and every URL password in it masked."""
    return _process.redact(text)


def redact_data(value: Any) -> Any:
    """``value`` (JSON-like data) with ``redact`` applied to every string in it."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_data(v) for v in value]
    return value


class RedactingFilter(logging.Filter):
    """A handler filter that masks secrets in the message and the traceback of each record.

    Installed on the daemon's log handler: whatever a library logs (a connection URL, an
    exception that quotes its arguments) passes through ``redact`` before it is written.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True
