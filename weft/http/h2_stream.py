"""One HTTP/2 stream as a neutral exchange: its request built from the header block, its body
relayed with flow control as the backpressure, and its response written back.

`weft.http.h2_server` owns the connection (the reader task, the writer, the h2 state machine,
drain and abuse bounds); each stream it accepts runs here, in a task of its own, the same path
an h1 request runs: `ServerState.app`, the access log and metrics hooks, a per-stream arena.

Why the request is checked here although h2 validated the block (pseudo-headers, connection
fields, ``te``, Host against ``:authority``): h2 accepts any bytes HPACK can carry, and the
request goes on to an HTTP/1.1 upstream. A value with CR or LF, a method that is not a token,
a path with spaces would be a request smuggled into that upstream (the h2-to-h1 downgrade
attacks), so every field is held to RFC 9110's grammar as h11 holds it (`fields_valid`), and the
``[limits]`` of an h1 head apply per stream: ``max_request_line`` to ``:path`` (414),
``max_headers`` and ``max_header_bytes`` (431, the header list counted as RFC 7541 counts it).
Split ``cookie`` fields are joined with ``"; "`` (RFC 9113 §8.2.3), as an h1 upstream expects one.

**Flow control is the backpressure, both ways.**

* Request body: DATA is buffered as it arrives (at most the stream's window: h2 refuses more)
  and credit goes back (``acknowledge_received_data``) only as the upstream side takes the bytes
  (`H2RequestBody`). A slow upstream stops the client's upload of that stream alone: the
  connection's own window is sized so that every stream's window fits in it.
* Response body: the upstream body is read only as far as the client's window for the stream
  allows (`_relay`): a read asks for at most ``min(window, buffer)`` bytes, and a stream whose
  window is closed does not read its upstream at all until the client opens it. A client that
  keeps a window closed for ``timeouts.client_send_idle`` loses the stream (RST_STREAM CANCEL),
  or the connection when it is the connection's window (GOAWAY ENHANCE_YOUR_CALM).

Endings: a response written in full ends the stream with END_STREAM, on the last DATA frame or
on a trailers HEADERS frame (``response.body.trailers``); a request body not read to its end is
then cut with RST_STREAM NO_ERROR (RFC 9113 §8.1). An upstream that fails mid-body resets the
stream (INTERNAL_ERROR): an h2 client must see the failure, never a clean but short body. A
client's RST_STREAM cancels the stream's task, which abandons its upstream exchange at once
(the pool closes that connection).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import trio
from h2.errors import ErrorCodes

from weft.arena_pool import RELAY_SIZE, BuffersExhausted
from weft.http.errors import ClientError, ClientGone, UpstreamError, error_response
from weft.http.h1 import METHOD, TARGET_BAD
from weft.http.h1_request import _HOST, ClientTimeout
from weft.http.headers import (
    HOP_BY_HOP,
    connection_tokens,
    fields_valid,
    new_request_id,
    valid_request_id,
)
from weft.http.messages import Body, BodyTooLarge, HeaderList, Headers, Request, Response

if TYPE_CHECKING:
    from weft.arena_pool import Arena
    from weft.http.h2_server import H2Server

log = logging.getLogger("weft.h2")

# Fields that never go into an h2 response (RFC 9113 §8.2.2), whatever built it: the upstream's
# hop-by-hop fields are gone already (the forwarder), weft's own answers may say close.
_CONNECTION_SPECIFIC = HOP_BY_HOP


class StreamReset(ClientGone):
    """The client reset the stream, or the connection under it ended."""


def _status_bytes(status: int) -> bytes:
    return b"%d" % status


class H2RequestBody(Body):
    """The request body of one stream, fed by the connection's reader (`H2Stream.on_data`) and
    taken by the upstream side; credit goes back to the client as it is taken."""

    def __init__(self, stream: H2Stream, length: int | None) -> None:
        super().__init__()
        self._stream = stream
        self.length = length
        self.received = 0

    def _count(self, n: int) -> None:
        self.received += n
        if self.limit is not None and self.received > self.limit:
            raise BodyTooLarge(self.limit)

    def prefetched(self) -> tuple[list[bytes], bool]:
        stream = self._stream
        chunks = stream.take_all()
        for c in chunks:
            self._count(len(c))
        return chunks, stream.ended and not stream.chunks

    async def receive(self) -> bytes:
        stream = self._stream
        if not stream.chunks:
            if stream.ended:
                return b""
            await stream.wait_data()
            if not stream.chunks:
                return b""
        data = stream.take_one()
        self._count(len(data))
        return data

    async def receive_into(self, view: memoryview) -> int:
        stream = self._stream
        if not stream.chunks:
            if stream.ended:
                return 0
            await stream.wait_data()
            if not stream.chunks:
                return 0
        n = stream.take_into(view)
        self._count(n)
        return n


class H2Stream:
    """One stream of an `H2Server` connection: its request body queue, its flow-control waits,
    and the task (`run`) that serves it. Also the request's `ClientWatch`."""

    __slots__ = (
        "_data_event",
        "_gone",
        "_window_event",
        "arena",
        "body",
        "chunks",
        "ended",
        "expect_continue",
        "head",
        "id",
        "request",
        "reset",
        "responded",
        "scope",
        "srv",
        "trailers",
    )

    def __init__(self, srv: H2Server, stream_id: int, head: HeaderList) -> None:
        self.srv = srv
        self.id = stream_id
        self.head = head
        self.chunks: deque[bytes | memoryview] = deque()
        self.ended = False  # the client's END_STREAM came
        self.reset = False  # the client reset the stream (or the connection went)
        self.responded = False  # the response's HEADERS went out
        self.trailers: HeaderList = []
        self.scope = trio.CancelScope()
        self.request: Request | None = None
        self.body: H2RequestBody | None = None
        self.arena: Arena | None = None
        self.expect_continue = False
        self._data_event: trio.Event | None = None
        self._window_event: trio.Event | None = None
        self._gone: Any = None  # the ClientWatch callback

    # -- fed by the connection's reader ------------------------------------------------------

    def on_data(self, data: bytes, flow_length: int) -> None:
        if flow_length > len(data):
            # Padding is nobody's to consume: its credit goes back at once.
            self.srv.conn.acknowledge_received_data(flow_length - len(data), self.id)
        if data:
            self.chunks.append(data)
        self._wake_data()

    def on_end(self, trailers: HeaderList | None = None) -> None:
        if trailers:
            self.trailers = trailers
            if self.body is not None:
                self.body.trailers = trailers
        self.ended = True
        self._wake_data()

    def on_reset(self) -> None:
        """The client reset the stream, or the connection ended under it: everything the stream
        waits on wakes, the upstream side hears it (`watch_gone`), and the task is cancelled."""
        if self.reset:
            return
        self.reset = True
        self._wake_data()
        self.wake_window()
        gone, self._gone = self._gone, None
        if gone is not None:
            gone()
        self.scope.cancel()

    def _wake_data(self) -> None:
        ev = self._data_event
        if ev is not None:
            self._data_event = None
            ev.set()

    def wake_window(self) -> None:
        ev = self._window_event
        if ev is not None:
            self._window_event = None
            ev.set()

    # -- the request body, taken by the upstream side ----------------------------------------

    def _consumed(self, n: int) -> None:
        srv = self.srv
        srv.conn.acknowledge_received_data(n, self.id)
        srv.flush()

    def take_all(self) -> list[bytes]:
        chunks = [bytes(c) if isinstance(c, memoryview) else c for c in self.chunks]
        self.chunks.clear()
        n = sum(map(len, chunks))
        if n:
            self._consumed(n)
        return chunks

    def take_one(self) -> bytes:
        c = self.chunks.popleft()
        self._consumed(len(c))
        return bytes(c) if isinstance(c, memoryview) else c

    def take_into(self, view: memoryview) -> int:
        c = self.chunks[0]
        n = len(c)
        if n > len(view):
            n = len(view)
            view[:n] = c[:n]
            self.chunks[0] = memoryview(c)[n:]
        else:
            view[:n] = c
            self.chunks.popleft()
        self._consumed(n)
        return n

    async def wait_data(self) -> None:
        """Wait for DATA, the end, or a reset (StreamReset), at most ``client_body_idle``
        (ClientTimeout, 408). Sends ``100 Continue`` first when the client asked for it."""
        if self.reset:
            raise StreamReset("client reset the stream while sending its body")
        if self.expect_continue:
            self.expect_continue = False
            await self.srv.send_interim(self, 100, [])
        ev = self._data_event = trio.Event()
        with trio.move_on_after(self.srv.body_idle):
            await ev.wait()
            if self.reset:
                raise StreamReset("client reset the stream while sending its body")
            return
        self._data_event = None
        raise ClientTimeout("client_body_timeout")

    def leftover(self) -> int:
        """Bytes buffered and never consumed (their connection credit must still go back)."""
        n = sum(map(len, self.chunks))
        self.chunks.clear()
        return n

    # -- ClientWatch -------------------------------------------------------------------------

    def watch_gone(self, on_gone: Any) -> None:
        if self.reset:
            on_gone()
        else:
            self._gone = on_gone

    def unwatch_gone(self) -> None:
        self._gone = None

    # -- the response, with flow control ---------------------------------------------------

    async def wait_window(self) -> int:
        """The bytes the client lets us send on this stream now, waiting while that is 0, at
        most ``client_send_idle`` (then ClientGone; a closed connection window is a stalled
        connection and ends it with ENHANCE_YOUR_CALM)."""
        srv = self.srv
        conn = srv.conn
        window = conn.local_flow_control_window(self.id)
        if window > 0:
            return window
        # What went into h2 so far must reach the client, or its credit never comes back.
        srv.flush()
        with trio.move_on_after(srv.send_idle):
            while window <= 0:
                if self.reset:
                    raise StreamReset("client reset the stream")
                ev = self._window_event = trio.Event()
                srv.window_waiters.add(self)
                try:
                    await ev.wait()
                finally:
                    srv.window_waiters.discard(self)
                if self.reset:
                    raise StreamReset("client reset the stream")
                window = conn.local_flow_control_window(self.id)
            return window
        self._window_event = None
        if conn.outbound_flow_control_window <= 0:
            srv.stalled()
        raise ClientGone("client kept its flow-control window closed (client_send_idle)")

    async def send_body(self, data: bytes | memoryview, end: bool = False) -> None:
        """Write `data` as DATA frames, each within the window and the frame size; END_STREAM
        on the last when `end`."""
        srv = self.srv
        conn = srv.conn
        view = memoryview(data)
        while True:
            window = await self.wait_window() if view else 1
            await srv.wait_space()
            if self.reset:
                raise StreamReset("client reset the stream")
            n = min(len(view), window, conn.max_outbound_frame_size)
            last = n == len(view)
            conn.send_data(self.id, view[:n], end_stream=end and last)
            view = view[n:]
            if last:
                break
        srv.flush()


