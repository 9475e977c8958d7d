"""`make deb` builds a package that installs, checks its config, and purges without a trace.

Runs the real dpkg on this machine (needs root); it is skipped when plantbus is already
installed here or a `plantbus` user exists, so it never touches an installation it did not
make. After the purge the machine is as it was: no files, no user, no group.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def _installed() -> bool:
    return _run("dpkg-query", "-W", "-f=${Status}", "plantbus").stdout.startswith("install")


def _exists(database: str, name: str) -> bool:
    return _run("getent", database, name).returncode == 0


@pytest.mark.timeout(600)
def test_deb_installs_checks_and_purges() -> None:
    if os.geteuid() != 0 or shutil.which("dpkg-deb") is None:
        pytest.skip("needs root and dpkg")
    if _installed() or _exists("passwd", "plantbus") or Path("/opt/plantbus").exists():
        pytest.skip("plantbus is already installed on this machine: not touching it")
    build = _run("make", "-C", str(REPO), "deb", timeout=480)
    assert build.returncode == 0, build.stdout + build.stderr
    deb = REPO / next(ln for ln in build.stdout.splitlines() if ln.endswith(".deb"))
    assert deb.suffix == ".deb" and deb.exists(), build.stdout
    contents = _run("dpkg-deb", "--contents", str(deb)).stdout
    for path in (
        "./opt/plantbus/bin/plantbus",
        "./lib/systemd/system/plantbus.service",
        "./usr/lib/sysusers.d/plantbus.conf",
        "./etc/plantbus/plantbus.toml",
        "./etc/plantbus/conf.d/",
    ):
        assert path in contents, path
    conffiles = _run("dpkg-deb", "--info", str(deb), "conffiles").stdout.split()
    assert "/etc/plantbus/plantbus.toml" in conffiles
    try:
        install = _run("dpkg", "-i", str(deb))
        assert install.returncode == 0, install.stdout + install.stderr
        # the command, its venv and the plantbus user: check the shipped config as that user
        check = _run("runuser", "-u", "plantbus", "--", "/usr/bin/plantbus", "check")
        assert check.returncode == 0, check.stdout + check.stderr
        assert check.stdout.startswith("config OK"), check.stdout
        stat = os.stat("/etc/plantbus/plantbus.toml")
        assert (stat.st_mode & 0o777, stat.st_uid) == (0o640, 0)
        # the venv's Python is the package's own: its dependencies are inside it
        imports = _run("/opt/plantbus/bin/python", "-c", "import prometheus_client, pydantic")
        assert imports.returncode == 0, imports.stderr
    finally:
        purge = _run("dpkg", "--purge", "plantbus")
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert not _installed()
    for path in ("/opt/plantbus", "/etc/plantbus", "/usr/bin/plantbus", "/var/lib/plantbus"):
        assert not Path(path).exists(), path
    assert not _exists("passwd", "plantbus") and not _exists("group", "plantbus")
