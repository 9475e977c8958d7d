"""Fuzz: the config loader (``load_config``: the main file and ``conf.d/*.toml``).

Inputs: random bytes as a file; the shipped configs (``config/plantbus.toml`` with every
documented setting uncommented, each connector's ``sample.toml`` as a conf.d file) with
byte mutations; and the same configs parsed, changed structurally (a value of the wrong
type, NaN, ±inf, numbers beyond int64, huge strings, deep nesting, unknown keys, keys
removed, tables where arrays belong) and written back as TOML. Every input either loads
or raises ``ConfigError`` whose every message names a file (``plantbus.toml: ...``,
``conf.d/x.toml: ...``) and, unless the whole file is unreadable, a key path; no message
reports an internal error (a validator that raised something else), and nothing else is
raised (``plantbus run`` would show a traceback instead of exit 2).
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import random
import re
import shutil
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fuzzkit import FUZZ, mutate, within
from hypothesis import example, given
from hypothesis import strategies as st

from plantbus.broker.config import ConfigError, PlantbusConfig, load_config

pytestmark = pytest.mark.fuzz

REPO = Path(__file__).resolve().parents[2]
SCRATCH = Path("/dev/shm") if Path("/dev/shm").is_dir() else None


def _uncommented(text: str) -> str:
    """``config/plantbus.toml`` with its ``# key = value`` defaults and examples switched on."""
    return re.sub(r"(?m)^(\s*)# ([A-Za-z_]+ = )", r"\1\2", text)


MAIN_SEEDS = [
    (REPO / "config" / "plantbus.toml").read_text(),
    _uncommented((REPO / "config" / "plantbus.toml").read_text()),
    '[node]\nname = "edge"\n[api]\nlisten = "127.0.0.1:0"\n',
]
CONF_D_SEEDS = [p.read_text() for p in sorted(REPO.glob("connectors/*/sample.toml"))] + [
    p.read_text() for p in sorted((REPO / "config" / "conf.d").glob("*.toml"))
]


# -- TOML written back from data ------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return (
            "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
        )
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON escapes are TOML basic-string escapes
    if isinstance(v, datetime.date | datetime.time):
        return v.isoformat()
    if isinstance(v, dict):
        return (
            "{"
            + ", ".join(
                f"{json.dumps(k, ensure_ascii=False)} = {_toml_value(x)}" for k, x in v.items()
            )
            + "}"
        )
    return "[" + ", ".join(_toml_value(x) for x in v) + "]"


def toml_dumps(doc: dict[str, Any]) -> str:
    """TOML text of ``doc``: one ``key = value`` line per top-level key, inline below."""
    return "".join(
        f"{json.dumps(k, ensure_ascii=False)} = {_toml_value(v)}\n" for k, v in doc.items()
    )


# -- structural mutations -------------------------------------------------------------------------

_ODD_VALUES: list[Any] = [
    0,
    -1,
    2**63 - 1,
    -(2**63),
    1.5,
    -0.0,
    math.nan,
    math.inf,
    -math.inf,
    1e308,
    "",
    "x" * 5000,
    "5s",
    "-5s",
    "1e999s",
    "99999999999999999999h",
    "512MiB",
    "0B",
    "127.0.0.1:99999",
    "mqtt://",
    "plant/+/#",
    "$SYS",
    "\x00",
    "é😀",
    "../../../etc/passwd",
    "/dev/null",
    True,
    False,
    [],
    {},
    [1, "a"],
    [{}],
    {"unknown": 1},
    datetime.datetime(2024, 5, 1, 12, 0),
    datetime.date(1, 1, 1),
    datetime.time(23, 59),
]


def _odd(rng: random.Random) -> Any:
    # a copy: the lists and tables are mutated later, and a shared one could end up inside
    # itself (a cycle: endless recursion, and inputs that depend on earlier ones)
    return copy.deepcopy(rng.choice(_ODD_VALUES))


def _deep(rng: random.Random) -> Any:
    v: Any = rng.choice([1, "x", []])
    for _ in range(rng.choice([5, 40, 120])):
        v = [v] if rng.random() < 0.5 else {"k": v}
    return v


