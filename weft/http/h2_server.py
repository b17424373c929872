"""The HTTP/2 server side: one `H2Server` per client connection, the `h2` library doing the
framing and HPACK, one task per stream (`weft.http.h2_stream`).

The dispatcher (`weft.http.dispatch`) hands a connection here when TLS negotiated ``h2`` by ALPN
or when a cleartext client opened with the HTTP/2 preface (prior knowledge, h2c); the preface is
still unread then, and h2 checks it.

**Tasks.** One reader per connection, one writer per connection, one task per stream, and no
task per frame (hypercorn's shape):

* the *reader* reads into the worker's `SCRATCH`, feeds h2, and turns its events into stream
  state (`H2Stream.on_data`, ``on_end``, ``on_reset``) and wake-ups; it never awaits anything
  but the socket, so a slow stream never delays the frames of the others;
* a *stream task* (`serve_stream`) builds the `Request`, runs the App and writes the response;
* the *writer* owns the socket's send side. Everyone else only calls h2 and `flush`, which
  queues the bytes for the writer, in order, and wakes it; the writer runs after the tasks
  runnable at that moment, so what every stream answered in one scheduler batch goes out in
  one send (batching, the way nginx writes a connection's frames once per event loop turn,
  rather than one syscall per stream). Whoever is
  about to produce DATA first waits while more than `HIGH_WATER` bytes are queued
  (`wait_space`), and the reader stops reading while that is so: a client that does not read
  stops being read (its PINGs and SETTINGS would otherwise queue answers without end), and a
  write that makes no progress for ``timeouts.client_send_idle`` ends the connection.

**Timeouts.** Before the first stream a client has ``client_header`` to start one (the preface
counts as the start of a request head, as nginx treats it); between streams,
``client_keepalive``; while a stream is open, the stream's own timeouts apply (body idle, send
idle) and the connection has none. A connection that ends idle gets GOAWAY NO_ERROR.

**Drain** (`on_drain`; reload and stop): the two-step GOAWAY of RFC 9113 §6.8, as nghttp2 and
nginx do it. First a GOAWAY with the largest stream id and a PING: streams the client sent
before it read that are still served. When the PING's ACK comes back (or after
``timeouts.drain_idle``), a GOAWAY with the last stream id really taken. In-flight streams
finish; then the connection closes. No stream the client sent is refused, which is what makes
a reload lose nothing. The GOAWAY frames are made with hyperframe, not with h2's
``close_connection``: that moves h2 to its CLOSED state, in which the in-flight streams could
no longer send or receive a byte.

**Abuse** (the rates and the CONTINUATION bound are in `weft.http.h2_guard`, with their
sources): a client past a bound gets GOAWAY ENHANCE_YOUR_CALM and the connection closes;
protocol errors get h2's GOAWAY with its error code. Besides those:

* rapid reset (CVE-2023-44487): a reset stream's task is cancelled, which abandons its upstream
  exchange; resets are rate-limited; and a new stream is refused (REFUSED_STREAM, counted as a
  reset) while ``max_concurrent_streams`` stream *tasks* still run, because a reset frees h2's
  stream slot before the task under it has stopped;
* HPACK: the client may allow our encoder a table of any size; weft's encoder keeps none
  (`weft.http.h2_hpack`: static table and memoized literals, as nginx encodes), so no client
  makes a worker keep megabytes of our own response headers. The decoder's list limit (h2's)
  is twice the advertised ``max_header_list_size``: past that, ENHANCE_YOUR_CALM; between the
  two, the stream's 431.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import trio
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    PingReceived,
    PriorityUpdated,
    RemoteSettingsChanged,
    RequestReceived,
    SettingsAcknowledged,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import DenialOfServiceError, ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from weft.http.h2_guard import BoundedFrameBuffer, FloodGuard
from weft.http.h2_hpack import StaticEncoder
from weft.http.h2_stream import H2Stream, serve_stream, trailer_fields
from weft.http.h2_stream import StreamReset as StreamGone
from weft.http.io import SCRATCH

if TYPE_CHECKING:
    from weft.http.messages import HeaderList, Request, Response
    from weft.http.transport import TCPTransport
    from weft.workers.state import ServerState

log = logging.getLogger("weft.h2")

# Bytes queued for the socket past which producers wait and the reader stops reading.
HIGH_WATER = 256 * 1024
# The connection-level receive window: every stream's window fits in it (see h2_stream).
MAX_WINDOW = 2**31 - 1
# How long the last bytes (a GOAWAY) may take to go out before the close, and how long the
# close lingers reading, so the client reads them instead of a reset.
CLOSE_FLUSH_SECONDS = 1.0
LINGER_SECONDS = 1.0
_DRAIN_PING = b"weftdrn\x00"


class H2Server:
    """Serves one HTTP/2 client connection until it closes, fails, or the worker drains."""

    def __init__(
        self, transport: TCPTransport, state: ServerState, client: tuple[str, int]
    ) -> None:
        self.transport = transport
        self.state = state
        self.client = client
        cfg = state.config
        self.limits = cfg.limits
        self.timeouts = cfg.timeouts
        self.body_idle = cfg.timeouts.client_body_idle
        self.send_idle = cfg.timeouts.client_send_idle
        self.rid_header = cfg.request_id_header.encode()
        h2lim = cfg.limits.h2
        self.max_streams = h2lim.max_concurrent_streams
        self.hard_header_list = 2 * h2lim.max_header_list_size
        conn = self.conn = H2Connection(
            H2Configuration(
                client_side=False,
                header_encoding=None,
                validate_inbound_headers=True,
                # h2's normalizing only joins split cookies, which build_request does.
                normalize_inbound_headers=False,
                # Response fields are lowercase and checked (`fields_valid`, `response_fields`).
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        conn.incoming_buffer = BoundedFrameBuffer(h2lim.max_header_list_size)
        conn.encoder = StaticEncoder()  # type: ignore[assignment]
        conn.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: h2lim.max_header_list_size,
                SettingCodes.INITIAL_WINDOW_SIZE: h2lim.initial_window_size,
            },
        )
        conn.decoder.max_header_list_size = self.hard_header_list
        conn.initiate_connection()
        window = min(MAX_WINDOW, self.max_streams * h2lim.initial_window_size)
        if window > 65535:
            conn.increment_flow_control_window(window - 65535)
        self.streams: dict[int, H2Stream] = {}
        self.window_waiters: set[H2Stream] = set()
        self.guard = FloodGuard(trio.current_time())
        self._out = bytearray()
        self._writing = False
        self._out_event: trio.Event | None = None
        self._space = trio.lowlevel.ParkingLot()
        self._nursery: trio.Nursery | None = None  # the streams' tasks
        self._outer: trio.Nursery | None = None  # the writer's and the drain timer's
        # The reader runs under this scope; its deadline is the connection's idle timeout.
        self._read_scope = trio.CancelScope(
            deadline=trio.current_time() + cfg.timeouts.client_header
        )
        self._closing = False  # the connection is ending: no more streams, no more reads
        self._drain_step = 0  # 1: first GOAWAY and PING sent; 2: final GOAWAY sent
        self._last_id = 0  # the last stream taken, once the final GOAWAY is out
        self._peer_goaway = False
        self._error: str | None = None  # why the connection is being closed, for the log

    # -- the connection ----------------------------------------------------------------------

    async def serve(self) -> None:
        """Serve the connection until it ends. Closes the transport; never raises."""
        state = self.state
        try:
            async with trio.open_nursery() as outer:
                self._outer = outer
                outer.start_soon(self._write_loop)
                async with trio.open_nursery() as streams:
                    self._nursery = streams
                    self.flush()  # our SETTINGS
                    state.register(self)  # may call on_drain at once
                    with self._read_scope:
                        await self._read_loop()
                    if self._read_scope.cancelled_caught and not self._closing:
                        # Idle for its whole timeout: say so before closing.
                        self._goaway(ErrorCodes.NO_ERROR, self.conn.highest_inbound_stream_id)
                    self._closing = True
                    for stream in list(self.streams.values()):
                        stream.on_reset()
                    self.flush()
                with trio.move_on_after(CLOSE_FLUSH_SECONDS):
                    await self._flushed()
                outer.cancel_scope.cancel()
            await self._linger()
        except Exception:
            log.exception("h2 connection from %s:%d failed", *self.client)
        finally:
            state.unregister(self)
            for stream in list(self.streams.values()):
                stream.on_reset()
            self.transport.close()
        if self._error is not None:
            log.info("h2 connection from %s:%d closed: %s", *self.client, self._error)

    async def _read_loop(self) -> None:
        """Read and handle frames until EOF, a broken connection, a fatal frame, or the end
        of a drain; the idle deadline cancels it from outside."""
        transport = self.transport
        conn = self.conn
        timers = self.state.timers
        while not self._closing:
            if len(self._out) > HIGH_WATER:
                await self._wait_below(HIGH_WATER)
            try:
                n = await transport.recv_into(SCRATCH, math.inf, timers)
            except (OSError, trio.ClosedResourceError, TimeoutError):
                return
            if not n:
                return
            try:
                events = conn.receive_data(SCRATCH[:n])  # copied by h2 before any await
            except DenialOfServiceError as e:
                self._error = f"ENHANCE_YOUR_CALM: {e}"
                self.flush()
                return
            except ProtocolError as e:
                self._error = f"protocol error: {e}"
                self.flush()
                return
            self._handle(events)
            self.flush()

    def _handle(self, events: list) -> None:
        now = trio.current_time()
        guard = self.guard
        attached = None
        for ev in events:
            t = type(ev)
            if t is DataReceived:
                stream = self.streams.get(ev.stream_id)
                if not ev.data and not ev.stream_ended and not guard.allow("empty_data", now):
                    return self._calm()
                if stream is not None:
                    stream.on_data(ev.data, ev.flow_controlled_length)
                else:
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif t is RequestReceived:
                if ev.priority_updated is not None:
                    attached = attached or set()
                    attached.add(id(ev.priority_updated))
                self._new_stream(ev.stream_id, ev.headers)
            elif t is StreamEnded:
                stream = self.streams.get(ev.stream_id)
                if stream is not None:
                    stream.on_end()
            elif t is WindowUpdated:
                if ev.stream_id:
                    stream = self.streams.get(ev.stream_id)
                    if stream is not None:
                        stream.wake_window()
                else:
                    for stream in list(self.window_waiters):
                        stream.wake_window()
            elif t is StreamReset:
                stream = self.streams.get(ev.stream_id)
                if stream is not None:
                    stream.on_reset()
                if not guard.allow("reset", now):
                    return self._calm()
            elif t is TrailersReceived:
                stream = self.streams.get(ev.stream_id)
                if stream is not None:
                    stream.on_end(trailer_fields(list(ev.headers)))
            elif t is PingReceived:
                if not guard.allow("ping", now):
                    return self._calm()
            elif t is PingAckReceived:
                if ev.ping_data == _DRAIN_PING and self._drain_step == 1:
                    self._final_goaway()
            elif t is RemoteSettingsChanged:
                if not guard.allow("settings", now):
                    return self._calm()
                if SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
                    for stream in list(self.window_waiters):
                        stream.wake_window()
            elif t is SettingsAcknowledged:
                # h2 sets its decoder's limit to the advertised size on each ACK: keep ours.
                self.conn.decoder.max_header_list_size = self.hard_header_list
            elif t is PriorityUpdated:
                if (attached is None or id(ev) not in attached) and not guard.allow(
                    "priority", now
                ):
                    return self._calm()
            elif t is ConnectionTerminated:
                # The client goes away: what is in flight finishes, then the connection ends.
                self._peer_goaway = True
                self._maybe_end()
        return None

    def _new_stream(self, stream_id: int, head: HeaderList) -> None:
        if self._drain_step >= 2 and stream_id > self._last_id:
            # After the final GOAWAY (RFC 9113 §6.8): not processed, the client may retry it.
            self._refuse(stream_id)
            return
        if len(self.streams) >= self.max_streams:
            # h2 freed the slot of a reset stream whose task still runs (rapid reset).
            self._refuse(stream_id)
            if not self.guard.allow("reset", trio.current_time()):
                self._calm()
            return
        stream = H2Stream(self, stream_id, list(head))
        self.streams[stream_id] = stream
        if self._read_scope.deadline != math.inf:  # setting it costs even when unchanged
            self._read_scope.deadline = math.inf
        assert self._nursery is not None
        self._nursery.start_soon(serve_stream, self, stream)

    def _refuse(self, stream_id: int) -> None:
        try:
            self.conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
        except ProtocolError:
            pass  # the client reset it already, in the same read

    def stream_done(self, stream: H2Stream) -> None:
        """A stream's task ended: give back the connection credit of the body it never took,
        and end the connection if it was the last one of a drain or of a GOAWAY."""
        self.streams.pop(stream.id, None)
        self.window_waiters.discard(stream)
        left = stream.leftover()
        if left and not self._closing:
            try:
                self.conn.acknowledge_received_data(left, stream.id)
            except ProtocolError:
                pass
            self.flush()
        if not self.streams:
            self._idle()

    def _idle(self) -> None:
        """No stream is open: the idle deadline runs again (or the drain ends)."""
        if self._maybe_end():
            return
        now = trio.current_time()
        if self.state.draining:
            self._read_scope.deadline = now + self.timeouts.drain_idle
        else:
            self._read_scope.deadline = now + self.timeouts.client_keepalive

    def _maybe_end(self) -> bool:
        if self.streams:
            return False
        if self._drain_step >= 2 or self._peer_goaway:
            self._closing = True
            self._read_scope.cancel()
            return True
        return False

    def _calm(self) -> None:
        """The client went past a flood bound: GOAWAY ENHANCE_YOUR_CALM and close."""
        self._error = f"ENHANCE_YOUR_CALM: {self.guard.tripped} flood"
        self._fatal(ErrorCodes.ENHANCE_YOUR_CALM)

    def stalled(self) -> None:
        """A stream waited ``client_send_idle`` for connection-level credit: the client keeps
        the whole connection stalled."""
        self._error = "ENHANCE_YOUR_CALM: connection window closed for client_send_idle"
        self._fatal(ErrorCodes.ENHANCE_YOUR_CALM)

    def _fatal(self, code: ErrorCodes) -> None:
        if not self._closing:
            self._closing = True
            self._goaway(code, self.conn.highest_inbound_stream_id)
            self.flush()
            self._read_scope.cancel()

    def _goaway(self, code: ErrorCodes, last_stream_id: int) -> None:
        """A GOAWAY frame made without h2's ``close_connection`` (see the module docstring)."""
        self.flush()
        frame = GoAwayFrame(0, last_stream_id=last_stream_id, error_code=code)
        self._queue(frame.serialize())

    # -- drain -------------------------------------------------------------------------------

    def on_drain(self) -> None:
        """The worker drains (`ServerState.drain`): the first GOAWAY and a PING now, the final
        GOAWAY at its ACK or after ``drain_idle``; the connection ends when no stream is left
        (see the module docstring)."""
        if self._drain_step or self._closing:
            return
        self._drain_step = 1
        self._goaway(ErrorCodes.NO_ERROR, 2**31 - 1)
        self.conn.ping(_DRAIN_PING)
        self.flush()
        assert self._outer is not None
        self._outer.start_soon(self._drain_deadline)

    async def _drain_deadline(self) -> None:
        await trio.sleep(self.timeouts.drain_idle)
        if self._drain_step == 1:
            self._final_goaway()

    def _final_goaway(self) -> None:
        self._drain_step = 2
        self._last_id = self.conn.highest_inbound_stream_id
        self._goaway(ErrorCodes.NO_ERROR, self._last_id)
        self.flush()
        self._maybe_end()

    # -- writing -----------------------------------------------------------------------------

    def flush(self) -> None:
        """Queue what h2 has to send, for the writer."""
        data = self.conn.data_to_send()
        if data:
            self._queue(data)

    def _queue(self, data: bytes) -> None:
        """Append to the writer's buffer and wake it. The writer runs after the tasks that
        are runnable now, so the frames of every stream that answered in this scheduler
        batch go out in one send: per-stream sends cost a syscall each (12 % of a worker's
        CPU with h2load -m10, 1 KiB bodies)."""
        self._out += data
        ev = self._out_event
        if ev is not None:
            self._out_event = None
            ev.set()

    def _broken(self) -> None:
        self._closing = True
        self._out.clear()
        self._read_scope.cancel()
        self._space.unpark_all()

    async def _write_loop(self) -> None:
        transport = self.transport
        while True:
            while not self._out:
                ev = self._out_event = trio.Event()
                await ev.wait()
            data, self._out = self._out, bytearray()
            self._writing = True
            try:
                await transport.send_all(data, self.send_idle)
            except TimeoutError:
                self._error = "client stopped reading (client_send_idle)"
                self._broken()
                return
            except (OSError, trio.ClosedResourceError):
                self._broken()
                return
            finally:
                self._writing = False
                self._space.unpark_all()

    async def wait_space(self) -> None:
        """Wait while more than `HIGH_WATER` bytes wait for the socket."""
        if len(self._out) > HIGH_WATER:
            self.flush()
            await self._wait_below(HIGH_WATER)

    async def _wait_below(self, level: int) -> None:
        while len(self._out) > level and not self._closing:
            await self._space.park()

    async def _flushed(self) -> None:
        while self._out or self._writing:
            await self._space.park()

    async def _linger(self) -> None:
        """Shut our side and read what the client still sends, briefly, so that it reads our
        last frames (a GOAWAY) rather than a reset."""
        transport = self.transport
        if transport.closed:
            return
        try:
            transport.shutdown_write()
        except OSError:
            return
        with trio.move_on_after(LINGER_SECONDS):
            try:
                while await transport.recv_into(SCRATCH, math.inf, self.state.timers):
                    pass
            except (OSError, trio.ClosedResourceError, TimeoutError):
                pass

    # -- what the streams call ---------------------------------------------------------------

    async def send_headers(
        self, stream: H2Stream, fields: HeaderList, *, end: bool, flush: bool = True
    ) -> None:
        """A HEADERS frame on `stream` (its response head, or trailers with `end`)."""
        await self.wait_space()
        if stream.reset or self._closing:
            raise StreamGone("the stream or its connection ended")
        self.conn.send_headers(stream.id, fields, end_stream=end)
        stream.responded = True
        if flush:
            self.flush()

    def send_small(self, stream: H2Stream, fields: HeaderList, data: bytes | memoryview) -> bool:
        """HEADERS and one DATA frame with END_STREAM on `stream`, at once, if the client's
        windows, the frame size and the write buffer all take `data` now; False (nothing
        sent) otherwise, and the caller goes the way that waits (`send_headers`,
        `H2Stream.send_body`). Raises StreamGone if the stream or the connection ended."""
        if stream.reset or self._closing:
            raise StreamGone("the stream or its connection ended")
        conn = self.conn
        n = len(data)
        if (
            len(self._out) > HIGH_WATER
            or n > conn.max_outbound_frame_size
            or n > conn.local_flow_control_window(stream.id)
        ):
            return False
        conn.send_headers(stream.id, fields)
        stream.responded = True
        conn.send_data(stream.id, data, end_stream=True)
        self.flush()
        return True

    async def send_interim(self, stream: H2Stream, status: int, fields: HeaderList) -> None:
        """A 1xx response on `stream` (``100 Continue``, or a relayed 103)."""
        if stream.reset or stream.responded or self._closing:
            return
        self.conn.send_headers(stream.id, [(b":status", b"%d" % status), *fields])
        self.flush()

    def reset_stream(self, stream: H2Stream, code: ErrorCodes, *, for_cause: bool = True) -> None:
        """RST_STREAM on `stream` unless it is closed already. A reset weft makes for the
        client's fault counts against its reset rate (the rapid-reset variant that makes the
        server reset streams)."""
        if stream.reset or self._closing:
            return
        try:
            self.conn.reset_stream(stream.id, code)
        except ProtocolError:
            return  # closed on both sides already
        stream.reset = True
        self.flush()
        if (
            for_cause
            and code != ErrorCodes.INTERNAL_ERROR
            and not self.guard.allow("reset", trio.current_time())
        ):
            self._calm()

    def log_exchange(
        self, request: Request | None, response: Response, error: str | None, start: float
    ) -> None:
        hook = self.state.on_exchange
        if hook is not None:
            try:
                hook(request, response, error, self.client, trio.current_time() - start)
            except Exception:
                log.exception("access log hook failed")
