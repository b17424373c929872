"""One worker: serve the given listening sockets with trio until told to stop, then drain.

The entry point is `serve(sockets, config)`, synchronous, so a supervisor can call it in a forked
child (trio cannot fork from inside `trio.run`) and `weft run` can call it in-process. The worker
does not bind or close its listening sockets: they belong to whoever passed them in, because
closing a SO_REUSEPORT socket resets the connections queued on it.

Inside `trio.run`, shaped like hypercorn's `worker_serve`:

* the **accept nursery** runs one accept loop per listener; a semaphore of
  ``limits.max_connections`` makes excess connections wait in the kernel backlog;
* the **connection nursery** runs one task per client connection: on a TLS listener it first
  runs the handshake (`weft.http.tls.accept`, bounded by ``timeouts.tls_handshake``; a
  failure is counted by reason in `Worker.tls_failures` and logged at info, without a
  traceback), then the adapter the protocol dispatcher (`weft.http.dispatch`) picks serves it;
* the **service nursery** runs the pool sweeper and the access-log writer.

accept() errors: running out of a resource (descriptors, memory, buffers) backs the accept loop
off for ``ACCEPT_BACKOFF`` instead of killing the worker, and a client that gave up while queued
(ECONNABORTED, EPROTO) is skipped. Each such error is counted in `Worker.accept_errors` (the
metrics publish it as ``weft_accept_errors_total``); the resource errors are logged at most once
per ``ACCEPT_WARN_INTERVAL``, the next line saying how many it left out, because a worker out of
descriptors retries ten times a second for as long as the shortage lasts.

Drain (SIGTERM, SIGINT, or `stop` being set): the accept loops are cancelled (the sockets stay
open and their queues with them), idle keep-alive connections are closed, busy connections
finish their current response with ``Connection: close``, and whatever still runs after
``timeouts.drain`` is cancelled. Then the upstream pools close and `serve` returns.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import signal
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable

import trio

from weft import metrics as metrics_mod
from weft import spiffe
from weft.accesslog import AccessLog
from weft.arena_pool import ArenaPool
from weft.backpressure import SharedLimiter, private_table, sweep_idle_ns
from weft.bufpool import BufferPool, private_pool
from weft.connection import UpstreamPools
from weft.dst import Position
from weft.forward import Inflight
from weft.handler import App, Middleware
from weft.http import tls, tls_errors
from weft.http.dispatch import serve_connection
from weft.http.io import accept
from weft.http.messages import Request, Response
from weft.http.transport import TCPTransport, Transport
from weft.observer import DestinationObserver, LocalRecords
from weft.outcome import Observer
from weft.prober import Prober
from weft.redis_limiter import RedisLimiter
from weft.retry_middleware import RetryBudget
from weft.schema import Config, Destination, Listener, RateLimitBackend, Route
from weft.spiffe import WorkerIdentity
from weft.workers.state import ServerState

log = logging.getLogger("weft.worker")

# accept() errors that mean "out of a resource for now": back off instead of dying, as
# trio's serve_listeners does (EMFILE/ENFILE/ENOMEM/ENOBUFS).
_ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# accept() errors of a client that gave up while queued: nothing to serve, take the next one.
_ACCEPT_ABORTED_ERRORS = {errno.ECONNABORTED, errno.EPROTO}
ACCEPT_BACKOFF = 0.1  # seconds
# At most one accept warning per this many seconds per worker: a shortage that lasts retries
# every ACCEPT_BACKOFF, which would be 10 lines a second, and the first line says it all.
ACCEPT_WARN_INTERVAL = 10.0  # seconds
# Connections accepted back to back before the accept loop yields (fairness to served ones).
ACCEPT_BURST = 64


class Hooks:
    """What a supervised worker adds to `serve`; this base class is the unsupervised worker
    (`weft run` with one worker in-process, tests): every hook does nothing.

    The supervisor's child (`weft.workers.child`) overrides them to keep its worker-table row
    in shared memory, to count in-flight requests across workers, and to notice the death of
    its parent.
    """

    #: seconds between `heartbeat` calls
    heartbeat_interval = 1.0
    #: read end of the parent-liveness pipe: EOF means the supervisor died (drain, then exit)
    parent_fd: int | None = None
    #: endpoint records of this process alone, made on first use (see `observer_for`)
    local_records: LocalRecords | None = None
    _limiter: SharedLimiter | None = None
    _redis: RedisLimiter | None = None
    _buffers: BufferPool | None = None
    #: the SVID and bundles of ``[spiffe]`` (`weft.spiffe`); None without it
    identity: WorkerIdentity | None = None

    def inflight_for(self, dest: Destination) -> Inflight | None:
        """Shared in-flight counts for a destination, or None for this process's own."""
        return None

    def observer_for(self, dest: Destination) -> Observer | None:
        """What learns from every attempt of `dest` and tells its balancer what to skip
        (`weft.outcome`): health, outlier ejection and the breaker, with their state in shared
        memory. None: nothing observes (no such feature configured).

        Here, without a supervisor, the records are this process's own (an anonymous mapping):
        one worker is all there is to share them with."""
        if not dest.observed:
            return None
        if self.local_records is None:
            self.local_records = LocalRecords()
        columns = self.local_records.columns(len(dest.endpoints))
        return DestinationObserver(dest, self.local_records.table, columns, pid=os.getpid())

    def rate_limiter(self) -> SharedLimiter:
        """The worker's limiter over the instance's rate-limit keys; here, this process's."""
        if self._limiter is None:
            self._limiter = SharedLimiter(private_table())
        return self._limiter

    def redis_limiter(self, backend: RateLimitBackend) -> RedisLimiter:
        """The worker's one connection to the ``[rate_limit_backend]`` Redis (made lazily)."""
        if self._redis is None:
            self._redis = RedisLimiter(backend.url, backend.timeout)
        return self._redis

    def buffer_pool(self, config: Config) -> BufferPool:
        """The buffer pool the data path leases from (`weft.arena_pool`); here, this process's
        own of ``buffers.memory``, in an anonymous mapping (its pages cost nothing until
        touched). A supervised worker's is the instance's shared segment."""
        if self._buffers is None:
            self._buffers = private_pool(config.buffers.memory)
        return self._buffers

    def retry_budget_for(self, route: Route) -> RetryBudget:
        """The shared retry budget of a route with ``[routes.retry]``; here, this process's."""
        assert route.retry is not None
        if self.local_records is None:
            self.local_records = LocalRecords()
        return RetryBudget.local(route.retry, self.local_records)

    def wrr_position_for(self, dest: Destination) -> Position | None:
        """Shared schedule position for a round_robin/weighted destination, or None."""
        return None

    def ready(self) -> None:
        """Every listener accepts."""

    def identity_usable(self, usable: bool) -> None:
        """The SVID became unusable (expired unrenewed) or usable again (`weft.spiffe`)."""

    def draining(self) -> None:
        """The worker stopped accepting and is finishing its requests."""

    def heartbeat(self, inflight: int, requests: int) -> None:
        """Called every `heartbeat_interval` from the event loop (a stuck loop stops calling),
        with the requests in flight now and served so far."""


