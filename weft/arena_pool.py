"""Per-request arenas: every pool buffer a request leased, its head scratch and its replay body,
given back in one call when the request ends.

A request on the data path takes buffers from the shared pool (`weft.bufpool`) in several
places: the relay of a streamed response body (the h1 server), the relay of a streamed request
body (the upstream adapter), the body kept for a retry (the retry middleware). Freeing each of
them where it was taken would put a ``finally`` at every one of those sites and on every path
through them (success, an upstream error, a client that left, a cancellation), and one missed
path is a buffer lost until the worker dies. So none of them frees anything: each leases through
the request's `Arena` (``request.arena``), and the adapter that serves the request calls
`Arena.release` once, in the ``finally`` that ends the exchange. Nothing is freed piece by piece.

An arena is **reused**: the h1 server keeps one per connection (requests on a connection are
served one after another), an h2 connection will take one per stream from the worker's
`ArenaPool`. What it keeps between requests: the list that holds the leases, and ``head``,
the connection's read buffer for request heads. ``head`` is connection scratch, not the
request's: it holds the pipelined bytes of the next request, so `release` leaves it, and only
`ArenaPool.give_back` empties it. Reads land in the worker's shared scratch
(`weft.http.io.SCRATCH`) and are appended to ``head``, so no read makes a `bytes` of its own.

**Backpressure.** A lease is `BufferPool.claim`: lock-free, no system call. When a class has no
free buffer, `lease_wait` waits for one (the pool is polled, see `BufferPool.claim_wait`) for at
most the timeout its caller gives, the body-idle timeout of the side it reads, and then raises
`BuffersExhausted` (503, ``buffers_exhausted``; Retry-After 1). It never allocates around the
budget. Each wait and each give-up is noted in the request's ``ctx`` (``buffer_waits``,
``buffer_exhausted``) for the metrics.
"""

from __future__ import annotations

import logging
from typing import Any

from weft.bufpool import CLASS_SIZES, Buffer, BufferPool, size_class
from weft.http.errors import UpstreamError
from weft.http.messages import Body

__all__ = ["RELAY_SIZE", "Arena", "ArenaPool", "BuffersExhausted", "ReplayBody"]

log = logging.getLogger("weft.arena")

#: the buffer a relay reads into: the largest class, one socket read (`weft.http.h1.READ_SIZE`)
RELAY_SIZE = CLASS_SIZES[-1]
# Arenas an ArenaPool keeps for reuse; more are made and dropped as needed.
KEEP = 1024


class BuffersExhausted(UpstreamError):
    """No pool buffer of the class needed came free in time (503; not the endpoint's fault:
    the forwarder's outcome table has no result for it, so no breaker or outlier counts it)."""

    status = 503
    reason = "buffers_exhausted"
    #: what the client is told
    public = "the server has no buffer memory free; try again"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, retry_after=1)


class Arena:
    """One request's scratch (see the module docstring); `release` ends the request."""

    __slots__ = ("_leases", "ctx", "head", "pool")

    def __init__(self, pool: BufferPool) -> None:
        self.pool = pool
        self._leases: list[Buffer] = []
        #: the connection's read buffer for request heads (kept across requests)
        self.head = bytearray()
        #: the ``ctx`` of the request being served (waits are noted there), None between them
        self.ctx: dict[str, Any] | None = None

    @property
    def leased(self) -> int:
        """Buffers held now."""
        return len(self._leases)

    def lease(self, size: int) -> Buffer | None:
        """A buffer of the class holding `size` bytes, or None when that class has none free."""
        buf = self.pool.claim(size)
        if buf is not None:
            self._leases.append(buf)
        return buf

    async def lease_wait(self, size: int, timeout: float) -> Buffer:
        """A buffer of the class holding `size` bytes, waiting up to `timeout` seconds for one
        to come free. Raises BuffersExhausted after that; a cancellation holds nothing."""
        buf = self.pool.claim(size)
        if buf is None:
            ctx = self.ctx
            if ctx is not None:
                ctx["buffer_waits"] = ctx.get("buffer_waits", 0) + 1
            buf = await self.pool.claim_wait(size, timeout)
            if buf is None:
                if ctx is not None:
                    ctx["buffer_exhausted"] = True
                raise BuffersExhausted(
                    f"no free buffer of {size} bytes within {timeout:g}s (buffers.memory)"
                )
        self._leases.append(buf)
        return buf

    def release(self) -> int:
        """End the request: every lease goes back to the pool. How many were freed (a buffer
        the supervisor already reclaimed is not). Idempotent; `head` is kept."""
        self.ctx = None
        leases = self._leases
        if not leases:
            return 0
        freed = 0
        for buf in leases:
            try:
                freed += buf.release()
            except BufferError:
                # Something still holds an export of the buffer's view (a bug in a caller):
                # leaving it tagged loses it until this worker exits, rather than handing
                # bytes someone still reads to another request.
                log.error("a pool buffer is still exported at the end of its request: %r", buf)
        leases.clear()
        return freed


