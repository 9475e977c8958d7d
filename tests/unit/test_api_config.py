"""``[api]`` config: tokens, listeners without tokens, TLS files; and the ACL rules.

``plantbus check`` must exit 2 naming the file and key path for every mistake; the access
rules (``covers``, ``Role``) are checked here on their own, and against the real server in
``tests/integration/api/test_api_access.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from plantbus.broker.api import Role
from plantbus.broker.cli import main
from plantbus.broker.config import check_config, load_config
from plantbus.broker.topics import covers

REPO = Path(__file__).resolve().parents[2]


def _check(tmp_path: Path, text: str) -> list[str]:
    (tmp_path / "plantbus.toml").write_text(text)
    return check_config(tmp_path / "plantbus.toml")


@pytest.mark.parametrize("listen", ["0.0.0.0:8470", ":8470", "192.0.2.2:8470", "edge07:8470"])
def test_a_listener_other_machines_reach_needs_tokens(
    tmp_path: Path, listen: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "plantbus.toml").write_text(f'[api]\nlisten = "{listen}"\n')
    assert main(["check", "-c", str(tmp_path / "plantbus.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"plantbus.toml: api.listen: '{listen}' accepts connections from other")
    assert "loopback and Unix-socket clients only" in err
    # with a token it is fine
    (tmp_path / "plantbus.toml").write_text(
        f'[api]\nlisten = "{listen}"\n[[api.tokens]]\ntoken = "t"\nsubscribe = ["#"]\n'
    )
    assert main(["check", "-c", str(tmp_path / "plantbus.toml")]) == 0


@pytest.mark.parametrize("listen", ["127.0.0.1:8470", "127.1.2.3:1", "localhost:8470", "[::1]:1"])
def test_loopback_listeners_need_no_tokens(tmp_path: Path, listen: str) -> None:
    assert _check(tmp_path, f'[api]\nlisten = "{listen}"\n') == []


def test_token_mistakes_name_the_entry_and_never_the_token(tmp_path: Path) -> None:
    (tmp_path / "empty.token").write_text("  \n")
    (tmp_path / "dup.token").write_text("s3cret-value\n")
    errors = _check(
        tmp_path,
        """
[api]
[[api.tokens]]
token = "s3cret-value"
[[api.tokens]]
token_file = "dup.token"
[[api.tokens]]
token_file = "missing.token"
[[api.tokens]]
token_file = "empty.token"
[[api.tokens]]
name = "both"
token = "x"
token_file = "dup.token"
[[api.tokens]]
token = "y"
publish = ["$cmd/#"]
write = ["plant/+x"]
[[api.tokens]]
token = "z"
write = ["$cmd/plant/press"]
""",
    )
    missing = tmp_path / "missing.token"
    assert errors == [
        f"plantbus.toml: api.tokens[2].token_file: cannot read '{missing}': "
        "No such file or directory",
        "plantbus.toml: api.tokens[4].token: give `token` or `token_file`, never both",
        "plantbus.toml: api.tokens[5].publish: publish filter '$cmd/#': publish never covers "
        "command topics; list the device topics in `write` instead",
        "plantbus.toml: api.tokens[5].write: filter 'plant/+x': '+' must be a whole level",
        "plantbus.toml: api.tokens[6].write: write filter '$cmd/plant/press': `write` lists "
        "device topics (a command to 'plant/press7' is published on '$cmd/plant/press7'), "
        "without '$cmd/'",
    ]
    # once the tables are valid, the tokens are compared (the files are read at load)
    errors = _check(
        tmp_path,
        """
