"""Start and stop the real processes of an end-to-end test: upstream servers and weft itself.

Rules this module keeps, so that a failing test never hangs and never leaves anything behind:

* every wait has a deadline (``READY_TIMEOUT``, ``STOP_TIMEOUT``) and a failure says what was
  awaited and shows the process's captured stderr;
* output goes to files in the test's tmp_path, never to pipes (a full pipe blocks the child);
* ``stop()`` sends SIGTERM, waits a bounded time, then SIGKILLs the process *and every
  descendant it had* (weft forks workers), and asserts they are gone;
* upstream servers die with their parent (PR_SET_PDEATHSIG in upstream.py).

Ports: an upstream binds port 0 and reports the port it got, which is race-free. weft is given a
port chosen by ``free_port()``: bind port 0, read the port, close the socket. Between that close
and weft's bind another process could take the port; on a test machine that is rare, and the
failure is loud (weft exits with "address in use", ``start_weft`` shows its stderr).
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[2]
UPSTREAM_SCRIPT = Path(__file__).resolve().parent / "upstream.py"

# Start-up on a loaded 2-core machine: interpreter start plus imports take ~0.3 s; 10 s is the
# ceiling after which something is wrong, not slow.
READY_TIMEOUT = 10.0
# SIGTERM to exit: weft's drain deadline in the test configs is at most a few seconds.
STOP_TIMEOUT = 15.0
POLL_INTERVAL = 0.02

T = TypeVar("T")

_instance_counter = itertools.count(1)
# Every instance this test process names starts so: its leftovers can be told from others'.
INSTANCE_PREFIX = f"e2e{os.getpid()}x"


def unique_instance() -> str:
    """An instance name no other weft of this test run uses (shm segment and pidfile names)."""
    return f"{INSTANCE_PREFIX}{next(_instance_counter)}"


def wait_for(predicate: Callable[[], T], timeout: float, what: str,
             interval: float = POLL_INTERVAL) -> T:
    """Poll ``predicate`` until it returns a truthy value; return it. AssertionError naming
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# Ports free_port handed out, so that it never hands one out twice in a test run: two calls
# in a row can get the same free port from the kernel, and a test that puts its proxy on one
# and a "dead" endpoint on the other then proxies to itself.
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (see the module docstring for the race), and that
    no earlier call of this process returned."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no port that was not handed out already")


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# -- process trees ------------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: split after the last ')'.
        fields = stat[stat.rfind(b")") + 2 :].split()
        ppid = int(fields[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, grandchildren, ...)."""
    tree = _children_map()
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z"


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` from /proc/<pid>/status (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# -- upstream servers ---------------------------------------------------------------------------


@dataclass
class Upstream:
    """A running ``tests/support/upstream.py``."""

    name: str
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    # Set for a TLS upstream: how a control request reaches it (trusting its CA, with a
    # client certificate when it requires one).
    tls: ssl.SSLContext | None = None

    @property
    def address(self) -> str:
        """``host:port``, as written in a destination's endpoints."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def _control_get(self, target: str) -> dict[str, Any]:
        """GET a control path on a fresh connection (a control connection: not counted) and
        return its JSON; AssertionError with the server's words if it refuses."""
        conn = (
            http.client.HTTPConnection(self.host, self.port, timeout=5.0)
            if self.tls is None
            else http.client.HTTPSConnection(self.host, self.port, timeout=5.0, context=self.tls)
        )
        try:
            conn.request("GET", target, headers={"connection": "close"})
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise AssertionError(f"upstream {self.name}: GET {target} answered "
                                 f"{response.status}: {body.decode(errors='replace')}")
        return json.loads(body)

    def stats(self) -> dict[str, Any]:
        """The server's counters, read on a control connection that does not count in them."""
        return self._control_get("/stats")

    def reset_stats(self) -> dict[str, Any]:
        """Clear the server's counters and lists; returns them as they were just before."""
        return self._control_get("/stats?reset=1")

    def control(self, **params: object) -> dict[str, Any]:
        """Set the server's fault setting (upstream.py docstring): ``control(mode="status",
        code=503)``, ``control(mode="hang")``, ``control()`` for normal behaviour. Each call
        replaces the whole setting. Returns the new setting; AssertionError if refused.

        True/False are sent as 1/0 (``degraded=True``)."""
        query = urllib.parse.urlencode(
            {k: (int(v) if isinstance(v, bool) else v) for k, v in params.items()})
        return self._control_get(f"/control?{query}" if query else "/control")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.terminated_by_stop = True
            try:
                self.proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5.0)
        assert self.proc.poll() is not None

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def start_upstream(name: str, log_dir: Path, *, host: str = "127.0.0.1", port: int = 0,
                   timeout: float = READY_TIMEOUT, tls: tuple[Path, Path] | None = None,
                   client_ca: Path | None = None,
                   control_tls: ssl.SSLContext | None = None) -> Upstream:
    """Start an upstream server named ``name``; return once it listens (on `port`, or on a
    free one; a test restarts a stopped upstream on its old port with it).

    `tls`: (certificate, key) PEM files to serve TLS with; `client_ca`: then require client
    certificates signed by it; `control_tls`: the context `Upstream.stats` and `control` use
    to reach a TLS upstream.

    Its stderr goes to ``log_dir/upstream-<name>.stderr``. Raises AssertionError (with that
    stderr) if it does not report ``LISTENING <port>`` within ``timeout`` seconds.
    """
    stderr_path = log_dir / f"upstream-{name}.stderr"
    with open(stderr_path, "ab") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(UPSTREAM_SCRIPT), "--port", str(port), "--name", name,
             "--host", host,
             *(["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])] if tls else []),
             *(["--tls-client-ca", str(client_ca)] if client_ca else [])],
            stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
        )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, remaining))
        if not ready:
            proc.kill()
            proc.wait(timeout=5.0)
            raise AssertionError(f"upstream {name} not listening after {timeout}s: "
                                 f"{stderr_path.read_text()}")
        byte = os.read(proc.stdout.fileno(), 1)
        if not byte:
            proc.wait(timeout=5.0)
            raise AssertionError(f"upstream {name} exited ({proc.returncode}): "
                                 f"{stderr_path.read_text()}")
        line += byte
    # Nothing more is printed; close our end so the child never blocks on it.
    proc.stdout.close()
    word, port = line.decode().split()
    assert word == "LISTENING", line
    return Upstream(name, host, int(port), proc, stderr_path, control_tls)


