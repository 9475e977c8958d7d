"""Config loading: main file + conf.d merge, defaults, relative paths, entry identity.

The shipped files (config/plantbus.toml, config/demo.toml, config/conf.d/) are loaded
here too, so a key renamed in a model cannot leave them stale.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from plantbus.broker.config import (
    ApiConfig,
    ConfigError,
    DeviceEntry,
    PlantbusConfig,
    SinkEntry,
    check_config,
    load_config,
    parse_config,
)
from plantbus.broker.connector import BuildContext
from plantbus.connectors import sim

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config"


def write_tree(root: Path, files: dict[str, str | bytes]) -> Path:
    """Write ``files`` (relative path -> content) under ``root``; return the main file."""
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")
    return root / "plantbus.toml"


def sim_device(name: str, extra: str = "") -> str:
    points = '[{ name = "n", signal = "counter" }]'
    return f'[[devices.sim]]\nname = "{name}"\npoints = {points}\n{extra}'


MAIN = """
[node]
name = "edge-07"
tags = { site = "ulm", hall = "h1" }
state_dir = "state"

[api]
listen = "127.0.0.1:8470"

[[sinks.file]]
name = "lp"
path = "var/plantbus.lp"
subscribe = ["plant/#"]
"""


def test_empty_main_file_gives_the_defaults(tmp_path: Path) -> None:
    config = load_config(write_tree(tmp_path, {"plantbus.toml": ""}))
    assert config.node.name == socket.gethostname()
    assert config.node.tags == {}
    assert config.node.state_dir == Path("/var/lib/plantbus")
    assert config.node.log_level == "info"
    assert config.node.shutdown_timeout == 10.0
    assert config.api == ApiConfig(enabled=True, listen="127.0.0.1:8470", unix=None)
    assert config.api.listen_address == ("127.0.0.1", 8470)
    assert config.devices == []
    assert config.sinks == []
    assert config.path == tmp_path / "plantbus.toml"
    assert config.files == [tmp_path / "plantbus.toml"]


def test_main_and_conf_d_are_merged_in_name_order(tmp_path: Path) -> None:
    main = write_tree(
        tmp_path,
        {
            "plantbus.toml": MAIN + sim_device("in-main"),
            "conf.d/20-press8.toml": sim_device("press8") + sim_device("press9"),
            "conf.d/10-press7.toml": sim_device("press7", 'topic = "plant/h1/press7"\n'),
            # hidden editor files and other extensions are not config
            "conf.d/.#10-press7.toml": "garbage",
            "conf.d/README.md": "# not read",
            "conf.d/old.toml.bak": "garbage",
        },
    )
    config = load_config(main)
    assert [d.name for d in config.devices] == ["in-main", "press7", "press8", "press9"]
    assert [d.source.name for d in config.devices] == [
        "plantbus.toml",
        "10-press7.toml",
        "20-press8.toml",
        "20-press8.toml",
    ]
    assert [d.index for d in config.devices] == [0, 0, 0, 1]  # within each file
    assert config.devices[3].where == "conf.d/20-press8.toml: devices.sim[1]"
    assert all(isinstance(d, DeviceEntry) and d.kind == "sim" for d in config.devices)
    assert isinstance(config.devices[1].config, sim.Config)
    assert config.devices[1].config.topic == "plant/h1/press7"
    assert config.files == [
        main,
        tmp_path / "conf.d" / "10-press7.toml",
        tmp_path / "conf.d" / "20-press8.toml",
    ]
    assert config.node.tags == {"site": "ulm", "hall": "h1"}
    assert config.device("press8") is config.devices[2]
    with pytest.raises(KeyError):
        config.device("nope")


def test_conf_d_can_be_left_out(tmp_path: Path) -> None:
    main = write_tree(
        tmp_path, {"plantbus.toml": sim_device("a"), "conf.d/b.toml": "this is not toml"}
    )
    assert [d.name for d in load_config(main, include_conf_d=False).devices] == ["a"]


def test_relative_paths_resolve_against_the_file_that_names_them(tmp_path: Path) -> None:
    main = write_tree(
        tmp_path,
        {
            "plantbus.toml": MAIN.replace('listen = "127.0.0.1:8470"', 'unix = "run/api.sock"'),
            "conf.d/cell4.toml": """
[[sinks.file]]
name = "cell4"
path = "out/cell4.lp"
buffer = { kind = "memory", path = "buf" }
[[sinks.file]]
name = "abs"
path = "/tmp/abs.lp"
""",
        },
    )
    config = load_config(main)
    assert config.node.state_dir == tmp_path / "state"
    assert config.api.unix == tmp_path / "run" / "api.sock"
    lp, cell4, absolute = config.sinks
    assert lp.config.path == tmp_path / "var" / "plantbus.lp"
    assert cell4.config.path == tmp_path / "conf.d" / "out" / "cell4.lp"
    assert cell4.config.buffer.path == tmp_path / "conf.d" / "buf"
    assert absolute.config.path == Path("/tmp/abs.lp")
    assert lp.config.buffer.path is None  # unset stays unset: the outlet picks its place


def test_defaults_apply_where_an_entry_does_not_set_the_key(tmp_path: Path) -> None:
    main = write_tree(
        tmp_path,
        {
            "plantbus.toml": """
