"""The life of a forked worker, from `fork()` to `os._exit()`.

Between the fork and `trio.run` the child first undoes what it inherited from the supervisor
(`weft.workers.postfork.Preamble`: parent-death signal, the supervisor's signal handlers, its
descriptors), ignoring SIGHUP (a reload is the supervisor's business, and a terminal hang-up
must not kill workers); trio installs its own SIGTERM/SIGINT receiver. Besides the
parent-death signal, the worker watches a pipe whose write end only the supervisor holds
(EOF = parent gone): the prctl is Linux-only and bound to the forking *thread*.

Its row: the worker claims a worker-table row (BOOTING), marks it READY once every listener
accepts, DRAINING when it stops accepting, and stamps a heartbeat every second. With
``[spiffe]``, READY waits for a usable X.509-SVID, and the row reads NOT_READY while the worker
has none (it expired unrenewed: `weft.spiffe`).

Exit codes: 0 after a drain, `WORKER_BOOT_ERROR` when it failed before READY (the supervisor
stops at first start, or rolls a reload back), 1 for a failure after READY. `os._exit` is used
so that nothing inherited (atexit handlers, the supervisor's buffers) runs twice.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
import time
import traceback

from weft.backpressure import SharedLimiter
from weft.bufpool import BufferPool
from weft.dst import Position
from weft.forward import Inflight
from weft.handler import Middleware, load_all_middleware
from weft.identity_process import directory_for
from weft.observer import DestinationObserver
from weft.outcome import Observer
from weft.retry_middleware import RetryBudget
from weft.schema import Config, Destination, Route
from weft.shm.worktable import BOOTING, DRAINING, NOT_READY, READY
from weft.spiffe import WorkerIdentity
from weft.workers.postfork import Preamble, exit_child
from weft.workers.shared import (
    SharedState,
    endpoint_key,
    inflight_for,
    route_key,
    wrr_position_for,
)
from weft.workers.worker import Hooks, serve

log = logging.getLogger("weft.worker")

WORKER_BOOT_ERROR = 3  # as gunicorn: "the worker could not boot", do not respawn blindly


class ChildHooks(Hooks):
    def __init__(
        self,
        state: SharedState,
        slot: int,
        generation: int,
        columns: dict[str, int],
        parent_fd: int,
    ) -> None:
        self.state = state
        self.row = state.table.claim(os.getpid(), slot, generation)
        self.row.set_state(BOOTING)
        self.row.heartbeat(time.monotonic_ns())
        self.columns = columns
        self.parent_fd = parent_fd
        self.is_ready = False
        self.is_draining = False
        self.published = (0, 0)  # (in-flight, requests) last written to the row

    def inflight_for(self, dest: Destination) -> Inflight | None:
        if dest.strategy == "least_conn":
            return inflight_for(self.state, self.row, self.columns, dest)
        return None

    def observer_for(self, dest: Destination) -> Observer | None:
        if not dest.observed:
            return None
        cols = [self.columns[endpoint_key(dest.name, e.authority)] for e in dest.endpoints]
        return DestinationObserver(dest, self.state.endpoints, cols, pid=os.getpid())

    def rate_limiter(self) -> SharedLimiter:
        if self._limiter is None:
            self._limiter = SharedLimiter(self.state.rate_table)
        return self._limiter

    def buffer_pool(self, config: Config) -> BufferPool:
        if self.state.buffers is None:  # a state made without a pool (tests): this process's
            return super().buffer_pool(config)
        return self.state.buffers

    def retry_budget_for(self, route: Route) -> RetryBudget:
        assert route.retry is not None
        column = self.columns[route_key(route.name)]
        return RetryBudget(self.state.endpoints, column, route.retry)

    def wrr_position_for(self, dest: Destination) -> Position | None:
        if dest.strategy in ("round_robin", "weighted"):
            return wrr_position_for(self.state, self.columns, dest)
        return None

    def ready(self) -> None:
        self.is_ready = True
        self.row.heartbeat(time.monotonic_ns())
        self.row.set_state(READY)

    def draining(self) -> None:
        self.is_draining = True
        self.row.set_state(DRAINING)

    def identity_usable(self, usable: bool) -> None:
        if self.is_ready and not self.is_draining:
            self.row.set_state(READY if usable else NOT_READY)

    def heartbeat(self, inflight: int, requests: int) -> None:
        old_inflight, old_requests = self.published
        if inflight != old_inflight:
            self.row.inflight_add(inflight - old_inflight)
        if requests != old_requests:
            self.row.requests_add(requests - old_requests)
        self.published = (inflight, requests)
        self.row.heartbeat(time.monotonic_ns())


def run(
    *,
    slot: int,
    generation: int,
    sockets: list[socket.socket],
    config: Config,
    state: SharedState,
    columns: dict[str, int],
    parent_fd: int,
    preamble: Preamble,
) -> None:
    """Become a worker; never returns (`os._exit`)."""
    code = WORKER_BOOT_ERROR
    hooks: ChildHooks | None = None
    try:
        preamble.apply(ignore=(signal.SIGHUP,))
        os.set_blocking(parent_fd, False)
        hooks = ChildHooks(state, slot, generation, columns, parent_fd)
        if config.spiffe is not None:
            hooks.identity = WorkerIdentity(
                config, directory_for(config.instance), state.identity_generation
            )
        middleware: dict[str, list[Middleware]] = load_all_middleware(config)
        # What exists now (modules, config, tables) lives as long as the worker: freeze it so
        # that full collections stop rescanning it, and collect the young generation less
        # often (the request path frees nearly everything by reference counting; what it
        # leaves is cycles from exceptions and cancelled tasks). Measured on the 1 KiB
        # benchmark, 1 worker, 4 alternating rounds: 741 -> 698 µs of CPU per request (noisy).
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        serve(sockets, config, middleware=middleware, hooks=hooks)
        code = 0
    except BaseException as e:  # the child reports everything, then exits
        if hooks is not None and hooks.is_ready:
            code = 1
        errors = getattr(e, "errors", None)
        if errors:
            for line in errors:
                print(f"weft worker {slot}: {line}", file=sys.stderr)
        else:
            print(f"weft worker {slot} (pid {os.getpid()}) failed:", file=sys.stderr)
            traceback.print_exc()
    finally:
        exit_child(code)