# -- weft ---------------------------------------------------------------------------------------


def weft_env(pythonpath: Sequence[str | Path] = (), env: dict[str, str] | None = None
             ) -> dict[str, str]:
    """The environment of a weft subprocess: the repository (and ``pythonpath``) importable."""
    out = dict(os.environ)
    paths = [str(p) for p in pythonpath] + [str(REPO_ROOT)]
    if out.get("PYTHONPATH"):
        paths.append(out["PYTHONPATH"])
    out["PYTHONPATH"] = os.pathsep.join(paths)
    out["PYTHONUNBUFFERED"] = "1"
    if env:
        out.update(env)
    return out


def run_weft_cli(args: Sequence[str], *, cwd: Path | None = None, timeout: float = 30.0,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m weft ARGS`` to completion (bounded by ``timeout``); capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "weft", *args], cwd=cwd or REPO_ROOT, env=weft_env(env=env),
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


@dataclass
class Weft:
    """A running ``python -m weft run``: its supervisor process and what it writes."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    workdir: Path
    stdout_path: Path
    stderr_path: Path
    config_path: Path | None = None
    config: dict[str, object] = field(default_factory=dict)
    instance: str | None = None
    stop_timeout: float = STOP_TIMEOUT
    returncode: int | None = None
    # True once stop() itself sent SIGTERM (as opposed to finding weft already exited)
    terminated_by_stop: bool = False
    # True once a test sent weft a signal (signal()): an exit after that is expected
    signalled: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout_text(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def access_log_path(self) -> Path | None:
        section = self.config.get("access_log")
        if isinstance(section, dict):
            path = section.get("path", "-")
            if path != "-":
                p = Path(str(path))
                return p if p.is_absolute() else self.workdir / p
        return None

    def access_log_lines(self) -> list[str]:
        """Lines of the access log: the configured file, or stdout when it logs to "-"."""
        path = self.access_log_path
        if path is None:
            return self.stdout_text().splitlines()
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def access_log_records(self) -> list[dict[str, object]]:
        """The access log parsed: one JSON object per line (lines that are not JSON skipped)."""
        out = []
        for line in self.access_log_lines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out

    def pids(self) -> list[int]:
        """The supervisor and every live descendant (the workers)."""
        return [self.pid, *descendants(self.pid)]

    def worker_pids(self) -> list[int]:
        return descendants(self.pid)

    def rss_bytes(self) -> int:
        """Summed RSS of the supervisor and its workers."""
        return sum(rss_bytes(p) for p in self.pids())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def diagnostics(self) -> str:
        return (f"weft pid {self.pid} rc={self.proc.poll()}\n--- stderr ---\n"
                f"{self.stderr_text()[-6000:]}\n--- stdout ---\n{self.stdout_text()[-3000:]}")

    def signal(self, signum: int) -> None:
        self.signalled = True
        self.proc.send_signal(signum)

    @property
    def exited_on_its_own(self) -> bool:
        """weft ended without being asked to: a crash, whatever the exit status."""
        return self.proc.poll() is not None and not (self.signalled or self.terminated_by_stop)

    def stop(self, timeout: float | None = None) -> int:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL everything left.

        Returns weft's exit status. Raises AssertionError if SIGTERM alone did not end the
        supervisor and all its workers in time (they are killed first), so a slow or stuck
        shutdown is a test failure, never a leftover process.
        """
        if self.returncode is not None:
            return self.returncode
        timeout = self.stop_timeout if timeout is None else timeout
        tree = self.pids()
        problems: list[str] = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.terminated_by_stop = True
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                problems.append(f"weft did not exit within {timeout}s of SIGTERM")
        # Workers must be gone with the supervisor (bounded grace for the kernel to reap them).
        deadline = time.monotonic() + (2.0 if not problems else 0.0)
        while any(pid_alive(p) for p in tree[1:]) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        left = [p for p in tree[1:] if pid_alive(p)]
        if left:
            problems.append(f"worker processes outlived the supervisor: {left}")
        for p in [*tree[1:]]:
            with contextlib.suppress(ProcessLookupError):
                if pid_alive(p):
                    os.kill(p, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5.0)
        self.returncode = self.proc.returncode
        leftover = self.leftover_shm()
        if leftover and problems:
            # A killed weft cannot clean up; remove its segments so the next test starts clean.
            for seg in leftover:
                with contextlib.suppress(OSError):
                    seg.unlink()
        elif leftover:
            problems.append(f"shared-memory segments left after a clean stop: {leftover}")
            for seg in leftover:
                with contextlib.suppress(OSError):
                    seg.unlink()
        if problems:
            raise AssertionError("; ".join(problems) + "\n" + self.diagnostics())
        return self.returncode

    def leftover_shm(self) -> list[Path]:
        if not self.instance:
            return []
        return sorted(Path("/dev/shm").glob(f"weft-{self.instance}-*"))