def build_request(srv: H2Server, stream: H2Stream) -> Request:
    """The `Request` for a stream's header block. Raises ClientError (its status and reason)
    for what an h1 head would be refused for (see the module docstring)."""
    lim = srv.limits
    method = path = authority = b""
    host = None
    headers: HeaderList = []
    cookies: list[bytes] = []
    size = 0
    length: int | None = None
    rid = b""
    rid_header = srv.rid_header
    for k, v in stream.head:
        size += len(k) + len(v) + 32
        if k[:1] == b":":
            if k == b":method":
                method = v
            elif k == b":path":
                path = v
            elif k == b":authority":
                authority = v
            continue  # :scheme is the listener's to say
        if k == b"host":
            host = v
            continue
        if k == b"cookie":
            cookies.append(v)
            continue
        if k == b"content-length":
            if length is not None or not v.isdigit():
                raise ClientError("malformed Content-Length", reason="bad_request")
            length = int(v)
        elif k == b"expect":
            stream.expect_continue = v.lower() == b"100-continue"
        elif k == rid_header:
            rid = v
        headers.append((k, v))
    if cookies:
        headers.append((b"cookie", b"; ".join(cookies)))
    if len(headers) > lim.max_headers:
        raise ClientError("too many header fields", status=431, reason="too_many_headers")
    if size > lim.max_header_bytes:
        raise ClientError("request head too large", status=431, reason="head_too_large")
    if len(path) > lim.max_request_line:
        raise ClientError("request target too long", status=414, reason="uri_too_long")
    if not METHOD.match(method):
        raise ClientError("malformed method", reason="bad_method")
    if method == b"CONNECT":
        raise ClientError("CONNECT is not supported", status=405, reason="connect")
    if not path or TARGET_BAD.search(path):
        raise ClientError("malformed request target", reason="bad_target")
    if path == b"*":
        if method != b"OPTIONS":
            raise ClientError("asterisk-form is only valid for OPTIONS", reason="bad_target")
    elif path[:1] != b"/":
        raise ClientError("malformed request target", reason="bad_target")
    authority = authority or host or b""
    if not authority or not _HOST.match(authority) or b"@" in authority:
        raise ClientError("missing or malformed :authority", reason="bad_host")
    headers.insert(0, (b"host", authority))
    if not fields_valid(headers):
        # A CR, LF or NUL in a value would be a second request to an h1 upstream.
        raise ClientError("malformed header field", reason="bad_request")
    if stream.ended and length is None and not stream.trailers:
        # The whole body came before the request was built: it goes on with its length.
        length = sum(map(len, stream.chunks))
    body = stream.body = H2RequestBody(stream, length)
    body.trailers = stream.trailers
    request = Request(
        method.decode("ascii"),
        path.decode("latin-1"),
        Headers(headers),
        body,
        http_version="2",
        client=srv.client,
        scheme="https" if srv.transport.tls else "http",
        request_id=rid.decode("ascii") if valid_request_id(rid) else new_request_id(),
        start=trio.current_time(),
        interim=lambda status, fields: srv.send_interim(stream, status, fields),
    )
    request.client_watch = stream
    peer_id = srv.transport.peer_id
    if peer_id is not None:
        request.ctx["peer_id"] = peer_id
    return request


