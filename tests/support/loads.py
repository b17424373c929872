"""Keep-alive loads from clients that are no kinder than real ones.

`KeepAliveLoad` (support.supervised) checks an idle connection before reusing it, as urllib3
does, so a server that closes idle connections costs it nothing. Most clients don't: Python's
`http.client`, curl in a loop, wrk, browsers mid-navigation. They send on a kept-alive
connection without looking, and a close that crosses the request loses it. These loads count
every request such a client sends:

* `HttpClientLoad`: threads, each with one `http.client.HTTPConnection` looping a GET, with an
  optional think time between requests (slow clients keep their connection idle, which is
  what a draining server has to get right);
* `WrkLoad`: `wrk` with keep-alive and a Lua `delay()` between requests, run as a subprocess
  and stopped with SIGINT, after which it prints its summary.
"""

from __future__ import annotations

import http.client
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from support.procs import wait_for


@dataclass
class HttpFailure:
    client: int
    kind: str  # the exception's class name, or "status <n>"
    detail: str
    nth: int  # the request's index on its connection (0: the first on a new connection)


@dataclass
class HttpClientCounts:
    ok: int = 0
    connections: int = 0  # connections http.client opened (it reconnects after a close)
    closed_by_server: int = 0  # responses that said Connection: close
    upstreams: Counter[str] = field(default_factory=Counter)


class ClientThreads:
    """`clients` threads running `_run(i)` until `stop`; a context manager (threads start on
    enter, stop and are joined, with a bound, on exit). Subclasses set `name` and `_run`."""

    name = "client"

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _run(self, client: int) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        for i in range(self.clients):
            t = threading.Thread(target=self._run, args=(i,), name=f"{self.name}-{i}",
                                 daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"{self.name} clients did not stop within {timeout}s: {alive}"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class HttpClientLoad(ClientThreads):
    """`clients` threads looping ``GET path`` on one `http.client.HTTPConnection` each.

    The client never probes its idle connection: it sends, and an error is a failed request.
    After a failure it closes and goes on with a fresh connection (as an application would
    after reporting the error). `think` is a (low, high) range of seconds slept between
    requests; (0, 0) means back to back.
    """

    def __init__(self, host: str, port: int, *, clients: int, path: str = "/echo",
                 think: tuple[float, float] = (0.0, 0.0), timeout: float = 10.0,
                 name: str = "http.client") -> None:
        super().__init__(clients)
        self.host, self.port, self.path = host, port, path
        self.think = think
        self.timeout = timeout
        self.name = name
        self.counts = HttpClientCounts()
        self.failures: list[HttpFailure] = []
        self._lock = threading.Lock()

    def ok(self) -> int:
        with self._lock:
            return self.counts.ok

    def wait_requests(self, n: int, timeout: float = 10.0) -> None:
        target = self.ok() + n
        wait_for(lambda: self.ok() >= target, timeout, f"{n} more {self.name} requests")

    def summary(self) -> str:
        kinds = Counter((f.kind, f.nth) for f in self.failures)
        return (f"{self.name}: {len(self.failures)} failed of {self.counts.ok + len(self.failures)}"
                f" (by kind and index on the connection: {dict(kinds)}); {self.counts};"
                f" first: {self.failures[:5]}")

    def _run(self, client: int) -> None:
        rng = random.Random(client)
        conn = self._new_connection()
        nth = 0
        try:
            while not self._stop.is_set():
                if conn.sock is None:  # http.client closed it after Connection: close
                    nth = 0
                try:
                    if conn.sock is None:
                        with self._lock:
                            self.counts.connections += 1
                    conn.request("GET", self.path, headers={"Host": "weft-test"})
                    resp = conn.getresponse()
                    resp.read()
                except (OSError, http.client.HTTPException) as e:
                    with self._lock:
                        self.failures.append(HttpFailure(client, type(e).__name__, str(e), nth))
                    conn.close()
                    conn = self._new_connection()
                    nth = 0
                    continue
                with self._lock:
                    if resp.status == 200:
                        self.counts.ok += 1
                        self.counts.upstreams[resp.getheader("x-upstream") or "?"] += 1
                    else:
                        self.failures.append(
                            HttpFailure(client, f"status {resp.status}", "", nth))
                    if resp.will_close:
                        self.counts.closed_by_server += 1
                nth += 1
                low, high = self.think
                if high > 0:
                    self._stop.wait(rng.uniform(low, high))
        finally:
            conn.close()

    def _new_connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)


_WRK_SCRIPT = """\
wrk.headers["Host"] = "weft-test"
function delay()
  return {delay_ms}
end
"""


@dataclass
class WrkResult:
    requests: int
    socket_errors: dict[str, int]  # connect, read, write, timeout
    non_2xx: int
    output: str

    @property
    def failures(self) -> int:
        return sum(self.socket_errors.values()) + self.non_2xx


class WrkLoad:
    """`wrk` against ``http://host:port/path``: `connections` keep-alive connections on one
    thread, each sending its next request `delay_ms` after the last response (so connections
    sit idle between requests, as a real client's do). Runs until `stop` (SIGINT; wrk then
    prints its summary) or `max_seconds`."""

    def __init__(self, host: str, port: int, workdir: Path, *, connections: int = 8,
                 delay_ms: int = 5, path: str = "/echo", max_seconds: int = 120) -> None:
        wrk = shutil.which("wrk")
        assert wrk, "wrk is not installed (scripts/test installs it)"
        script = workdir / "wrk-delay.lua"
        script.write_text(_WRK_SCRIPT.format(delay_ms=delay_ms))
        self.cmd = [wrk, "-t1", f"-c{connections}", f"-d{max_seconds}s", "--timeout", "10s",
                    "-s", str(script), f"http://{host}:{port}{path}"]
        self.max_seconds = max_seconds
        self.proc: subprocess.Popen[str] | None = None
        self.result: WrkResult | None = None

    def start(self) -> WrkLoad:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        return self

    def stop(self, timeout: float = 15.0) -> WrkResult:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=5.0)
            raise AssertionError(f"wrk did not stop within {timeout}s:\n{out}") from None
        self.result = parse_wrk(out)
        return self.result

    def __enter__(self) -> WrkLoad:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.result is None:
            self.stop()


def parse_wrk(out: str) -> WrkResult:
    """The counts of wrk's summary. Raises AssertionError when there is no summary."""
    m = re.search(r"^\s*(\d+) requests in ", out, re.M)
    assert m, f"no wrk summary:\n{out}"
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    e = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if e:
        errors = dict(zip(errors, map(int, e.groups()), strict=True))
    n = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return WrkResult(int(m.group(1)), errors, int(n.group(1)) if n else 0, out)
