"""Upstream connection pools: keep-alive reuse, caps, a bounded wait queue, idle eviction.

One `UpstreamPools` per worker process holds an `EndpointPool` per endpoint of every destination.
The rules, in the order a request meets them:

1. **Reuse first.** An idle connection is taken newest-first (LIFO: the warmest socket, and the
   oldest ones age out by the idle timer). One the upstream closed while idle (or sent bytes
   on, like an unsolicited 408 or a second response) is detected by a non-blocking select()
   before every reuse and thrown away: bytes that belong to no request must never be read as
   the answer to the next one (a response desync hands one client's response to another).
2. **Open within caps.** A new connection needs room under the endpoint's ``max_per_endpoint``
   and the worker's ``[upstream] max_connections``. At the worker cap an idle connection of
   another endpoint is closed to make room (idle sockets are worth less than a waiting request).
3. **Otherwise wait**, in FIFO order, at most ``queue_timeout`` (give or take the worker's
   `Timers.TICK`) and only while fewer than ``queue_size`` requests wait: past either,
   `PoolFull` (the client gets 503 + Retry-After).
   Every released or closed connection wakes the first waiter, which retries from step 1.
4. **Release** returns a connection only if its exchange ended cleanly on both sides and it has
   served fewer than ``max_requests``; everything else is closed. Idle connections beyond
   ``max_idle_per_endpoint`` or older than ``idle_timeout`` are closed by the sweeper (every
   `SWEEP_INTERVAL`), oldest first. Not at release: requests that arrive in bursts (h2
   clients multiplexing, one read bringing many streams) release their connections in
   bursts, and a cap applied at release closed every connection past it only for the next
   burst to open new ones: with h2load -m10 (640 streams in flight) 43 % of requests paid a
   connect and a close. The sweeper trims what stays idle for a second; the sockets open stay
   bounded by ``max_per_endpoint`` all the time.
5. **Close** (drain): idle connections are closed at once, busy ones when they are released.

A destination with ``[destinations.<name>.tls]`` gets TLS connections (`open_transport`): the
handshake is part of opening, inside ``upstream_connect`` (Envoy's connect timeout covers it
too), and a refused certificate is a 502 `upstream_tls` naming the verification error.

The pool counts connections, not requests: in-flight request counts for least-connections
balancing live in `weft.dst`'s caller (the forwarder).

**HTTP/2 endpoints** (``protocol = "h2"``/``"h2c"``, or ``"auto"`` once ALPN chose h2) share
connections: `acquire` hands out a **stream slot** (`weft.http.h2_client.H2Upstream`) on an
open connection with room, newest connection first, and opens a new connection only when every
one is full (or going away). While one connection to the endpoint is being opened, other
requests wait for it instead of opening their own. What each cap counts for them:

* ``max_per_endpoint`` and ``[upstream] max_connections``: **connections** (sockets), as for h1;
* streams per connection: at most ``max_streams_per_connection``, lowered by the upstream's
  SETTINGS_MAX_CONCURRENT_STREAMS, so an endpoint carries at most ``max_per_endpoint`` times
  that many requests at once; past it requests wait in the same queue (``queue_size``,
  ``queue_timeout``), woken as slots free up;
* ``max_requests``: **streams** per connection; a connection that reached it takes no new
  stream and closes when its last one ends;
* ``max_idle_per_endpoint`` and ``idle_timeout``: connections without a stream in flight.
  An idle h2 connection is not closed to make room for another endpoint at the worker cap
  (only idle h1 connections are).

Each h2 connection has its own task (reader and writer), started in the pool's nursery
(`UpstreamPools.run`); a connection that dies or is told GOAWAY leaves the pool by itself.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable

import trio

from weft import spiffe
from weft.http import tls as tls_mod
from weft.http.errors import UpstreamError
from weft.http.h1_client import H1Upstream
from weft.http.h2_client import H2Upstream, take_slot
from weft.http.h2_conn import H2Connection
from weft.http.io import Timers
from weft.http.transport import Transport, open_tcp
from weft.http.upstream import UpstreamConnection
from weft.schema import Destination, Endpoint, PoolConfig, UpstreamTLS

log = logging.getLogger("weft.pool")

SWEEP_INTERVAL = 1.0  # seconds between idle sweeps; idle_timeout is honoured to within this


class PoolFull(UpstreamError):
    status = 503
    reason = "pool_full"


async def open_transport(
    ep: Endpoint, tls: UpstreamTLS | None, identity: spiffe.WorkerIdentity | None = None
) -> Transport:
    """A connection to `ep`: TCP, then TLS when the destination has `tls` (SNI and the name
    verified: ``server_name``, or the endpoint's host; with ``spiffe = true`` weft's SVID from
    `identity` and the upstream's checked by `weft.spiffe.connect`). Unbounded: the caller's
    scope bounds it. Raises OSError (connect), `weft.http.tls_errors.UpstreamTLSError`
    (handshake; closed)."""
    transport = await open_tcp(ep.host, ep.port)
    if tls is None:
        return transport
    try:
        if tls.spiffe:
            return await spiffe.connect(identity, transport, tls, tls.server_name or ep.host)
        return await tls_mod.connect(transport, tls.context, tls.server_name or ep.host)
    except BaseException:
        transport.close()
        raise


class _Waiter:
    """A request in an endpoint's queue. `wake_one` sets its event (its turn to retry); the
    worker's `Timers` call it at ``queue_timeout`` (a timer entry rather than a cancel scope
    per wait: entering a scope with a deadline cost 4 % of a worker's CPU with h2 streams
    queueing for connections, 13 µs a wait)."""

    __slots__ = ("event", "expired", "queued")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.expired = False
        self.queued = True  # in the deque (wake_one takes it out)

    def __call__(self) -> None:
        self.expired = True
        self.event.set()


class EndpointPool:
    """Connections to one endpoint."""

    def __init__(
        self,
        owner: UpstreamPools,
        endpoint: Endpoint,
        cfg: PoolConfig,
        connect_timeout: float,
        tls: UpstreamTLS | None = None,
        protocol: str = "http1.1",
    ) -> None:
        self.owner = owner
        self.protocol = protocol
        # Streams on shared connections (h2, h2c; auto once ALPN said h2): see the module doc.
        self.speaks_h2 = protocol in ("h2", "h2c")
        self.h2conns: list[H2Connection] = []
        self.h2_opening = 0  # h2 connections being opened (others wait for them)
        self.endpoint = endpoint
        self.cfg = cfg
        self.tls = tls  # None: cleartext
        self.connect_timeout = connect_timeout
        self.idle: deque[UpstreamConnection] = deque()
        self.open = 0  # idle + busy + being opened
        self.waiters: deque[_Waiter] = deque()  # FIFO; a woken waiter that loses keeps its place
        self.waiting = 0
        self.created = 0  # connections ever opened (tests and status read it)
        # Connections closed because the upstream sent bytes past the end of a response.
        self.stray_responses = 0

    async def acquire(self, *, fresh: bool = False) -> tuple[UpstreamConnection, bool]:
        """A connection for one exchange, and whether it was reused.

        An idle connection is checked for a close (or bytes nobody asked for) by the upstream
        before it is handed out: one select() call. The check is never skipped: a connection
        released a moment ago can already hold a second response its upstream sent late (a
        desync), and that response would be read as the answer to this request. `fresh`
        skips the idle list (the forwarder's retry after a reused connection failed).

        Raises PoolFull (503) when the queue is full or the wait times out, UpstreamError
        (502 refused/unreachable, 504 connect timeout) when opening fails.
        """
        owner = self.owner
        if owner.closing:
            raise UpstreamError("worker is shutting down", status=503, reason="draining")
        conn = self._ready(fresh)
        if conn is not None:
            return conn, True
        if self._may_open(fresh):
            return await self._open(), False
        return await self._wait(fresh)

    def _ready(self, fresh: bool) -> UpstreamConnection | None:
        """What can be handed out at once: a stream slot on an h2 connection with room, or an
        idle h1 connection (none when `fresh`)."""
        if self.speaks_h2:
            for c in reversed(self.h2conns):
                if c.has_room():
                    return take_slot(c, self)
            return None
        return None if fresh else self._take_idle()

    def _may_open(self, fresh: bool) -> bool:
        """Whether a connection may be opened now (within the caps; for h2, not while another
        is being opened: its streams are for the waiters)."""
        if self.speaks_h2:
            if self.h2_opening:
                return False
        elif fresh and self.open >= self.cfg.max_per_endpoint:
            self.close_idle(1)  # a fresh connection is wanted: an idle one gives up its place
        return self.open < self.cfg.max_per_endpoint and self.owner.make_room()

    async def move(self, slot: H2Upstream) -> None:
        """Give `slot`'s stream back and put it on another slot (an unprocessed h2 stream is
        sent again there; `weft.http.h2_client`). Raises as `acquire`."""
        slot.conn.finish(slot)
        other, _ = await self.acquire()
        assert isinstance(other, H2Upstream)
        other.held = False
        slot.conn = other.conn
        slot.held = True

    def _take_idle(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            self.owner.idle_count -= 1
            if conn.closed_while_idle():
                if conn.stray:
                    self._stray(conn, "while it was idle")
                self._discard(conn)
                continue
            return conn
        return None

    async def _wait(self, fresh: bool) -> tuple[UpstreamConnection, bool]:
        owner = self.owner
        if self.waiting >= self.cfg.queue_size:
            raise PoolFull(
                f"{self.endpoint.authority}: {self.waiting} requests already wait "
                f"({self._in_use()})",
                retry_after=1,
            )
        waiter = _Waiter()
        self.waiters.append(waiter)
        self.waiting += 1
        owner.waiting += 1
        timer = owner.timers.arm_call(trio.current_time() + self.cfg.queue_timeout, waiter)
        try:
            while True:
                await waiter.event.wait()
                if owner.closing:
                    raise UpstreamError("worker is shutting down", status=503, reason="draining")
                conn = self._ready(fresh)
                if conn is not None:
                    return conn, True
                if self._may_open(fresh):
                    return await self._open(), False
                if waiter.expired:
                    raise PoolFull(
                        f"{self.endpoint.authority}: no "
                        f"{'stream' if self.speaks_h2 else 'connection'} within "
                        f"{self.cfg.queue_timeout:g}s ({self._in_use()})",
                        retry_after=1,
                    )
                # Someone was quicker: wait again at the head of the queue.
                waiter.event = trio.Event()
                waiter.queued = True
                self.waiters.appendleft(waiter)
        finally:
            owner.timers.disarm(timer)
            self.waiting -= 1
            owner.waiting -= 1
            if waiter.queued:
                self.waiters.remove(waiter)

    def _in_use(self) -> str:
        """What the caps count, for a PoolFull message: connections, and for h2 the streams."""
        cap = f"{self.open} of max_per_endpoint {self.cfg.max_per_endpoint} connections open"
        if not self.speaks_h2:
            return cap
        streams = sum(c.active for c in self.h2conns)
        room = sum(c.capacity() for c in self.h2conns)
        opening = ", one being opened" if self.h2_opening else ""
        return f"{streams} of {room} streams in use on {cap}{opening}"

    def wake_one(self) -> bool:
        if self.waiters:
            waiter = self.waiters.popleft()
            waiter.queued = False
            waiter.event.set()
            return True
        return False

    async def _open(self) -> UpstreamConnection:
        """A new connection: an H1Upstream, or for h2 a slot on a new H2Connection (its
        preface and SETTINGS exchanged within ``upstream_connect`` too)."""
        self.open += 1
        self.owner.total += 1
        h2conn: H2Connection | None = None
        opening = self.speaks_h2
        self.h2_opening += opening
        try:
            ep = self.endpoint
            with trio.move_on_after(self.connect_timeout) as cs:
                try:
                    transport = await open_transport(ep, self.tls, self.owner.identity)
                except OSError as e:
                    raise UpstreamError(
                        f"connect to {ep.authority} failed: {e.strerror or e}",
                        reason="connect_error",
                    ) from None
                if self._wants_h2(transport):
                    h2conn = H2Connection(
                        transport,
                        ep,
                        tls=self.tls is not None,
                        max_streams=self.cfg.max_streams_per_connection,
                        on_change=self._h2_changed,
                    )
                    try:
                        await h2conn.handshake()
                    except OSError as e:
                        raise UpstreamError(
                            f"h2 preface with {ep.authority} failed: {e}", reason="connect_error"
                        ) from None
            if cs.cancelled_caught:
                raise UpstreamError(
                    f"connect to {ep.authority} timed out", status=504, reason="connect_timeout"
                )
        except BaseException:
            self.open -= 1
            self.owner.total -= 1
            self.h2_opening -= opening
            if h2conn is not None:
                h2conn.transport.close()
            self.wake_one() or self.owner.wake_any()
            raise
        self.h2_opening -= opening
        self.created += 1
        if h2conn is None:
            return H1Upstream(transport, ep, self.owner.timers)
        self.speaks_h2 = True  # "auto": ALPN said h2; from now on streams are handed out
        nursery = self.owner.nursery
        assert nursery is not None, "h2 connections need UpstreamPools.run"
        self.h2conns.append(h2conn)
        h2conn.nursery = nursery  # where request bodies stream after the head (h2_client)
        nursery.start_soon(h2conn.run)
        slot = take_slot(h2conn, self)
        self._wake_h2()
        return slot

    def _wants_h2(self, transport: Transport) -> bool:
        """Whether a connection just opened speaks h2. ``h2`` insists on ALPN h2 (a 502 when
        the upstream chose anything else); ``auto`` follows ALPN."""
        if self.protocol == "h2c":
            return True
        if self.protocol == "h2":
            if transport.alpn != "h2":
                transport.close()
                raise UpstreamError(
                    f"{self.endpoint.authority} did not choose h2 by ALPN "
                    f"(chose {transport.alpn or 'nothing'})",
                    reason="bad_response",
                )
            return True
        return self.protocol == "auto" and transport.alpn == "h2"

    def _h2_changed(self, conn: H2Connection) -> None:
        """An h2 connection's room or life changed (a slot given back, new SETTINGS, GOAWAY,
        death): apply the caps, close it when it is done, and wake as many waiters as fit."""
        if conn in self.h2conns:
            cfg = self.cfg
            if cfg.max_requests and conn.requests >= cfg.max_requests:
                conn.goaway = True  # retired: no new stream; closed once the last one ends
            done = conn.dead is not None or conn.closed
            if conn.active == 0 and not done:
                idle = sum(1 for c in self.h2conns if c.active == 0)
                done = conn.goaway or self.owner.closing or idle > cfg.max_idle_per_endpoint
            if done:
                self.h2conns.remove(conn)
                conn.close()
                self.open -= 1
                self.owner.total -= 1
                if not self.waiters:
                    self.owner.wake_any()
        self._wake_h2()

    def _wake_h2(self) -> None:
        room = sum(c.capacity() - c.active for c in self.h2conns if c.has_room())
        if not self.h2_opening and self.open < self.cfg.max_per_endpoint:
            room += 1  # one waiter may open a connection
        for _ in range(min(room, len(self.waiters))):
            self.wake_one()

    def release(self, conn: UpstreamConnection) -> None:
        """Give a connection back after an exchange (closed unless cleanly reusable); an h2
        slot goes back to its connection (its stream reset unless it ended cleanly)."""
        if type(conn) is H2Upstream:
            conn.conn.finish(conn)
            return
        conn.requests += 1
        cfg = self.cfg
        if not conn.reusable():
            if conn.stray:
                self._stray(conn, "past the end of a response")
            self._discard(conn)
            return
        if self.owner.closing or (cfg.max_requests and conn.requests >= cfg.max_requests):
            self._discard(conn)
            return
        conn.recycle()
        conn.idle_since = trio.current_time()
        self.idle.append(conn)
        self.owner.idle_count += 1
        self.wake_one() or self.owner.wake_any()

    def _stray(self, conn: UpstreamConnection, when: str) -> None:
        """Bytes nobody asked for: a second response (a desync, or the answer to a smuggled
        request). Reusing the connection would hand them to the next client as its answer."""
        self.stray_responses += 1
        log.warning(
            "%s sent %d bytes %s: connection closed, never reused",
            self.endpoint.authority,
            conn.stray,
            when,
        )

    def discard(self, conn: UpstreamConnection) -> None:
        """Close a connection that must not be reused (broken or abandoned exchange); for an h2
        slot, reset its stream (the connection goes on)."""
        if type(conn) is H2Upstream:
            conn.conn.finish(conn)
            return
        self._discard(conn)

    def _discard(self, conn: UpstreamConnection) -> None:
        self.open -= 1
        self.owner.total -= 1
        conn.close()
        self.wake_one() or self.owner.wake_any()

    def sweep(self, now: float) -> None:
        """Close idle connections older than ``idle_timeout``, then the oldest idle ones past
        ``max_idle_per_endpoint`` (see the module docstring for why not at release); an h2
        connection without streams for ``idle_timeout`` is told GOAWAY."""
        for c in [c for c in self.h2conns if c.active == 0]:
            if now - c.idle_since > self.cfg.idle_timeout:
                c.goaway = True
                self._h2_changed(c)
        idle = self.idle
        cfg = self.cfg
        while idle and (
            now - idle[0].idle_since > cfg.idle_timeout or len(idle) > cfg.max_idle_per_endpoint
        ):
            self.owner.idle_count -= 1
            self._discard(idle.popleft())

    def close_idle(self, n: int | None = None) -> int:
        closed = 0
        while self.idle and (n is None or closed < n):
            self.owner.idle_count -= 1
            self._discard(self.idle.popleft())
            closed += 1
        for c in [c for c in self.h2conns if c.active == 0]:
            if n is not None and closed >= n:
                break
            c.goaway = True
            self._h2_changed(c)
            closed += 1
        return closed


class UpstreamPools:
    """Every endpoint pool of one worker, the worker-wide cap, and the worker's timers (their
    `run` task drives `Timers` for the client side too)."""

    def __init__(
        self,
        destinations: Iterable[Destination],
        max_total: int,
        connect_timeout: float,
        timers: Timers | None = None,
    ) -> None:
        self.timers = timers if timers is not None else Timers()
        self.identity: spiffe.WorkerIdentity | None = None  # the worker's SVID (`weft.spiffe`)
        self.max_total = max_total
        self.total = 0
        self.idle_count = 0
        self.closing = False
        self.waiting = 0
        # Where h2 connections run their task (`run` opens it); None until then.
        self.nursery: trio.Nursery | None = None
        self.by_destination: dict[str, list[EndpointPool]] = {}
        for dest in destinations:
            eps = []
            for ep in dest.endpoints:
                pool = EndpointPool(
                    self, ep, dest.pool, connect_timeout, dest.tls, dest.protocol
                )
                eps.append(pool)
            self.by_destination[dest.name] = eps

    def make_room(self) -> bool:
        """Whether one more connection may open, closing an idle one elsewhere if needed."""
        if self.total < self.max_total:
            return True
        if self.idle_count:
            oldest: EndpointPool | None = None
            for pools in self.by_destination.values():
                for p in pools:
                    if p.idle and (
                        oldest is None or p.idle[0].idle_since < oldest.idle[0].idle_since
                    ):
                        oldest = p
            if oldest is not None:
                oldest.close_idle(1)
                return self.total < self.max_total
        return False

    def wake_any(self) -> bool:
        """A connection slot was freed: let the first waiter of any endpoint retry."""
        if self.waiting:
            for pools in self.by_destination.values():
                for p in pools:
                    if p.wake_one():
                        return True
        return False

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The worker's timers: socket deadlines every `Timers.TICK`, idle upstream
        connections past their idle timeout every SWEEP_INTERVAL; until cancelled. The h2
        connections' tasks run in its nursery (cancelled with it)."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            task_status.started()
            next_sweep = trio.current_time() + SWEEP_INTERVAL
            while True:
                await trio.sleep(Timers.TICK)
                now = trio.current_time()
                self.timers.expire(now)
                if now >= next_sweep:
                    next_sweep = now + SWEEP_INTERVAL
                    for pools in self.by_destination.values():
                        for p in pools:
                            p.sweep(now)

    async def aclose(self) -> None:
        """Graceful close: idle connections now; busy ones are closed when released."""
        self.closing = True
        for pools in self.by_destination.values():
            for p in pools:
                p.close_idle()
                while p.wake_one():
                    pass
        await trio.lowlevel.checkpoint()

    def stats(self) -> dict[str, list[dict[str, int | str]]]:
        return {
            name: [
                {
                    "endpoint": p.endpoint.authority,
                    "open": p.open,
                    "idle": len(p.idle),
                    "waiting": p.waiting,
                    "created": p.created,
                    # h2 endpoints only: streams in flight over the `open` connections
                    **({"streams": sum(c.active for c in p.h2conns)} if p.speaks_h2 else {}),
                    "stray_responses": p.stray_responses,
                }
                for p in pools
            ]
            for name, pools in self.by_destination.items()
        }