def finish(wefts: Sequence[Weft]) -> list[str]:
    """Stop every weft (teardown); return one problem text per weft that crashed during the
    test, did not stop on SIGTERM in time, or exited non-zero after it."""
    problems = []
    for w in wefts:
        if w.exited_on_its_own:
            problems.append(f"weft exited by itself during the test (rc={w.proc.returncode})\n"
                            + w.diagnostics())
            continue
        try:
            rc = w.stop()
        except AssertionError as e:
            problems.append(str(e))
            continue
        if w.terminated_by_stop and rc != 0:
            problems.append(f"weft exited with {rc} after SIGTERM (a clean stop is 0)\n"
                            + w.diagnostics())
    return problems


def _listener_from_config(config: dict[str, object]) -> tuple[str, int]:
    listeners = config.get("listeners")
    assert isinstance(listeners, list) and listeners, "the config has no [[listeners]]"
    first = listeners[0]
    assert isinstance(first, dict)
    host = str(first.get("address", "127.0.0.1"))
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, int(first["port"])


def _listener_from_args(args: Sequence[str]) -> tuple[str, int]:
    args = list(args)
    for i, a in enumerate(args):
        value = None
        if a == "--listen" and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith("--listen="):
            value = a.split("=", 1)[1]
        if value is not None:
            host, _, port = value.rpartition(":")
            return host.strip("[]") or "127.0.0.1", int(port)
    raise AssertionError(f"cannot tell weft's listen port from {args}")