[defaults.devices]
interval = "250ms"

[defaults.sinks]
flush_interval = "2s"
queue = { size = 1000, policy = "drop_oldest" }
buffer = { kind = "memory", path = "buffers" }
""",
            "conf.d/a.toml": sim_device("slow", 'interval = "5s"\n')
            + sim_device("default")
            + '[[sinks.file]]\npath = "a.lp"\nflush_interval = "100ms"\n',
        },
    )
    config = load_config(main)
    assert [d.config.interval for d in config.devices] == [5.0, 0.25]
    (sink,) = config.sinks
    assert sink.config.flush_interval == 0.1  # its own
    assert sink.config.queue.size == 1000  # from the defaults
    assert sink.config.queue.policy == "drop_oldest"
    # a path in [defaults] is relative to the main file, wherever the sink is
    assert sink.config.buffer.path == tmp_path / "buffers"
    assert config.defaults.devices.interval == 0.25
    assert config.defaults.sinks.model_fields_set == {"flush_interval", "queue", "buffer"}


def test_sink_default_names(tmp_path: Path) -> None:
    one = load_config(
        write_tree(tmp_path / "one", {"plantbus.toml": '[[sinks.file]]\npath = "a"\n'})
    )
    assert [s.name for s in one.sinks] == ["file"]
    several = load_config(
        write_tree(
            tmp_path / "several",
            {
                "plantbus.toml": '[[sinks.file]]\npath = "a"\n'
                '[[sinks.file]]\nname = "b"\npath = "b"\n',
                "conf.d/x.toml": '[[sinks.file]]\npath = "c"\n',
            },
        )
    )
    assert [s.name for s in several.sinks] == ["file-1", "b", "file-3"]
    assert [s.key for s in several.sinks] == [("file", "file-1"), ("file", "b"), ("file", "file-3")]
    assert all(isinstance(s, SinkEntry) for s in several.sinks)


def test_entries_compare_by_kind_and_config_only(tmp_path: Path) -> None:
    files = {
        "plantbus.toml": MAIN,
        "conf.d/a.toml": sim_device("a") + sim_device("b"),
        "conf.d/c.toml": sim_device("c"),
    }
    first = load_config(write_tree(tmp_path, files))
    # the same text read again gives equal entries, with equal hashes
    again = load_config(write_tree(tmp_path, files))
    assert first.devices == again.devices
    assert first.sinks == again.sinks
    assert [d.config_hash for d in first.devices] == [d.config_hash for d in again.devices]
    assert re.fullmatch(r"[0-9a-f]{64}", first.devices[0].config_hash)
    assert len({*first.devices, *again.devices}) == 3

    # move b to its own file and change c: only c differs
    files["conf.d/a.toml"] = sim_device("a")
    files["conf.d/b.toml"] = sim_device("b")
    files["conf.d/c.toml"] = sim_device("c", 'interval = "2s"\n')
    changed = load_config(write_tree(tmp_path, files))
    old = {d.key: d for d in first.devices}
    new = {d.key: d for d in changed.devices}
    assert [k for k in new if new[k] != old[k]] == ["c"]
    assert new["b"].source.name == "b.toml" and old["b"].source.name == "a.toml"
    assert new["c"].config_hash != old["c"].config_hash


def test_equal_values_written_differently_are_equal(tmp_path: Path) -> None:
    a = load_config(
        write_tree(tmp_path / "a", {"plantbus.toml": sim_device("x", 'interval = "1000ms"\n')})
    )
    b = load_config(
        write_tree(tmp_path / "b", {"plantbus.toml": sim_device("x", 'interval = "1s"\n')})
    )
    c = load_config(write_tree(tmp_path / "c", {"plantbus.toml": sim_device("x")}))  # the default
    assert a.devices == b.devices == c.devices


def test_build_context_and_build(tmp_path: Path) -> None:
    config = load_config(write_tree(tmp_path, {"plantbus.toml": MAIN + sim_device("s1")}))
    ctx = config.build_context()
    assert ctx == BuildContext(
        node_name="edge-07", node_tags={"site": "ulm", "hall": "h1"}, state_dir=tmp_path / "state"
    )
    connector = config.devices[0].build(ctx)
    assert connector.name == "s1"


def test_utf8_bom_and_non_ascii_text_are_fine(tmp_path: Path) -> None:
    text = '[node]\nname = "prüfstand"\ntags = { halle = "Süd" }\n'
    config = load_config(write_tree(tmp_path, {"plantbus.toml": b"\xef\xbb\xbf" + text.encode()}))
    assert config.node.name == "prüfstand"
    assert config.node.tags == {"halle": "Süd"}


def test_empty_tag_values_are_allowed(tmp_path: Path) -> None:
    # an empty tag value is left out of the line rather than refused
    config = load_config(
        write_tree(tmp_path, {"plantbus.toml": sim_device("s", 'tags = { line = "" }\n')})
    )
    assert config.devices[0].config.tags == {"line": ""}


def test_ipv6_listen_address(tmp_path: Path) -> None:
    config = load_config(write_tree(tmp_path, {"plantbus.toml": '[api]\nlisten = "[::1]:9000"\n'}))
    assert config.api.listen_address == ("::1", 9000)
    off = load_config(
        write_tree(tmp_path / "off", {"plantbus.toml": '[api]\nenabled = false\nlisten = ""\n'})
    )
    assert off.api.listen is None and off.api.listen_address is None


def test_parse_config_reads_text_as_a_main_file(tmp_path: Path) -> None:
    config = parse_config(MAIN + sim_device("s1"), tmp_path / "demo.toml")
    assert config.node.state_dir == tmp_path / "state"
    assert [d.name for d in config.devices] == ["s1"]
    assert config.devices[0].where == "demo.toml: devices.sim[0]"
    with pytest.raises(ConfigError) as info:
        parse_config("[nod]\n", tmp_path / "demo.toml")
    assert info.value.errors == ["demo.toml: nod: unknown key (did you mean 'node'?)"]


def test_check_config_is_empty_for_a_valid_config(tmp_path: Path) -> None:
    assert check_config(write_tree(tmp_path, {"plantbus.toml": MAIN + sim_device("s1")})) == []


# -- the shipped files -------------------------------------------------------------------------


def test_shipped_main_config_and_conf_d_load() -> None:
    assert check_config(CONFIG / "plantbus.toml") == []
    config = load_config(CONFIG / "plantbus.toml")
    assert config.files[0] == CONFIG / "plantbus.toml"
    assert len(config.files) == 1 + len(list((CONFIG / "conf.d").glob("*.toml")))
    assert config.devices, "the conf.d examples onboard at least one device"


def test_shipped_demo_config_loads() -> None:
    config = load_config(CONFIG / "demo.toml", include_conf_d=False)
    signals = {p.signal for d in config.devices for p in d.config.points}
    assert signals == {"counter", "sine", "ramp", "random_walk", "step"}
    assert [s.kind for s in config.sinks] == ["file"]
    # under the repository's var/ (git-ignored, removed by `make clean`)
    assert config.sinks[0].config.path.resolve().is_relative_to(REPO / "var")
    assert config.node.state_dir.resolve().is_relative_to(REPO / "var")


def _uncomment(text: str) -> str:
    # Telegraf's convention: "##" explains, "# " comments out a setting; uncommenting every
    # setting must give a valid config that sets every documented key
    return "\n".join(re.sub(r"^(\s*)# (?!#)", r"\1", line) for line in text.splitlines())


def _write_api_files(folder: Path) -> None:
    # the [api] sample names a token file and a TLS key pair, which `check` reads
    import shutil
    import sys

    sys.path.insert(0, str(REPO / "tests" / "integration" / "bridges"))
    from bridge_servers import make_certs

    certs = make_certs(folder / "certs")
    (folder / "tls").mkdir()
    shutil.copy(certs.server_cert, folder / "tls" / "api.pem")
    shutil.copy(certs.server_key, folder / "tls" / "api.key")
    (folder / "tokens").mkdir()
    (folder / "tokens" / "dashboard").write_text("a-token\n")


def test_every_commented_setting_in_the_main_config_is_valid_and_documented(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = (CONFIG / "plantbus.toml").read_text()
    monkeypatch.setenv("INFLUX_TOKEN", "a-token")  # the 2.x example takes it from there
    _write_api_files(tmp_path)
    config = parse_config(_uncomment(raw), tmp_path / "plantbus.toml")
    # [node], [api] and [defaults] show every key as a setting
    for model in (config.node, config.api, config.defaults.devices, config.defaults.sinks):
        assert model.model_fields_set == set(type(model).model_fields), type(model).__name__
    assert {s.kind for s in config.sinks} == {"file", "influxdb", "kapacitor", "punt"}
    for s in config.sinks:
        # every key of each sink kind is at least named (set, or explained in a "##" line)
        for key in type(s.config).model_fields:
            assert re.search(rf"^[#\s]*{key} = ", raw, re.MULTILINE), (s.kind, key)


def test_plantbus_config_is_immutable(tmp_path: Path) -> None:
    config = load_config(write_tree(tmp_path, {"plantbus.toml": MAIN}))
    assert isinstance(config, PlantbusConfig)
    with pytest.raises(AttributeError):
        config.node = None  # type: ignore[misc]
    with pytest.raises(ValueError):
        config.node.name = "other"  # type: ignore[misc]
