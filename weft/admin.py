"""The admin listener: metrics, health, readiness and status of the instance over HTTP.

Endpoints (all GET; with ``[admin] token`` every request needs ``Authorization: Bearer
<token>``, else 401):

==============================  ===========================================================
``/metrics``                    every family, merged over all processes (Prometheus text)
``/metrics/workers/<slot>``     the families of the current worker of that slot alone
``/healthz``                    200 while the supervisor lives
``/readyz``                     200 while a worker of the current generation is READY and the
                                instance is not stopping; 503 (with the reason) otherwise
``/status``                     JSON: what ``weft status --json`` prints
==============================  ===========================================================

Theory of operation:

* **A process of its own.** The supervisor binds the admin socket at start and keeps it (a bind
  error is a start-up error, and the port never changes hands); it forks the admin process
  before the first worker and respawns it, with a doubling backoff, whenever it dies. The admin
  process only reads what the others publish, so it keeps answering while workers crash,
  restart or reload, and nothing it does (a slow scrape, a stuck client) can delay the
  supervisor's loop. A thread in the supervisor would share its fate and the supervisor forks:
  a fork while another thread holds a lock (the logging module's, the allocator's) leaves that
  lock held forever in the child.
* **What it reads.** Metrics from the instance's metrics directory (`weft.metrics`), the
  worker table from shared memory (inherited), the generation and the "stopping" flag from the
  state file the supervisor rewrites (`weft.control`). A worker's own view is the files written
  by that worker's pid: the admin asks no worker anything. The endpoints' health, ejection and
  breaker gauges are read at each scrape from their records in the inherited shared memory,
  found through the columns the state file publishes (``observed``): the column map lives in
  the supervisor and changes with reloads, which the admin process outlives. The buffer pool's
  gauges are read from its bitmap: the supervisor creates the pool before it forks the admin
  process, so the pool (``shared.buffers``) is inherited like the worker table, and a reload
  never replaces it. It is not closed: a child ends with ``os._exit``, never unmapping what it
  inherited (see `weft.shm.segment`).
* **Serving**: `http.server` with a thread per connection, at most `MAX_CLIENTS` at once, each
  socket bounded by `CLIENT_TIMEOUT`. The process exits on SIGTERM, or when its parent is gone
  (PR_SET_PDEATHSIG, and a check of its parent pid every `POLL`). What it first undoes of
  the supervisor's inheritance is the workers' preamble too (`weft.workers.postfork`).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import selectors
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Iterable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weft import control
from weft.identity import MANIFEST
from weft.identity_process import directory_for
from weft.respawn import HelperProcess
from weft.schema import Admin, Listener
from weft.shm.worktable import NOT_READY, READY, STATE_NAMES
from weft.sock import bind_listener
from weft.workers.postfork import Preamble, exit_child

if TYPE_CHECKING:
    from weft.workers.shared import SharedState

log = logging.getLogger("weft.admin")

BACKLOG = 64
MAX_CLIENTS = 16  # connections served at once; more wait in the backlog
CLIENT_TIMEOUT = 10.0  # seconds a client may take per read or write
POLL = 0.5  # seconds between checks of the stop flag and the parent
CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"
_WORKER_PATH = re.compile(r"^/metrics/workers/(\d{1,4})$")


# -- readiness (pure) -------------------------------------------------------------------------


def readiness(state: dict[str, Any] | None, workers: Iterable[Any]) -> tuple[bool, str]:
    """Whether the instance takes traffic, and why. `state` is the state file (None while
    there is none yet); `workers` the worker-table rows (`WorkerInfo`)."""
    if state is None:
        return False, "starting"
    if state.get("stopping"):
        return False, "stopping"
    generation = state.get("generation")
    current = [w for w in workers if w.generation == generation]
    ready = [w for w in current if w.state == READY]
    if not ready:
        if any(w.state == NOT_READY for w in current):
            return False, (
                f"no worker of generation {generation} is ready: no usable X.509-SVID "
                f"({identity_problem(state)})"
            )
        return False, f"no worker of generation {generation} is ready"
    return True, f"{len(ready)} worker(s) of generation {generation} ready"


def identity_problem(state: dict[str, Any]) -> str:
    """What the identity process last reported (`weft.identity`), for /readyz."""
    instance = state.get("instance")
    try:
        manifest = json.loads((directory_for(str(instance)) / MANIFEST).read_bytes())
    except (OSError, ValueError):
        return "the identity process published nothing readable"
    return str(manifest.get("problem") or "expired, see the log")


def worker_of_slot(workers: Sequence[Any], slot: int, generation: int | None) -> int | None:
    """The pid whose view ``/metrics/workers/<slot>`` shows: the slot's worker of the current
    generation (during a reload the old one still drains beside it), else its newest."""
    rows = [w for w in workers if w.slot == slot]
    if not rows:
        return None
    current = [w for w in rows if w.generation == generation]
    if current:
        return max(current, key=lambda w: (w.state == READY, w.row)).pid
    return max(rows, key=lambda w: w.generation).pid


# -- the supervisor's side --------------------------------------------------------------------


class AdminProcess(HelperProcess):
    """The admin socket and the process serving it, as the supervisor keeps them (the
    respawn, restart and stop are `weft.respawn.HelperProcess`'s).

    The supervisor calls `bind` and `spawn` at start (before the first worker), `reaped` for
    every child it reaps that is not a worker, `tick` from its loop (respawns), `reconfigure`
    after a successful reload and `stop` when it exits. `fileno` is what a worker must close.
    """

    name = "admin process"

    def __init__(
        self, config: Admin, *, pidfile: Path, metrics_dir: Path, shared: SharedState
    ) -> None:
        super().__init__()
        self.config = config
        self.pidfile = pidfile
        self.metrics_dir = metrics_dir
        self.shared = shared
        self.sock: socket.socket | None = None

    @classmethod
    def bound(
        cls, config: Admin, pidfile: Path, metrics_dir: Path, shared: SharedState
    ) -> AdminProcess:
        """An admin process-to-be with its socket bound. Raises OSError naming the address."""
        admin = cls(config, pidfile=pidfile, metrics_dir=metrics_dir, shared=shared)
        admin.bind()
        return admin

    @property
    def address(self) -> str:
        host = f"[{self.config.address}]" if ":" in self.config.address else self.config.address
        return f"{host}:{self.config.port}"

    def bind(self) -> None:
        """Raises OSError naming the address."""
        assert self.config.port is not None
        self.sock = bind_listener(
            Listener(self.config.address, self.config.port, BACKLOG), reuseport=False
        )

    def fileno(self) -> int | None:
        return self.sock.fileno() if self.sock is not None else None

    def spawn(self, preamble: Preamble) -> int:
        """Fork the admin process; it detaches from the supervisor with `preamble` (closing
        the supervisor's other descriptors: listeners, the instance lock, pipes) first."""
        assert self.sock is not None
        pid = self._fork(lambda: _child_main(self, preamble))
        log.info("admin listener on %s (pid %d)", self.address, pid)
        return pid

    def reconfigure(self, config: Admin) -> None:
        """A reload changed [admin]: rebind if the address moved (on failure the old socket
        stays), and restart the process so that it serves the new settings."""
        if config == self.config or not config.enabled:
            if not config.enabled and self.config != config:
                log.warning("admin: turning the admin listener off takes a restart")
            return
        old_sock, old_config = self.sock, self.config
        if (config.address, config.port) != (old_config.address, old_config.port):
            self.config = config
            try:
                self.bind()
            except OSError as e:
                log.error("admin: %s; keeping %s", e.strerror, self.address)
                self.config, self.sock = old_config, old_sock
                return
            assert old_sock is not None
            old_sock.close()
        self.config = config
        self.restart()

    def stop(self) -> None:
        """Stop the admin process (bounded wait, then SIGKILL) and close the socket."""
        self.stop_process()
        self.respawn_at = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# -- the admin process ------------------------------------------------------------------------


def _child_main(admin: AdminProcess, preamble: Preamble) -> None:
    """Become the admin process; never returns (`os._exit`)."""
    code = 1
    try:
        # A terminal's Ctrl-C or Ctrl-\\ reaches the whole process group: the admin process
        # must keep answering (/readyz: 503) while the supervisor stops the workers; the
        # supervisor stops it last, with SIGTERM.
        preamble.apply(ignore=(signal.SIGHUP, signal.SIGINT, signal.SIGQUIT))
        supervisor = preamble.parent_pid
        stopping = threading.Event()
        signal.signal(signal.SIGTERM, lambda _n, _f: stopping.set())
        # The signal's byte on this pipe ends the wait below at once: Python would otherwise
        # retry the interrupted select (PEP 475) and notice the stop only after POLL.
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        assert admin.sock is not None
        server = AdminServer(
            admin.sock,
            token=admin.config.token,
            pidfile=admin.pidfile,
            metrics_dir=admin.metrics_dir,
            shared=admin.shared,
            supervisor=supervisor,
        )
        _serve_until(server, stopping, wake_r, supervisor)
        code = 0
    except BaseException:
        print(f"weft admin (pid {os.getpid()}) failed:", file=sys.stderr)
        traceback.print_exc()
    finally:
        exit_child(code)


def _serve_until(
    server: AdminServer, stopping: threading.Event, wake_fd: int, supervisor: int
) -> None:
    """Serve until `stopping` is set or the supervisor is gone, asleep while nothing happens.

    The listening socket is non-blocking (the supervisor binds it like the workers'), and
    `socketserver.handle_request` waits for the smaller of the socket's timeout and its own:
    0 here, so calling it in a loop spun a core. The wait is ours instead: the socket or the
    signal wake-up pipe becomes readable, or POLL passes (then the parent is checked, in case
    PR_SET_PDEATHSIG did not arm). A readable socket is then served by `handle_request`, whose
    zero-timeout select finds the connection at once.
    """
    with selectors.DefaultSelector() as selector:
        selector.register(server.socket, selectors.EVENT_READ, "listener")
        selector.register(wake_fd, selectors.EVENT_READ, "wakeup")
        while not stopping.is_set() and os.getppid() == supervisor:
            for key, _ in selector.select(POLL):
                if key.data == "wakeup":
                    try:
                        while os.read(wake_fd, 256):
                            pass
                    except BlockingIOError:
                        pass
                elif not stopping.is_set():
                    server.handle_request()


class AdminServer(ThreadingHTTPServer):
    """Serves the admin endpoints on an already listening socket (not closed by it)."""

    daemon_threads = True

    def __init__(
        self,
        sock: socket.socket,
        *,
        token: str | None,
        pidfile: Path,
        metrics_dir: Path,
        shared: SharedState,
        supervisor: int,
    ) -> None:
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.token = token
        self.pidfile = pidfile
        self.metrics_dir = metrics_dir
        self.shared = shared
        self.supervisor = supervisor
        self.slots = threading.BoundedSemaphore(MAX_CLIENTS)

    def server_close(self) -> None:
        pass  # the socket is the supervisor's

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # over MAX_CLIENTS: the client retries
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    # -- what the endpoints read --

    def state(self) -> dict[str, Any] | None:
        try:
            return control.read_state(self.pidfile)
        except control.ControlError:
            return None

    def workers(self) -> list[Any]:
        return self.shared.table.snapshot()

    def render_metrics(self, pid: int | None = None) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        from weft.metrics_read import FilesCollector

        registry = CollectorRegistry(auto_describe=False)
        registry.register(FilesCollector(self.metrics_dir, pid))
        if pid is None:
            registry.register(_SharedCollector(self))
        return generate_latest(registry)


class _SharedCollector:
    """Families read from shared memory at scrape time: worker-table use, worker states, the
    shared buffer pool's use per size class, and the health, ejection and breaker state of
    every observed endpoint."""

    def __init__(self, server: AdminServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        table = self.server.shared
        rows = self.server.workers()
        used = GaugeMetricFamily(
            "weft_shm_slots_in_use",
            "Slots in use per shared-memory structure (worker_table: one row per worker process).",
            labels=["segment"],
        )
        used.add_metric(["worker_table"], len(rows))
        yield used
        capacity = GaugeMetricFamily(
            "weft_shm_slots",
            "Slots per shared-memory structure, used or not.",
            labels=["segment"],
        )
        capacity.add_metric(["worker_table"], table.rows)
        yield capacity
        workers = GaugeMetricFamily("weft_workers", "Worker processes by state.", labels=["state"])
        for code, name in STATE_NAMES.items():
            workers.add_metric([name.lower()], sum(1 for w in rows if w.state == code))
        yield workers
        pool = self.server.shared.buffers  # None only in a state made without one (tests)
        if pool is not None:
            from weft.metrics_read import buffer_families

            yield from buffer_families(pool.stats(), pool.memory)
        observed = (self.server.state() or {}).get("observed")
        if observed:
            from weft.metrics_read import endpoint_families
            from weft.observer import monotonic_ms, observed_states

            states = observed_states(table.endpoints, observed, monotonic_ms())
            yield from endpoint_families(states)


class _Handler(BaseHTTPRequestHandler):
    server: AdminServer
    protocol_version = "HTTP/1.1"
    timeout = CLIENT_TIMEOUT

    def version_string(self) -> str:
        return "weft-admin"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no access log for probes and scrapes

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        try:
            status, ctype, body, extra = self._route()
        except Exception:
            log.exception("admin: %s failed", self.path)
            status, ctype, body, extra = 500, "text/plain", b"internal error\n", []
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _authorized(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        got = self.headers.get("Authorization", "")
        scheme, _, value = got.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), token.encode()
        )

    def _route(self) -> tuple[int, str, bytes, list[tuple[str, str]]]:
        text = "text/plain; charset=utf-8"
        if not self._authorized():
            return 401, text, b"401: a bearer token is needed\n", [("WWW-Authenticate", "Bearer")]
        path = self.path.split("?", 1)[0]
        srv = self.server
        if path == "/healthz":
            if os.getppid() != srv.supervisor:
                return 503, text, b"supervisor gone\n", []
            return 200, text, b"ok\n", []
        if path == "/readyz":
            ok, why = readiness(srv.state(), srv.workers())
            return (200 if ok else 503), text, f"{why}\n".encode(), []
        if path == "/metrics":
            return 200, CONTENT_TYPE_METRICS, srv.render_metrics(), []
        m = _WORKER_PATH.match(path)
        if m:
            slot = int(m.group(1))
            state = srv.state() or {}
            pid = worker_of_slot(srv.workers(), slot, state.get("generation"))
            if pid is None:
                return 404, text, f"no worker in slot {slot}\n".encode(), []
            return 200, CONTENT_TYPE_METRICS, srv.render_metrics(pid), [("X-Weft-Pid", str(pid))]
        if path == "/status":
            from weft.status import collect

            try:
                info = collect(srv.pidfile)
            except control.ControlError as e:
                return 503, text, f"{e}\n".encode(), []
            info["admin"] = {"pid": os.getpid()}
            body = json.dumps(info, indent=2).encode() + b"\n"
            return 200, "application/json", body, []
        return 404, text, b"not found (try /metrics, /healthz, /readyz, /status)\n", []
