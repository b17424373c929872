"""Helpers for end-to-end tests of the supervisor: its pidfile and control commands, its worker
table, which worker serves a client connection, keep-alive load, and a stand-in for systemd.

* `Supervised` is a running ``weft run`` started with an explicit ``--pidfile`` in the test's
  directory (never the machine's default location), plus what a test asks it: the status as
  ``weft status --json`` prints it (read in-process: polling the CLI costs an interpreter start
  per poll), the ``weft reload|stop|status`` commands, and bounded waits on the worker table.
* `accepted_by` tells which process holds the server end of a client's TCP connection, read
  from the kernel (``/proc/net/tcp`` and ``/proc/<pid>/fd``): with SO_REUSEPORT a client cannot
  choose its worker, but it can find out which one it got without any help from weft.
* `KeepAliveLoad` runs N clients in threads, each keeping its connection and looping requests,
  and counts every request: what a reload or a dead worker costs clients is counted, not
  sampled.
* `NotifySocket` binds the AF_UNIX datagram socket a test passes as ``NOTIFY_SOCKET`` and keeps
  every sd_notify message weft sends to it.

Every wait has a deadline; every thread is joined with one; every socket and temporary
directory is closed or removed by the context managers.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weft.workers.shared import SharedState

from .loads import ClientThreads
from .procs import Weft, run_weft_cli, wait_for, weft_env
from .rawhttp import Incomplete, Malformed, RawConnection, RawResponse, parse_response

_pidfile_counter = itertools.count(1)


def pidfile_in(directory: Path, name: str = "weft") -> Path:
    """A fresh pidfile path in `directory` (the state file goes next to it)."""
    return directory / f"{name}-{next(_pidfile_counter)}.pid"


# -- a supervised weft ---------------------------------------------------------------------------


@dataclass
class Supervised:
    """A ``weft run`` (`weft`) and the pidfile it was started with."""

    weft: Weft
    pidfile: Path

    @property
    def pid(self) -> int:
        return self.weft.pid

    @property
    def instance(self) -> str:
        assert self.weft.instance
        return self.weft.instance

    @contextlib.contextmanager
    def shared_state(self) -> Iterator[SharedState]:
        """The instance's shared segment, attached as ``weft status`` does; closed on exit."""
        state = SharedState.attach(self.instance)
        try:
            yield state
        finally:
            state.close()

    def status(self) -> dict[str, Any]:
        """What ``weft status --json`` prints, computed in this process (same code path)."""
        from weft.status import collect

        return collect(self.pidfile)

    def workers(self) -> list[dict[str, Any]]:
        return self.status()["workers"]

    def cli(self, command: str, *args: str, timeout: float = 30.0
            ) -> subprocess.CompletedProcess[str]:
        """``python -m weft COMMAND --pidfile P ARGS`` to completion."""
        return run_weft_cli([command, "--pidfile", str(self.pidfile), *args], timeout=timeout)

    def stop_cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """``weft stop`` while this process, weft's parent, reaps weft the moment it exits, as
        systemd or a shell would (an unreaped zombie still answers ``kill(pid, 0)``). Marks
        the weft as stopped by the test."""
        self.mark_stopped_by_test()
        reaper = threading.Thread(target=self._reap, args=(timeout,), daemon=True)
        reaper.start()
        try:
            return self.cli("stop", "--timeout", str(timeout), *args, timeout=timeout + 15.0)
        finally:
            reaper.join(timeout=timeout + 5.0)

    def _reap(self, timeout: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.weft.proc.wait(timeout=timeout)

    def reload(self, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """``weft reload`` (waits for the outcome, at most `timeout` seconds)."""
        return self.cli("reload", "--timeout", str(timeout), timeout=timeout + 15.0)

    def wait_workers(self, n: int, *, state: str = "READY", generation: int | None = None,
                     timeout: float = 10.0, exclude: Iterable[int] = ()) -> list[dict[str, Any]]:
        """Wait until the worker table has exactly `n` rows, all in `state` (and `generation`),
        none of them a pid in `exclude`; return the rows."""
        excluded = set(exclude)

        def settled() -> list[dict[str, Any]] | None:
            from weft.control import ControlError

            try:
                rows = self.workers()
            except ControlError:  # the state file is written just after the pidfile
                return None
            if len(rows) != n or any(r["pid"] in excluded for r in rows):
                return None
            # The state's spelling is pinned by the status test; waits only need its meaning.
            if any(r["state"].upper() != state.upper() for r in rows):
                return None
            if generation is not None and any(r["generation"] != generation for r in rows):
                return None
            return rows

        try:
            return wait_for(settled, timeout, f"{n} {state} workers")
        except AssertionError as e:
            raise AssertionError(f"{e}; table now: {self._rows_or_error()}\n"
                                 + self.weft.diagnostics()) from None

    def _rows_or_error(self) -> object:
        try:
            return self.workers()
        except Exception as e:  # a diagnostic only
            return repr(e)

    def mark_stopped_by_test(self) -> None:
        """The test stopped this weft itself (``weft stop``, SIGKILL): teardown must not call
        the exit a crash."""
        self.weft.signalled = True


def start_supervised(weft_factory: Callable[..., Weft], directory: Path,
                     config_text: str | None = None, *, args: Sequence[str] = (),
                     workers: int | None = None, name: str | None = None,
                     pidfile: Path | None = None, **kwargs: object) -> Supervised:
    """Start ``weft run ... --pidfile <directory>/<name>-N.pid`` (or `pidfile`) through the
    `weft` fixture (so teardown stops it) and, when `workers` is given, wait until that many
    are READY."""
    pidfile = pidfile or pidfile_in(directory, name or "weft")
    w = weft_factory(config_text, args=[*args, "--pidfile", str(pidfile)], name=name, **kwargs)
    sup = Supervised(w, pidfile)
    wait_for(lambda: _names_pid(pidfile, w.pid), 10.0, f"the pidfile {pidfile} of pid {w.pid}")
    if workers is not None:
        sup.wait_workers(workers)
    return sup


def _names_pid(pidfile: Path, pid: int) -> bool:
    try:
        return pidfile.read_text().strip() == str(pid)
    except FileNotFoundError:
        return False


def run_weft_to_exit(args: Sequence[str], *, cwd: Path, env: dict[str, str] | None = None,
                     timeout: float = 10.0) -> tuple[int, str]:
    """Run ``python -m weft ARGS`` expecting it to exit by itself; return (code, stderr).

    If it is still running after `timeout` seconds it is stopped (SIGTERM, then SIGKILL) and
    AssertionError is raised: a command that should have been refused must not linger.
    """
    err_path = cwd / f"run-to-exit-{next(_pidfile_counter)}.stderr"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "weft", *args],
            cwd=cwd, env=weft_env(env=env), stdout=subprocess.DEVNULL, stderr=err,
            stdin=subprocess.DEVNULL,
        )
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5.0)
        raise AssertionError(f"weft {' '.join(args)} still running after {timeout}s:\n"
                             + err_path.read_text(errors="replace")) from None
    return code, err_path.read_text(errors="replace")