def serve(
    sockets: list[socket.socket],
    config: Config,
    *,
    middleware: dict[str, list[Middleware]] | None = None,
    on_ready: Callable[[], None] | None = None,
    handle_signals: bool = True,
    hooks: Hooks | None = None,
) -> None:
    """Run a worker until SIGTERM/SIGINT (when `handle_signals`) and a completed drain.

    Args:
      sockets: listening, non-blocking sockets; not closed by the worker.
      config: the validated config.
      middleware: preloaded middleware by route name (loaded from config when None).
      on_ready: called once every listener accepts.
      hooks: supervisor integration (see `Hooks`).
    """
    trio.run(_main, sockets, config, middleware, on_ready, handle_signals, hooks or Hooks())


class Worker:
    """The state of one running worker (reachable from tests and the supervisor glue)."""

    def __init__(
        self,
        config: Config,
        middleware: dict[str, list[Middleware]] | None,
        hooks: Hooks | None = None,
    ) -> None:
        self.config = config
        self.hooks = hooks or Hooks()
        self.identity = self.hooks.identity
        self.pools = UpstreamPools(
            config.destinations.values(),
            config.upstream_max_connections,
            config.timeouts.upstream_connect,
        )
        self.pools.identity = self.identity
        self.app = App(config, self.pools, middleware, hooks=self.hooks)
        observers = {
            name: fw.observer
            for name, fw in self.app.forwarders.items()
            if isinstance(fw.observer, DestinationObserver)
        }
        #: active probes and pool eviction (None: no destination is observed)
        self.prober = Prober(observers, self.pools) if observers else None
        self.state = ServerState(config, self.app, self.pools.timers)
        self.state.arenas = ArenaPool(self.hooks.buffer_pool(config))
        self.access_log = AccessLog(config.access_log.path) if config.access_log.enabled else None
        if self.access_log is not None:
            self.state.on_exchange = self.access_log.record
        self.connections = trio.Semaphore(config.limits.max_connections)
        self.stop = trio.Event()
        #: accept() errors survived, by errno name ("EMFILE"; the names of both sets above,
        #: listed as label values in weft.metrics.ACCEPT_ERRNOS)
        self.accept_errors: Counter[str] = Counter()
        # The accept warning's rate limit: when it was last logged, and errors since then.
        self._accept_warned_at: float | None = None
        self._accept_unlogged = 0
        #: failed TLS handshakes, by (listener "address:port", reason): the reasons are
        #: tls_errors.HANDSHAKE_REASONS
        self.tls_failures: Counter[tuple[str, str]] = Counter()
        # Metrics (weft.metrics): None when off, or when no supervisor collects them.
        self.metrics = metrics_mod.for_worker(
            config, self.pools, self.accept_errors, self.tls_failures
        )
        if self.metrics is not None:
            self._install_metrics(self.metrics)

    def _install_metrics(self, metrics: metrics_mod.WorkerMetrics) -> None:
        """Hook the metrics into the data path, next to the access log, and into the
        destinations' observers (breaker transitions and ejections this worker makes)."""
        self.app.on_route = metrics.route_started
        self.state.on_abandon = metrics.abandoned
        for fw in self.app.forwarders.values():
            if isinstance(fw.observer, DestinationObserver):
                fw.observer.on_event = metrics.endpoint_event
        record = self.state.on_exchange
        if record is None:
            self.state.on_exchange = metrics.exchange
            return
        count = metrics.exchange

        def both(
            request: Request | None,
            response: Response,
            error: str | None,
            client: tuple[str, int],
            duration: float,
        ) -> None:
            count(request, response, error, client, duration)
            record(request, response, error, client, duration)

        self.state.on_exchange = both

    async def accept_loop(
        self, listener: socket.socket, nursery: trio.Nursery, config: Listener | None = None
    ) -> None:
        """Accept connections on `listener` and serve each in a task of `nursery`, forever.
        `config`: the listener's section (its TLS), None for a cleartext one.

        Waits for a `connections` token before each accept (the excess waits in the kernel
        backlog). Out of a resource (EMFILE, ENFILE, ENOMEM, ENOBUFS): count, warn (rate
        limited, `_accept_warning`), sleep ``ACCEPT_BACKOFF`` and retry; a client that gave up
        while queued (ECONNABORTED, EPROTO): count and go on. Any other OSError is raised.
        Returns only by cancellation.
        """
        burst = 0
        while True:
            burst += 1
            if burst >= ACCEPT_BURST:
                burst = 0
                await trio.lowlevel.checkpoint()
            try:
                self.connections.acquire_nowait()
            except trio.WouldBlock:
                await self.connections.acquire()
            try:
                sock, peer = await accept(listener)
            except OSError as e:
                self.connections.release()
                if e.errno in _ACCEPT_RESOURCE_ERRORS:
                    self.accept_errors[errno.errorcode[e.errno]] += 1
                    self._accept_warning(e)
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                if e.errno in _ACCEPT_ABORTED_ERRORS:
                    self.accept_errors[errno.errorcode[e.errno]] += 1
                    continue  # the client gave up while queued: nothing to serve
                raise
            except BaseException:
                self.connections.release()
                raise
            nursery.start_soon(self.handle, sock, peer, config)

    def _accept_warning(self, e: OSError) -> None:
        """Log a resource error of accept() now, or count it for the next line if one was
        logged less than ACCEPT_WARN_INTERVAL ago (trio's clock, so tests can fake it)."""
        now = trio.current_time()
        last = self._accept_warned_at
        if last is not None and now - last < ACCEPT_WARN_INTERVAL:
            self._accept_unlogged += 1
            return
        more = self._accept_unlogged
        self._accept_warned_at = now
        self._accept_unlogged = 0
        since = f" ({more} more since the last message)" if more else ""
        log.warning("accept: %s%s; backing off %.1fs", e.strerror, since, ACCEPT_BACKOFF)

    async def handle(
        self, sock: socket.socket, peer: tuple[str, int], listener: Listener | None = None
    ) -> None:
        try:
            transport: Transport
            if listener is None or listener.tls is None:
                transport = TCPTransport(sock)
            else:
                lt, timeout = listener.tls, self.config.timeouts.tls_handshake
                try:
                    if lt.spiffe:
                        transport = await spiffe.accept(self.identity, sock, lt, timeout)
                    else:
                        transport = await tls.accept(sock, lt.context, timeout)
                except tls_errors.HandshakeFailed as e:
                    name = f"{listener.address}:{listener.port}"
                    self.tls_failures[(name, e.reason)] += 1
                    log.info("TLS handshake from %s:%d on %s failed: %s (%s)",
                             *peer, name, e.reason, e.detail)
                    return
            await serve_connection(transport, self.state, peer)
        finally:
            self.connections.release()


