"""The HTTP/2 client side: `H2Connection` (one per upstream h2 connection, shared by many
requests) and `H2Upstream` (one stream slot on it: what the pool hands the forwarder).

The forwarder talks to every upstream through `weft.http.upstream.UpstreamConnection`
(``exchange`` plus the pool's questions). For HTTP/1.1 that object is a connection; for h2 it
is a **stream slot**: the pool (`weft.connection.EndpointPool`) takes a slot on a connection
that has room, and the slot's ``on_done`` gives the slot back, never the connection. The h2
library (python-hyper ``h2``) does all framing, HPACK and flow-control accounting; this module
does the I/O around it and the mapping to weft's errors.

Theory of operation, per connection:

* **One task** (`H2Connection.run`, started in the pool's nursery) reads frames and
  dispatches the library's events to the streams they belong to (head, DATA, trailers, end,
  reset), and a writer beside it sends whatever the library has queued. Stream tasks never
  read the socket and never write it: they change the library's state synchronously and wake
  the writer (`kick`), so frames go out in the order they were made.
* **Backpressure both ways.** A DATA frame received is kept on its stream until the response
  body's reader takes it (`H2ResponseBody`), and only then is it acknowledged, which is what
  reopens the upstream's flow-control window: a slow client slows its stream's upstream, and
  the memory per stream is bounded by the window weft advertises (`STREAM_WINDOW`). A request
  body is sent only as far as the upstream's window allows, and each chunk waits for the
  writer to put it on the socket; a wait without progress past ``upstream_send_idle`` is a
  504 ``upstream_send_timeout`` (when the socket itself is stuck, the whole connection is
  failed: nothing more can go out on it).
* **GOAWAY**: the connection takes no new stream at once. Streams above the last-stream-id
  were not processed (RFC 9113 §6.8) and fail with `Unprocessed`, which `H2Upstream.exchange`
  retries on another slot (a new connection, as the pool hands out none on this one) whatever
  the method, as long as the request body can be sent again (it was all in memory, or not a
  byte was read yet); otherwise a 502 that says so. A graceful GOAWAY (NO_ERROR) lets the
  streams at or below the last id finish; one with an error fails them (502). RST_STREAM
  REFUSED_STREAM is `Unprocessed` too (§8.7).
  The h2 library moves its connection state machine to CLOSED on any GOAWAY received and
  would refuse the frames of the streams that may still finish; each connection gets its own
  transition table in which a received GOAWAY leaves it open (`_survive_goaway`: the one
  reach into the library's internals here).

Errors are the h1 client's `UpstreamError` reasons, so health, outlier detection, the breaker
and retries do not know the version: ``upstream_reset`` (connection closed or reset, a
stream reset, a GOAWAY with an error), ``bad_response`` (an h2 protocol error, a response
head without a valid ``:status``, a 101), ``upstream_header_timeout``,
``upstream_body_timeout``, ``upstream_send_timeout``, ``request_timeout``.

What is not done: WebSocket over an h2 upstream (RFC 8441 extended CONNECT): Upgrade is a
connection-specific field and is dropped, so the upstream answers the request as a plain one.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from weft.http.errors import ClientError, ClientGone, ProxyError, UpstreamError
from weft.http.h2_translate import request_headers, response_head, trailer_fields
from weft.http.messages import Body, Headers, Response
from weft.http.transport import Transport
from weft.http.upstream import Outgoing

if TYPE_CHECKING:
    from weft.schema import Endpoint, Timeouts

log = logging.getLogger("weft.upstream")

OnDone = Callable[[bool], None]
Interim = Callable[[int, list[tuple[bytes, bytes]]], Awaitable[None]]

READ_SIZE = 64 * 1024  # bytes per socket read
# The receive window weft advertises per stream: the most response bytes one stream holds
# before its reader consumes them (the memory bound per stream; 1 MiB keeps a 10 ms RTT link
# at ~100 MB/s per stream).
STREAM_WINDOW = 1 << 20
# The connection-level receive window: many streams' windows at once (16 streams full).
CONNECTION_WINDOW = 16 << 20
# Retries of a stream the upstream did not process (GOAWAY above last id, REFUSED_STREAM) before
# the request fails: each goes to a slot the pool picks anew.
MAX_UNPROCESSED_RETRIES = 3


class Unprocessed(UpstreamError):
    """The upstream did not process the stream (RFC 9113 §8.7): safe to send again."""

    reason = "upstream_reset"


class SlotSource(Protocol):
    """Where a slot gets a new stream after an unprocessed one (`weft.connection`)."""

    async def move(self, slot: H2Upstream) -> None: ...


def _config() -> h2.config.H2Configuration:
    return h2.config.H2Configuration(client_side=True, header_encoding=None)


def _survive_goaway(conn: h2.connection.H2Connection) -> None:
    """Keep `conn` open when a GOAWAY is received (see the module docstring): the frames of the
    streams at or below its last-stream-id may follow in the same read, so the state is kept
    by this connection's own transition table, not restored after the event. New streams are
    refused by `H2Connection.goaway`, not by the library."""
    sm = conn.state_machine
    open_ = h2.connection.ConnectionState.CLIENT_OPEN
    table = dict(sm._transitions)  # the library offers no option for this
    table[(open_, h2.connection.ConnectionInputs.RECV_GOAWAY)] = (None, open_)
    sm._transitions = table  # type: ignore[misc]


class H2Connection:
    """One h2 connection to an upstream endpoint and the streams it carries."""

    def __init__(
        self,
        transport: Transport,
        endpoint: Endpoint,
        *,
        tls: bool,
        max_streams: int,
        on_change: Callable[[H2Connection], None] = lambda _c: None,
    ) -> None:
        self.transport = transport
        self.endpoint = endpoint
        self.scheme = b"https" if tls else b"http"
        self.h2 = h2.connection.H2Connection(_config())
        _survive_goaway(self.h2)
        self.max_streams = max_streams  # weft's own cap; the upstream's setting lowers it
        self.streams: dict[int, H2Upstream] = {}  # open streams by id
        self.active = 0  # slots handed out and not given back
        self.requests = 0  # streams ever started (for max_requests)
        self.idle_since = 0.0
        self.goaway = False  # takes no new stream (GOAWAY received, retiring, or dead)
        self.dead: UpstreamError | None = None
        self.closed = False
        self.on_change = on_change  # the pool: capacity or liveness changed
        self._wake_writer = trio.Event()
        self._window = trio.Event()  # set (and replaced) whenever send windows grow
        self._written = 0  # batches the writer finished
        self._queued = 0  # batches asked for
        self._progress = trio.Event()  # set (and replaced) after each batch written
        self._writer_stuck_since: float | None = None

    # -- capacity --------------------------------------------------------------------------

    def capacity(self) -> int:
        """Streams it may carry at once: weft's cap, lowered by the upstream's setting."""
        return min(self.max_streams, self.h2.remote_settings.max_concurrent_streams)

    def has_room(self) -> bool:
        return not self.goaway and self.active < self.capacity()

    def take_slot(self, source: SlotSource | None) -> H2Upstream:
        assert self.has_room()
        self.active += 1
        return H2Upstream(self, source)

    def move_slot(self, slot: H2Upstream) -> None:
        """Put `slot` (given back on its old connection) on this one."""
        assert self.has_room() and not slot.held
        self.active += 1
        slot.conn = self
        slot.held = True

    # -- opening and the connection task ----------------------------------------------------

    async def handshake(self) -> None:
        """Send the preface and weft's SETTINGS, then wait for the upstream's SETTINGS (so the
        first streams respect its MAX_CONCURRENT_STREAMS). Unbounded: the caller's scope
        bounds it. Raises OSError, UpstreamError (closed, or not h2)."""
        c = self.h2
        c.initiate_connection()
        c.update_settings(
            {
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            }
        )
        c.increment_flow_control_window(CONNECTION_WINDOW - 65535)  # from the default
        await self.transport.send_all(c.data_to_send())
        while True:
            data = await self.transport.recv(READ_SIZE)
            if not data:
                raise UpstreamError(
                    f"{self.endpoint.authority} closed the connection in the h2 preface",
                    reason="upstream_reset",
                )
            try:
                events = c.receive_data(data)
            except h2.exceptions.ProtocolError as e:
                raise UpstreamError(
                    f"{self.endpoint.authority} does not speak h2: {e}", reason="bad_response"
                ) from None
            settled = False
            for ev in events:
                if isinstance(ev, h2.events.RemoteSettingsChanged):
                    settled = True
                self._dispatch(ev)
            if self.dead is not None:
                raise self.dead
            if settled:
                out = c.data_to_send()  # the SETTINGS ack
                if out:
                    await self.transport.send_all(out)
                return

    async def run(self) -> None:
        """Read and write until the connection ends; then every stream still on it fails and
        the transport is closed. Never raises (a bug is logged, and fails the streams)."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_loop)
                await self._read_loop()
                nursery.cancel_scope.cancel()
        except Exception as e:  # an invariant broken: never take the worker's pool task down
            log.exception("h2 connection to %s failed", self.endpoint.authority)
            self._fail(UpstreamError(f"h2 connection failed: {e!r}", reason="upstream_reset"))
        finally:
            if self.dead is None:
                self._fail(UpstreamError("h2 connection closed", reason="upstream_reset"))
            self.transport.close()
            self.closed = True

    async def _read_loop(self) -> None:
        c = self.h2
        while True:
            try:
                data = await self.transport.recv(READ_SIZE)
            except (OSError, trio.ClosedResourceError) as e:
                err = UpstreamError(f"upstream connection reset: {e}", reason="upstream_reset")
                self._fail(err)
                return
            if not data:
                self._fail(
                    UpstreamError("upstream closed the h2 connection", reason="upstream_reset")
                )
                return
            try:
                events = c.receive_data(data)
            except h2.exceptions.ProtocolError as e:
                log.info("%s broke HTTP/2: %s", self.endpoint.authority, e)
                self._fail(UpstreamError(f"h2 protocol error: {e}", reason="bad_response"))
                self.kick()  # the GOAWAY the library queued
                await trio.lowlevel.checkpoint()
                return
            for ev in events:
                self._dispatch(ev)
            self.kick()
            if self.dead is not None:
                return

    async def _write_loop(self) -> None:
        c = self.h2
        while True:
            data = c.data_to_send()
            if not data:
                self._written = self._queued
                self._progress.set()
                self._progress = trio.Event()
                await self._wake_writer.wait()
                self._wake_writer = trio.Event()
                continue
            batch = self._queued
            self._writer_stuck_since = trio.current_time()
            try:
                await self.transport.send_all(data)
            except (OSError, trio.ClosedResourceError) as e:
                self._fail(UpstreamError(f"upstream connection broke while sending: {e}",
                                         reason="upstream_reset"))
                self.transport.close()  # ends the reader too
                return
            self._writer_stuck_since = None
            self._written = batch
            self._progress.set()
            self._progress = trio.Event()

    def kick(self) -> int:
        """Wake the writer for what the library has queued; the batch number to wait for."""
        self._queued += 1
        self._wake_writer.set()
        return self._queued

    async def wait_written(self, batch: int, timeout: float) -> None:
        """Wait until the writer has put `batch` (and all before it) on the socket. Raises
        UpstreamError 504 ``upstream_send_timeout`` after `timeout` seconds without progress
        (the socket is stuck: the connection is failed too), or the connection's error."""
        while self._written < batch:
            if self.dead is not None:
                raise self.dead
            with trio.move_on_after(timeout) as cs:
                await self._progress.wait()
            if cs.cancelled_caught:
                err = _send_timeout(timeout)
                self._fail(err)
                self.transport.close()
                raise err

    # -- events -------------------------------------------------------------------------------

    def _dispatch(self, ev: h2.events.Event) -> None:
        t = type(ev)
        sid = getattr(ev, "stream_id", None)
        if sid:
            stream = self.streams.get(sid)
            if stream is not None:
                stream.on_event(ev)
            elif t is h2.events.DataReceived:
                # A stream weft reset: its bytes still count against the connection window.
                self.h2.acknowledge_received_data(ev.flow_controlled_length, sid)
            return
        if t is h2.events.WindowUpdated:
            self._window.set()
            self._window = trio.Event()
        elif t is h2.events.RemoteSettingsChanged:
            self._window.set()  # INITIAL_WINDOW_SIZE may have grown every stream's window
            self._window = trio.Event()
            self.on_change(self)  # MAX_CONCURRENT_STREAMS may have changed the room
        elif t is h2.events.ConnectionTerminated:
            self._goaway(ev)

    def _goaway(self, ev: h2.events.ConnectionTerminated) -> None:
        self.goaway = True
        last = ev.last_stream_id if ev.last_stream_id is not None else 0
        graceful = ev.error_code == h2.errors.ErrorCodes.NO_ERROR
        code = getattr(ev.error_code, "name", ev.error_code)
        for sid, stream in list(self.streams.items()):
            if sid > last:
                stream.fail(Unprocessed(f"upstream sent GOAWAY (last stream {last}) above "
                                        f"stream {sid}: not processed"))
            elif not graceful:
                stream.fail(UpstreamError(f"upstream sent GOAWAY {code}", reason="upstream_reset"))
        if not graceful:
            self.dead = UpstreamError(f"upstream sent GOAWAY {code}", reason="upstream_reset")
        self.on_change(self)

    def _fail(self, err: UpstreamError) -> None:
        """The connection is over: every stream on it fails with `err` (once)."""
        if self.dead is None:
            self.dead = err
        self.goaway = True
        for stream in list(self.streams.values()):
            stream.fail(err)
        self._window.set()
        self._progress.set()
        self.on_change(self)

    # -- what the streams call ----------------------------------------------------------------

    def start_stream(self, stream: H2Upstream, headers: list[tuple[bytes, bytes]],
                     end: bool) -> int:
        """Open a stream with its HEADERS (id taken and frame queued at once, so ids go out in
        order); the writer's batch number."""
        c = self.h2
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, headers, end_stream=end)
        self.streams[sid] = stream
        self.requests += 1
        stream.sid = sid
        return self.kick()

    async def send_data(self, stream: H2Upstream, data: bytes | memoryview, idle: float) -> None:
        """Send `data` on `stream` as its window allows, each frame waiting for the writer.
        Raises UpstreamError: 504 ``upstream_send_timeout`` after `idle` seconds without
        window or socket progress, or the stream's or connection's failure."""
        c = self.h2
        view = memoryview(data)
        while view:
            stream.check()
            window = c.local_flow_control_window(stream.sid)
            n = min(window, c.max_outbound_frame_size, len(view))
            if n <= 0:
                event = self._window
                with trio.move_on_after(idle) as cs:
                    await event.wait()
                if cs.cancelled_caught:
                    raise _send_timeout(idle)
                continue
            c.send_data(stream.sid, bytes(view[:n]))
            view = view[n:]
            await self.wait_written(self.kick(), idle)

    def end_stream(self, stream: H2Upstream, trailers: list[tuple[bytes, bytes]]) -> int:
        stream.check()
        if trailers:
            self.h2.send_headers(stream.sid, trailers, end_stream=True)
        else:
            self.h2.end_stream(stream.sid)
        stream.local_ended = True
        return self.kick()

    def acknowledge(self, stream: H2Upstream, size: int) -> None:
        """`size` bytes of `stream`'s DATA were consumed: reopen the windows by as much."""
        if size and self.dead is None:
            self.h2.acknowledge_received_data(size, stream.sid)
            self.kick()

    def finish(self, stream: H2Upstream) -> None:
        """A slot is given back: its stream is reset if still open, unconsumed DATA is
        acknowledged (the connection window), and the pool hears of the room."""
        if not stream.held:
            return
        stream.held = False
        sid = stream.sid
        known = sid is not None and self.streams.pop(sid, None) is not None
        if known and self.dead is None:
            owed = sum(f for _d, f in stream.chunks)
            stream.chunks.clear()
            c = self.h2
            try:
                if owed:
                    c.acknowledge_received_data(owed, sid)
                if not stream.closed_both:
                    c.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            except h2.exceptions.H2Error:
                pass  # the stream closed in the meantime
            self.kick()
        self.active -= 1
        self.idle_since = trio.current_time()
        self.on_change(self)

    def close(self) -> None:
        """GOAWAY if the socket takes it now, then close (the connection task ends)."""
        self.goaway = True
        if not self.closed and self.dead is None:
            try:
                self.h2.close_connection()
                self.transport.send_some(self.h2.data_to_send())
            except (OSError, h2.exceptions.H2Error):
                pass
        self.transport.close()
        self.closed = True