[api]
[[api.tokens]]
token = "s3cret-value"
[[api.tokens]]
token_file = "dup.token"
[[api.tokens]]
token_file = "empty.token"
""",
    )
    assert errors == [
        "plantbus.toml: api.tokens[1].token_file: the same token as api.tokens[0]: "
        "each token names one role",
        "plantbus.toml: api.tokens[2].token_file: the token is empty",
    ]
    assert _check(tmp_path, '[api]\n[[api.tokens]]\nname = "none"\n') == [
        "plantbus.toml: api.tokens[0]: give the token as `token` or `token_file`"
    ]
    assert not any("s3cret" in e for e in errors)


def test_local_commands_only_without_tokens(tmp_path: Path) -> None:
    assert _check(tmp_path, "[api]\nlocal_commands = true\n") == []
    assert _check(tmp_path, '[api]\nlocal_commands = true\n[[api.tokens]]\ntoken = "t"\n') == [
        "plantbus.toml: api.local_commands: applies only without [[api.tokens]]; with tokens, "
        "give a token a `write` list of the device topics it may command"
    ]


def test_queue_defaults_to_drop_oldest_for_api_clients(tmp_path: Path) -> None:
    (tmp_path / "plantbus.toml").write_text("[api]\nqueue = { size = 500 }\n")
    api = load_config(tmp_path / "plantbus.toml").api
    assert (api.queue.size, api.queue.policy) == (500, "drop_oldest")
    assert _check(tmp_path, '[api]\nqueue = { policy = "sometimes" }\n') == [
        "plantbus.toml: api.queue.policy: must be 'block', 'drop_oldest' or 'drop_newest', "
        "not the string 'sometimes'"
    ]


def test_tls_files_are_loaded_by_check(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "tests" / "integration" / "bridges"))
    from bridge_servers import make_certs

    c = make_certs(tmp_path / "tls")
    ok = f'[api]\ntls = {{ certificate = "{c.server_cert}", private_key = "{c.server_key}", '
    assert _check(tmp_path, ok + f'ca = "{c.ca}" }}\n') == []
    # the client's key with the server's certificate: not a pair
    errors = _check(
        tmp_path,
        f'[api]\ntls = {{ certificate = "{c.server_cert}", private_key = "{c.client_key}" }}\n',
    )
    assert len(errors) == 1
    assert errors[0].startswith("plantbus.toml: api.tls.certificate: cannot load the certificate")
    assert _check(tmp_path, f'[api]\ntls = {{ certificate = "{c.server_cert}" }}\n') == [
        "plantbus.toml: api.tls.private_key: missing required key: a TLS server needs it"
    ]
    errors = _check(tmp_path, ok + 'ca = "nope.pem" }\n')
    assert errors == [
        f"plantbus.toml: api.tls.ca: cannot load the CA file '{tmp_path / 'nope.pem'}': "
        "No such file or directory"
    ]
    assert _check(
        tmp_path, '[api]\nlisten = ""\nunix = "api.sock"\ntls = { certificate = "x" }\n'
    ) == ["plantbus.toml: api.tls: TLS applies to `listen`, and the API has none"]


@pytest.mark.parametrize(
    ("outer", "inner", "expected"),
    [
        ("#", "#", True),
        ("#", "plant/+/press", True),
        ("plant/#", "plant", True),
        ("plant/#", "plant/#", True),
        ("plant/#", "plant/h1/+", True),
        ("plant/+", "plant/press", True),
        ("plant/+", "plant/+", True),
        ("plant/+", "plant/#", False),
        ("plant/+", "plant/a/b", False),
        ("plant/press", "plant/+", False),
        ("plant/press", "plant/press", True),
        ("plant/press", "plant/press/#", False),
        ("plant", "plant/#", False),
        ("+/press", "plant/press", True),
        ("#", "$reply/plant", False),
        ("+/plant", "$reply/plant", False),
        ("$reply/#", "$reply/plant/+", True),
        ("analytics/#", "plant/#", False),
    ],
)
def test_covers(outer: str, inner: str, expected: bool) -> None:
    assert covers(outer, inner) is expected


def test_roles() -> None:
    op = Role("op", ("plant/+",), ("analytics/#",), ("plant/h1/#",))
    assert op.subscribe_denied("plant/press") is None
    assert op.subscribe_denied("$reply/plant/h1/press7") is None  # replies of its commands
    assert op.subscribe_denied("$reply/plant/h2/press7") is not None
    assert op.subscribe_denied("$cmd/plant/h1/press7") is not None
    assert op.publish_denied("analytics/z") is None
    assert op.publish_denied("$cmd/plant/h1/press7") is None
    assert "needs a `write` entry" in (op.publish_denied("$cmd/plant/h2/press7") or "")
    # a publish list never covers commands, whatever it holds
    wide = Role("wide", publish=("#", "+/#"))
    assert wide.publish_denied("anything/at/all") is None
    assert wide.publish_denied("$cmd/plant/press") is not None
    local = Role("local", everything=True)
    assert local.subscribe_denied("$cmd/#") is None
    assert "local_commands is false" in (local.publish_denied("$cmd/plant/press") or "")
    assert Role("local", everything=True, commands=True).publish_denied("$cmd/x") is None
