"""The HTTP/1.1 client side: one `H1Upstream` per upstream connection, h11 doing the framing.

The forwarder (`weft.forward`) decides *what* is sent (the endpoint, the header policy, the
retry); this module owns *how* one exchange goes on one HTTP/1.1 connection, behind the small
interface every upstream adapter offers (`weft.http.upstream.UpstreamConnection`):
``exchange(outgoing, timeouts, deadline, interim, on_done) -> Response`` plus the pool's
questions (`reusable`, `closed_while_idle`, `close`). The pool hands out these objects without
knowing the protocol; an h2 connection that multiplexes streams fits the same interface.

An exchange, step by step:

1. **Send** the head. A body already complete in memory goes in the same write; a streaming
   body is pumped by a second task while the first waits for the response head, so an upstream
   that answers early (413, 401) is heard. The head timeout (``upstream_header``) starts when
   the body is fully sent. Every write that has to wait is bounded by ``upstream_send_idle``
   (504 `upstream_send_timeout`: an upstream that stopped reading never holds a request
   forever).
2. **Watch the client** once the body is sent and while the head is awaited (`ClientWatch`,
   for h1 the worker's `PeerWatch`): a client that closes abandons the exchange (`ClientGone`,
   counted as 499), so its upstream socket is released at once and not when the upstream
   finally answers. No task or cancel scope per request: the watch wakes the read.
3. **Read** the head: 1xx are relayed to the client (100 is swallowed: weft answered the
   client's Expect itself); a 101 becomes a byte tunnel only when the client asked for a
   WebSocket upgrade and the upstream switched to WebSocket, anything else is a 502.
   Content-Length with Transfer-Encoding in a response is refused (502), as in a request.
4. **Return** a Response whose body streams from the upstream. Chunks h11 already holds are
   handed out as prefetched; when the whole body is in memory the connection is given back
   (`on_done`) before the client is even written to.

**Reuse is decided on bytes, not only on states.** A connection is reusable when both sides of
h11 are DONE *and* nothing is buffered past the end of the response: an upstream that sent a
second response after the first (a desync, or a smuggled request's answer) would otherwise hand
that response to the next client of the pool. Such a connection is closed and the event is
counted (`EndpointPool.stray_responses`) and logged. Bytes that arrive while it is idle are
caught by `closed_while_idle` before every reuse.

Errors are `UpstreamError` with a reason word: ``upstream_reset`` (closed or reset before or
during the response), ``bad_response`` (not HTTP/1.1), ``upstream_header_timeout``,
``upstream_body_timeout``, ``upstream_send_timeout``, ``request_timeout``. None of them leaves
this module wrapped in an ExceptionGroup: the pump's and the reader's outcomes are collected
and the one that explains the failure is raised after the nursery closes.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import h11
import trio

from weft.arena_pool import RELAY_SIZE
from weft.http import tls_errors
from weft.http.errors import ClientError, ClientGone, UpstreamError
from weft.http.h1 import (
    END,
    READ_SIZE,
    data_bytes,
    end_of_message,
    fields,
    valid_request_line,
)
from weft.http.h1_response import H1ResponseBody, OnDone
from weft.http.headers import connection_tokens
from weft.http.io import SCRATCH
from weft.http.messages import Body, Headers, Response
from weft.http.transport import TCPTransport
from weft.http.tunnel import Tunnel
from weft.http.upstream import Outgoing

if TYPE_CHECKING:
    from weft.bufpool import Buffer
    from weft.http.io import Timers
    from weft.schema import Endpoint, Timeouts

log = logging.getLogger("weft.upstream")

Interim = Callable[[int, list[tuple[bytes, bytes]]], Awaitable[None]]


class H1Upstream:
    """An HTTP/1.1 connection to one upstream endpoint; owned by the pool between requests."""

    __slots__ = (
        "client_left",
        "conn",
        "endpoint",
        "idle_since",
        "raw_done",
        "received",
        "requests",
        "sent",
        "stray",
        "timers",
        "transport",
    )

    def __init__(self, transport: TCPTransport, endpoint: Endpoint, timers: Timers) -> None:
        self.transport = transport
        self.timers = timers
        self.endpoint = endpoint
        self.conn = h11.Connection(h11.CLIENT)
        self.requests = 0
        self.idle_since = 0.0
        self.received = 0  # bytes received in the current exchange
        self.sent = False  # written to since the last read (the answer is likely not there yet)
        self.stray = 0  # bytes found past the end of the last response (never reused then)
        # The client left while this exchange awaited the response head (see _client_left).
        self.client_left = False
        # The last response body was read raw to its exact end, past h11 (H1ResponseBody).
        self.raw_done = False

    # -- what the pool asks ----------------------------------------------------------------

    @property
    def response_started(self) -> bool:
        """Whether any byte of a response came back in the current exchange (a failure before
        that, on a reused connection, is the upstream's keep-alive close racing our request)."""
        return self.received > 0

    def reusable(self) -> bool:
        c = self.conn
        if c.our_state is not h11.DONE:
            return False
        if self.raw_done:
            return True  # read to the byte where the response ends (h11 stays in SEND_BODY)
        if c.their_state is not h11.DONE:
            return False
        rest, closed = c.trailing_data
        if rest:
            self.stray = len(rest)
            return False
        return not closed

    def recycle(self) -> None:
        if self.raw_done:
            self.conn = h11.Connection(h11.CLIENT)
            self.raw_done = False
        else:
            self.conn.start_next_cycle()
        self.received = 0
        # A watch that fired after the head had come (the exchange went on) must not fail the
        # next client's exchange on this connection.
        self.client_left = False

    def closed_while_idle(self) -> bool:
        """True when the upstream closed, reset, or sent bytes nobody asked for on this idle
        connection: unusable either way. Bytes (not a close) are noted in `stray`: the
        upstream answered a request nobody sent, which the pool counts as a desync."""
        if not self.transport.readable_now():
            return False
        waiting = self.transport.peek(READ_SIZE)
        if waiting:
            self.stray = len(waiting)
        return True

    def close(self) -> None:
        self.transport.close()

    # -- one exchange --------------------------------------------------------------------------

    async def exchange(
        self,
        out: Outgoing,
        timeouts: Timeouts,
        deadline: float,
        interim: Interim | None,
        on_done: OnDone,
    ) -> Response:
        """Send `out`, return the response with a body streaming from this connection.

        `on_done(reusable)` is called exactly once when the connection is free again: when the
        returned body ends or is closed, when the tunnel ends, or (with False) when this raises.
        Raises UpstreamError (the upstream's fault) or ClientError (the client's, from reading
        its body, or ClientGone when it left while the head was awaited).
        """
        handed_off = False
        try:
            ev = await self._send_and_read_head(out, timeouts, deadline, interim)
            response = self._response(ev, out, timeouts, deadline, on_done)
            handed_off = True
            return response
        finally:
            if not handed_off:
                on_done(False)

    async def _send_and_read_head(
        self, out: Outgoing, timeouts: Timeouts, deadline: float, interim: Interim | None
    ) -> h11.Response | h11.InformationalResponse:
        conn = self.conn
        head_timeout = timeouts.upstream_header
        send_idle = timeouts.upstream_send_idle
        trusted = out.fields_checked and valid_request_line(out.method, out.target)
        data = conn.send(
            h11.Request(method=out.method, target=out.target, headers=out.headers, _parsed=trusted)
        )
        if not out.has_body:
            await self._send(data + conn.send(END), send_idle)
            return await self._read_head_watched(out, interim, head_timeout, deadline)
        body = out.body
        chunks, complete = body.prefetched()
        chunked = body.length is None
        pieces: list[bytes | memoryview] = [data]
        size = len(data)
        for c in chunks:
            if c:
                pieces.append(data_bytes(conn, c))
                size += len(c)
        if complete:
            # The whole body is in memory (it came with the head, or it is a replay body).
            pieces.append(conn.send(end_of_message(body.trailers if chunked else [])))
            await self._send_pieces(pieces, size, send_idle)
            return await self._read_head_watched(out, interim, head_timeout, deadline)
        # The rest streams from the client through a pool buffer of the request's arena,
        # leased before anything is written (none free in time: 503, nothing sent).
        relay = None
        if out.arena is not None:
            relay = await out.arena.lease_wait(RELAY_SIZE, timeouts.client_body_idle)
        await self._send_pieces(pieces, size, send_idle)
        return await self._stream_body(out, body, chunked, timeouts, deadline, interim, relay)

    async def _send_pieces(
        self, pieces: list[bytes | memoryview], size: int, timeout: float
    ) -> None:
        """Write the head and body pieces: joined into one write when small, else in turn
        (a large replay body is written from its buffers, not copied into one object)."""
        if size <= RELAY_SIZE or len(pieces) == 1:
            await self._send(b"".join(pieces) if len(pieces) > 1 else pieces[0], timeout)
            return
        for p in pieces:
            if p:
                await self._send(p, timeout)

    async def _stream_body(
        self,
        out: Outgoing,
        body: Body,
        chunked: bool,
        timeouts: Timeouts,
        deadline: float,
        interim: Interim | None,
        relay: Buffer | None,
    ) -> h11.Response | h11.InformationalResponse:
        """Pump the rest of the body while the response head is awaited (read into `relay`'s
        buffer and written from it; as `bytes` without one); see the module doc for which
        failure wins."""
        conn = self.conn
        send_idle = timeouts.upstream_send_idle
        head_timeout = timeouts.upstream_header
        pump_error: ProxyErrorT | None = None
        read_error: UpstreamError | ClientGone | None = None
        head: list[h11.Response | h11.InformationalResponse] = []
        read_scope = trio.CancelScope(deadline=deadline)

        async def pump(cancel: trio.CancelScope) -> None:
            nonlocal pump_error
            try:
                if relay is not None:
                    view = relay.view
                    while n := await body.receive_into(view):
                        await self._send(data_bytes(conn, view[:n]), send_idle)
                else:
                    while chunk := await body.receive():
                        await self._send(conn.send(h11.Data(data=chunk)), send_idle)
                await self._send(
                    conn.send(end_of_message(body.trailers if chunked else [])), send_idle
                )
            except ClientError as e:
                pump_error = e  # the client's fault (gone, too slow, too large): stop all
                cancel.cancel()
                return
            except UpstreamError as e:
                pump_error = e
                if e.reason == "upstream_send_timeout":
                    cancel.cancel()  # it stopped reading: no answer is coming either
                else:
                    # Reset while we wrote: an answer it sent first (413, 401) may still be
                    # readable; the reader gets `upstream_header` to find it.
                    read_scope.deadline = min(deadline, trio.current_time() + head_timeout)
                return
            read_scope.deadline = min(deadline, trio.current_time() + head_timeout)
            if out.client_watch is not None:
                out.client_watch.watch_gone(self._client_left)  # the reader raises ClientGone

        async def read(cancel: trio.CancelScope) -> None:
            nonlocal read_error
            try:
                with read_scope:
                    head.append(await self._read_head(interim, 1e9, deadline))
            except (UpstreamError, ClientGone) as e:
                read_error = e
            cancel.cancel()  # the head (or the reader's failure) ends the pump

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, nursery.cancel_scope)
                nursery.start_soon(read, nursery.cancel_scope)
        finally:
            if out.client_watch is not None:
                out.client_watch.unwatch_gone()
        if head:
            if conn.our_state is h11.SEND_BODY:
                # The upstream answered before taking the whole body: neither connection can
                # be reused (the client's rest of the body is unread).
                out.close_client = True
            return head[0]
        if isinstance(pump_error, ClientError):
            raise pump_error
        if read_error is not None:
            raise read_error
        if pump_error is not None:
            raise pump_error
        raise UpstreamError(
            "upstream too slow (upstream_header_timeout)",
            status=504,
            reason="upstream_header_timeout",
        )

    async def _read_head_watched(
        self, out: Outgoing, interim: Interim | None, head_timeout: float, deadline: float
    ) -> h11.Response | h11.InformationalResponse:
        """`_read_head` while the client is watched: if it leaves, ClientGone (at most a
        `Timers.TICK` later) instead of waiting for an answer nobody will read."""
        watch = out.client_watch
        if watch is None:
            return await self._read_head(interim, head_timeout, deadline)
        watch.watch_gone(self._client_left)
        try:
            return await self._read_head(interim, head_timeout, deadline)
        finally:
            watch.unwatch_gone()

    def _client_left(self) -> None:
        """The client watch fired (from the worker's tick): wake the read, which then raises
        ClientGone; the connection is not reused (the exchange did not finish)."""
        self.client_left = True
        self.transport.wake()

    def _response(
        self,
        ev: h11.Response | h11.InformationalResponse,
        out: Outgoing,
        timeouts: Timeouts,
        deadline: float,
        on_done: OnDone,
    ) -> Response:
        headers = fields(ev.headers)
        length = None
        has_cl = has_te = False
        for k, v in headers:
            if k == b"content-length":
                has_cl = True
                length = int(v)  # h11 checked it (and that repeats agree)
            elif k == b"transfer-encoding":
                has_te = True
        if has_cl and has_te:
            raise UpstreamError(
                "upstream sent both Content-Length and Transfer-Encoding", reason="bad_response"
            )
        if type(ev) is h11.InformationalResponse:  # 101: see _read_head
            if not (out.upgrade and _switches_to_websocket(headers)):
                raise UpstreamError(
                    "upstream switched protocols without a WebSocket upgrade being asked for",
                    reason="bad_response",
                )
            tunnel = Tunnel(
                self.transport, conn_rest(self.conn), timeouts.websocket_idle, on_done
            )
            return Response(101, Headers(headers), reason=ev.reason, tunnel=tunnel)
        has_body = out.method != b"HEAD" and ev.status_code not in (204, 304)
        body = H1ResponseBody(
            self, on_done, timeouts.upstream_body_idle, deadline, length if has_body else None
        )
        if not has_body:
            body.length = length  # what the head declared (a HEAD's), though none follows
        return Response(ev.status_code, Headers(headers), body, reason=ev.reason)

    async def _send(self, data: bytes | memoryview, timeout: float) -> None:
        """Write to the upstream; 504 after `timeout` without progress, 502 on a reset."""
        self.sent = True
        transport = self.transport
        try:
            sent = transport.send_some(data)
            if sent < len(data):
                await transport.send_all(memoryview(data)[sent:], timeout)
        except TimeoutError:
            raise UpstreamError(
                f"upstream stopped reading the request for {timeout:g}s (upstream_send_idle)",
                status=504,
                reason="upstream_send_timeout",
            ) from None
        except (OSError, trio.ClosedResourceError) as e:
            raise UpstreamError(
                f"upstream connection broke while sending: {e}", reason="upstream_reset"
            ) from None

    async def _read_head(
        self, interim: Interim | None, timeout: float, deadline: float
    ) -> h11.Response | h11.InformationalResponse:
        while True:
            now = trio.current_time()
            if now >= deadline:
                raise UpstreamError("request_total exceeded", status=504, reason="request_timeout")
            # Name the limit that ends the wait: the head timeout, or the request's deadline
            # (request_total, or the retry middleware's per-try deadline).
            if deadline < now + timeout:
                ev = await self.next_event(deadline, "request_timeout")
            else:
                ev = await self.next_event(now + timeout, "upstream_header_timeout")
            t = type(ev)
            if t is h11.Response:
                return ev
            if t is h11.InformationalResponse:
                if ev.status_code == 101:
                    return ev
                if ev.status_code != 100 and interim is not None:
                    await interim(ev.status_code, fields(ev.headers))
                continue
            raise UpstreamError(
                f"upstream closed before responding ({type(ev).__name__})", reason="upstream_reset"
            )

    async def next_event(self, deadline: float, what: str) -> h11.Event:
        """The next h11 event from the upstream, reading as needed.

        Raises UpstreamError: 504 (reason `what`) when no byte came by `deadline` (trio time),
        502 when the upstream closes early or violates HTTP/1.1.
        """
        conn = self.conn
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as e:
                log.info("%s sent a malformed response: %s", self.endpoint.authority, e)
                raise UpstreamError(
                    "upstream sent a malformed response", reason="bad_response"
                ) from None
            if ev is not h11.NEED_DATA:
                return ev
            if self.client_left:
                raise ClientGone("client closed while its response was awaited")
            try:
                n = await self.transport.recv_into(
                    SCRATCH, deadline, self.timers, try_first=not self.sent
                )
                self.sent = False
            except TimeoutError:
                raise UpstreamError(
                    f"upstream too slow ({what})", status=504, reason=what
                ) from None
            except (OSError, trio.ClosedResourceError) as e:
                if self.client_left:
                    raise ClientGone("client closed while its response was awaited") from None
                if isinstance(e, ssl.SSLError) and not self.received:
                    raise tls_errors.refused(e, self.endpoint.host) from None  # an alert, no answer
                raise UpstreamError(
                    f"upstream connection reset: {e}", reason="upstream_reset"
                ) from None
            if not n and not self.received:
                # Closed before answering at all (for a reused connection: the upstream's
                # keep-alive timeout raced our request). h11 would call it a protocol error.
                raise UpstreamError(
                    "upstream closed the connection before responding", reason="upstream_reset"
                )
            self.received += n
            conn.receive_data(SCRATCH[:n])  # copied by h11 before anything awaits


ProxyErrorT = ClientError | UpstreamError


def conn_rest(conn: h11.Connection) -> bytes:
    """What h11 read past the 101's head: the first bytes of the switched protocol."""
    return bytes(conn.trailing_data[0])


def _switches_to_websocket(headers: list[tuple[bytes, bytes]]) -> bool:
    """A 101 that names WebSocket in Upgrade (RFC 6455 §4.2.2) and Upgrade in Connection."""
    if b"upgrade" not in connection_tokens(headers):
        return False
    for k, v in headers:
        if k == b"upgrade":
            return v.strip().lower() == b"websocket"
    return False
