"""One HTTP/2 connection to an upstream endpoint, shared by many requests: `H2Connection`.

The pool (`weft.connection.EndpointPool`) opens it, runs its task, and hands out stream slots
on it (`weft.http.h2_client.H2Upstream`, one per exchange). The h2 library (python-hyper
``h2``) does all framing, HPACK and flow-control accounting; this module does the I/O around
it. The slots change the library's state synchronously and never touch the socket.

Theory of operation:

* **One task** (`H2Connection.run`, started in the pool's nursery) reads frames and
  dispatches the library's events to the streams they belong to (head, DATA, trailers, end,
  reset), and a writer beside it sends whatever the library has queued. Stream tasks never
  read the socket and never write it: they change the library's state and wake the writer
  (`kick`), so frames go out in the order they were made, and many frames made in one turn
  go out in one write.
* **Backpressure both ways.** A DATA frame received is kept on its stream until the response
  body's reader takes it, and only then is it acknowledged (`acknowledge`), which is what
  reopens the upstream's flow-control window: a slow client slows its stream's upstream, and
  the memory per stream is bounded by the window weft advertises (`STREAM_WINDOW`). A request
  body is sent only as far as the upstream's window allows (`send_data`), and each chunk waits
  for the writer to put it on the socket; a wait without progress past ``upstream_send_idle``
  is a 504 ``upstream_send_timeout`` (when the socket itself is stuck, the whole connection is
  failed: nothing more can go out on it).
* **GOAWAY**: the connection takes no new stream at once. Streams above the last-stream-id
  were not processed (RFC 9113 §6.8) and fail with `Unprocessed`, which the slot sends again
  elsewhere. A graceful GOAWAY (NO_ERROR) lets the streams at or below the last id finish; one
  with an error fails them (502). The h2 library moves its connection state machine to CLOSED
  on any GOAWAY received and would refuse the frames of the streams that may still finish;
  each connection gets its own transition table in which a received GOAWAY leaves it open
  (`survive_goaway`: the one reach into the library's internals here).
* **Death** (EOF, reset, a protocol error, a stuck writer) fails every stream on it with the
  same `UpstreamError` and tells the pool (`on_change`), which drops the connection.

Errors are the h1 client's `UpstreamError` reasons, so health, outlier detection, the breaker
and retries do not know the version: ``upstream_reset`` (connection closed or reset, a GOAWAY
with an error), ``bad_response`` (an h2 protocol error), ``upstream_send_timeout``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from weft.http.errors import UpstreamError
from weft.http.transport import Transport

if TYPE_CHECKING:
    from weft.http.h2_client import H2Upstream
    from weft.schema import Endpoint

log = logging.getLogger("weft.upstream")

READ_SIZE = 64 * 1024  # bytes per socket read
# The receive window weft advertises per stream: the most response bytes one stream holds
# before its reader consumes them (the memory bound per stream; 1 MiB keeps a 10 ms RTT link
# at ~100 MB/s per stream).
STREAM_WINDOW = 1 << 20
# The connection-level receive window: many streams' windows at once (16 streams full).
CONNECTION_WINDOW = 16 << 20


class Unprocessed(UpstreamError):
    """The upstream did not process the stream (RFC 9113 §8.7): safe to send again."""

    reason = "upstream_reset"


class SlotSource(Protocol):
    """Where a slot gets a new stream after an unprocessed one (`weft.connection`)."""

    async def move(self, slot: H2Upstream) -> None: ...


def _config() -> h2.config.H2Configuration:
    return h2.config.H2Configuration(client_side=True, header_encoding=None)


def survive_goaway(conn: h2.connection.H2Connection) -> None:
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
        survive_goaway(self.h2)
        self.max_streams = max_streams  # weft's own cap; the upstream's setting lowers it
        self.streams: dict[int, H2Upstream] = {}  # open streams by id
        self.active = 0  # slots handed out and not given back
        self.requests = 0  # streams ever started (for max_requests)
        self.idle_since = 0.0
        self.goaway = False  # takes no new stream (GOAWAY received, retiring, or dead)
        self.dead: UpstreamError | None = None
        self.closed = False
        self.on_change = on_change  # the pool: capacity or liveness changed
        # The pool's nursery, set by the pool: a stream's request body is pumped in a task
        # there, since a full-duplex one goes on after the exchange returned the response.
        self.nursery: trio.Nursery | None = None
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

    def reserve(self) -> None:
        """Count one more slot handed out (`weft.http.h2_client.take_slot` makes it)."""
        assert self.has_room()
        self.active += 1

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
                self._fail(
                    UpstreamError(
                        f"upstream connection broke while sending: {e}", reason="upstream_reset"
                    )
                )
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
                stream.fail(
                    Unprocessed(
                        f"upstream sent GOAWAY (last stream {last}) above "
                        f"stream {sid}: not processed"
                    )
                )
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

    def start_stream(
        self, stream: H2Upstream, headers: list[tuple[bytes, bytes]], end: bool
    ) -> int:
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
            if stream.reset:
                return  # reset without an error: the upstream answered and wants no more
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
        """End weft's side of `stream` (with `trailers`); the writer's batch number. A stream
        the upstream already reset without an error (it answered, RFC 9113 §8.1) is left as
        it is. Raises the stream's error."""
        stream.check()
        if stream.reset:
            stream.local_ended = True
            return self._written  # nothing to wait for
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
        stream.stop_pump()
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
