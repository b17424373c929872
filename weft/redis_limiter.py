"""Rate limits past one host: the same GCRA and leaky bucket as `weft.backpressure`, kept in
Redis by a Lua script, so any number of weft hosts share one limit.

Why a small trio-native RESP client and not redis-py: redis-py's asyncio client needs an
asyncio loop, and bridging it into trio (trio-asyncio, or a thread per worker running a loop)
costs a thread hop or a second event loop per decision and more code than the three commands
this needs (SELECT, SCRIPT LOAD, EVALSHA). RESP2 is a line protocol: `RespConnection` writes
arrays of bulk strings and parses the five reply types, and nothing else.

Theory of operation:

* **One script, one round trip.** `SCRIPT` computes the decision on the key's TAT with Redis's
  own clock (``TIME``: every host decides on one clock, where CLOCK_MONOTONIC is per host), and
  sets the new TAT with an expiry of its refill time, so idle keys vanish by themselves. Keys
  are ``weft:<route>:<key>``. The script is loaded once per connection (``SCRIPT LOAD``) and
  called by ``EVALSHA``; a ``NOSCRIPT`` (Redis restarted) loads it again. Unlike Envoy's global
  rate limit service (fixed windows, up to twice the limit across a window edge) this is the
  exact GCRA.
* **Known-over-limit cache.** A refused key's "blocked until" time goes into the instance's
  shared key table (`weft.backpressure.SharedLimiter.block`); until then every worker refuses
  it without asking Redis, with the Retry-After the script computed.
* **Failure.** Each decision is bounded by ``timeout``. A slow or absent Redis, a broken
  connection or an error reply gives the configured ``on_error`` decision, counted. A slow
  answer leaves the connection as it is (its reply is read and dropped later); a broken one is
  replaced by the next call, and a failed connect is not tried again for `RETRY_INTERVAL`, so
  the limiter recovers on its own when Redis returns without a connect attempt per request
  while it is down.
* **One pipelined connection per worker** (`RespConnection`): concurrent decisions do not
  queue behind each other's round trips.
"""

from __future__ import annotations

import hashlib
import logging
import math
import urllib.parse
from collections import deque
from dataclasses import dataclass

import trio

from weft.backpressure import Verdict
from weft.schema import RateLimit

__all__ = ["SCRIPT", "RedisError", "RedisLimiter", "RespConnection", "parse_url"]

log = logging.getLogger("weft.ratelimit")

RETRY_INTERVAL = 1.0  # seconds between connect attempts while Redis is unreachable

# KEYS[1]: the key. ARGV: interval_us, tolerance_us (burst x T, or queue x T), leaky (0/1),
# nodelay (0/1). Returns {admit, retry_after_us, remaining, reset_us, delay_us}.
SCRIPT = b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - now
if wait > tau then
  return {0, wait - tau, 0, wait, 0}
end
local new = tat + interval
local ttl = math.ceil((new - now) / 1000) + 1000
redis.call('SET', KEYS[1], new, 'PX', ttl)
local delay = 0
if ARGV[3] == '1' and ARGV[4] == '0' then delay = wait end
return {1, 0, math.floor((tau + interval - (new - now)) / interval), new - now, delay}
"""
SCRIPT_SHA = hashlib.sha1(SCRIPT).hexdigest().encode()


class RedisError(Exception):
    """Redis answered an error, or the connection broke."""


def parse_url(url: str) -> tuple[str, int, int]:
    """``redis://host:port/db`` -> (host, port, db). Raises ValueError with the reason."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "redis":
        raise ValueError(f'expected a URL like "redis://127.0.0.1:6379/0", got {url!r}')
    if not u.hostname:
        raise ValueError(f"no host in {url!r}")
    db = u.path.strip("/") or "0"
    if not db.isdigit():
        raise ValueError(f"the database in {url!r} is not a number")
    return u.hostname, u.port or 6379, int(db)


