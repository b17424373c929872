"""The state a worker shares with the connections it serves: config, the app, timers, drain.

It lives with the worker, not in a protocol adapter, because every adapter (h1 today, h2 next)
serves under the same worker: the drain signal, the in-flight counts the heartbeat publishes,
and the exchange hooks (access log, metrics) are the worker's. Drain is a callback per
connection (`register`): each adapter answers it in its own way (h1 with ``Connection: close``
on the next response, h2 with GOAWAY).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from weft.arena_pool import ArenaPool
from weft.http.io import Timers
from weft.http.messages import Request, Response
from weft.schema import Config

ServerApp = Callable[[Request], Awaitable[Response]]


class Drainable(Protocol):
    """A served connection, as the worker's drain sees it."""

    def on_drain(self) -> None:
        """The worker drains: finish what is in flight, then close (h1: ``Connection: close``
        on the next response and a close once idle for ``timeouts.drain_idle``; h2: GOAWAY)."""


class ServerState:
    """What a connection needs from its worker: config, the app, the worker's timers, and the
    drain signal.

    Every served connection is in `connections` (`register` / `unregister`) so that `drain` can
    call its `on_drain`; a connection that starts after the drain began sees `draining`.
    """

    def __init__(self, config: Config, app: ServerApp, timers: Timers) -> None:
        self.config = config
        self.app = app
        self.timers = timers
        self.draining = False
        self.connections: set[Drainable] = set()
        # Requests being served now, and served in all (published by the worker's heartbeat).
        self.inflight = 0
        self.requests = 0
        # Called once per finished exchange: (request or None, response, error reason, client,
        # duration in seconds). The access log and metrics hang here.
        self.on_exchange: (
            Callable[[Request | None, Response, str | None, tuple[str, int], float], None] | None
        ) = None
        # Called for a request whose client went away before it got a response (no exchange
        # to log; metrics count it as nginx's 499 and end its in-flight count).
        self.on_abandon: Callable[[Request], None] | None = None
        # The worker's arenas over its buffer pool (`weft.arena_pool`): a connection takes one
        # and gives it back when it ends. None: no pool (a state made in tests).
        self.arenas: ArenaPool | None = None

    def register(self, conn: Drainable) -> None:
        self.connections.add(conn)
        if self.draining:
            conn.on_drain()

    def unregister(self, conn: Drainable) -> None:
        self.connections.discard(conn)

    def drain(self) -> None:
        """Stop keep-alive on every connection: each finishes what it serves, and closes."""
        if self.draining:
            return
        self.draining = True
        for conn in list(self.connections):
            conn.on_drain()
