"""Prometheus metrics: the families weft records, where they are kept, and how they are read.

Theory of operation:

* **One directory per instance, one set of files per process.** prometheus-client's
  multiprocess mode keeps every value in an mmap-ed file named after the writing process
  (``counter_<pid>.db``, ``histogram_<pid>.db``, ``gauge_livesum_<pid>.db`` ...) in
  ``$PROMETHEUS_MULTIPROC_DIR``. The supervisor makes that directory (`prepare_directory`:
  ``/dev/shm/weft.<instance>.metrics/``, mode 0700; a stale one of a killed instance is removed
  first, as its shared memory is) and sets the variable *before* prometheus_client is imported
  and before any worker is forked. A worker writes its own files on the request path: a value
  is in memory the moment it is written, so a worker that is SIGKILLed loses nothing it
  counted. The directory must be on a tmpfs: on a disk, the kernel's writeback of the dirty
  mmap pages stalls the writing workers (measured with scripts/bench on ext4: p99 latency
  several times higher, a third fewer requests/s). The name is not ``weft-<instance>-...``,
  which `weft.shm.segment` reads as a segment of the instance.
* **The aggregate** (the admin listener's ``/metrics``) merges every file of the directory.
  Counter and histogram files are never removed while the instance lives, so what a dead or
  retired worker counted stays in the sums, and an aggregate counter never goes down. Gauges
  say what they mean across processes: the per-worker ones are ``livesum`` (the supervisor
  calls `SupervisorMetrics.process_dead` when it reaps a worker, which removes that pid's live
  gauge files, so a dead worker's in-flight requests and connections vanish with it); the
  supervisor's own are ``livemax`` (one writer).
* **A worker's own view** (``/metrics/workers/<slot>``) merges only the files of that pid
  (`weft.metrics_read.collect`), read by the admin process from the same directory. The
  worker does no work for a scrape, and a worker that is stuck or busy is still visible.
* **Instance-wide facts are read, not counted.** An endpoint's health, ejection and breaker
  state are one record in shared memory for all workers (`weft.shm.endpoints`); a gauge per
  worker would only repeat it once per process. The admin process reads the records at scrape
  time (`weft.metrics_read.endpoint_families`, over `weft.observer.observed_states`) and
  adds them to the aggregate alone. What *happens* to them (a breaker transition, an
  ejection) is counted by the worker that made it happen, through the observers' ``on_event``
  (`WorkerMetrics.endpoint_event`), so those counters add up across workers like the others.
  The shared buffer pool is the same: how many buffers of each class are in use is read from
  its bitmap (`weft.metrics_read.buffer_families`); the waits for a buffer, and the requests
  that gave up waiting, are counted by the worker that waited (from ``request.ctx``).
* **Label values** come from config names, status codes and fixed word lists, never from the
  request (`method_label`, `reason_label`, `retry_reason_label`, `buffer_class_label`), so the
  number of series is bounded by the config.
  A request that never matched a route (404, or refused before routing) has ``route=""``: no
  route name can be empty, and an empty label is Prometheus's "not applicable".
* **The one label from the request: the principal**, and only for routes that opt in
  (``metrics_principal = true``): ``weft_principal_requests_total{route, principal,
  code_class}``. The value is the SPIFFE ID weft verified (the client's X.509-SVID) or accepted
  (a JWT-SVID's subject), in its ``spiffe://`` form; ``""`` for a request without one (as for
  ``route``: not applicable). SPIFFE IDs name workloads, a set the trust domains' registrations
  bound, but an issuer may sign any subject, so the bound is enforced too: each worker process
  gives a route at most `MAX_PRINCIPALS` distinct values, the first it sees, and counts every
  later principal under ``"other"`` (no SPIFFE ID is spelled so). The aggregate merges every
  process's files, so it can show up to that many per worker process that ever ran the
  config, when workers see different principals. ``code_class`` (``2xx`` ... ``5xx``), not the
  code, keeps a principal at five series. A route without the key costs one attribute test.
* **Cost on the request path**: one counter, one or two histograms and up to two byte
  counters per exchange, each an mmap write of ~2-3 µs (measured on the 2-core test machine;
  a request costs weft ~600 µs there). In-flight requests per route and pool figures are kept
  in plain ints by the request path and copied into their gauges once a second by
  `WorkerMetrics.run`, so they cost no write per request. So are counts kept by the objects
  that see the events (stray upstream responses by the pools, accept() errors by the worker):
  `WorkerMetrics.sample` adds what they counted since its last look to their counters.
"""