def shm_segments(instance: str) -> list[Path]:
    """The instance's files in /dev/shm (``weft-<instance>-<name>``)."""
    return sorted(Path("/dev/shm").glob(f"weft-{instance}-*"))


# -- which process accepted a connection ---------------------------------------------------------


def _proc_net_addr(host: str, port: int) -> str:
    # /proc/net/tcp prints the address word as the host-order integer of its network-order
    # bytes (so 127.0.0.1 on x86 is 0100007F) and the port in hex.
    (word,) = struct.unpack("=I", socket.inet_aton(host))
    return f"{word:08X}:{port:04X}"


def accepted_by(sock: socket.socket, pids: Iterable[int]) -> int | None:
    """The pid among `pids` holding the server end of client socket `sock` (IPv4), or None
    while no process has accepted it (or none of `pids` did)."""
    client = _proc_net_addr(*sock.getsockname()[:2])
    server = _proc_net_addr(*sock.getpeername()[:2])
    inode = None
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            cols = line.split()
            if cols[1] == server and cols[2] == client:
                inode = cols[9]
                break
    if inode is None or inode == "0":
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
    return None


# -- keep-alive load -----------------------------------------------------------------------------


@dataclass
class Failure:
    """A request that did not end with a complete 200 response."""

    client: int
    kind: str  # reset | eof-before-response | eof-mid-response | timeout | malformed | status ...
    detail: str
    started: float  # time.monotonic() when the request was sent
    worker: int | None  # the process that had accepted the connection, when known
    nth: int = 0  # the request's index on its connection (0: the first, on a new connection)


@dataclass
class LoadCounts:
    requests_ok: int = 0
    connects: int = 0
    closed_after_response: int = 0  # a response said Connection: close; the client reconnected
    idle_closed: int = 0  # the server closed an idle connection; seen before the next request
    idle_reset: int = 0  # ... with a reset instead of a FIN
    upstreams: Counter[str] = field(default_factory=Counter)


