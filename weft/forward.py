"""The terminal handler of every route: send the request to an endpoint, return its response.

One `Forwarder` per destination per worker. It owns the destination's balancer and in-flight
counts; connections come from `weft.connection`, bytes go through `weft.http.h1.H1Upstream`.

An exchange, step by step:

1. **Pick** an endpoint (`weft.dst`), count it in flight until the response body ends.
2. **Acquire** a connection (reused or new; the pool may answer 503/502/504).
3. **Send** the head. A body already complete in memory goes in the same write; a streaming
   body is pumped by a second task while the first waits for the response head, so an upstream
   that answers early (413, 401) is heard. The head timeout (``upstream_header``) starts when
   the body is fully sent.
4. **Read** the head: 1xx are relayed to the client (100 is swallowed: weft answered the
   client's Expect itself), 101 turns the exchange into a byte tunnel when an upgrade was asked
   for, anything malformed is a 502 and the connection is dropped.
5. **Return** a Response whose body streams from the upstream. Body chunks h11 already holds are
   handed out as prefetched, and when the whole body is in memory the connection goes back to
   the pool before the client is even written to.

A reused connection that turns out dead (closed by the upstream while idle, no response byte
received) is retried once on a fresh connection, as Go's http.Transport does: only when the
request has no body and its method is idempotent (RFC 9110 §9.2.2), because nothing else
guarantees the upstream did not act on it.

Errors the proxy makes are returned as responses (so user middleware sees a 502 like any other
response); `request.ctx["error"]` carries the reason for the access log.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from typing import Protocol

import h11
import trio

from weft.config import Config, Destination
from weft.connection import EndpointPool
from weft.dst import HashKeySource, Position, make_balancer
from weft.http.errors import ClientError, UpstreamError
from weft.http.h1 import (
    END,
    READ_SIZE,
    H1Upstream,
    end_of_message,
    error_response,
    fields,
    valid_request_line,
)
from weft.http.headers import (
    fields_valid,
    forward_request_headers,
    forward_response_headers,
    has_field,
    is_trusted,
    is_upgrade_request,
)
from weft.http.io import recv, send_all
from weft.http.messages import Body, Headers, Request, Response

log = logging.getLogger("weft.forward")

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class UpstreamBody(Body):
    """A response body streamed from an upstream connection; returns it to the pool at the end."""

    __slots__ = (
        "_chunks",
        "_complete",
        "_deadline",
        "_done",
        "_fwd",
        "_idle",
        "_idx",
        "_pool",
        "_up",
    )

    def __init__(
        self,
        fwd: Forwarder,
        idx: int,
        pool: EndpointPool,
        up: H1Upstream,
        idle: float,
        deadline: float,
        length: int | None,
    ) -> None:
        super().__init__()
        self._fwd = fwd
        self._idx = idx
        self._pool = pool
        self._up = up
        self._idle = idle
        self._deadline = deadline
        self.length = length
        self._done = False
        self._chunks: list[bytes] = []
        self._complete = False
        # Take what h11 already holds, without I/O.
        conn = up.conn
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError:
                break  # reported by the first receive()
            t = type(ev)
            if t is h11.Data:
                self._chunks.append(bytes(ev.data))
            elif t is h11.EndOfMessage:
                self.trailers = fields(ev.headers)
                self._complete = True
                self._finish(True)
                break
            else:
                break  # NEED_DATA (or PAUSED): the rest comes by receive()

    def prefetched(self) -> tuple[list[bytes], bool]:
        chunks, self._chunks = self._chunks, []
        return chunks, self._complete

    def _finish(self, reusable: bool) -> None:
        if self._done:
            return
        self._done = True
        self._fwd.counts.add(self._idx, -1)
        if reusable:
            self._pool.release(self._up)
        else:
            self._pool.discard(self._up)

    async def receive(self) -> bytes:
        if self._chunks:
            return self._chunks.pop(0)
        if self._complete:
            return b""
        now = trio.current_time()
        try:
            if now >= self._deadline:
                raise UpstreamError("request_total exceeded", status=504, reason="request_timeout")
            ev = await self._up.next_event(
                min(now + self._idle, self._deadline), "upstream_body_timeout"
            )
        except BaseException:
            self._finish(False)
            raise
        t = type(ev)
        if t is h11.Data:
            return bytes(ev.data)
        if t is h11.EndOfMessage:
            self.trailers = fields(ev.headers)
            self._complete = True
            self._finish(True)
            return b""
        self._finish(False)
        raise UpstreamError(f"upstream closed mid-body ({ev!r})", reason="upstream_reset")

    async def aclose(self) -> None:
        self._chunks = []
        self._finish(False)


class Tunnel:
    """Relays bytes both ways after a 101 (WebSocket), until either side ends or goes idle."""

    def __init__(
        self, fwd: Forwarder, idx: int, pool: EndpointPool, up: H1Upstream, idle: float
    ) -> None:
        self.fwd, self.idx, self.pool, self.up, self.idle = fwd, idx, pool, up, idle

    async def run(self, server: object, client_rest: bytes) -> None:
        client: socket.socket = server.sock  # type: ignore[attr-defined]
        upstream = self.up.sock
        upstream_rest = self.up.conn.trailing_data[0]
        scope = trio.CancelScope()

        async def copy(src: socket.socket, dst: socket.socket, first: bytes) -> None:
            try:
                if first:
                    await send_all(dst, first)
                while data := await recv(src, READ_SIZE):
                    await send_all(dst, data)
                    scope.deadline = trio.current_time() + self.idle
                dst.shutdown(socket.SHUT_WR)  # pass the half-close on
            except OSError:
                scope.cancel()

        try:
            scope.deadline = trio.current_time() + self.idle
            with scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(copy, client, upstream, client_rest)
                    nursery.start_soon(copy, upstream, client, upstream_rest)
        finally:
            self.fwd.counts.add(self.idx, -1)
            self.pool.discard(self.up)


class Inflight(Protocol):
    """In-flight requests per endpoint of one destination (what least_conn balances on)."""

    def add(self, index: int, delta: int) -> None: ...

    def view(self) -> Sequence[int]: ...


class LocalInflight:
    """Counts of this process alone (one worker, or tests); the supervisor's workers use
    shared-memory counts summed over every worker instead (`weft.workers.shared`)."""

    __slots__ = ("counts",)

    def __init__(self, n: int) -> None:
        self.counts = [0] * n

    def add(self, index: int, delta: int) -> None:
        self.counts[index] += delta

    def view(self) -> Sequence[int]:
        return self.counts


class Forwarder:
    """Sends requests of one destination to its endpoints."""

    def __init__(
        self,
        dest: Destination,
        pools: Sequence[EndpointPool],
        config: Config,
        inflight: Inflight | None = None,
        position: Position | None = None,
    ) -> None:
        self.dest = dest
        self.pools = list(pools)
        self.config = config
        self.balancer = make_balancer(
            dest.strategy,
            [e.weight for e in dest.endpoints],
            balance_factor=dest.hash_balance_factor,
            # By address: a changed endpoint list moves only the keys of changed endpoints.
            names=[e.authority for e in dest.endpoints],
            position=position,  # shared by the workers (round_robin, weighted)
        )
        self.hash_source = HashKeySource.parse(dest.hash_key) if dest.hash_key else None
        self.counts: Inflight = inflight if inflight is not None else LocalInflight(len(self.pools))
        # Only these strategies look at in-flight counts; the others skip summing them.
        self.needs_counts = dest.strategy == "least_conn" or (
            dest.strategy == "consistent_hash" and dest.hash_balance_factor > 0
        )
        self.via = config.via.encode()
        # The Via entries weft adds, by the HTTP version of the message it received.
        self.via_request = {"1.1": b"1.1 " + self.via, "1.0": b"1.0 " + self.via}
        self.via_response = b"1.1 " + self.via
        self.rid_header = config.request_id_header.encode()
        self.trusted = config.trusted_proxies
        host_header = dest.host_header
        self.host_mode = host_header if host_header in ("pass", "endpoint") else "literal"
        self.host_literal = host_header.encode()

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._forward(request)
        except UpstreamError as e:
            request.ctx["error"] = e.reason
            log.info("request %s to %s: %s", request.id, request.ctx.get("endpoint", "-"), e.detail)
            return error_response(
                e.status,
                e.detail,
                request.id,
                close=False,
                retry_after=e.retry_after if e.status == 503 else None,
            )

    def _pick(self, request: Request) -> int | None:
        key = None
        if self.hash_source is not None:
            key = self.hash_source.extract(
                request.headers.raw, request.client[0], request.path.encode("latin-1")
            )
        counts = self.counts.view() if self.needs_counts else ()
        return self.balancer.pick(key=key, inflight=counts)

    async def _forward(self, request: Request) -> Response:
        idx = self._pick(request)
        if idx is None:
            raise UpstreamError(
                "no endpoint available", status=503, reason="no_endpoint", retry_after=1
            )
        pool = self.pools[idx]
        ep = pool.endpoint
        request.ctx["endpoint"] = ep.authority
        route = request.route
        timeouts = route.timeouts if route is not None else self.config.timeouts
        deadline = request.ctx.get("deadline")
        if deadline is None:
            deadline = trio.current_time() + 1e9

        raw = request.headers.raw
        upgrade = is_upgrade_request(raw)
        host = None
        for k, v in raw:
            if k == b"host":
                host = v
                break
        if self.host_mode == "pass":
            upstream_host = host if host is not None else ep.authority.encode()
        elif self.host_mode == "endpoint":
            upstream_host = ep.authority.encode()
        else:
            upstream_host = self.host_literal
        version = request.http_version
        via = self.via_request.get(version) or f"{version} ".encode() + self.via
        rid = request.id.encode()
        headers = forward_request_headers(
            raw,
            client_ip=request.client[0],
            trusted=is_trusted(request.client[0], self.trusted),
            scheme=request.scheme,
            host=host,
            upstream_host=upstream_host,
            via=via,
            request_id_header=self.rid_header,
            request_id=rid,
            upgrade=upgrade,
        )
        body = request.body
        length = body.length
        has_body = length is None or length > 0
        if length is None:
            headers = [(k, v) for k, v in headers if k != b"content-length"]
            headers.append((b"transfer-encoding", b"chunked"))
        elif length > 0 or has_field(raw, b"content-length"):
            headers = [(k, v) for k, v in headers if k != b"content-length"]
            headers.append((b"content-length", str(length).encode()))
        method = request.method.encode("ascii")
        target = request.upstream_target.encode("latin-1")
        # h11 skips its per-field checks when told the fields are valid. They are when no user
        # middleware ran (request.validated: parsed fields plus weft's own); otherwise
        # middleware may have rebuilt any of them: pre-check them all at once, or let h11
        # check (and refuse) them itself.
        trusted_fields = valid_request_line(method, target) and (
            request.validated or fields_valid(headers)
        )
        h11_request = h11.Request(
            method=method, target=target, headers=headers, _parsed=trusted_fields
        )
        retryable = not has_body and request.method in IDEMPOTENT
        started = trio.current_time()
        self.counts.add(idx, 1)
        handed_off = False
        try:
            attempt = 0
            while True:
                up, reused = await pool.acquire(fresh=attempt > 0, retryable=retryable)
                try:
                    ev = await self._exchange(
                        request, up, h11_request, has_body, timeouts, deadline
                    )
                except UpstreamError as e:
                    pool.discard(up)
                    if (
                        reused
                        and retryable
                        and attempt == 0
                        and up.received == 0
                        and e.reason == "upstream_reset"
                    ):
                        attempt += 1
                        log.debug("retrying %s on a fresh connection: %s", request.id, e.detail)
                        continue
                    raise
                except BaseException:
                    pool.discard(up)
                    raise
                break
            request.ctx["upstream_time"] = trio.current_time() - started
            resp_headers = fields(ev.headers)
            has_cl = has_te = False
            length = None
            for k, v in resp_headers:
                if k == b"content-length":
                    has_cl = True
                    length = int(v)  # h11 checked it (and that repeats agree)
                elif k == b"transfer-encoding":
                    has_te = True
            if has_cl and has_te:
                pool.discard(up)
                raise UpstreamError(
                    "upstream sent both Content-Length and Transfer-Encoding",
                    reason="bad_response",
                )
            if type(ev) is h11.InformationalResponse:  # 101
                out = forward_response_headers(resp_headers, via=self.via_response, upgrade=True)
                tunnel = Tunnel(self, idx, pool, up, timeouts.websocket_idle)
                handed_off = True
                return Response(101, Headers(out), reason=ev.reason, tunnel=tunnel)
            out = forward_response_headers(resp_headers, via=self.via_response)
            if not has_field(out, self.rid_header):
                out.append((self.rid_header, rid))
            rbody = UpstreamBody(self, idx, pool, up, timeouts.upstream_body_idle, deadline, length)
            handed_off = True
            return Response(ev.status_code, Headers(out), rbody, reason=ev.reason)
        finally:
            if not handed_off:
                self.counts.add(idx, -1)

    async def _exchange(
        self,
        request: Request,
        up: H1Upstream,
        h11_request: h11.Request,
        has_body: bool,
        timeouts: object,
        deadline: float,
    ) -> h11.Response | h11.InformationalResponse:
        """Send the request, return the response head (or a 101)."""
        conn = up.conn
        head_timeout = timeouts.upstream_header  # type: ignore[attr-defined]
        body_timeout = timeouts.upstream_body_idle  # type: ignore[attr-defined]
        data = conn.send(h11_request)
        if not has_body:
            await up.send(data + conn.send(END), head_timeout)
            return await self._read_head(request, up, head_timeout, deadline)
        body = request.body
        first = await body.receive()
        chunked = body.length is None
        if not first or getattr(body, "done", False):
            # The whole body arrived with the head: one write.
            if first:
                data += conn.send(h11.Data(data=first))
            data += conn.send(end_of_message(body.trailers if chunked else []))
            await up.send(data, body_timeout)
            return await self._read_head(request, up, head_timeout, deadline)
        await up.send(data + conn.send(h11.Data(data=first)), body_timeout)
        client_error: ClientError | None = None
        head_scope = trio.CancelScope(deadline=deadline)
        result: list[h11.Response | h11.InformationalResponse] = []

        async def pump() -> None:
            nonlocal client_error
            try:
                while chunk := await body.receive():
                    await up.send(conn.send(h11.Data(data=chunk)), body_timeout)
                end = end_of_message(body.trailers if chunked else [])
                await up.send(conn.send(end), body_timeout)
            except ClientError as e:
                client_error = e
                head_scope.cancel()
                return
            except UpstreamError:
                return  # the response read reports what the upstream did
            head_scope.deadline = min(deadline, trio.current_time() + head_timeout)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            with head_scope:
                result.append(await self._read_head(request, up, 1e9, deadline))
            nursery.cancel_scope.cancel()
        if client_error is not None:
            raise client_error
        if not result:
            raise UpstreamError(
                "upstream too slow (upstream_header_timeout)",
                status=504,
                reason="upstream_header_timeout",
            )
        if conn.our_state is h11.SEND_BODY:
            # The upstream answered before taking the whole body: neither connection can be
            # reused (the client's rest of the body is unread).
            request.ctx["close"] = True
        return result[0]

    async def _read_head(
        self, request: Request, up: H1Upstream, timeout: float, deadline: float
    ) -> h11.Response | h11.InformationalResponse:
        while True:
            now = trio.current_time()
            if now >= deadline:
                raise UpstreamError("request_total exceeded", status=504, reason="request_timeout")
            ev = await up.next_event(min(now + timeout, deadline), "upstream_header_timeout")
            t = type(ev)
            if t is h11.Response:
                return ev
            if t is h11.InformationalResponse:
                if ev.status_code == 101:
                    return ev
                if ev.status_code != 100 and request.interim is not None:
                    await request.interim(
                        ev.status_code,
                        forward_response_headers(fields(ev.headers), via=self.via_response),
                    )
                continue
            raise UpstreamError(
                f"upstream closed before responding ({ev!r})", reason="upstream_reset"
            )
