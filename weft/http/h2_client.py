"""The HTTP/2 client side of an exchange: `H2Upstream`, one stream slot on a shared
`weft.http.h2_conn.H2Connection`, and `H2ResponseBody`, the response streaming from it.

The forwarder talks to every upstream through `weft.http.upstream.UpstreamConnection`
(``exchange`` plus the pool's questions). For HTTP/1.1 that object is a connection; for h2 it
is a **stream slot**: the pool (`weft.connection.EndpointPool`) takes a slot on a connection
that has room (`take_slot`), and the slot's ``on_done`` gives the slot back, never the
connection.

One exchange: the request head becomes a HEADERS frame (`weft.http.h2_translate` maps h1
fields to h2 and back); a body all in memory is sent whole, one that is still arriving is
pumped from the client while the response head is awaited, so an upstream that answers early
(413, 401) is heard. When the client side is h2 too (`Outgoing.duplex`) the pump goes on after
the head, while the response streams back, as a gRPC bidirectional call needs; it stops when
the slot is given back. The response body is read from the stream's received DATA, each chunk
acknowledged as it is taken (the backpressure, see `weft.http.h2_conn`).

**Unprocessed streams** (a GOAWAY above the stream's id, RST_STREAM REFUSED_STREAM; RFC 9113
§8.7) are sent again on a slot the pool picks anew (a new connection, as the pool hands out
none on one going away), whatever the method, at most `MAX_UNPROCESSED_RETRIES` times, as long
as the request body can be sent again (it was all in memory, or not a byte was read yet);
otherwise a 502 that says so.

Errors are the h1 client's `UpstreamError` reasons: ``upstream_reset`` (a stream reset, the
connection's death), ``bad_response`` (a response head without a valid ``:status``, a 101),
``upstream_header_timeout``, ``upstream_body_timeout``, ``upstream_send_timeout``,
``request_timeout``.

What is not done: WebSocket over an h2 upstream (RFC 8441 extended CONNECT): Upgrade is a
connection-specific field and is dropped, so the upstream answers the request as a plain one.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import h2.errors
import h2.events
import h2.exceptions
import trio

from weft.http.errors import ClientError, ClientGone, ProxyError, UpstreamError
from weft.http.h2_conn import H2Connection, SlotSource, Unprocessed
from weft.http.h2_translate import request_headers, response_head, trailer_fields
from weft.http.messages import Body, Headers, Response
from weft.http.upstream import Outgoing

if TYPE_CHECKING:
    from weft.schema import Endpoint, Timeouts

log = logging.getLogger("weft.upstream")

OnDone = Callable[[bool], None]
Interim = Callable[[int, list[tuple[bytes, bytes]]], Awaitable[None]]

# Retries of a stream the upstream did not process (GOAWAY above last id, REFUSED_STREAM) before
# the request fails: each goes to a slot the pool picks anew.
MAX_UNPROCESSED_RETRIES = 3


def take_slot(conn: H2Connection, source: SlotSource | None) -> H2Upstream:
    """A new stream slot on `conn` (which must have room); `source` moves it after an
    unprocessed stream (None: the request fails instead)."""
    conn.reserve()
    return H2Upstream(conn, source)


class H2Upstream:
    """One stream slot on an `H2Connection`: the `UpstreamConnection` the pool hands out for
    an h2 endpoint. It carries one exchange; on an unprocessed stream it moves to a new slot
    (`SlotSource.move`) and sends the request again there."""

    __slots__ = (
        "chunks",
        "client_left",
        "conn",
        "ended",
        "error",
        "event",
        "head",
        "held",
        "idle_since",
        "interims",
        "local_ended",
        "pump",
        "requests",
        "reset",
        "sid",
        "source",
        "stray",
        "trailers",
    )

    def __init__(self, conn: H2Connection, source: SlotSource | None) -> None:
        self.conn = conn
        self.source = source
        self.requests = 0
        self.idle_since = 0.0
        self.stray = 0  # h2 frames every message: nothing can arrive past a response
        self.held = True  # it holds a slot on `conn` (given back once, by `conn.finish`)
        self.pump: trio.CancelScope | None = None  # the request body's task, while it runs
        self._clear()

    def _clear(self) -> None:
        self.sid: int | None = None
        self.head: list[tuple[bytes, bytes]] | None = None
        self.interims: deque[list[tuple[bytes, bytes]]] = deque()
        self.chunks: deque[tuple[bytes, int]] = deque()  # (data, flow-controlled length)
        self.trailers: list[tuple[bytes, bytes]] = []
        self.ended = False  # the upstream ended the stream (END_STREAM)
        self.local_ended = False  # weft ended its side
        self.reset = False  # the stream was reset (by either side)
        self.error: UpstreamError | None = None
        self.event = trio.Event()
        self.client_left = False

    @property
    def endpoint(self) -> Endpoint:
        return self.conn.endpoint

    # -- what the pool asks (see weft.http.upstream.UpstreamConnection) ----------------------

    @property
    def response_started(self) -> bool:
        """Whether the response head came back on this stream."""
        return self.head is not None

    @property
    def closed_both(self) -> bool:
        return self.reset or (self.ended and self.local_ended)

    def reusable(self) -> bool:
        """Whether the exchange ended cleanly (the slot is given back either way; the answer
        only says whether the stream needs a reset)."""
        return self.ended and self.error is None

    def recycle(self) -> None:
        pass

    def closed_while_idle(self) -> bool:
        return False  # a slot is never idle: it is taken for one exchange

    def close(self) -> None:
        self.conn.finish(self)

    # -- events from the connection task --------------------------------------------------------

    def wake(self) -> None:
        self.event.set()

    def on_event(self, ev: h2.events.Event) -> None:
        t = type(ev)
        if t is h2.events.ResponseReceived:
            self.head = ev.headers
        elif t is h2.events.InformationalResponseReceived:
            self.interims.append(ev.headers)
        elif t is h2.events.DataReceived:
            if ev.data:
                self.chunks.append((ev.data, ev.flow_controlled_length))
            elif ev.flow_controlled_length:
                self.conn.acknowledge(self, ev.flow_controlled_length)  # padding only
        elif t is h2.events.TrailersReceived:
            self.trailers = list(ev.headers)
        elif t is h2.events.StreamEnded:
            self.ended = True
        elif t is h2.events.StreamReset:
            self.reset = True
            if ev.error_code == h2.errors.ErrorCodes.REFUSED_STREAM:
                self.fail(Unprocessed("upstream refused the stream (REFUSED_STREAM)"))
            elif not self.ended:
                code = getattr(ev.error_code, "name", ev.error_code)
                self.fail(
                    UpstreamError(f"upstream reset the stream ({code})", reason="upstream_reset")
                )
        self.event.set()

    def fail(self, err: UpstreamError) -> None:
        """The stream cannot go on (its first error wins). A stream the upstream already
        ended keeps what it received: a connection that dies after that loses nothing."""
        if self.error is None and not self.ended:
            self.error = err
        self.event.set()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    async def wait(self, until: float) -> bool:
        """Wait for an event on this stream until `until` (trio time); False on timeout."""
        if self.event.is_set():
            self.event = trio.Event()
            return True
        with trio.move_on_at(until):
            await self.event.wait()
            self.event = trio.Event()
            return True
        return False

    def _client_gone(self) -> None:
        self.client_left = True
        self.event.set()

    # -- one exchange --------------------------------------------------------------------------

    async def exchange(
        self,
        out: Outgoing,
        timeouts: Timeouts,
        deadline: float,
        interim: Interim | None,
        on_done: OnDone,
    ) -> Response:
        """Send `out` on this slot's stream and return the response, its body streaming from
        the stream. `on_done(clean)` is called once when the slot is free again (the body
        ended or was closed, or with False when this raises). An unprocessed stream is sent
        again on a new slot (see the module docstring). Raises UpstreamError or ClientError
        (the client's body failed, or ClientGone)."""
        handed_off = False
        sent = _Sent(out)
        try:
            tries = 0
            while True:
                try:
                    response = await self._exchange_once(
                        out, sent, timeouts, deadline, interim, on_done
                    )
                    handed_off = True
                    return response
                except Unprocessed as e:
                    tries += 1
                    if not sent.replayable:
                        raise UpstreamError(
                            f"{e.detail}; the request body was already streamed and cannot be "
                            "sent again",
                            reason="upstream_reset",
                        ) from None
                    if tries > MAX_UNPROCESSED_RETRIES or self.source is None:
                        raise UpstreamError(
                            f"{e.detail} ({tries} times)", reason="upstream_reset"
                        ) from None
                    log.debug(
                        "%s: %s; sent again on another stream", self.endpoint.authority, e.detail
                    )
                    await self.source.move(self)
                    self._clear()
        finally:
            if not handed_off:
                on_done(False)

    async def _exchange_once(
        self,
        out: Outgoing,
        sent: _Sent,
        timeouts: Timeouts,
        deadline: float,
        interim: Interim | None,
        on_done: OnDone,
    ) -> Response:
        conn = self.conn
        if conn.goaway or conn.dead is not None:
            raise Unprocessed("the h2 connection went away before the stream was opened")
        headers = request_headers(out.method, out.target, out.headers, conn.scheme)
        send_idle = timeouts.upstream_send_idle
        head_limit = [min(deadline, trio.current_time() + timeouts.upstream_header)]
        if not out.has_body:
            await conn.wait_written(conn.start_stream(self, headers, True), send_idle)
            self.local_ended = True
            return await self._response(out, timeouts, deadline, interim, on_done, head_limit)
        chunks, complete = sent.in_memory()
        conn.start_stream(self, headers, False)
        if complete:
            for c in chunks:
                await conn.send_data(self, c, send_idle)
            await conn.wait_written(conn.end_stream(self, sent.trailers()), send_idle)
            head_limit[0] = min(deadline, trio.current_time() + timeouts.upstream_header)
            return await self._response(out, timeouts, deadline, interim, on_done, head_limit)
        # The rest streams from the client while the head is awaited: an upstream that
        # answers early (413, 401) is heard. The pump is a task in the pool's nursery: for a
        # duplex request (`Outgoing.duplex`) it goes on after the head came, while the
        # response streams back, until the body ends or the slot is given back
        # (`stop_pump`); otherwise it stops at the head. Its outcome is kept, not raised.
        head_limit[0] = deadline
        pump_error: ClientError | UpstreamError | None = None
        scope = self.pump = trio.CancelScope()
        pumped = trio.Event()

        async def pump() -> None:
            nonlocal pump_error
            try:
                with scope:
                    for c in chunks:
                        await conn.send_data(self, c, send_idle)
                    body = out.body
                    while chunk := await body.receive():
                        sent.streamed = True
                        await conn.send_data(self, chunk, send_idle)
                    await conn.wait_written(conn.end_stream(self, sent.trailers()), send_idle)
                    head_limit[0] = min(deadline, trio.current_time() + timeouts.upstream_header)
            except (ClientError, UpstreamError) as e:
                pump_error = e
                if isinstance(e, ClientError) or (
                    # Before the head no answer is awaited any more; after it (duplex) the
                    # response may still come whole while the upstream reads no more.
                    e.reason == "upstream_send_timeout" and self.head is None
                ):
                    self.fail(_PumpFailed())
            except h2.exceptions.StreamClosedError:
                pass  # the upstream closed its side (it answered): nothing more to send
            except Exception as e:
                # A bug, or the stream closed under a late send: never the pool's nursery's
                # problem (that would end every connection of the worker).
                log.warning("request body to %s failed: %r", self.endpoint.authority, e)
                self.fail(UpstreamError(f"request body failed: {e!r}", reason="upstream_reset"))
            finally:
                pumped.set()
                self.event.set()

        assert conn.nursery is not None, "h2 streams need the pool's nursery"
        conn.nursery.start_soon(pump)
        response: Response | None = None
        error: ProxyError | None = None
        try:
            response = await self._response(
                out, timeouts, deadline, interim, on_done, head_limit, pumping=True
            )
        except ProxyError as e:
            error = e
        finally:
            if response is None or not out.duplex:
                scope.cancel()
        if response is not None:
            if not self.local_ended and not out.duplex:
                out.close_client = True  # answered before the whole body was taken
            return response
        await pumped.wait()  # cancelled above: it ends at its next checkpoint
        if isinstance(error, _PumpFailed):
            assert pump_error is not None
            raise pump_error
        assert error is not None
        raise error

    def stop_pump(self) -> None:
        """The slot is given back: a request body still streaming to it stops."""
        if self.pump is not None:
            self.pump.cancel()
            self.pump = None

    async def _response(
        self,
        out: Outgoing,
        timeouts: Timeouts,
        deadline: float,
        interim: Interim | None,
        on_done: OnDone,
        head_limit: list[float],
        *,
        pumping: bool = False,
    ) -> Response:
        watch = out.client_watch
        watching = False
        try:
            while self.head is None:
                if self.error is not None:
                    raise self.error
                if self.client_left:
                    raise ClientGone("client closed while its response was awaited")
                while self.interims:
                    status, fields = response_head(self.interims.popleft())
                    if status != 100 and interim is not None:
                        await interim(status, fields)
                if watch is not None and not watching and (self.local_ended or not pumping):
                    watch.watch_gone(self._client_gone)
                    watching = True
                now = trio.current_time()
                if now >= deadline:
                    raise UpstreamError(
                        "request_total exceeded", status=504, reason="request_timeout"
                    )
                if now >= head_limit[0]:
                    raise UpstreamError(
                        "upstream too slow (upstream_header_timeout)",
                        status=504,
                        reason="upstream_header_timeout",
                    )
                await self.wait(min(head_limit[0], deadline))
        finally:
            if watching:
                watch.unwatch_gone()  # type: ignore[union-attr]
        try:
            status, fields = response_head(self.head)
        except ValueError as e:
            raise UpstreamError(
                f"upstream sent a bad h2 response head: {e}", reason="bad_response"
            ) from None
        if status == 101:
            raise UpstreamError("upstream answered 101 on an h2 stream", reason="bad_response")
        length = None
        for k, v in fields:
            if k == b"content-length":
                length = int(v)  # the h2 library checked it
                break
        has_body = out.method != b"HEAD" and status not in (204, 304)
        body = H2ResponseBody(
            self, on_done, timeouts.upstream_body_idle, deadline, length if has_body else None
        )
        if not has_body:
            body.length = length
        return Response(status, Headers(fields), body)


class _PumpFailed(UpstreamError):
    """Marks a stream whose request body could not be sent (the client's body failed, or the
    upstream stopped reading): the pump's own error is raised instead."""

    def __init__(self) -> None:
        super().__init__("the request body could not be sent", reason="upstream_reset")


class _Sent:
    """What of the request body was taken, so that an unprocessed stream knows whether it
    can send the request again: chunks that were all in memory are kept; a body streamed
    from the client is not (once a byte of it was read, it cannot be sent twice)."""

    __slots__ = ("_chunks", "_complete", "_taken", "out", "streamed")

    def __init__(self, out: Outgoing) -> None:
        self.out = out
        self._taken = False
        self._chunks: list[bytes | memoryview] = []
        self._complete = False
        self.streamed = False

    def in_memory(self) -> tuple[list[bytes | memoryview], bool]:
        if not self._taken:
            self._taken = True
            chunks, self._complete = self.out.body.prefetched()
            self._chunks = [c for c in chunks if c]
        return self._chunks, self._complete

    def trailers(self) -> list[tuple[bytes, bytes]]:
        body = self.out.body
        return trailer_fields(body.trailers) if body.length is None else []

    @property
    def replayable(self) -> bool:
        return not self.streamed


class H2ResponseBody(Body):
    """A response body streamed from an h2 stream. Each chunk is acknowledged to the upstream
    (its flow-control window reopened) only when it is taken here: the backpressure."""

    __slots__ = ("_deadline", "_done", "_idle", "_on_done", "_s")

    def __init__(
        self, stream: H2Upstream, on_done: OnDone, idle: float, deadline: float, length: int | None
    ) -> None:
        super().__init__()
        self._s = stream
        self._on_done = on_done
        self._idle = idle
        self._deadline = deadline
        self._done = False
        self.length = length
        if stream.ended and not stream.chunks and stream.error is None:
            self.trailers = stream.trailers
            self._finish(True)

    def _finish(self, clean: bool) -> None:
        if not self._done:
            self._done = True
            self._on_done(clean)

    def prefetched(self) -> tuple[list[bytes], bool]:  # type: ignore[override]
        s = self._s
        out = []
        owed = 0
        while s.chunks:
            data, flow = s.chunks.popleft()
            out.append(data)
            owed += flow
        if owed:
            s.conn.acknowledge(s, owed)
        complete = s.ended and s.error is None
        if complete:
            self.trailers = s.trailers
            self._finish(True)
        return out, complete

    async def receive(self) -> bytes:
        s = self._s
        while True:
            if s.chunks:
                data, flow = s.chunks.popleft()
                s.conn.acknowledge(s, flow)
                return data
            if s.error is not None:
                self._finish(False)
                raise s.error
            if s.ended:
                self.trailers = s.trailers
                self._finish(True)
                return b""
            if self._done:
                return b""
            now = trio.current_time()
            if now >= self._deadline:
                self._finish(False)
                raise UpstreamError("request_total exceeded", status=504, reason="request_timeout")
            if self._deadline < now + self._idle:
                until, what = self._deadline, "request_timeout"
            else:
                until, what = now + self._idle, "upstream_body_timeout"
            if not await s.wait(until) and not s.chunks and not s.ended:
                self._finish(False)
                raise UpstreamError(f"upstream too slow ({what})", status=504, reason=what)

    async def aclose(self) -> None:
        self._finish(False)