class KeepAliveLoad(ClientThreads):
    """`clients` threads, each keeping one keep-alive connection and looping ``GET path``.

    A careful HTTP/1.1 client, like urllib3: before reusing an idle connection it checks
    whether the server closed it (then it reconnects: no request was lost), and it reconnects
    after a response that says ``Connection: close``. Everything else that is not a complete
    200 response to a sent request is a `Failure`: a reset, EOF before or in the middle of the
    response, no response within `timeout`, a malformed response, another status, a refused
    connect.

    `identify(sock) -> pid | None`, when given, is asked after the first response on each new
    connection which worker accepted it; failures then name their worker.

    Use as a context manager (threads start on enter, stop and are joined on exit) or call
    `start` / `stop`.
    """

    name = "load"

    def __init__(self, host: str, port: int, *, clients: int = 32, path: str = "/echo",
                 pause: float = 0.0, timeout: float = 10.0,
                 identify: Callable[[socket.socket], int | None] | None = None) -> None:
        super().__init__(clients)
        self.host = host
        self.port = port
        self.request = f"GET {path} HTTP/1.1\r\nHost: weft-test\r\n\r\n".encode()
        self.pause = pause
        self.timeout = timeout
        self.identify = identify
        self.counts = LoadCounts()
        self.failures: list[Failure] = []
        self._lock = threading.Lock()
        self._ok_since: dict[int, int] = {}  # client -> requests ok since mark()
        self._marked = False

    # -- control --

    def ok(self) -> int:
        with self._lock:
            return self.counts.requests_ok

    def mark(self) -> None:
        """Start counting, per client, the requests that succeed from now on."""
        with self._lock:
            self._ok_since = dict.fromkeys(range(self.clients), 0)
            self._marked = True

    def clients_ok_since_mark(self) -> int:
        """How many clients completed at least one request since `mark`."""
        with self._lock:
            return sum(1 for n in self._ok_since.values() if n)

    def wait_requests(self, n: int, timeout: float = 10.0) -> None:
        """Wait until `n` more requests have succeeded (the load is flowing)."""
        target = self.ok() + n
        wait_for(lambda: self.ok() >= target, timeout, f"{n} more successful requests")

    # -- one client --

    def _fail(self, client: int, kind: str, detail: str, started: float,
              worker: int | None, nth: int = 0) -> None:
        with self._lock:
            self.failures.append(Failure(client, kind, detail, started, worker, nth))

    def _run(self, client: int) -> None:
        try:
            self._loop(client)
        except Exception as e:  # never let a thread die with an unhandled exception
            self._fail(client, "client-error", repr(e), time.monotonic(), None)

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self.counts.connects += 1
        return sock

    def _closed_while_idle(self, sock: socket.socket) -> str | None:
        """'fin' or 'reset' if the server ended this idle connection, else None."""
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return None
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except ConnectionResetError:
            return "reset"
        return "fin" if not data else "unsolicited bytes"

    def _loop(self, client: int) -> None:
        sock: socket.socket | None = None
        worker: int | None = None
        fresh = False
        nth = 0
        while not self._stop.is_set():
            if sock is not None:
                how = self._closed_while_idle(sock)
                if how is not None:
                    with self._lock:
                        if how == "fin":
                            self.counts.idle_closed += 1
                        else:
                            self.counts.idle_reset += 1
                    if how == "unsolicited bytes":
                        self._fail(client, "malformed", "bytes on an idle connection",
                                   time.monotonic(), worker)
                    sock.close()
                    sock = None
            if sock is None:
                try:
                    sock = self._connect()
                except OSError as e:
                    self._fail(client, "connect", repr(e), time.monotonic(), None)
                    self._stop.wait(0.05)
                    continue
                worker = None
                fresh = True
                nth = 0
            started = time.monotonic()
            resp, error = self._exchange(sock)
            if error is not None:
                kind, detail = error
                self._fail(client, kind, detail, started, worker, nth)
                sock.close()
                sock = None
                continue
            assert resp is not None
            if fresh and self.identify is not None:
                worker = self.identify(sock)
            fresh = False
            with self._lock:
                if resp.status == 200:
                    self.counts.requests_ok += 1
                    self.counts.upstreams[resp.header("x-upstream") or "?"] += 1
                    if self._marked:
                        self._ok_since[client] += 1
            if resp.status != 200:
                self._fail(client, f"status {resp.status}", resp.body[:200].decode("latin-1"),
                           started, worker, nth)
            nth += 1
            if resp.connection_close or resp.status != 200:
                if resp.connection_close:
                    with self._lock:
                        self.counts.closed_after_response += 1
                sock.close()
                sock = None
            if self.pause:
                self._stop.wait(self.pause)
        if sock is not None:
            sock.close()

    def _exchange(self, sock: socket.socket
                  ) -> tuple[RawResponse | None, tuple[str, str] | None]:
        try:
            sock.sendall(self.request)
        except (ConnectionResetError, BrokenPipeError) as e:
            return None, ("reset", f"on send: {e!r}")
        buf = b""
        eof = False
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                resp, _used = parse_response(buf, eof=eof)
                return resp, None
            except Incomplete:
                if eof:
                    kind = "eof-mid-response" if buf else "eof-before-response"
                    return None, (kind, repr(buf[:200]))
            except Malformed as e:
                return None, ("malformed", str(e))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None, ("timeout", repr(buf[:200]))
            sock.settimeout(remaining)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                return None, ("timeout", repr(buf[:200]))
            except ConnectionResetError as e:
                return None, ("reset", f"{e!r} after {len(buf)} bytes")
            if not data:
                eof = True
            buf += data


