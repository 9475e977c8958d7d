"""Secrets in the config: ``${VAR}``, ``<key>_file``, "never both", the permission warning,
and that no secret is ever shown (messages, ``check`` output, repr, logs)."""

from __future__ import annotations

import io
import json
import logging
import os
import secrets as random_secrets
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from plantbus.broker.cli import main, setup_logging
from plantbus.broker.config import ConfigError, load_config, read_token
from plantbus.broker.secrets import RedactingFilter, redact_url, register

HEAD = '[node]\nname = "n"\nstate_dir = "state"\n[api]\nenabled = false\n'

# one table per kind with a secret key, each secret given as password_file = "{file}"
SECRET_TABLES = {
    ("sinks", "influxdb", "password"): (
        'url = "http://127.0.0.1:1"\ndatabase = "d"\nusername = "u"\npassword_file = "{file}"\n'
    ),
    ("sinks", "influxdb", "token"): (
        'url = "http://127.0.0.1:1"\nbucket = "b"\norg = "o"\ntoken_file = "{file}"\n'
    ),
    ("sinks", "kapacitor", "password"): (
        'url = "http://127.0.0.1:1"\ndatabase = "d"\nusername = "u"\npassword_file = "{file}"\n'
    ),
    ("sinks", "mqtt", "password"): (
        'url = "mqtt://127.0.0.1:1"\nusername = "u"\npassword_file = "{file}"\n'
    ),
    ("sinks", "amqp", "password"): (
        'url = "amqp://127.0.0.1:1/"\nexchange = "x"\nusername = "u"\npassword_file = "{file}"\n'
    ),
    ("sinks", "kafka", "password"): (
        'bootstrap_servers = ["127.0.0.1:1"]\nusername = "u"\npassword_file = "{file}"\n'
    ),
    ("devices", "mqtt", "password"): (
        'name = "m"\nurl = "mqtt://127.0.0.1:1"\nusername = "u"\npassword_file = "{file}"\n'
        'subscriptions = [{{ filter = "a/#" }}]\n'
    ),
    ("devices", "opcua", "password"): (
        'name = "o"\nurl = "opc.tcp://127.0.0.1:1"\nusername = "u"\npassword_file = "{file}"\n'
        'points = [{{ name = "a", node = "ns=2;i=1" }}]\n'
    ),
}


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def _errors(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(path)
    return e.value.errors


def _secret() -> str:
    return "s-" + random_secrets.token_urlsafe(12)


def _check(path: Path) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(["check", "-c", str(path)])
    return rc, out.getvalue() + err.getvalue()


@pytest.mark.parametrize("where", list(SECRET_TABLES), ids=lambda w: ".".join(w))
def test_every_secret_key_takes_a_file_relative_to_its_config_file(
    tmp_path: Path, where: tuple[str, str, str]
) -> None:
    section, kind, key = where
    value = _secret()
    # in conf.d: the relative path is relative to conf.d, not to the main file
    _write(tmp_path / "conf.d" / "secret" / "pw", value + "\n")
    _write(tmp_path / "plantbus.toml", HEAD)
    table = SECRET_TABLES[where].format(file="secret/pw")
    _write(tmp_path / "conf.d" / "x.toml", f"[[{section}.{kind}]]\n{table}")
    config = load_config(tmp_path / "plantbus.toml")
    entry = (config.sinks if section == "sinks" else config.devices)[0]
    assert getattr(entry.config, key).get_secret_value() == value  # trailing newline gone
    assert value not in repr(config) and value not in str(entry.config)
    assert value not in entry.config.model_dump_json()
    assert config.warnings == []


@pytest.mark.parametrize("where", list(SECRET_TABLES), ids=lambda w: ".".join(w))
def test_every_secret_key_takes_the_environment(
    tmp_path: Path, where: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    section, kind, key = where
    value = _secret()
    monkeypatch.setenv("PLANTBUS_TEST_SECRET", value)
    table = (
        SECRET_TABLES[where]
        .format(file="x")
        .replace(f'{key}_file = "x"', f'{key} = "${{PLANTBUS_TEST_SECRET}}"')
    )
    # world-readable, but the secret is not in it: no warning
    _write(tmp_path / "plantbus.toml", HEAD + f"[[{section}.{kind}]]\n{table}", 0o644)
    config = load_config(tmp_path / "plantbus.toml")
    entry = (config.sinks if section == "sinks" else config.devices)[0]
    assert getattr(entry.config, key).get_secret_value() == value
    assert config.warnings == []


def test_env_references_in_any_string_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PB_SITE", "hall1")
    monkeypatch.setenv("PB_DIR", "out")
    _write(
        tmp_path / "plantbus.toml",
        '[node]\nname = "${PB_SITE}-edge"\nstate_dir = "state"\n'
        'tags = { site = "${PB_SITE}", note = "costs $$5, $${PB_SITE} stays" }\n'
        "[api]\nenabled = false\n"
        '[[sinks.file]]\npath = "${PB_DIR}/lp"\nsubscribe = ["$SYS/#", "plant/#"]\n',
    )
    config = load_config(tmp_path / "plantbus.toml")
    assert config.node.name == "hall1-edge"
    # `$$` alone and `$SYS` are not references; only `$${` is an escape
    assert config.node.tags == {"site": "hall1", "note": "costs $$5, ${PB_SITE} stays"}
    assert config.sinks[0].config.path == tmp_path / "out" / "lp"
    assert config.sinks[0].config.subscribe == ["$SYS/#", "plant/#"]


def test_env_mistakes_name_file_key_and_variable_never_a_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PB_UNSET", raising=False)
    monkeypatch.setenv("PB_SET", "the-set-value")
    _write(tmp_path / "plantbus.toml", HEAD)
    _write(
        tmp_path / "conf.d" / "a.toml",
        '[[sinks.influxdb]]\nurl = "http://127.0.0.1:1"\ndatabase = "d"\nusername = "u"\n'
        'password = "${PB_SET}${PB_UNSET}"\n'
        '[[sinks.file]]\npath = "${PB_SET}/${not a name}"\n'
        '[[sinks.file]]\nname = "f2"\npath = "x${PB_SET"\n',
    )
    errors = _errors(tmp_path / "plantbus.toml")
    assert errors == [
        "conf.d/a.toml: sinks.influxdb[0].password: the environment variable PB_UNSET is not set",
        "conf.d/a.toml: sinks.file[0].path: ${not a name} is not an environment variable "
        "reference: a name is letters, digits and '_' (write $${ for a literal ${)",
        "conf.d/a.toml: sinks.file[1].path: an unterminated ${ (write $${ for a literal ${)",
    ]
    assert rc_and_output_hide(tmp_path, "the-set-value")


def rc_and_output_hide(tmp_path: Path, value: str) -> bool:
    rc, output = _check(tmp_path / "plantbus.toml")
    return rc == 2 and value not in output


def test_never_both_and_unreadable_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PB_PW", "from-the-env")
    _write(tmp_path / "empty", "\n")
    _write(tmp_path / "pw", "in-a-file\n")
    (tmp_path / "folder").mkdir()
    base = 'url = "http://127.0.0.1:1"\ndatabase = "d"\nusername = "u"\n'
    _write(
        tmp_path / "plantbus.toml",
        HEAD
        + f'[[sinks.influxdb]]\n{base}password = "inline-pw"\npassword_file = "pw"\n'
        + f'[[sinks.influxdb]]\nname = "b"\n{base}password = "${{PB_PW}}"\npassword_file = "pw"\n'
        + f'[[sinks.influxdb]]\nname = "c"\n{base}password_file = "missing"\n'
        + f'[[sinks.influxdb]]\nname = "d"\n{base}password_file = "empty"\n'
        + f'[[sinks.influxdb]]\nname = "e"\n{base}password_file = "folder"\n'
        + f'[[sinks.influxdb]]\nname = "f"\n{base}password_file = 5\n'
        + f'[[sinks.influxdb]]\nname = "g"\n{base}username_file = "pw"\npassword = "p-p-p"\n',
    )
    errors = _errors(tmp_path / "plantbus.toml")
    assert errors == [
        "plantbus.toml: sinks.influxdb[0].password: give `password` or `password_file`, never both",
        "plantbus.toml: sinks.influxdb[1].password: give `password` or `password_file`, never "
        "both (it comes from the environment)",
        f"plantbus.toml: sinks.influxdb[2].password_file: cannot read '{tmp_path / 'missing'}': "
        "No such file or directory",
        f"plantbus.toml: sinks.influxdb[3].password_file: '{tmp_path / 'empty'}' is empty",
        f"plantbus.toml: sinks.influxdb[4].password_file: cannot read '{tmp_path / 'folder'}': "
        "Is a directory",
        "plantbus.toml: sinks.influxdb[5].password_file: must be the path of a file holding the "
        "password, not the integer 5",
        # only secret keys take a file
        "plantbus.toml: sinks.influxdb[6].username_file: unknown key (did you mean 'username'?)",
    ]
    rc, output = _check(tmp_path / "plantbus.toml")
    assert rc == 2
    for secret in ("from-the-env", "in-a-file", "inline-pw", "p-p-p"):
        assert secret not in output


def test_api_token_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PB_TOKEN", "env-token-value")
    _write(tmp_path / "t", "file-token-value\n")
    _write(
        tmp_path / "plantbus.toml",
        '[api]\n[[api.tokens]]\ntoken_file = "t"\n[[api.tokens]]\ntoken = "${PB_TOKEN}"\n',
    )
    config = load_config(tmp_path / "plantbus.toml")
    assert [read_token(t) for t in config.api.tokens] == ["file-token-value", "env-token-value"]


def test_check_warns_when_others_may_read_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PB_PW", "env-pw-value")
    inline = "inline-pw-value"
    main_file = _write(
        tmp_path / "plantbus.toml",
        f'[node]\nname = "n"\nstate_dir = "state"\n[api]\n[[api.tokens]]\ntoken = "{inline}"\n',
        0o644,
    )
    pw = _write(tmp_path / "pw", "file-pw-value\n", 0o644)
    key = _write(tmp_path / "keys" / "k1.key", os.urandom(32).hex(), 0o604)
    base = 'url = "http://127.0.0.1:1"\ndatabase = "d"\nusername = "u"\n'
    # group-readable (0640 root:plantbus) is fine
    _write(
        tmp_path / "conf.d" / "ok.toml", f'[[sinks.influxdb]]\n{base}password = "x-x-x"\n', 0o640
    )
    _write(
        tmp_path / "conf.d" / "open.toml",
        f'[[sinks.influxdb]]\nname = "a"\n{base}password_file = "../pw"\n'
        f'[[sinks.kapacitor]]\n{base}password_file = "../pw"\n'
        f'[[sinks.influxdb]]\nname = "b"\n{base}password = "${{PB_PW}}"\n'
        '[[sinks.file]]\npath = "out"\nencrypt = { key_files = ["../keys/k1.key"] }\n',
        0o644,
    )
    config = load_config(main_file)
    assert config.warnings == [
        f"plantbus.toml: WARNING: holds secrets (api.tokens[0].token) and other users may read "
        f"it (mode 0644): chmod o-r {main_file}, or move them to <key>_file / ${{VAR}}",
        f"conf.d/open.toml: WARNING: other users may read the secret file '{pw}' (mode 0644) of "
        f"sinks.influxdb[0].password_file, sinks.kapacitor[0].password_file: chmod o-r {pw}",
        f"conf.d/open.toml: WARNING: other users may read the secret file '{key}' (mode 0604) of "
        f"sinks.file[0].encrypt.key_files[0]: chmod o-r {key}",
    ]
    rc, output = _check(main_file)
    assert rc == 0  # a warning, not an error
    assert output.count("WARNING") == 3 and "config OK: 0 devices, 5 sinks" in output
    for secret in (inline, "file-pw-value", "env-pw-value", "x-x-x"):
        assert secret not in output
    # fixed: silent
    for path in (main_file, pw, key, tmp_path / "conf.d" / "open.toml"):
        path.chmod(0o640)
    assert load_config(main_file).warnings == []


def test_urls_with_credentials_are_refused_without_showing_the_password(tmp_path: Path) -> None:
    _write(
        tmp_path / "plantbus.toml",
        HEAD + '[[sinks.amqp]]\nurl = "amqp://bob:amqp-pw-1@127.0.0.1:1/"\nexchange = "x"\n'
        '[[sinks.mqtt]]\nurl = "mqtt://bob:mqtt-pw-2@127.0.0.1:1"\n'
        '[[sinks.influxdb]]\nurl = "http://bob:influx-pw-4@127.0.0.1:1"\ndatabase = "d"\n'
        '[[devices.opcua]]\nname = "o"\nurl = "opc.tcp://bob:opc-pw-3@127.0.0.1:1"\n'
        'points = [{ name = "a", node = "ns=2;i=1" }]\n',
    )
    rc, output = _check(tmp_path / "plantbus.toml")
    assert rc == 2
    assert "amqp://bob:***@127.0.0.1:1/" in output
    assert (
        "sinks.influxdb[0].url: invalid url 'http://bob:***@127.0.0.1:1': credentials go in "
        in (output)
    )
    for secret in ("amqp-pw-1", "mqtt-pw-2", "opc-pw-3", "influx-pw-4"):
        assert secret not in output


def test_log_filter_masks_registered_secrets_and_url_passwords() -> None:
    value = _secret()
    register(value)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("plantbus.test.secrets")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.error("login with %s failed on %s", value, "amqp://u:pw-in-url@host:5672/")
        try:
            raise ValueError(f"bad password {value!r}")
        except ValueError:
            log.error("with traceback", exc_info=True)
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert value not in text and "pw-in-url" not in text
    assert "login with *** failed on amqp://u:***@host:5672/" in text
    assert "bad password '***'" in text


def test_redact_url_keeps_the_rest() -> None:
    assert redact_url("no url here") == "no url here"
    assert redact_url("x amqps://a:b@h/v?q=1 and http://h:80/p") == (
        "x amqps://a:***@h/v?q=1 and http://h:80/p"
    )


def test_escaped_forms_of_a_secret_are_masked_too() -> None:
    tail = random_secrets.token_hex(4)
    value = 'pä"ss\\wörd-' + tail
    register(value)
    record = logging.LogRecord("asyncua", logging.DEBUG, __file__, 1, "%s", None, None)
    for shown in (
        f"Password={value.encode()!r}",  # a bytes repr: escaped, non-ASCII as \xc3\xa4
        f"password={value!r}",
        f'{{"password": {json.dumps(value)}}}',
    ):
        record.msg, record.args = "Sending: %s", (shown,)
        RedactingFilter().filter(record)
        assert record.getMessage().startswith("Sending: ") and "***" in record.getMessage()
        assert tail not in record.getMessage(), record.getMessage()


def test_json_log_lines_mask_secrets_in_tracebacks(monkeypatch: pytest.MonkeyPatch) -> None:
    value = _secret()
    register(value)
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        setup_logging("debug", "json")
        try:
            raise ConnectionError(f"login {value} refused")
        except ConnectionError:
            logging.getLogger("plantbus.test").debug("failed: %s", value, exc_info=True)
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    line = json.loads(stream.getvalue().splitlines()[-1])
    assert line["msg"] == "failed: ***"
    assert "login *** refused" in line["exc"] and value not in stream.getvalue()


def test_a_changed_secret_file_changes_the_entry_for_reload(tmp_path: Path) -> None:
    # a reload (SIGHUP) reads the files again: a rotated password restarts the sink only
    _write(tmp_path / "pw", "first-password\n")
    _write(
        tmp_path / "plantbus.toml",
        HEAD + '[[sinks.influxdb]]\nurl = "http://127.0.0.1:1"\ndatabase = "d"\n'
        'username = "u"\npassword_file = "pw"\n[[sinks.file]]\npath = "out"\n',
    )
    before = load_config(tmp_path / "plantbus.toml")
    _write(tmp_path / "pw", "second-password\n")
    after = load_config(tmp_path / "plantbus.toml")
    assert before.sinks[0] != after.sinks[0]
    assert before.sinks[1] == after.sinks[1]
    # the digest that logs may show tells nothing about the secret
    assert before.sinks[0].config_hash == after.sinks[0].config_hash