def encode(*args: bytes | str | int) -> bytes:
    """A command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class _Waiter:
    __slots__ = ("done", "error", "event", "result")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.done = False
        self.result: object = None
        self.error: Exception | None = None


class RespConnection:
    """One pipelined connection to Redis: `call` sends a command and returns its reply.

    Calls do not wait for each other's round trips: each writes its command (under a lock,
    so commands never interleave) and joins a FIFO of pending replies; whichever caller finds
    nobody reading reads replies off the socket in order and hands each to its waiter. A caller
    that gives up (its timeout) leaves its place in the FIFO: its reply is read and dropped
    when it comes, so the connection stays in step. A reader cancelled in the middle of a
    reply, or any read error, breaks the connection (`broken`): the owner replaces it.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self._send = trio.Lock()
        self._pending: deque[_Waiter] = deque()
        self._reading = False
        self._consumed = 0  # lines and strings taken off `buf` (a reply begun, or not)
        self.broken: str | None = None

    @classmethod
    async def connect(cls, host: str, port: int) -> RespConnection:
        return cls(await trio.open_tcp_stream(host, port))

    async def call(self, *args: bytes | str | int) -> object:
        if self.broken:
            raise RedisError(self.broken)
        waiter = _Waiter()
        try:
            async with self._send:
                await self.stream.send_all(encode(*args))
                self._pending.append(waiter)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._break(f"connection: {e}")
            raise RedisError(self.broken or "connection broken") from None
        while not waiter.done:
            if self._reading:
                await waiter.event.wait()
                if not waiter.done:
                    waiter.event = trio.Event()  # woken to take over reading: wait anew after
                continue
            await self._read_until(waiter)
        if waiter.error is not None:
            raise waiter.error
        return waiter.result

    async def _read_until(self, mine: _Waiter) -> None:
        self._reading = True
        mark = self._consumed
        try:
            while self._pending and not mine.done:
                head = self._pending[0]
                mark = self._consumed
                try:
                    head.result = await self._reply()
                except RedisError as e:
                    if self.broken:
                        raise
                    head.error = e  # an error reply: the connection is still in step
                head.done = True
                self._pending.popleft()
                head.event.set()
        except trio.Cancelled:
            # Cancelled while waiting for bytes: if none of the reply was taken yet, the
            # connection is in step, and the reply is read when it comes. Mid-reply, it is not.
            if self._consumed != mark:
                self._break("cancelled in the middle of a reply")
            raise
        except BaseException as e:  # the connection failed
            self._break(f"reading a reply: {e!r}")
            raise
        finally:
            self._reading = False
            # Wake the waiters so that one of them takes over reading (the head may be a
            # caller that gave up and waits no more).
            for w in self._pending:
                w.event.set()

    def _break(self, why: str) -> None:
        if self.broken is None:
            self.broken = why
        for w in self._pending:
            w.error = RedisError(why)
            w.done = True
            w.event.set()
        self._pending.clear()
        sock = getattr(self.stream, "socket", None)
        if sock is not None:
            sock.close()

    async def _line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 2]
                self._consumed += 1
                return line
            await self._more()

    async def _more(self) -> None:
        try:
            data = await self.stream.receive_some(65536)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self.broken = f"connection: {e}"
            raise RedisError(self.broken) from None
        if not data:
            self.broken = "connection closed by Redis"
            raise RedisError(self.broken)
        self.buf += data

    async def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            await self._more()
        out = bytes(self.buf[:n])
        del self.buf[: n + 2]
        self._consumed += 1
        return out

    async def _reply(self) -> object:
        line = await self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RedisError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else await self._exactly(n)
        if kind == b"*":
            n = int(rest)
            if n < 0:
                return None
            items = []
            for _ in range(n):
                try:
                    items.append(await self._reply())
                except RedisError as e:
                    if self.broken:
                        raise
                    items.append(e)  # an error inside an array: keep the rest in step
            return items
        self.broken = f"unexpected reply {line[:40]!r}"
        raise RedisError(self.broken)


@dataclass
class _State:
    conn: RespConnection | None = None
    failed_at: float = -math.inf  # the last failed connect: none is tried for RETRY_INTERVAL
    logged_at: float = -math.inf


class RedisLimiter:
    """The decisions of one worker against a shared Redis (see the module docstring)."""

    def __init__(self, url: str, timeout: float) -> None:
        self.host, self.port, self.db = parse_url(url)
        self.timeout = timeout
        self._state = _State()
        self._connecting = trio.Lock()
        #: calls that failed or timed out (the metrics' backend errors)
        self.errors = 0

    async def _connection(self) -> RespConnection:
        st = self._state
        if st.conn is not None and not st.conn.broken:
            return st.conn
        async with self._connecting:  # one connect at a time; the others then use it
            if st.conn is not None and not st.conn.broken:
                return st.conn
            st.conn = None
            if trio.current_time() - st.failed_at < RETRY_INTERVAL:
                raise RedisError("Redis was unreachable less than a second ago")
            try:
                conn = await RespConnection.connect(self.host, self.port)
                if self.db:
                    await conn.call(b"SELECT", self.db)
                await conn.call(b"SCRIPT", b"LOAD", SCRIPT)
            except (OSError, RedisError) as e:
                st.failed_at = trio.current_time()
                raise RedisError(f"connect: {e}") from None
            st.conn = conn
            return conn

    async def decide(self, key: bytes, limit: RateLimit) -> Verdict | None:
        """The decision for `key` under `limit`; None when Redis could not decide in time
        (the caller applies ``on_error``)."""
        interval_us = max(1, limit.interval_ns // 1000)
        leaky = limit.algorithm == "leaky_bucket"
        tau = (limit.queue if leaky else limit.burst) * interval_us
        args = (b"EVALSHA", SCRIPT_SHA, 1, key, interval_us, tau, int(leaky), int(limit.nodelay))
        reply = None
        with trio.move_on_after(self.timeout):
            try:
                conn = await self._connection()
                try:
                    reply = await conn.call(*args)
                except RedisError as e:
                    if not str(e).startswith("NOSCRIPT"):
                        raise
                    await conn.call(b"SCRIPT", b"LOAD", SCRIPT)
                    reply = await conn.call(*args)
            except (OSError, RedisError) as e:
                self._fail(str(e))
                return None
        if reply is None:
            self._fail(f"no answer within {self.timeout:g}s")
            return None
        admit, retry_us, remaining, reset_us, delay_us = reply  # type: ignore[misc]
        return Verdict(bool(admit), 0, delay_us * 1000, retry_us * 1000, remaining, reset_us * 1000)

    def _fail(self, why: str) -> None:
        self.errors += 1
        now = trio.current_time()
        if now - self._state.logged_at >= RETRY_INTERVAL:
            self._state.logged_at = now
            log.warning("rate-limit backend redis://%s:%d: %s", self.host, self.port, why)