def listener_of(sock: socket.socket, config: Config) -> Listener | None:
    """The [[listeners]] entry `sock` was bound for (by its address and port), or None."""
    try:
        address, port = sock.getsockname()[:2]
    except OSError:
        return None
    for lst in config.listeners:
        if lst.port == port and lst.address == address:
            return lst
    return None


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Stop signals that arrived before trio's receiver was open (see `hold_stop_signals`).
_early_signals: list[int] = []


def hold_stop_signals() -> None:
    """Record SIGTERM/SIGINT instead of dying, until `serve` takes them over.

    Called before the listeners are bound: from the moment a client can connect, a stop signal
    must mean a graceful drain, never the default action (exit 143) or a KeyboardInterrupt
    traceback from inside the startup code.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda n, _frame: _early_signals.append(n))


async def _watch_signals(
    worker: Worker, signals: AsyncIterator[int], scope: trio.CancelScope
) -> None:
    """First SIGTERM/SIGINT: drain. A second one: stop now (as nginx's fast shutdown).

    The receiver stays open until the worker exits, so a second signal never meets the default
    handler (which would kill the process with 143 and lose the last access-log lines).
    """
    async for signum in signals:
        name = signal.Signals(signum).name
        if not worker.stop.is_set():
            log.info("worker got %s: draining", name)
            worker.stop.set()
        else:
            log.info("worker got %s again: stopping now", name)
            scope.cancel()


async def _main(
    sockets: list[socket.socket],
    config: Config,
    middleware: dict[str, list[Middleware]] | None,
    on_ready: Callable[[], None] | None,
    handle_signals: bool,
    hooks: Hooks,
) -> None:
    with contextlib.ExitStack() as stack:
        signals = None
        if handle_signals:
            signals = stack.enter_context(trio.open_signal_receiver(*STOP_SIGNALS))
        await _serve(sockets, config, middleware, on_ready, signals, hooks)


async def _heartbeat(hooks: Hooks, state: ServerState) -> None:
    while True:
        hooks.heartbeat(state.inflight, state.requests)
        await trio.sleep(hooks.heartbeat_interval)


# Seconds between sweeps of idle rate-limit keys; each worker sweeps (the CAS makes it
# idempotent), at a random point of the period so that they do not all sweep at once.
RATE_SWEEP_PERIOD = 30.0


async def _sweep_rate_keys(limiter: SharedLimiter, idle_ns: int) -> None:
    await trio.sleep(random.uniform(0, RATE_SWEEP_PERIOD))
    while True:
        limiter.sweep(idle_ns)
        await trio.sleep(RATE_SWEEP_PERIOD)


async def _run_prober(prober: Prober, scope: trio.CancelScope) -> None:
    with scope:
        await prober.run()


async def _watch_parent(worker: Worker, fd: int) -> None:
    """Drain when the supervisor's end of the liveness pipe closes (it died)."""
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            continue
        if not data:
            log.warning("supervisor is gone: draining")
            worker.stop.set()
            return


async def _serve(
    sockets: list[socket.socket],
    config: Config,
    middleware: dict[str, list[Middleware]] | None,
    on_ready: Callable[[], None] | None,
    signals: AsyncIterator[int] | None,
    hooks: Hooks,
) -> None:
    worker = Worker(config, middleware, hooks)
    listeners = sockets
    if worker.identity is not None and config.spiffe is not None:
        await worker.identity.wait_first(config.spiffe.first_fetch_timeout)
    if _early_signals:
        log.info("got %s while starting: draining", signal.Signals(_early_signals[0]).name)
        worker.stop.set()
    if worker.access_log is not None:
        worker.access_log.open()
    try:
        async with trio.open_nursery() as service:
            await service.start(worker.pools.run)
            if worker.access_log is not None:
                await service.start(worker.access_log.run)
            if worker.metrics is not None:
                await service.start(worker.metrics.run)
            service.start_soon(_heartbeat, hooks, worker.state)
            limits = [x for r in config.routes for x in r.rate_limits]
            if limits:
                service.start_soon(_sweep_rate_keys, hooks.rate_limiter(), sweep_idle_ns(limits))
            probing = trio.CancelScope()
            if worker.prober is not None:
                service.start_soon(_run_prober, worker.prober, probing)
            if hooks.parent_fd is not None:
                service.start_soon(_watch_parent, worker, hooks.parent_fd)
            if worker.identity is not None:
                service.start_soon(spiffe.follow, worker.identity, hooks.identity_usable)
            async with trio.open_nursery() as conns:
                if signals is not None:
                    service.start_soon(_watch_signals, worker, signals, conns.cancel_scope)
                async with trio.open_nursery() as acceptors:
                    for listener in listeners:
                        acceptors.start_soon(
                            worker.accept_loop, listener, conns, listener_of(listener, config)
                        )
                    hooks.ready()
                    if on_ready is not None:
                        on_ready()
                    await worker.stop.wait()
                    acceptors.cancel_scope.cancel()
                hooks.draining()
                probing.cancel()  # its leases go to the next generation now
                worker.state.drain()
                conns.cancel_scope.deadline = trio.current_time() + config.timeouts.drain
            await worker.pools.aclose()
            service.cancel_scope.cancel()
    finally:
        if worker.access_log is not None:
            worker.access_log.close()
