"""Malformed configs: each case is one real mistake and the exact messages it must produce.

Every message names the file (relative to the main file's folder) and the key path, with
array indexes counted within that file, so the expected lists below are the whole output.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from plantbus.broker import registry
from plantbus.broker.config import ConfigError, check_config, load_config

SIM = """
[[devices.sim]]
name = "{name}"
points = [{{ name = "n", signal = "counter" }}]
"""

DEVICE_KINDS = ", ".join(sorted(registry.DEVICE_KINDS))
SINK_KINDS = ", ".join(sorted(registry.SINK_KINDS))
DURATION_HINT = 'use a number with a unit (ns, us, ms, s, m, h, d, w), e.g. "100ms", "5s", "1h30m"'


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


def errors_of(root: Path, files: dict[str, str | bytes]) -> list[str]:
    main = write_tree(root, files)
    with pytest.raises(ConfigError) as info:
        load_config(main)
    # check_config is what `plantbus check` prints: it must agree with load_config
    assert check_config(main) == info.value.errors
    return info.value.errors


CASES: list[tuple[str, dict[str, str | bytes], list[str]]] = [
    (
        "unknown top-level key with a suggestion",
        {"plantbus.toml": '[nodes]\nname = "edge"\n'},
        ["plantbus.toml: nodes: unknown key (did you mean 'node'?)"],
    ),
    (
        "unknown device key with a suggestion",
        {"conf.d/press7.toml": SIM.format(name="press7") + 'intervall = "1s"\n'},
        ["conf.d/press7.toml: devices.sim[0].intervall: unknown key (did you mean 'interval'?)"],
    ),
    (
        "unknown key nested in a point",
        {
            "conf.d/sim.toml": """
[[devices.sim]]
name = "s1"
points = [
  { name = "n", signal = "counter" },
  { name = "temp", signal = "sine", perod = "5s" },
]
"""
        },
        ["conf.d/sim.toml: devices.sim[0].points[1].perod: unknown key (did you mean 'period'?)"],
    ),
    (
        "unknown key without any close match",
        {"plantbus.toml": SIM.format(name="s1") + "colour = 3\n"},
        ["plantbus.toml: devices.sim[0].colour: unknown key"],
    ),
    (
        "unknown key in a sink",
        {
            "plantbus.toml": """