from __future__ import annotations

import collections
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from weft.jwt_svid import REASONS as JWT_REASONS
from weft.retry import RetryOn
from weft.schema import HTTP_METHODS, Config

if TYPE_CHECKING:
    from weft.connection import UpstreamPools
    from weft.http.messages import Request, Response

ENV = "PROMETHEUS_MULTIPROC_DIR"
NO_ROUTE = ""  # the route label of a request that matched no route
OTHER = "OTHER"  # the method label of a method outside HTTP_METHODS (or an unparsed request)
SAMPLE_INTERVAL = 1.0  # seconds between copies of in-flight counts and pool figures to gauges

METHODS = frozenset(HTTP_METHODS)
# Reason words the data path puts in request.ctx["error"] / ProxyError.reason (the access log's
# "error" field). Anything else is counted as "other", so a middleware that invents reasons
# cannot grow the number of series. A concern that adds reasons adds them here.
REASONS = frozenset(
    {
        "ambiguous_framing",
        "bad_body",
        "bad_host",
        "bad_method",
        "bad_request",
        "bad_request_line",
        "bad_response",
        "bad_target",
        "bad_version",
        "body_too_large",
        "breaker_open",
        "client_gone",
        "client_timeout",
        "connect",
        "connect_error",
        "connect_timeout",
        "draining",
        "h2_preface",
        "head_too_large",
        "internal",
        "middleware_error",
        "no_endpoint",
        "no_route",
        "per_try_timeout",
        "pool_full",
        "rate_limited",
        "request_timeout",
        "too_many_headers",
        "upstream",
        "upstream_body_timeout",
        "upstream_header_timeout",
        "upstream_reset",
        "upstream_send_timeout",
        "upstream_tls",
        "uri_too_long",
        # weft.spiffe_middleware: authorize's refusals, and jwt_svid's "jwt_<reason>"
        "forbidden",
        "no_identity",
        "identity_unavailable",
        *(f"jwt_{r}" for r in JWT_REASONS),
    }
)

# Whole exchanges: from a millisecond (a pooled keep-alive hop on a LAN) to the default
# request_total of 300 s.
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0,
)  # fmt: skip
# Upstream response heads: the default upstream_header timeout is 60 s.
UPSTREAM_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
)  # fmt: skip
POOL_STATES = ("open", "idle", "waiting")
# The errno label values of weft_accept_errors_total: the accept() errors a worker survives
# (weft.workers.worker: out of a resource, or a client that gave up while queued).
ACCEPT_ERRNOS = ("ECONNABORTED", "EMFILE", "ENFILE", "ENOBUFS", "ENOMEM", "EPROTO")
# The state label values of the endpoint gauges and of weft_breaker_transitions_total: the names
# of weft.health's and weft.adaptive's states, lower case.
HEALTH_STATES = ("healthy", "degraded", "unhealthy")
BREAKER_STATES = ("closed", "open", "half_open")
# Reason words the retry middleware puts in request.ctx["retries"] (weft.outcome's failure
# results); the other kind of reason is a status code ("503"). Anything else is "other".
RETRY_REASONS = frozenset({"connect_error", "reset", "timeout", "protocol_error"})
# weft_principal_requests_total (see the module docstring): the principal label of a request
# without one, and of a route's principals past MAX_PRINCIPALS. Neither is a SPIFFE ID's form.
NO_PRINCIPAL = ""
OTHER_PRINCIPALS = "other"
# Distinct principals per opted-in route and worker process: room for every workload of a large
# trust domain calling one route, and at five code classes at most 5000 series of a route per
# worker. A principal keeps its label once it has one, so a workload's label never changes
# while a worker lives.
MAX_PRINCIPALS = 1000


