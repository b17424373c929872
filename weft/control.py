"""How the `weft stop|reload|status` commands find and talk to a running supervisor.

Two files per instance, both in the runtime directory:

* the **pidfile** (``--pidfile``; default ``$RUNTIME_DIRECTORY/<instance>.pid`` under systemd,
  else ``/run/weft/<instance>.pid`` when writable, else ``$XDG_RUNTIME_DIR/weft/`` or
  ``/tmp/weft-<uid>/``; the control commands look in ``/run/weft`` first, see `find_pidfile`):
  the supervisor's pid, written at start, removed at exit;
* the **state file** next to it (``<pidfile>.state.json``): a JSON document the supervisor
  rewrites atomically (write + rename) whenever something an operator asks about changes:
  instance, config file and hash, generation, the outcome of the last reload with a
  sequence number, and which shared records hold the observed endpoints' health and breakers
  (``observed``, `weft.workers.shared.observed_columns`).

`weft reload` reads the reload sequence number, sends SIGHUP, and waits until the number moves
on; the outcome (ok, or the validation errors / the reason the new workers failed) is then in
the file. A signal plus a file keeps the supervisor free of a control socket and its
listener; the state file is also what `weft status` shows.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any


class ControlError(Exception):
    """No supervisor to talk to, or it did not answer; the message says which."""


RUN_DIR = Path("/run/weft")  # systemd's RuntimeDirectory=weft (systemd/weft.service)


def default_pidfile(instance: str) -> Path:
    """Where the pidfile of `instance` goes when ``--pidfile`` is not given."""
    runtime = os.environ.get("RUNTIME_DIRECTORY")  # set by systemd's RuntimeDirectory=
    if runtime:
        return Path(runtime.split(":")[0]) / f"{instance}.pid"
    run = RUN_DIR
    if run.is_dir() and os.access(run, os.W_OK):
        return run / f"{instance}.pid"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(xdg) / "weft" if xdg else Path(f"/tmp/weft-{os.getuid()}")
    return base / f"{instance}.pid"


def find_pidfile(instance: str) -> Path:
    """The pidfile a control command looks at for `instance` without ``--pidfile``.

    The writer's default (`default_pidfile`) depends on who asks: under systemd it is the
    unit's runtime directory, ``/run/weft``, which an operator's shell may not be able to
    write, and then the default would move to ``$XDG_RUNTIME_DIR``. A reader only needs to
    find the file, so an existing ``/run/weft/<instance>.pid`` wins.
    """
    if not os.environ.get("RUNTIME_DIRECTORY"):
        systemd = RUN_DIR / f"{instance}.pid"
        if systemd.exists():
            return systemd
    return default_pidfile(instance)


def state_path(pidfile: Path) -> Path:
    return pidfile.with_name(pidfile.name + ".state.json")


def write_pidfile(pidfile: Path) -> None:
    pidfile.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _atomic_write(pidfile, f"{os.getpid()}\n")


def write_state(pidfile: Path, state: dict[str, Any]) -> None:
    _atomic_write(state_path(pidfile), json.dumps(state, indent=2) + "\n")


def remove_files(pidfile: Path) -> None:
    for p in (pidfile, state_path(pidfile)):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_pid(pidfile: Path) -> int:
    """The live supervisor's pid. Raises ControlError when there is none."""
    try:
        text = pidfile.read_text().strip()
    except FileNotFoundError:
        raise ControlError(f"no weft running (no pidfile at {pidfile})") from None
    try:
        pid = int(text)
    except ValueError:
        raise ControlError(f"{pidfile}: not a pid: {text!r}") from None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise ControlError(
            f"no weft running (stale pidfile {pidfile}: pid {pid} is gone)"
        ) from None
    except PermissionError:
        pass  # alive, owned by someone else: signalling it will say so
    return pid


def read_state(pidfile: Path) -> dict[str, Any]:
    try:
        return json.loads(state_path(pidfile).read_text())
    except FileNotFoundError:
        raise ControlError(f"no weft running (no state file next to {pidfile})") from None
    except json.JSONDecodeError as e:
        raise ControlError(f"{state_path(pidfile)}: unreadable state: {e}") from None


def send(pidfile: Path, signum: int) -> int:
    pid = read_pid(pidfile)
    try:
        os.kill(pid, signum)
    except PermissionError:
        raise ControlError(f"not allowed to signal weft (pid {pid})") from None
    return pid


def _running(pid: int) -> bool:
    """Whether `pid` still runs. An exited process its parent has not reaped yet is a zombie,
    for which ``kill(pid, 0)`` still succeeds: /proc tells the two apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    # The state follows the parenthesised command name, which may itself contain ") ".
    return stat[stat.rindex(")") + 2 :][:1] not in ("Z", "X")


def reload(pidfile: Path, timeout: float) -> dict[str, Any]:
    """Ask for a reload and wait for its outcome (the state file's ``reload`` entry)."""
    before = read_state(pidfile).get("reload", {}).get("seq", 0)
    send(pidfile, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            state = read_state(pidfile)
        except ControlError:
            read_pid(pidfile)  # raises if the supervisor died meanwhile
            continue
        outcome = state.get("reload", {})
        if outcome.get("seq", 0) > before:
            return outcome
    raise ControlError(f"no answer to the reload within {timeout:g}s")


def stop(pidfile: Path, timeout: float, *, fast: bool = False) -> int:
    """Send SIGTERM (SIGQUIT when `fast`) and wait until the supervisor is gone."""
    pid = send(pidfile, signal.SIGQUIT if fast else signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(pid):
            return pid
        time.sleep(0.05)
    raise ControlError(f"weft (pid {pid}) still running after {timeout:g}s")