[[sinks.file]]
path = "var/out.lp"
flush_intervall = "1s"
"""
        },
        [
            "plantbus.toml: sinks.file[0].flush_intervall: unknown key "
            "(did you mean 'flush_interval'?)"
        ],
    ),
    (
        "unknown key in a nested sink table",
        {
            "plantbus.toml": '[[sinks.file]]\npath = "o.lp"\n'
            'buffer = { kind = "memory", max_sise = "1GiB" }\n'
        },
        ["plantbus.toml: sinks.file[0].buffer.max_sise: unknown key (did you mean 'max_size'?)"],
    ),
    (
        "wrong type: a string for an integer",
        {"plantbus.toml": SIM.format(name="s1") + 'batch = "five"\n'},
        ["plantbus.toml: devices.sim[0].batch: must be an integer, not the string 'five'"],
    ),
    (
        "wrong type: a float with a fraction for an integer",
        {"plantbus.toml": SIM.format(name="s1") + "batch = 2.5\n"},
        ["plantbus.toml: devices.sim[0].batch: must be an integer, not the float 2.5"],
    ),
    (
        "wrong type: a number as a tag value",
        {"plantbus.toml": "[node]\ntags = { site = 7 }\n"},
        ["plantbus.toml: node.tags.site: must be a string, not the integer 7"],
    ),
    (
        "bad duration",
        {"conf.d/a.toml": SIM.format(name="s1") + 'interval = "10 parsecs"\n'},
        [f"conf.d/a.toml: devices.sim[0].interval: invalid duration '10 parsecs': {DURATION_HINT}"],
    ),
    (
        "negative interval",
        {"conf.d/a.toml": SIM.format(name="s1") + 'interval = "-5s"\n'},
        [f"conf.d/a.toml: devices.sim[0].interval: invalid duration '-5s': {DURATION_HINT}"],
    ),
    (
        "negative interval as a number",
        {"conf.d/a.toml": SIM.format(name="s1") + "interval = -5\n"},
        ["conf.d/a.toml: devices.sim[0].interval: a duration cannot be negative"],
    ),
    (
        "bad size",
        {"plantbus.toml": '[defaults.sinks]\nbatch_bytes = "4 megs"\n'},
        [
            "plantbus.toml: defaults.sinks.batch_bytes: invalid size '4 megs': use a number with "
            'B, kB, MB, GB, KiB, MiB or GiB, e.g. "512MiB"'
        ],
    ),
    (
        "bad value of a choice",
        {"plantbus.toml": '[defaults.sinks]\nqueue = { size = 10, policy = "drop_olderst" }\n'},
        [
            "plantbus.toml: defaults.sinks.queue.policy: must be 'block', 'drop_oldest' or "
            "'drop_newest', not the string 'drop_olderst'"
        ],
    ),
    (
        "number out of range",
        {"plantbus.toml": "[defaults.sinks]\nbatch_size = 0\n"},
        [
            "plantbus.toml: defaults.sinks.batch_size: must be greater than or equal to 1, "
            "not the integer 0"
        ],
    ),
    (
        "missing required keys",
        {"conf.d/a.toml": '[[devices.sim]]\ntopic = "plant/a"\n'},
        [
            "conf.d/a.toml: devices.sim[0].name: missing required key",
            "conf.d/a.toml: devices.sim[0].points: missing required key",
        ],
    ),
    (
        "missing required key in a point",
        {"conf.d/a.toml": SIM.format(name="s1").replace('name = "n", ', "")},
        ["conf.d/a.toml: devices.sim[0].points[0].name: missing required key"],
    ),
    (
        "empty device name",
        {"conf.d/a.toml": SIM.format(name="")},
        ["conf.d/a.toml: devices.sim[0].name: must not be empty"],
    ),
    (
        "duplicate device name across two conf.d files",
        {
            "conf.d/hall1.toml": SIM.format(name="press7"),
            "conf.d/hall2.toml": SIM.format(name="press8") + SIM.format(name="press7"),
        },
        [
            "conf.d/hall2.toml: devices.sim[1].name: duplicate device name 'press7' "
            "(first defined in conf.d/hall1.toml at devices.sim[0])"
        ],
    ),
    (
        "unknown device kind",
        {"conf.d/a.toml": '[[devices.simm]]\nname = "x"\n'},
        [
            f"conf.d/a.toml: devices.simm: unknown device kind 'simm' (did you mean 'sim'?); "
            f"known kinds: {DEVICE_KINDS}"
        ],
    ),
    (
        "unknown sink kind",
        {"plantbus.toml": '[[sinks.influx]]\nurl = "http://127.0.0.1:8086"\n'},
        [
            "plantbus.toml: sinks.influx: unknown sink kind 'influx' (did you mean 'influxdb'?); "
            f"known kinds: {SINK_KINDS}"
        ],
    ),
    (
        "invalid topic filter",
        {"plantbus.toml": '[[sinks.file]]\npath = "o.lp"\nsubscribe = ["plant/#", "a/#/b"]\n'},
        [
            "plantbus.toml: sinks.file[0].subscribe[1]: filter 'a/#/b': "
            "'#' must be a whole level and the last one"
        ],
    ),
    (
        "wildcard in a device topic",
        {"plantbus.toml": SIM.format(name="s1") + 'topic = "plant/+/s1"\n'},
        [
            "plantbus.toml: devices.sim[0].topic: topic 'plant/+/s1' holds a wildcard (+ or #); "
            "only filters may"
        ],
    ),
    (
        "device topic in the system namespace",
        {"plantbus.toml": SIM.format(name="s1") + 'topic = "$cmd/s1"\n'},
        [
            "plantbus.toml: devices.sim[0].topic: topic '$cmd/s1' starts with '$', which is "
            "reserved for system topics ($cmd/..., $reply/...)"
        ],
    ),
    (
        "device name that makes an invalid default topic",
        {"plantbus.toml": '[node]\nname = "edge"\n' + SIM.format(name="press+7")},
        [
            "plantbus.toml: devices.sim[0].name: the default topic is invalid: topic "
            "'edge/press+7' holds a wildcard (+ or #); only filters may (set `topic`)"
        ],
    ),
    (
        "point name that InfluxDB refuses",
        {"plantbus.toml": SIM.format(name="s1").replace('"n"', '"time"')},
        [
            "plantbus.toml: devices.sim[0].points[0].name: point name 'time' cannot be written "
            "in line protocol: it is 'time', which InfluxDB refuses as a field key"
        ],
    ),
    (
        "tag value ending in a backslash",
        {"conf.d/a.toml": SIM.format(name="s1") + "tags = { line = 'L1\\' }\n"},
        [
            "conf.d/a.toml: devices.sim[0].tags.line: tag value 'L1\\\\' cannot be written in "
            "line protocol: it ends with a backslash"
        ],
    ),
    (
        "measurement holding a newline",
        {"conf.d/a.toml": SIM.format(name="s1") + 'measurement = "press\\nline"\n'},
        [
            "conf.d/a.toml: devices.sim[0].measurement: measurement 'press\\nline' cannot be "
            "written in line protocol: it contains a newline"
        ],
    ),
    (
        "node tag key ending in a backslash",
        {"plantbus.toml": "[node]\ntags = { 'site\\' = \"ulm\" }\n"},
        [
            "plantbus.toml: node.tags: tag key 'site\\\\' cannot be written in line protocol: "
            "it ends with a backslash"
        ],
    ),
    (
        "the reserved tag 'device'",
        {"plantbus.toml": SIM.format(name="s1") + 'tags = { device = "other" }\n'},
        [
            "plantbus.toml: devices.sim[0].tags.device: the tag 'device' is reserved: "
            "plantbus sets it to the device name"
        ],
    ),
    (
        "TOML syntax error",
        {"conf.d/press7.toml": '[[devices.sim]]\nname = "press7"\ninterval = fast\n'},
        ["conf.d/press7.toml: line 3, column 12: TOML syntax error: Invalid value"],
    ),
    (
        "TOML syntax error at the end of the file",
        {"plantbus.toml": '[node]\nname = "edge'},
        ["plantbus.toml: at the end of the file: TOML syntax error: Unterminated string"],
    ),
    (
        "the same key twice",
        {"plantbus.toml": '[node]\nname = "a"\nname = "b"\n'},
        ["plantbus.toml: line 3, column 11: TOML syntax error: Cannot overwrite a value"],
    ),
    (
        "[node] in a conf.d file",
        {"conf.d/a.toml": '[node]\nname = "edge"\n' + SIM.format(name="s1")},
        ["conf.d/a.toml: node: only the main file (plantbus.toml) may hold [node]"],
    ),
    (
        "[defaults] in a conf.d file",
        {"conf.d/a.toml": '[defaults.devices]\ninterval = "1s"\n'},
        ["conf.d/a.toml: defaults: only the main file (plantbus.toml) may hold [defaults]"],
    ),
    (
        "unknown key in [defaults]",
        {"plantbus.toml": '[defaults.device]\ninterval = "1s"\n'},
        ["plantbus.toml: defaults.device: unknown key (did you mean 'devices'?)"],
    ),
    (
        "a device-only key in [defaults.devices]",
        {"plantbus.toml": '[defaults.devices]\nname = "x"\n'},
        ["plantbus.toml: defaults.devices.name: unknown key"],
    ),
    (
        "non-UTF-8 file",
        {"conf.d/latin1.toml": '[[devices.sim]]\nname = "Pr\xfcfstand"\n'.encode("latin-1")},
        ["conf.d/latin1.toml: not UTF-8 text: invalid byte 0xfc on line 2"],
    ),
    (
        "an array of tables where a table belongs",
        {"plantbus.toml": '[[node]]\nname = "edge"\n'},
        ["plantbus.toml: node: must be a table, not an array"],
    ),
    (
        "a single table where an array of tables belongs",
        {"conf.d/a.toml": '[devices.sim]\nname = "s1"\n'},
        [
            "conf.d/a.toml: devices.sim: must be an array of tables ([[devices.sim]]), "
            "not a single table"
        ],
    ),
    (
        "a value where the devices table belongs",
        {"plantbus.toml": "devices = 5\n"},
        ["plantbus.toml: devices: must be a table of device kinds, not the integer 5"],
    ),
    (
        "a string where the points array belongs",
        {"plantbus.toml": '[[devices.sim]]\nname = "s1"\npoints = "n"\n'},
        ["plantbus.toml: devices.sim[0].points: must be an array, not the string 'n'"],
    ),
    (
        "a table where a string belongs",
        {"plantbus.toml": "[api]\nlisten = { host = '127.0.0.1' }\n"},
        ["plantbus.toml: api.listen: must be a string, not a table"],
    ),
    (
        "bad listen address",
        {"plantbus.toml": '[api]\nlisten = "localhost"\n'},
        [
            "plantbus.toml: api.listen: invalid listen address 'localhost': use \"host:port\", "
            'e.g. "127.0.0.1:8470"'
        ],
    ),
    (
        "API enabled with nowhere to listen",
        {"plantbus.toml": '[api]\nlisten = ""\n'},
        ["plantbus.toml: api: the API is enabled but has neither `listen` nor `unix`"],
    ),
    (
        "node name that is not one topic level",
        {"plantbus.toml": '[node]\nname = "hall1/edge"\n'},
        [
            "plantbus.toml: node.name: node name 'hall1/edge' must be a single topic level: "
            "no '/', '+', '#' and no leading '$'"
        ],
    ),
    (
        "a default that a sink kind refuses",
        {
            "plantbus.toml": '[defaults.sinks]\ncodec = "json"\n'
            '[[sinks.file]]\npath = "a.lp"\n[[sinks.file]]\npath = "b.lp"\ncodec = "json"\n'
        },
        [
            "plantbus.toml: sinks.file[0].codec: must be 'line_protocol', not the string 'json' "
            "(value from defaults.sinks.codec in plantbus.toml)",
            "plantbus.toml: sinks.file[1].codec: must be 'line_protocol', not the string 'json'",
        ],
    ),
    (
        "a secret of the wrong type is not echoed",
        {
            "plantbus.toml": '[[sinks.influxdb]]\ndatabase = "plant"\n'
            'username = "plantbus"\npassword = 31415926\n'
        },
        [
            "plantbus.toml: sinks.influxdb[0].password: must be a string, "
            "not the value given (not shown: it is a secret)"
        ],
    ),
    (
        "missing required sink key and a value its kind refuses",
        # influxdb has no required key since 2.x took `bucket` beside `database`: punt's url
        {
            "conf.d/punt.toml": '[[sinks.punt]]\nsubscribe = ["plant/in/#"]\n'
            'result_topic = "plant/out"\nbatch_size = 0\n'
        },
        [
            "conf.d/punt.toml: sinks.punt[0].batch_size: must be greater than or equal to 1, "
            "not the integer 0",
            "conf.d/punt.toml: sinks.punt[0].url: missing required key",
        ],
    ),
    (
        "point named like another point's read-back reply field",
        {
            "conf.d/m.toml": '[[devices.modbus]]\nname = "m"\nhost = "127.0.0.1"\n'
            "read_back = true\npoints = [\n"
            '  { name = "sp", address = 0, writable = true },\n'
            '  { name = "sp.read_back", address = 1 },\n'
            '  { name = "sp.read_back_error", address = 2 },\n'
            '  { name = "ro", address = 3 },\n'
            '  { name = "ro.read_back", address = 4 },\n]\n'
        },
        [
            "conf.d/m.toml: devices.modbus[0].points[1].name: point name 'sp.read_back' is "
            "the reply field that reports the read-back of writable point 'sp'; rename one "
            "of them",
            "conf.d/m.toml: devices.modbus[0].points[2].name: point name 'sp.read_back_error' "
            "is the reply field that reports the read-back of writable point 'sp'; rename one "
            "of them",
        ],
    ),
    (
        "duplicate sink name",
        {
            "plantbus.toml": '[[sinks.file]]\nname = "lp"\npath = "a.lp"\n',
            "conf.d/b.toml": '[[sinks.file]]\nname = "lp"\npath = "b.lp"\n',
        },
        [
            "conf.d/b.toml: sinks.file[0].name: duplicate file sink name 'lp' "
            "(first defined in plantbus.toml at sinks.file[0])"
        ],
    ),
    (
        "sink name that could escape its buffer folder",
        {"plantbus.toml": '[[sinks.file]]\nname = "../x"\npath = "a.lp"\n'},
        [
            "plantbus.toml: sinks.file[0].name: sink name '../x' must not contain '/' "
            "nor start with '.'"
        ],
    ),
]


@pytest.mark.parametrize(("files", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed(tmp_path: Path, files: dict[str, str | bytes], expected: list[str]) -> None:
    files.setdefault("plantbus.toml", "")
    assert errors_of(tmp_path, files) == expected


def test_all_errors_of_all_files_are_collected_in_file_order(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path,
        {
            "plantbus.toml": '[node]\nname = ""\n[api]\nenabled = "perhaps"\n',
            "conf.d/b.toml": SIM.format(name="b") + 'interval = "fast"\nbatch = 0\n',
            "conf.d/a.toml": SIM.format(name="a").replace("counter", "pulse"),
            "conf.d/c.toml": "not toml at all\n",
        },
    )
    assert errors == [
        "plantbus.toml: node.name: must not be empty",
        "plantbus.toml: api.enabled: must be true or false, not the string 'perhaps'",
        "conf.d/a.toml: devices.sim[0].points[0].signal: must be 'sine', 'ramp', 'counter', "
        "'random_walk' or 'step', not the string 'pulse'",
        f"conf.d/b.toml: devices.sim[0].interval: invalid duration 'fast': {DURATION_HINT}",
        "conf.d/b.toml: devices.sim[0].batch: must be greater than or equal to 1, "
        "not the integer 0",
        "conf.d/c.toml: line 1, column 5: TOML syntax error: Expected '=' after a key in a "
        "key/value pair",
    ]


def test_missing_main_file(tmp_path: Path) -> None:
    main = tmp_path / "plantbus.toml"
    expected = [f"plantbus.toml: cannot read {main}: No such file or directory"]
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert info.value.errors == expected
    assert check_config(main) == expected


def test_main_file_is_a_folder(tmp_path: Path) -> None:
    main = tmp_path / "etc"
    main.mkdir()
    assert check_config(main) == [f"etc: cannot read {main}: Is a directory"]


def test_unreadable_conf_d_file(tmp_path: Path) -> None:
    # tests run as root, which reads any file whatever its mode: use a dangling symlink
    main = write_tree(tmp_path, {"plantbus.toml": "", "conf.d/ok.toml": SIM.format(name="s1")})
    target = tmp_path / "gone.toml"
    os.symlink(target, tmp_path / "conf.d" / "press7.toml")
    assert check_config(main) == [
        f"conf.d/press7.toml: cannot read {tmp_path / 'conf.d' / 'press7.toml'}: "
        "No such file or directory"
    ]


def test_conf_d_that_is_a_file(tmp_path: Path) -> None:
    main = write_tree(tmp_path, {"plantbus.toml": "", "conf.d": "oops"})
    assert check_config(main) == ["conf.d: cannot read the folder: Not a directory"]


def test_config_error_text(tmp_path: Path) -> None:
    # the main file is named relative to its own folder, wherever it is read from
    main = write_tree(tmp_path / "etc", {"plantbus.toml": "[nodes]\n"})
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert info.value.errors == ["plantbus.toml: nodes: unknown key (did you mean 'node'?)"]
    assert str(info.value) == "plantbus.toml: nodes: unknown key (did you mean 'node'?)"
    assert info.value.messages is info.value.errors


def test_check_config_never_raises(tmp_path: Path) -> None:
    # whatever goes wrong comes back as messages: `plantbus check` prints no traceback
    assert check_config(tmp_path / "missing" / "plantbus.toml")
    write_tree(tmp_path, {"plantbus.toml": b"\x00\xff\xfe"})
    assert check_config(tmp_path / "plantbus.toml") == [
        "plantbus.toml: not UTF-8 text: invalid byte 0xff on line 1"
    ]


def test_disk_buffer_is_accepted_and_its_keys_checked(tmp_path):
    from plantbus.broker.config import check_config, load_config

    main = tmp_path / "plantbus.toml"
    main.write_text(
        '[node]\nstate_dir = "state"\n[[sinks.file]]\npath = "x.lp"\n'
        'buffer = { kind = "disk", max_size = "1GiB", when_full = "block", '
        'sync_interval = "200ms" }\n'
    )
    assert check_config(main) == []
    cfg = load_config(main)
    assert cfg.node.state_dir == tmp_path / "state"  # relative: against the file's folder
    b = cfg.sinks[0].config.buffer
    assert (b.kind, b.max_size, b.when_full, b.sync_interval) == ("disk", 1 << 30, "block", 0.2)
    main.write_text(
        '[[sinks.file]]\npath = "x.lp"\n'
        'buffer = { kind = "disk", max_sise = "1GiB", when_full = "sometimes" }\n'
    )
    errors = check_config(main)
    assert any(
        e.startswith("plantbus.toml: sinks.file[0].buffer.max_sise: unknown key") for e in errors
    ), errors
    assert any(e.startswith("plantbus.toml: sinks.file[0].buffer.when_full:") for e in errors)


def test_two_disk_buffered_sinks_cannot_share_a_folder(tmp_path: Path) -> None:
    # b's explicit path is a's default folder (<state_dir>/buffers/<kind>/<name>)
    errors = errors_of(
        tmp_path,
        {
            "plantbus.toml": '[node]\nstate_dir = "state"\n'
            '[[sinks.file]]\nname = "a"\npath = "a.lp"\nbuffer = { kind = "disk" }\n'
            '[[sinks.file]]\nname = "m"\npath = "m.lp"\n',
            "conf.d/b.toml": '[[sinks.file]]\nname = "b"\npath = "b.lp"\n'
            'buffer = { kind = "disk", path = "../state/buffers/file/a" }\n',
        },
    )
    folder = tmp_path / "state" / "buffers" / "file" / "a"
    assert errors == [
        f"conf.d/b.toml: sinks.file[0].buffer.path: disk buffer folder {str(folder)!r} is "
        "already the buffer of file sink 'a' (plantbus.toml at sinks.file[0]); each "
        "disk-buffered sink needs its own folder"
    ]