def start_weft(
    workdir: Path,
    config_text: str | None = None,
    *,
    args: Sequence[str] = (),
    pythonpath: Sequence[str | Path] = (),
    env: dict[str, str] | None = None,
    ready_timeout: float = READY_TIMEOUT,
    stop_timeout: float = STOP_TIMEOUT,
    name: str = "weft",
    prefix: Sequence[str] = (),
) -> Weft:
    """Start ``python -m weft run`` and return once its listener accepts TCP connections.

    Args:
        workdir: where the config file, stdout and stderr files go (the process's cwd).
        config_text: TOML; written to ``workdir/<name>.toml`` and passed with ``-c``.
        args: extra arguments after ``run`` (quick mode: ``--listen``, ``--upstream``). Without
            a config the listen address is taken from ``--listen``.
        pythonpath: directories put first on the subprocess's PYTHONPATH (user middleware).
        env: extra environment variables.
        ready_timeout: seconds to wait for the listener.
        stop_timeout: seconds ``stop()`` waits after SIGTERM.
        prefix: a wrapper command put before ``python``, such as ``["prlimit",
            "--nofile=64:64"]``. It must exec weft (not fork it): the started process, whose
            pid ``stop()`` signals and whose descendants it kills, has to be the supervisor.

    Raises AssertionError with weft's stderr if it exits or is not listening in time (the
    process is killed first).
    """
    config: dict[str, object] = {}
    config_path = None
    cmd = [*prefix, sys.executable, "-m", "weft", "run"]
    if config_text is not None:
        config = tomllib.loads(config_text)
        config_path = workdir / f"{name}.toml"
        config_path.write_text(config_text)
        cmd += ["-c", str(config_path)]
        host, port = _listener_from_config(config) if not any(
            a.startswith("--listen") for a in args) else _listener_from_args(args)
    else:
        host, port = _listener_from_args(args)
    args = list(args)
    if config_text is None and "--instance" not in args:
        # Quick mode: a unique instance, so that its pidfile and segments are this test's own.
        args += ["--instance", unique_instance()]
    cmd += args
    server = config.get("server")
    instance = server.get("instance") if isinstance(server, dict) else None
    if config_text is None:
        instance = args[args.index("--instance") + 1]
    stdout_path = workdir / f"{name}.stdout"
    stderr_path = workdir / f"{name}.stderr"
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=workdir, env=weft_env(pythonpath, env),
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    weft = Weft(proc, host, port, workdir, stdout_path, stderr_path, config_path, config,
                str(instance) if instance else None, stop_timeout)
    deadline = time.monotonic() + ready_timeout
    while not port_accepts(host, port, timeout=0.2):
        if proc.poll() is not None:
            weft.returncode = proc.returncode
            raise AssertionError(f"weft exited before listening; cmd={cmd}\n"
                                 + weft.diagnostics())
        if time.monotonic() >= deadline:
            with contextlib.suppress(AssertionError):
                weft.stop(timeout=2.0)
            raise AssertionError(f"weft not listening on {host}:{port} after {ready_timeout}s; "
                                 f"cmd={cmd}\n" + weft.diagnostics())
        time.sleep(0.05)
    return weft


@contextlib.contextmanager
def blackhole(host: str = "127.0.0.1") -> Iterator[str]:
    """An address whose TCP connect hangs: a listener that never accepts, its backlog full.

    With ``listen(0)`` Linux queues one connection; later SYNs are dropped (not refused), so a
    connect attempt waits until its own timeout: the loopback stand-in for an unreachable host.
    Yields ``host:port``; everything is closed on exit.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        listener.bind((host, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect((host, port))
            fillers.append(s)
        # Prove it: a connect must not complete within a short deadline.
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.settimeout(0.3)
        try:
            probe.connect((host, port))
            raise AssertionError("blackhole listener accepted a connection")
        except TimeoutError:
            pass
        finally:
            probe.close()
        yield f"{host}:{port}"
    finally:
        for s in fillers:
            s.close()
        listener.close()