def _send_timeout(idle: float) -> UpstreamError:
    return UpstreamError(
        f"upstream stopped reading the request for {idle:g}s (upstream_send_idle)",
        status=504,
        reason="upstream_send_timeout",
    )


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
                self.fail(UpstreamError(f"upstream reset the stream ({code})",
                                        reason="upstream_reset"))
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
                    response = await self._exchange_once(out, sent, timeouts, deadline, interim,
                                                         on_done)
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
                        raise UpstreamError(f"{e.detail} ({tries} times)",
                                            reason="upstream_reset") from None
                    log.debug("%s: %s; sent again on another stream", self.endpoint.authority,
                              e.detail)
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
            await conn.wait_written(
                conn.end_stream(self, sent.trailers()), send_idle
            )
            head_limit[0] = min(deadline, trio.current_time() + timeouts.upstream_header)
            return await self._response(out, timeouts, deadline, interim, on_done, head_limit)
        # The rest streams from the client while the head is awaited: an upstream that
        # answers early (413, 401) is heard. Outcomes are collected and raised after the
        # nursery closes, so that none leaves wrapped in an ExceptionGroup.
        head_limit[0] = deadline
        pump_error: ClientError | UpstreamError | None = None

        async def pump() -> None:
            nonlocal pump_error
            try:
                for c in chunks:
                    await conn.send_data(self, c, send_idle)
                body = out.body
                while chunk := await body.receive():
                    sent.streamed = True
                    await conn.send_data(self, chunk, send_idle)
                await conn.wait_written(conn.end_stream(self, sent.trailers()), send_idle)
            except (ClientError, UpstreamError) as e:
                pump_error = e
                if isinstance(e, ClientError) or e.reason == "upstream_send_timeout":
                    self.fail(_PumpFailed())  # no answer is awaited any more
                self.event.set()
                return
            head_limit[0] = min(deadline, trio.current_time() + timeouts.upstream_header)
            self.event.set()

        response: Response | None = None
        error: ProxyError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            try:
                response = await self._response(out, timeouts, deadline, interim, on_done,
                                                head_limit, pumping=True)
            except ProxyError as e:
                error = e
            nursery.cancel_scope.cancel()
        if response is not None:
            if not self.local_ended:
                out.close_client = True  # answered before the whole body was taken
            return response
        if isinstance(error, _PumpFailed):
            assert pump_error is not None
            raise pump_error
        assert error is not None
        raise error

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
                    raise UpstreamError("request_total exceeded", status=504,
                                        reason="request_timeout")
                if now >= head_limit[0]:
                    raise UpstreamError("upstream too slow (upstream_header_timeout)",
                                        status=504, reason="upstream_header_timeout")
                await self.wait(min(head_limit[0], deadline))
        finally:
            if watching:
                watch.unwatch_gone()  # type: ignore[union-attr]
        try:
            status, fields = response_head(self.head)
        except ValueError as e:
            raise UpstreamError(f"upstream sent a bad h2 response head: {e}",
                                reason="bad_response") from None
        if status == 101:
            raise UpstreamError("upstream answered 101 on an h2 stream", reason="bad_response")
        length = None
        for k, v in fields:
            if k == b"content-length":
                length = int(v)  # the h2 library checked it
                break
        has_body = out.method != b"HEAD" and status not in (204, 304)
        body = H2ResponseBody(self, on_done, timeouts.upstream_body_idle, deadline,
                              length if has_body else None)
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

    def __init__(self, stream: H2Upstream, on_done: OnDone, idle: float, deadline: float,
                 length: int | None) -> None:
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
                raise UpstreamError("request_total exceeded", status=504,
                                    reason="request_timeout")
            if self._deadline < now + self._idle:
                until, what = self._deadline, "request_timeout"
            else:
                until, what = now + self._idle, "upstream_body_timeout"
            if not await s.wait(until) and not s.chunks and not s.ended:
                self._finish(False)
                raise UpstreamError(f"upstream too slow ({what})", status=504, reason=what)

    async def aclose(self) -> None:
        self._finish(False)