def method_label(method: str) -> str:
    return method if method in METHODS else OTHER


def reason_label(reason: str) -> str:
    return reason if reason in REASONS else "other"


def buffer_class_label(size: int) -> str:
    """A buffer size class (`weft.bufpool.CLASS_SIZES`) as the ``class`` label of the pool's
    gauges and of ``weft status``: ``256B``, ``1KiB``, ``4KiB``, ``16KiB``, ``64KiB``."""
    return f"{size >> 10}KiB" if size >= 1024 and size % 1024 == 0 else f"{size}B"


def retry_reason_label(reason: object) -> str:
    """A retry's reason as a label: a word of RETRY_REASONS or a status code, else "other"."""
    text = str(reason)
    if text in RETRY_REASONS:
        return text
    if len(text) == 3 and text.isascii() and text.isdigit() and "100" <= text <= "599":
        return text
    return "other"


# -- the directory ----------------------------------------------------------------------------


SHM_DIR = Path("/dev/shm")  # a tmpfs on every Linux; weft's segments live there too


def directory_for(instance: str, base: Path = SHM_DIR) -> Path:
    """Where `instance` keeps its metrics files."""
    return base / f"weft.{instance}.metrics"


def prepare_directory(instance: str, base: Path = SHM_DIR) -> Path:
    """Make the instance's metrics directory empty and private, and point prometheus_client
    at it (``$PROMETHEUS_MULTIPROC_DIR``, inherited by every process forked from here).

    The caller holds the instance lock: a directory already there is a killed instance's, and
    its files are stale. Raises OSError when the directory cannot be made.
    """
    path = directory_for(instance, base)
    shutil.rmtree(path, ignore_errors=True)  # refuses a symlink: then mkdir fails
    path.mkdir(mode=0o700)
    os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
    os.environ[ENV] = str(path)
    return path