def _paths(node: Any, path: tuple = ()) -> Iterator[tuple]:
    yield path
    if len(path) >= 12:  # not into a deep nest made before: it would only get deeper
        return
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*path, i))


def _get(node: Any, path: tuple) -> Any:
    for p in path:
        node = node[p]
    return node


def restructure(text: str, seed: int) -> bytes:
    """``text`` parsed, changed in 1-3 places, written back."""
    rng = random.Random(seed)
    doc = tomllib.loads(text)
    for _ in range(rng.randint(1, 3)):
        paths = list(_paths(doc))
        path = rng.choice(paths)
        k = rng.randrange(6)
        if not path:
            doc[rng.choice(["nodes", "devices", "sinks", "api", "x", ""])] = _odd(rng)
            continue
        parent, key = _get(doc, path[:-1]), path[-1]
        if k <= 1:  # a value of another type
            parent[key] = _odd(rng)
        elif k == 2:  # deep nesting
            parent[key] = _deep(rng)
        elif k == 3:  # remove it
            del parent[key]
        elif k == 4 and isinstance(parent, dict):  # an unknown key (a typo, mostly)
            name = str(key)
            typo = name[:-1] if len(name) > 1 and rng.random() < 0.5 else name + rng.choice("sx_")
            parent[typo] = _odd(rng)
        elif isinstance(parent, list):  # the element twice
            parent.append(parent[key])
        else:  # an array of tables given as one table, or the reverse
            v = parent[key]
            parent[key] = v[0] if isinstance(v, list) and v else [v]
    return toml_dumps(doc).encode("utf-8", "surrogatepass")


# -- the target -----------------------------------------------------------------------------------


def _file(seeds: list[str]) -> st.SearchStrategy[bytes]:
    raw = [s.encode() for s in seeds]
    return st.one_of(
        st.binary(max_size=200),
        st.tuples(st.sampled_from(raw), st.integers(0, 2**64)).map(lambda t: mutate(t[0], t[1])),
        st.tuples(st.sampled_from(seeds), st.integers(0, 2**64)).map(lambda t: restructure(*t)),
        st.sampled_from(raw),
    )


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(dir=SCRATCH))
    yield d
    shutil.rmtree(d)


FILE_LEVEL = re.compile(
    r"^(line \d+, column \d+: TOML syntax error|at the end of the file: TOML syntax error|"
    r"TOML syntax error|not UTF-8 text|cannot read)"
)


@FUZZ
@given(_file(MAIN_SEEDS), st.lists(_file(CONF_D_SEEDS), max_size=2))
@example(b"a = " + b"[" * 2000 + b"]" * 2000, [])  # found: RecursionError from tomllib
@example(b'[node]\nname = "e"\n', [b"x = " + b"{b=" * 2000 + b"1" + b"}" * 2000])
@example(b"[api]\nmax_request_size = 1e999\n", [])
@example(b"[api]\nmax_request_size = " + b"9" * 5000 + b"\n", [])  # found: tomllib's ValueError
def test_load_config(workdir: Path, main: bytes, conf_d: list[bytes]) -> None:
    for old in workdir.glob("**/*.toml"):
        old.unlink()
    (workdir / "plantbus.toml").write_bytes(main)
    (workdir / "conf.d").mkdir(exist_ok=True)
    shown = {"plantbus.toml"}
    for i, data in enumerate(conf_d):
        (workdir / "conf.d" / f"f{i}.toml").write_bytes(data)
        shown.add(f"conf.d/f{i}.toml")
    with within():
        try:
            config = load_config(workdir / "plantbus.toml")
        except ConfigError as e:
            assert e.errors
            for msg in e.errors:
                file, sep, rest = msg.partition(": ")
                assert sep and file in shown, msg
                assert rest.strip(), msg
                assert "internal error" not in msg and "cannot validate" not in msg, msg
                if not FILE_LEVEL.match(rest):
                    # a key path: "devices.mqtt[0].url: ..." / "node: ..." / '"odd key": ...'
                    where, sep, why = rest.partition(": ")
                    assert sep and where and why, msg
            return
    assert isinstance(config, PlantbusConfig)