# -- systemd's notify socket ---------------------------------------------------------------------


@dataclass
class Notification:
    fields: list[str]  # the datagram's KEY=VALUE lines
    received: float  # time.monotonic() when this test read it


class NotifySocket:
    """The AF_UNIX datagram socket systemd would pass as ``NOTIFY_SOCKET``.

    Bound in a short directory under /tmp (a socket path must fit in 108 bytes; pytest's
    tmp_path may not). `env` is what to add to weft's environment. `messages` keeps every
    datagram received so far, in order; `wait_for` reads until one matches.
    """

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="weft-notify-", dir="/tmp")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[Notification] = []

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.path}

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _receive(self, timeout: float) -> bool:
        readable, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not readable:
            return False
        data = self.sock.recv(65536)
        self.messages.append(Notification(data.decode().split("\n"), time.monotonic()))
        return True

    def wait_for(self, field: str, timeout: float = 10.0, *, after: int = 0) -> int:
        """Read until a datagram at index >= `after` has the line `field` (``KEY=VALUE``) or,
        when `field` ends with ``=``, a line starting with it; return that datagram's index."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(after, len(self.messages)):
                if any(_matches(line, field) for line in self.messages[i].fields):
                    return i
            if time.monotonic() >= deadline:
                raise AssertionError(f"no {field} from weft within {timeout}s; got "
                                     f"{[m.fields for m in self.messages]}")
            self._receive(deadline - time.monotonic())

    def fields(self, *, skip_status: bool = True) -> list[str]:
        """Every line received, in order (STATUS= lines left out unless asked)."""
        out = []
        for m in self.messages:
            out += [f for f in m.fields if not (skip_status and f.startswith("STATUS="))]
        return out


def _matches(line: str, field: str) -> bool:
    return line.startswith(field) if field.endswith("=") else line == field


def connections_by_worker(host: str, port: int, pids: Sequence[int],
                          enough: Callable[[dict[int, list[RawConnection]]], bool], *,
                          limit: int = 100) -> dict[int, list[RawConnection]]:
    """Open fresh keep-alive connections, each proven by one ``GET /echo``, and sort them by
    the worker (among `pids`) that accepted them, until `enough(groups)` holds.

    SO_REUSEPORT spreads connections over the workers by a hash of their addresses, so a
    client cannot pick its worker; it can open connections until it has the ones it needs.
    The caller closes them (every connection of every group). AssertionError after `limit`
    connections.
    """
    groups: dict[int, list[RawConnection]] = {pid: [] for pid in pids}
    try:
        for _ in range(limit):
            conn = RawConnection(port, host)
            conn.send(b"GET /echo HTTP/1.1\r\nHost: weft-test\r\n\r\n")
            resp = conn.read_response()
            assert resp.status == 200, resp
            pid = wait_for(lambda c=conn: accepted_by(c.sock, pids), 2.0,
                           "the worker holding a connection")
            groups[pid].append(conn)
            if enough(groups):
                return groups
    except BaseException:
        for conns in groups.values():
            for c in conns:
                c.close()
        raise
    for conns in groups.values():
        for c in conns:
            c.close()
    raise AssertionError(f"{limit} connections did not sort as wanted: "
                         f"{ {pid: len(c) for pid, c in groups.items()} }")