def remove_directory(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _prometheus_client(*, forks: bool = True) -> Any:
    """prometheus_client writing to this process's files in the metrics directory.

    The library picks its value class when it is first imported, and that class remembers the
    pid it opened its files for: after a fork it re-opens *every* value it ever made under the
    new pid (here: the supervisor's families, in each worker's files, at zero). So each
    writing process installs a fresh multiprocess value class before it makes its metrics.
    This also covers a user's middleware module that imported prometheus_client while the
    config was loaded, before ``$PROMETHEUS_MULTIPROC_DIR`` was set.

    To notice a fork, that class calls ``os.getpid()`` on every write: a system call, six per
    proxied request. A process that never forks after this point (a worker: `forks=False`)
    gives it its pid as a constant instead, the library's documented ``process_identifier``
    hook. The supervisor forks, so it keeps the check.
    """
    assert os.environ.get(ENV), f"{ENV} is not set"
    import prometheus_client
    from prometheus_client import values

    if forks:
        values.ValueClass = values.MultiProcessValue()
    else:
        pid = os.getpid()
        values.ValueClass = values.MultiProcessValue(lambda: pid)
    return prometheus_client


# -- a worker ---------------------------------------------------------------------------------


class WorkerMetrics:
    """The request families of one worker process.

    The data path calls `route_started` when a request is matched to a route (App.on_route),
    `exchange` once per finished exchange (ServerState.on_exchange), `abandoned` for a
    request whose client went away before it got a response (ServerState.on_abandon), and
    `endpoint_event` when a destination's observer moved a breaker or ejected an endpoint
    (`weft.observer.DestinationObserver.on_event`). `run`
    is a service task of the worker: every `SAMPLE_INTERVAL` it copies the in-flight counts
    and the pool figures to their gauges, and adds what `pools` (stray responses) and
    `accept_errors` (the worker's accept loop, by errno name) counted since to their counters.
    """

    def __init__(
        self,
        config: Config,
        pools: UpstreamPools,
        accept_errors: collections.Counter[str] | None = None,
        tls_failures: collections.Counter[tuple[str, str]] | None = None,
    ) -> None:
        pc = _prometheus_client(forks=False)
        Counter, Gauge, Histogram = pc.Counter, pc.Gauge, pc.Histogram
        self.pools = pools
        self.accept_errors = collections.Counter() if accept_errors is None else accept_errors
        self.requests = Counter(
            "weft_requests",
            "Requests answered, by route, method and status code.",
            ["route", "method", "code"],
            registry=None,
        )
        self.duration = Histogram(
            "weft_request_duration_seconds",
            "Whole exchanges, from the first byte of the request to the last of the response.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self.upstream = Histogram(
            "weft_upstream_response_seconds",
            "From sending a request upstream to its response head, per endpoint.",
            ["destination", "endpoint"],
            buckets=UPSTREAM_BUCKETS,
            registry=None,
        )
        self.inflight_gauge = Gauge(
            "weft_requests_in_flight",
            "Requests matched to a route and not finished yet.",
            ["route"],
            multiprocess_mode="livesum",
            registry=None,
        )
        self.bytes_in = Counter(
            "weft_request_bytes",
            "Request body bytes received from clients.",
            ["route"],
            registry=None,
        )
        self.bytes_out = Counter(
            "weft_response_bytes",
            "Response body bytes sent to clients.",
            ["route"],
            registry=None,
        )
        self.errors = Counter(
            "weft_proxy_errors",
            "Exchanges that ended in an error of the proxy's, by reason.",
            ["route", "reason"],
            registry=None,
        )
        self.pool_gauge = Gauge(
            "weft_pool_connections",
            "Upstream connections per endpoint: open (idle + busy), idle, and requests "
            "waiting for one.",
            ["destination", "endpoint", "state"],
            multiprocess_mode="livesum",
            registry=None,
        )
        self.stray = Counter(
            "weft_upstream_stray_responses",
            "Upstream connections closed because the upstream sent bytes nobody asked for "
            "(past the end of a response, or while idle): a desync weft refused to pass on.",
            ["destination", "endpoint"],
            registry=None,
        )
        self._stray_counted: dict[tuple[str, str], int] = {}
        self.accept = Counter(
            "weft_accept_errors",
            "accept() errors a worker survived, by errno: out of a resource (EMFILE, ENFILE, "
            "ENOMEM, ENOBUFS: it backed off), or a client that gave up while queued.",
            ["errno"],
            registry=None,
        )
        # Present from the start (at zero), so that rate() sees the first error, and so that
        # counting one never adds a key to the value file (which can grow it: a descriptor, at
        # the moment a worker has none to spare).
        self._accept_children = {name: self.accept.labels(name) for name in ACCEPT_ERRNOS}
        self._accept_counted = dict.fromkeys(ACCEPT_ERRNOS, 0)
        # Failed TLS handshakes, counted by the worker (Worker.tls_failures) and added here at
        # each sample; reasons are weft.http.tls_errors.HANDSHAKE_REASONS, listeners from the
        # config.
        self.tls_failures = collections.Counter() if tls_failures is None else tls_failures
        self._tls_counted: dict[tuple[str, str], int] = {}
        self.tls_handshake = Counter(
            "weft_tls_handshake_failures",
            "TLS handshakes with clients that failed, by listener and reason (timeout, eof, "
            "http_request, protocol_version, no_shared_cipher, no_alpn, unknown_ca, "
            "bad_certificate, other).",
            ["listener", "reason"],
            registry=None,
        )
        self.retries = Counter(
            "weft_retries",
            "Retries sent, by route and the reason of the try they replaced: a failure "
            "(connect_error, reset, timeout, protocol_error) or the status code answered.",
            ["route", "reason"],
            registry=None,
        )
        self.retry_budget = Counter(
            "weft_retry_budget_exhausted",
            "Retries wanted but refused by the route's retry budget (shared by all workers).",
            ["route"],
            registry=None,
        )
        self.rate_limit = Counter(
            "weft_rate_limit_decisions",
            "Rate-limit decisions per route: admitted, delayed (a leaky bucket's wait), rejected.",
            ["route", "decision"],
            registry=None,
        )
        self.rate_table_full = Counter(
            "weft_rate_table_full",
            "Rate-limit decisions that found no room in the shared key table "
            "([limits.rate_table] on_full decided them).",
            ["route"],
            registry=None,
        )
        self.principal_requests = Counter(
            "weft_principal_requests",
            "Requests answered on routes with metrics_principal = true, by route, the caller's "
            'SPIFFE ID ("" for none, "other" past the bound) and status class.',
            ["route", "principal", "code_class"],
            registry=None,
        )
        # Per opted-in route: principal -> its label, at most MAX_PRINCIPALS entries; and the
        # children by (route, label, status // 100).
        self._principal_labels: dict[str, dict[object, str]] = {
            r.name: {} for r in config.routes if r.metrics_principal
        }
        self._principal_children: dict[tuple[str, str, int], Any] = {}
        self._rate_limit = {
            (r.name, d): self.rate_limit.labels(r.name, d)
            for r in config.routes
            if r.rate_limits
            for d in ("admitted", "delayed", "rejected")
        }
        # Decisions counted here and added to their counters at each `sample`: one dict
        # increment per request instead of a write to the metrics file (a locked mmap write,
        # about 1.5 µs) on every request of a limited route.
        self._rate_pending: collections.Counter[tuple[str, str]] = collections.Counter()
        self.rate_backend_errors = Counter(
            "weft_rate_limit_backend_errors",
            "Rate-limit decisions the Redis backend did not make in time (or failed): "
            "[rate_limit_backend] on_error decided them.",
            ["route"],
            registry=None,
        )
        self._rate_backend_errors = {
            r.name: self.rate_backend_errors.labels(r.name)
            for r in config.routes
            if any(x.backend == "redis" for x in r.rate_limits)
        }
        self._rate_table_full = {
            r.name: self.rate_table_full.labels(r.name) for r in config.routes if r.rate_limits
        }
        # Counted from what the data path puts in request.ctx: "buffer_waits", how many times
        # the request found its buffer class empty and waited (`BufferPool.claim_wait`), and
        # "buffer_exhausted", set when a wait timed out and the request gave up (a 503 or an
        # aborted exchange). No class label: the request says how often it waited, not for
        # which class; `weft_buffers_in_use{class}` (the admin's gauges) shows which is short.
        self.buffer_waits = Counter(
            "weft_buffer_waits",
            "Times a request found its buffer size class empty in the shared pool and waited.",
            registry=None,
        )
        self.buffer_exhausted = Counter(
            "weft_buffer_exhausted",
            "Requests that gave up (503 or an aborted exchange) because no buffer was released "
            "in time.",
            registry=None,
        )
        self.breaker_transitions = Counter(
            "weft_breaker_transitions",
            "Circuit breaker transitions, by the state entered, counted by the worker that "
            "made them.",
            ["destination", "endpoint", "state"],
            registry=None,
        )
        self.ejections = Counter(
            "weft_outlier_ejections",
            "Endpoints ejected by passive outlier detection.",
            ["destination", "endpoint"],
            registry=None,
        )
        # Present from the start (at zero), as the accept errors: keyed as the data path and
        # the observers name them, so that counting is one dict lookup.
        self._retries: dict[tuple[str, str], Any] = {}
        self._retry_budget: dict[str, Any] = {}
        for r in config.routes:
            if r.retry is not None:
                on = RetryOn.parse(r.retry.on)
                for reason in [*sorted(on.results), *map(str, sorted(on.statuses))]:
                    self._retries[(r.name, reason)] = self.retries.labels(r.name, reason)
                self._retry_budget[r.name] = self.retry_budget.labels(r.name)
        self._endpoints = {
            d.name: [e.authority for e in d.endpoints] for d in config.destinations.values()
        }
        self._transitions: dict[tuple[str, int, str], Any] = {}
        self._ejections: dict[tuple[str, int], Any] = {}
        for d in config.destinations.values():
            for i, e in enumerate(d.endpoints):
                if d.breaker is not None:
                    for state in BREAKER_STATES:
                        self._transitions[(d.name, i, state.upper())] = (
                            self.breaker_transitions.labels(d.name, e.authority, state)
                        )
                if d.outlier is not None:
                    self._ejections[(d.name, i)] = self.ejections.labels(d.name, e.authority)
        # Children by label values, so that the request path does one dict lookup instead of
        # prometheus_client's label validation.
        self._requests: dict[tuple[str, str, int], Any] = {}
        self._errors: dict[tuple[str, str], Any] = {}
        self._upstream: dict[tuple[str, str], Any] = {}
        routes = [r.name for r in config.routes] + [NO_ROUTE]
        # Present from the start (at zero), so that rate() sees the first request.
        self._duration = {r: self.duration.labels(r) for r in routes}
        self._bytes_in = {r: self.bytes_in.labels(r) for r in routes}
        self._bytes_out = {r: self.bytes_out.labels(r) for r in routes}
        named = routes[:-1]  # a request is in flight per route once it has one
        self.inflight = dict.fromkeys(named, 0)
        self._inflight_children = {r: self.inflight_gauge.labels(r) for r in named}
        self._inflight_published = dict.fromkeys(named, 0)
        self._pool_children: dict[tuple[str, str, str], Any] = {}
        self._pool_published: dict[tuple[str, str, str], int] = {}
        self.sample()

    # -- the request path --

    def route_started(self, request: Request) -> None:
        route = request.route
        assert route is not None
        name = route.name
        self.inflight[name] = self.inflight.get(name, 0) + 1
        request.ctx["metrics_route"] = name

    def exchange(
        self,
        request: Request | None,
        response: Response,
        error: str | None,
        client: tuple[str, int],
        duration: float,
    ) -> None:
        if request is None:  # refused before the head was parsed
            self._count(NO_ROUTE, OTHER, response.status, duration, error)
            return
        r = request.route
        route = r.name if r is not None else NO_ROUTE
        method = request.method if request.method in METHODS else OTHER
        self._count(route, method, response.status, duration, error)
        ctx = request.ctx
        if r is not None and r.metrics_principal:
            self._count_principal(route, ctx.get("principal"), response.status)
        started = ctx.get("metrics_route")
        if started is not None:
            self.inflight[started] -= 1
        received = getattr(request.body, "received", 0)
        if received:
            self._child(self._bytes_in, self.bytes_in, route).inc(received)
        sent = response.bytes_out
        if sent:
            self._child(self._bytes_out, self.bytes_out, route).inc(sent)
        upstream_time = ctx.get("upstream_time")
        if upstream_time is not None and r is not None:
            key = (r.destination, ctx.get("endpoint") or "")
            child = self._upstream.get(key)
            if child is None:
                child = self._upstream[key] = self.upstream.labels(*key)
            child.observe(upstream_time)
        # Filled by the retry middleware: a reason per retry sent, and whether the budget
        # refused one.
        retries = ctx.get("retries")
        if retries:
            for reason in retries:
                rkey = (route, retry_reason_label(reason))
                rchild = self._retries.get(rkey)
                if rchild is None:
                    rchild = self._retries[rkey] = self.retries.labels(*rkey)
                rchild.inc()
        if ctx.get("retry_budget_exhausted"):
            self._child(self._retry_budget, self.retry_budget, route).inc()
        # Filled by the rate-limit middleware.
        decision = ctx.get("rate_limit")
        if decision is not None:
            self._rate_pending[route, decision] += 1
        if ctx.get("rate_limit_backend_error"):
            child = self._rate_backend_errors.get(route)
            if child is not None:
                child.inc()
        if ctx.get("rate_table_full"):
            child = self._rate_table_full.get(route)
            if child is not None:
                child.inc()
        self._count_buffers(ctx)

    def endpoint_event(self, destination: str, index: int, what: str, state: str) -> None:
        """An observer's event (`weft.observer.Event`): a breaker entered `state` ("OPEN",
        "HALF_OPEN", "CLOSED"), or endpoint `index` was ejected. Health transitions are
        not counted: the admin's weft_endpoint_health gauge shows the state itself."""
        if what == "breaker":
            key = (destination, index, state)
            child = self._transitions.get(key)
            if child is None:  # not a destination of this config's with a breaker
                label = state.lower()
                assert label in BREAKER_STATES, state
                ep = self._endpoints[destination][index]
                child = self._transitions[key] = self.breaker_transitions.labels(
                    destination, ep, label
                )
            child.inc()
        elif what == "ejection":
            ekey = (destination, index)
            echild = self._ejections.get(ekey)
            if echild is None:
                ep = self._endpoints[destination][index]
                echild = self._ejections[ekey] = self.ejections.labels(destination, ep)
            echild.inc()

    def abandoned(self, request: Request) -> None:
        """The client went away before its response (counted as nginx's 499)."""
        r = request.route
        route = r.name if r is not None else NO_ROUTE
        method = request.method if request.method in METHODS else OTHER
        self._count(route, method, 499, trio.current_time() - request.start, None)
        if r is not None and r.metrics_principal:
            self._count_principal(route, request.ctx.get("principal"), 499)
        started = request.ctx.get("metrics_route")
        if started is not None:
            self.inflight[started] -= 1
        self._count_buffers(request.ctx)  # it may have waited for a buffer before it left

    def _count_buffers(self, ctx: dict[str, Any]) -> None:
        """The buffer pool's part of a finished request's ctx (see __init__)."""
        waits = ctx.get("buffer_waits")
        if waits:
            self.buffer_waits.inc(waits)
        if ctx.get("buffer_exhausted"):
            self.buffer_exhausted.inc()

    def _count(
        self, route: str, method: str, status: int, duration: float, error: str | None
    ) -> None:
        key = (route, method, status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(route, method, str(status))
        child.inc()
        self._child(self._duration, self.duration, route).observe(duration)
        if error is not None:
            ekey = (route, reason_label(error))
            echild = self._errors.get(ekey)
            if echild is None:
                echild = self._errors[ekey] = self.errors.labels(*ekey)
            echild.inc()

    def _count_principal(self, route: str, principal: object, status: int) -> None:
        """One request of an opted-in route, by its principal (module docstring)."""
        labels = self._principal_labels.get(route)
        if labels is None:  # a route renamed by a middleware: still a config name
            labels = self._principal_labels[route] = {}
        label = labels.get(principal)
        if label is None:
            if principal is None:
                label = NO_PRINCIPAL
            elif len(labels) < MAX_PRINCIPALS:
                label = labels[principal] = str(principal)
            else:
                label = OTHER_PRINCIPALS  # not remembered: the dict stays at the bound
        key = (route, label, status // 100)
        child = self._principal_children.get(key)
        if child is None:
            child = self._principal_children[key] = self.principal_requests.labels(
                route, label, f"{key[2]}xx"
            )
        child.inc()

    @staticmethod
    def _child(cache: dict[str, Any], family: Any, route: str) -> Any:
        child = cache.get(route)
        if child is None:  # a route renamed by a middleware: still a config name
            child = cache[route] = family.labels(route)
        return child

    # -- sampled gauges --

    def sample(self) -> None:
        """Copy in-flight counts and pool figures to their gauges (only what changed), and
        add the rate-limit decisions counted since the last sample to their counters."""
        if self._rate_pending:
            for key, n in self._rate_pending.items():
                child = self._rate_limit.get(key)
                if child is not None:
                    child.inc(n)
            self._rate_pending.clear()
        published = self._inflight_published
        for route, n in self.inflight.items():
            if published.get(route) != n:
                self._child(self._inflight_children, self.inflight_gauge, route).set(n)
                published[route] = n
        for dest, pools in self.pools.by_destination.items():
            for p in pools:
                ep = p.endpoint.authority
                figures = (("open", p.open), ("idle", len(p.idle)), ("waiting", p.waiting))
                for state, value in figures:
                    key = (dest, ep, state)
                    if self._pool_published.get(key) == value:
                        continue
                    child = self._pool_children.get(key)
                    if child is None:
                        child = self._pool_children[key] = self.pool_gauge.labels(*key)
                    child.set(value)
                    self._pool_published[key] = value
                if p.stray_responses != self._stray_counted.get((dest, ep), 0):
                    before = self._stray_counted.get((dest, ep), 0)
                    self.stray.labels(dest, ep).inc(p.stray_responses - before)
                    self._stray_counted[(dest, ep)] = p.stray_responses
        counted = self._accept_counted
        for name, n in self.accept_errors.items():
            before = counted.get(name, 0)
            if n != before:
                child = self._accept_children.get(name)
                if child is None:  # a name outside ACCEPT_ERRNOS: still a fixed errno name
                    child = self._accept_children[name] = self.accept.labels(name)
                child.inc(n - before)
                counted[name] = n
        for key, n in self.tls_failures.items():
            before = self._tls_counted.get(key, 0)
            if n != before:
                self.tls_handshake.labels(*key).inc(n - before)
                self._tls_counted[key] = n

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sample every SAMPLE_INTERVAL until cancelled."""
        task_status.started()
        try:
            while True:
                await trio.sleep(SAMPLE_INTERVAL)
                self.sample()
        finally:
            self.sample()  # what was counted since the last one, at the worker's end


def for_worker(
    config: Config,
    pools: UpstreamPools,
    accept_errors: collections.Counter[str] | None = None,
    tls_failures: collections.Counter[tuple[str, str]] | None = None,
) -> WorkerMetrics | None:
    """The worker's metrics, or None when they are off or nobody collects them (a worker run
    without a supervisor has no metrics directory). `accept_errors` and `tls_failures`: the
    worker's `Worker.accept_errors` and `Worker.tls_failures`, read at every sample."""
    if not config.metrics.enabled or not os.environ.get(ENV):
        return None
    return WorkerMetrics(config, pools, accept_errors, tls_failures)


# -- the supervisor ---------------------------------------------------------------------------


class SupervisorMetrics:
    """Families only the supervisor writes: restarts, reloads, the active generation."""

    def __init__(self, directory: Path, generation: int) -> None:
        pc = _prometheus_client()
        self.directory = directory
        self.restarts = pc.Counter(
            "weft_worker_restarts",
            "Workers started to replace one that died unexpectedly.",
            registry=None,
        )
        self.reloads = pc.Counter(
            "weft_reloads",
            "Config reloads by outcome.",
            ["result"],
            registry=None,
        )
        self._reloads = {r: self.reloads.labels(r) for r in ("ok", "failed")}
        self.generation = pc.Gauge(
            "weft_config_generation",
            "The config generation the instance serves (1 at start, +1 per successful reload).",
            multiprocess_mode="livemax",  # one writer: the supervisor
            registry=None,
        )
        self.generation.set(generation)

    def worker_restarted(self) -> None:
        self.restarts.inc()

    def reload_done(self, ok: bool, generation: int) -> None:
        self._reloads["ok" if ok else "failed"].inc()
        self.generation.set(generation)

    def process_dead(self, pid: int) -> None:
        """A child was reaped: its live gauges (in flight, pool figures) leave the sums; its
        counters and histograms stay."""
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(self.directory))