def response_fields(status: int, headers: HeaderList) -> HeaderList:
    """The HEADERS of a response: ``:status`` first, then its fields without the
    connection-specific ones (RFC 9113 §8.2.2), whoever set them."""
    named = connection_tokens(headers) if any(k == b"connection" for k, _ in headers) else ()
    out: HeaderList = [(b":status", _status_bytes(status))]
    for k, v in headers:
        if k in _CONNECTION_SPECIFIC or k in named or k[:1] == b":":
            continue
        out.append((k, v))
    return out


def trailer_fields(trailers: HeaderList) -> HeaderList:
    """Trailers as they may go in an h2 HEADERS frame: no pseudo or connection fields."""
    return [(k, v) for k, v in trailers if k not in _CONNECTION_SPECIFIC and k[:1] != b":"]


async def serve_stream(srv: H2Server, stream: H2Stream) -> None:
    """The task of one stream: build the request, run the app, write the response; every path
    ends the stream on the wire and gives its arena back. Never raises.

    The exchange is reported once: to ``on_exchange`` when a response was chosen (whether or
    not it went out whole), to ``on_abandon`` when the client left before that (a reset)."""
    state = srv.state
    state.inflight += 1
    state.requests += 1
    arenas = state.arenas
    if arenas is not None:
        stream.arena = arenas.acquire()
    request: Request | None = None
    logged = False
    start = trio.current_time()
    try:
        with stream.scope:
            try:
                request = stream.request = build_request(srv, stream)
                if stream.arena is not None:
                    request.arena = stream.arena
                    stream.arena.ctx = request.ctx
                response = await state.app(request)
            except ClientGone:
                raise
            except ClientError as e:
                if request is not None:
                    request.ctx.setdefault("error", e.reason)
                response = error_response(
                    e.status, e.detail, request.id if request is not None else "", close=False
                )
                response.bytes_out = response.body.length or 0
                logged = True
                srv.log_exchange(request, response, e.reason, start)
                await _write_whole(stream, response, request)
                return
            try:
                await _write_response(srv, stream, request, response)
            except BuffersExhausted as e:
                # No relay buffer came free: nothing went out yet, a 503 does instead.
                await response.body.aclose()
                request.ctx["error"] = e.reason
                response = error_response(
                    503, BuffersExhausted.public, request.id, close=False, retry_after=1
                )
                response.bytes_out = response.body.length or 0
                await _write_whole(stream, response, request)
            except (ClientError, UpstreamError) as e:
                request.ctx["error"] = e.reason
                if isinstance(e, UpstreamError):
                    log.warning("request %s: %s", request.id, e.detail)
                    srv.reset_stream(stream, ErrorCodes.INTERNAL_ERROR)
                else:
                    srv.reset_stream(stream, ErrorCodes.CANCEL)
            finally:
                await response.body.aclose()
                logged = True
                srv.log_exchange(request, response, request.ctx.get("error"), start)
    except ClientGone:
        pass
    except Exception:
        log.exception("stream %d from %s:%d failed", stream.id, *srv.client)
        srv.reset_stream(stream, ErrorCodes.INTERNAL_ERROR)
    finally:
        state.inflight -= 1
        if not logged and request is not None and state.on_abandon is not None:
            state.on_abandon(request)
        if stream.arena is not None:
            arenas.give_back(stream.arena)  # type: ignore[union-attr]
            stream.arena = None
        srv.stream_done(stream)


