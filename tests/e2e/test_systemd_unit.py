"""systemd/weft.service as systemd reads it: ``systemd-analyze verify`` passes with nothing on
stderr, ``systemd-analyze security --offline`` runs (the exposure score is printed), and the
unit's timeouts and paths agree with weft's defaults.

How the shipped file is verified unchanged: ``verify`` checks that every Exec*= binary exists and
is executable, and the unit names /usr/local/bin/weft (where ``pip install`` puts the console
script on a server), while a test machine has weft in a virtualenv. Rewriting the paths in a
copy would verify a file nobody ships; installing something at /usr/local/bin would change the
machine. So each test builds an alternate root and passes ``--root=``, under which systemd
resolves both the units and the binaries:

* ``<root>/usr/lib/systemd/system``: a copy of this machine's system units, so that the unit's
  dependencies (network-online.target, multi-user.target, the default ones) resolve as they
  will on a server;
* ``<root>/etc/systemd/system/weft.service``: the shipped file, byte for byte;
* ``<root>/usr/local/bin/weft`` (each path the Exec*= lines name): a script running this
  checkout's weft with the test's interpreter.

``User=weft``: systemd-analyze (252) does not look the user up, so the test needs neither the
user nor root; starting the unit does need it (README: ``useradd --system``).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.procs import REPO_ROOT

from weft.schema import Config, Timeouts

pytestmark = pytest.mark.e2e

UNIT = REPO_ROOT / "systemd" / "weft.service"
UNIT_IN_ROOT = "/etc/systemd/system/weft.service"
HOST_UNITS = Path("/usr/lib/systemd/system")
ANALYZE_TIMEOUT = 60.0  # seconds; verify and security take well under one


def _analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze not found: install the `systemd` package (scripts/test does)")
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_analyze(), *args], capture_output=True, text=True, timeout=ANALYZE_TIMEOUT, check=False
    )


def _service_settings() -> dict[str, list[str]]:
    """The [Service] section as key -> values (a key may repeat, e.g. SystemCallFilter=)."""
    settings: dict[str, list[str]] = {}
    section = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        if section == "[Service]":
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _exec_lines() -> list[list[str]]:
    return [
        value.split()
        for key, values in _service_settings().items()
        if key.startswith("Exec")
        for value in values
    ]


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    if not HOST_UNITS.is_dir():
        pytest.fail(f"{HOST_UNITS} not found: is systemd installed?")
    root = tmp_path / "root"
    shutil.copytree(HOST_UNITS, root / HOST_UNITS.relative_to("/"), symlinks=True)
    (root / "lib").symlink_to("usr/lib")  # merged /usr, as on Debian 12: /lib -> usr/lib
    target = root / UNIT_IN_ROOT.lstrip("/")
    target.parent.mkdir(parents=True)
    shutil.copyfile(UNIT, target)
    for argv in _exec_lines():
        binary = root / argv[0].lstrip("@-:+!").lstrip("/")
        binary.parent.mkdir(parents=True, exist_ok=True)
        binary.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m weft "$@"\n')
        binary.chmod(0o755)
    return root


def test_unit_verifies_with_nothing_on_stderr(unit_root: Path) -> None:
    result = _run("verify", f"--root={unit_root}", UNIT_IN_ROOT)
    assert (result.returncode, result.stderr) == (0, ""), result.stdout + result.stderr


def test_verify_would_notice_a_missing_binary(unit_root: Path) -> None:
    # The check above is only worth something if verify looks at the binaries under --root.
    for argv in _exec_lines():
        (unit_root / argv[0].lstrip("/")).unlink(missing_ok=True)
    result = _run("verify", f"--root={unit_root}", UNIT_IN_ROOT)
    assert result.returncode != 0
    assert "is not executable" in result.stderr


def test_security_exposure_is_reported(unit_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = _run("security", "--offline=true", f"--root={unit_root}", "--no-pager", UNIT_IN_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    overall = re.search(
        r"Overall exposure level for weft\.service: (\d+\.\d+) (\w+)", result.stdout
    )
    assert overall is not None, result.stdout
    open_items = [line for line in result.stdout.splitlines() if line.startswith("✗")]
    with capsys.disabled():
        print(f"\nsystemd-analyze security weft.service: exposure {overall[1]} {overall[2]}")
        for line in open_items:
            print("  " + " ".join(line.split()))


def _usec(timespan: str) -> int:
    """A systemd time span in microseconds, as systemd itself parses it."""
    result = _run("timespan", timespan)
    assert result.returncode == 0, result.stderr
    found = re.search(r"μs: (\d+)", result.stdout)
    assert found is not None, result.stdout
    return int(found[1])


def test_timeouts_fit_weft_defaults() -> None:
    # Imported here: only this test depends on the supervisor's constants.
    from weft.supervisor import DRAIN_MARGIN, TICK

    settings = _service_settings()
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    # Stop: the supervisor SIGKILLs a worker DRAIN_MARGIN after the drain deadline, then exits;
    # systemd's SIGKILL must come later still.
    drain = Timeouts().drain + DRAIN_MARGIN
    assert _usec(settings["TimeoutStopSec"][-1]) > drain * 1e6
    # Start (and, on 252, ExecReload=): every worker is ready within boot_timeout.
    assert _usec(settings["TimeoutStartSec"][-1]) > defaults["boot_timeout"] * 1e6
    # Watchdog: pings every WatchdogSec/2, from a loop that wakes at least every TICK.
    assert _usec(settings["WatchdogSec"][-1]) / 2 > TICK * 1e6


def test_the_unit_and_the_operators_commands_find_one_pidfile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README's commands (``weft status -c /etc/weft/weft.toml``, ``weft reload -c ...``) find
    the pidfile of the instance the config names; the unit must write it there."""
    from weft import control

    settings = _service_settings()
    start, reload = (value.split() for value in (*settings["ExecStart"], *settings["ExecReload"]))
    # 1. both name the config, neither a pidfile of its own: the instance's default is used
    assert start[:2] == [reload[0], "run"] and reload[1] == "reload"
    assert "--pidfile" not in start and "--pidfile" not in reload
    config = start[start.index("-c") + 1]
    assert reload[reload.index("-c") + 1] == config == "/etc/weft/weft.toml"
    # 2. under the unit (ExecStart= and ExecReload= alike) the default is in its runtime
    #    directory, as systemd sets $RUNTIME_DIRECTORY
    runtime = Path("/run") / settings["RuntimeDirectory"][-1]
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime))
    assert control.default_pidfile("default") == runtime / "default.pid"
    # 3. an operator's shell has no $RUNTIME_DIRECTORY and may not write /run/weft (the unit's
    #    user owns it): the commands still find the pidfile the unit wrote there
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    run_dir = tmp_path / "run-weft"
    run_dir.mkdir()
    (run_dir / "default.pid").write_text("1\n")
    monkeypatch.setattr(control, "RUN_DIR", run_dir)
    monkeypatch.setattr(control.os, "access", lambda *_a, **_k: False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    assert control.find_pidfile("default") == run_dir / "default.pid"
    # ... and with nothing there, the same default `weft run` itself would use
    assert control.find_pidfile("other") == control.default_pidfile("other")