class ArenaPool:
    """A worker's arenas over its buffer pool: `acquire` one, `give_back` it (released) for
    reuse. A free list, nothing shared: arenas are per worker, their buffers per request."""

    __slots__ = ("_free", "pool")

    def __init__(self, pool: BufferPool) -> None:
        self.pool = pool
        self._free: list[Arena] = []

    def acquire(self) -> Arena:
        free = self._free
        return free.pop() if free else Arena(self.pool)

    def give_back(self, arena: Arena) -> None:
        """Release what `arena` still holds and keep it for the next `acquire`."""
        arena.release()
        arena.head.clear()  # (a bytearray's clear() gives its memory back)
        if len(self._free) < KEEP:
            self._free.append(arena)


class ReplayBody(Body):
    """A request body kept whole in leased pool buffers, for the retry middleware to send again
    on each try. Framed as the client sent it: ``length`` None stays chunked (its trailers go
    upstream too), else the Content-Length it had.

    `prefetched` hands out the buffers' views without a copy (the adapters write from them);
    `receive` gives copies as `bytes`, because middleware may keep what it reads past the
    arena's release.
    """

    __slots__ = ("_at", "_views")

    def __init__(self, views: list[memoryview], length: int | None, trailers: list) -> None:
        super().__init__()
        self._views = views
        self._at = 0
        self.length = length
        self.trailers = trailers

    @property
    def done(self) -> bool:
        return self._at >= len(self._views)

    def again(self) -> ReplayBody:
        """A fresh reading of the same bytes, for the next try."""
        return ReplayBody(self._views, self.length, self.trailers)

    async def receive(self) -> bytes:
        if self._at >= len(self._views):
            return b""
        self._at += 1
        return bytes(self._views[self._at - 1])

    def prefetched(self) -> tuple[list[Any], bool]:
        views = self._views[self._at :]
        self._at = len(self._views)
        return views, True


async def keep_body(
    arena: Arena | None, body: Body, limit: int, timeout: float
) -> tuple[ReplayBody | None, list[memoryview]]:
    """Read `body` whole into buffers leased from `arena`, if it is at most `limit` bytes.

    Returns (the replay body, []) when it fits; (None, the views read so far) when it is
    larger: the caller sends those, then the rest of `body`, and cannot replay. A body whose
    Content-Length is over `limit` is not read at all. A Content-Length body is read straight
    into the buffers (`Body.receive_into`); buffers are of the smallest class that holds what
    is left, so a 100-byte body takes a 256-byte buffer. Raises BuffersExhausted when a buffer
    cannot be had within `timeout`, and what reading `body` raises.
    """
    length = body.length
    views: list[memoryview] = []
    if length is not None and length > limit:
        return None, views
    total = 0
    chunked_size = CLASS_SIZES[2]  # chunked: 4 KiB first, then 64 KiB
    while True:
        size = min(max(length - total, 1), RELAY_SIZE) if length is not None else chunked_size
        if arena is not None:
            view = (await arena.lease_wait(size, timeout)).view
        else:  # a request made outside a protocol adapter (unit tests): plain memory
            view = memoryview(bytearray(CLASS_SIZES[size_class(size)]))
        used = 0
        while used < len(view):
            n = await body.receive_into(view[used:])
            if not n:
                if used:
                    views.append(view[:used])
                return ReplayBody(views, length, body.trailers), []
            used += n
            total += n
            if total > limit:
                views.append(view[:used])
                return None, views
        views.append(view)
        if length is not None and total >= length:
            return ReplayBody(views, length, body.trailers), []  # not one more buffer to see 0
        chunked_size = RELAY_SIZE