async def _write_whole(stream: H2Stream, response: Response, request: Request | None) -> None:
    """A response weft made (an error page), written whole; a request body not read to its
    end is then cut with RST_STREAM NO_ERROR."""
    srv = stream.srv
    chunks, _ = response.body.prefetched()
    body = b"".join(chunks)
    if request is not None and request.method == "HEAD":
        body = b""
    await srv.send_headers(
        stream, response_fields(response.status, response.headers.raw), end=not body
    )
    if body:
        await stream.send_body(body, end=True)
    if not stream.ended:
        srv.reset_stream(stream, ErrorCodes.NO_ERROR, for_cause=False)


async def _write_response(
    srv: H2Server, stream: H2Stream, request: Request, response: Response
) -> None:
    """Write `response` on the stream: HEADERS, the body within the client's windows, and the
    trailers or END_STREAM. Raises ClientGone/StreamReset (the client left), UpstreamError (the
    upstream failed mid-body), BuffersExhausted (no relay buffer: a 503 instead, if the head
    has not gone out)."""
    if response.tunnel is not None:
        raise UpstreamError("an upstream switched protocols on an h2 stream", reason="bad_response")
    headers = response.headers.raw
    if not request.validated and not fields_valid(headers):
        raise UpstreamError(
            "a response field set by middleware is not valid HTTP", reason="bad_response"
        )
    body = response.body
    no_body = request.method == "HEAD" or response.status in (204, 304)
    chunks, complete = body.prefetched()
    relay = None
    if not complete and not no_body and stream.arena is not None:
        route = request.route
        idle = (route.timeouts if route is not None else srv.timeouts).upstream_body_idle
        relay = await stream.arena.lease_wait(RELAY_SIZE, idle)
    fields = response_fields(response.status, headers)
    if no_body:
        await srv.send_headers(stream, fields, end=True)
        return
    pending = [c for c in chunks if c]
    chunks.clear()
    if complete and not body.trailers:
        # The usual small response: HEADERS and DATA with END_STREAM in one write.
        await srv.send_headers(stream, fields, end=not pending, flush=not pending)
        for i, c in enumerate(pending):
            await stream.send_body(c, end=i == len(pending) - 1)
            response.bytes_out += len(c)
        return
    await srv.send_headers(stream, fields, end=False)
    for c in pending:
        await stream.send_body(c)
        response.bytes_out += len(c)
    del pending
    if not complete:
        if relay is not None:
            view = relay.view
            while True:
                # Backpressure: ask the upstream for no more than the client lets us send.
                window = await stream.wait_window()
                n = await body.receive_into(view[: min(window, len(view))])
                if not n:
                    break
                await stream.send_body(view[:n])
                response.bytes_out += n
        else:
            while chunk := await body.receive():
                await stream.send_body(chunk)
                response.bytes_out += len(chunk)
    trailers = trailer_fields(body.trailers)
    if trailers:
        await srv.send_headers(stream, trailers, end=True)
    else:
        await stream.send_body(b"", end=True)
