"""One gRPC call over its own HTTP/2 connection, on trio: what the Workload API client needs.

gRPC over HTTP/2 (grpc/grpc ``doc/PROTOCOL-HTTP2.md``) is a POST with ``content-type:
application/grpc`` and ``te: trailers``; each message in either direction is a 5-byte prefix
(a compressed flag, then a big-endian 32-bit length) and the protobuf bytes; the outcome is
``grpc-status`` (and a percent-encoded ``grpc-message``) in the trailers, or in the response
headers alone when the server fails the call before any message ("Trailers-Only"). This
module does exactly that with the ``h2`` library weft already uses, and nothing more: no
compression (weft offers none, so a compressed message is a protocol error), no
client-streaming, no retries (the caller's policy, `weft.workload_api`).

Theory of operation:

* **A connection per call.** `open_call` connects (unix socket or TCP), sends the preface,
  its SETTINGS, the request headers and the one request message in one write, and gives the
  call to the caller; leaving the ``async with`` closes the socket, whatever happened. The
  Workload API client makes two long-lived calls (the X.509 and JWT-bundle watches) and a few
  short ones, so a connection per call costs one local connect each and spares weft the
  shared-connection machinery of `weft.http.h2_conn` (which is built around upstream pools,
  `UpstreamError` and many streams per connection): a dead stream is a dead connection, and
  a reconnect is a new call.
* **No task of its own.** `GrpcCall.receive` reads the socket only when the caller wants the
  next message, so nothing runs between calls and cancellation is plain trio: a cancelled
  receive leaves the h2 state consistent (h2 is fed whole reads only), and the socket is
  closed by the ``async with``.
* **Flow control as backpressure.** Received DATA is acknowledged only when the caller needs
  more bytes than are buffered, so the agent cannot push more than the stream window plus one
  message ahead of the reader. A message longer than `max_message` fails the call with
  RESOURCE_EXHAUSTED (gRPC's default receive limit is 4 MiB).

Errors: every failure of the call is a `GrpcError` with a gRPC status code: the server's own
status, or one derived as gRPC's clients derive it (an HTTP status without ``grpc-status``, a
RST_STREAM code, a connection that closed or could not be opened is UNAVAILABLE).
"""

from __future__ import annotations

import enum
import math
import struct
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import trio

from weft.http.h2_conn import survive_goaway

__all__ = ["MAX_MESSAGE", "GrpcCall", "GrpcError", "Status", "open_call"]

READ_SIZE = 64 * 1024
MAX_MESSAGE = 4 << 20  # grpc's default max receive message size
_PREFIX = struct.Struct(">BI")


class Status(enum.IntEnum):
    """gRPC status codes (grpc/grpc ``doc/statuscodes.md``)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# HTTP status -> gRPC code when a response has no grpc-status (doc/http-grpc-status-mapping.md).
_HTTP_TO_GRPC = {
    400: Status.INTERNAL,
    401: Status.UNAUTHENTICATED,
    403: Status.PERMISSION_DENIED,
    404: Status.UNIMPLEMENTED,
    429: Status.UNAVAILABLE,
    502: Status.UNAVAILABLE,
    503: Status.UNAVAILABLE,
    504: Status.UNAVAILABLE,
}
# RST_STREAM error code -> gRPC code (doc/PROTOCOL-HTTP2.md, "Errors"); others are INTERNAL.
_RESET_TO_GRPC = {
    h2.errors.ErrorCodes.REFUSED_STREAM: Status.UNAVAILABLE,
    h2.errors.ErrorCodes.CANCEL: Status.CANCELLED,
    h2.errors.ErrorCodes.ENHANCE_YOUR_CALM: Status.RESOURCE_EXHAUSTED,
    h2.errors.ErrorCodes.INADEQUATE_SECURITY: Status.PERMISSION_DENIED,
}


class GrpcError(Exception):
    """A call ended with a status other than OK."""

    def __init__(self, code: Status, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def frame(message: bytes) -> bytes:
    """A message with its gRPC length prefix (uncompressed)."""
    return _PREFIX.pack(0, len(message)) + message


class GrpcCall:
    """A server-streaming or unary call on one h2 connection: `receive` until None.

    Made by `open_call`; the caller never touches the stream directly.
    """

    def __init__(self, stream: trio.abc.Stream, peer: str, *, max_message: int) -> None:
        self._stream = stream
        self.peer = peer  # for messages: "unix:///run/spire/agent.sock"
        self.max_message = max_message
        self._h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        # A graceful GOAWAY (a server stopping) may be followed by this stream's messages and
        # trailers, and by PINGs: the h2 library would refuse them all (see weft.http.h2_conn).
        survive_goaway(self._h2)
        self._sid = 0
        self._buffer = bytearray()  # DATA received, not yet cut into messages
        self._owed = 0  # flow-controlled bytes received and not yet acknowledged
        self._messages: deque[bytes] = deque()
        self._headers_seen = False
        self._status: GrpcError | None = None  # the outcome, once known (OK included)
        self._ended = False

    async def start(self, path: str, request: bytes, metadata: dict[str, str]) -> None:
        """Send the preface, the call's headers and its one request message, half-closing the
        stream (the Workload API's calls are all unary requests). Raises GrpcError
        UNAVAILABLE if the connection breaks."""
        c = self._h2
        c.initiate_connection()
        self._sid = c.get_next_available_stream_id()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode("ascii")),
            (b":authority", b"localhost"),  # what grpc sends for a unix socket target
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"user-agent", b"weft"),
            *((k.encode("ascii"), v.encode("ascii")) for k, v in metadata.items()),
        ]
        c.send_headers(self._sid, headers)
        c.send_data(self._sid, frame(request), end_stream=True)
        await self._flush()

    async def receive(self) -> bytes | None:
        """The next response message; None once the call ended with OK. Raises GrpcError
        (the call's status, or why the connection failed)."""
        while True:
            if self._messages:
                return self._messages.popleft()
            if self._status is not None:
                if self._status.code == Status.OK:
                    return None
                raise self._status
            if self._owed:  # more bytes are needed: reopen the window for them
                self._h2.acknowledge_received_data(self._owed, self._sid)
                self._owed = 0
                await self._flush()
            await self._read()

    async def _read(self) -> None:
        try:
            data = await self._stream.receive_some(READ_SIZE)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._fail(Status.UNAVAILABLE, f"connection to {self.peer} broke: {e}")
            return
        if not data:
            self._fail(Status.UNAVAILABLE, f"{self.peer} closed the connection")
            return
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            self._fail(Status.INTERNAL, f"{self.peer} broke HTTP/2: {e}")
            return
        for ev in events:
            self._on_event(ev)
        await self._flush()  # SETTINGS and PING acknowledgements

    async def _flush(self) -> None:
        out = self._h2.data_to_send()
        if out:
            try:
                await self._stream.send_all(out)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                self._fail(Status.UNAVAILABLE, f"connection to {self.peer} broke: {e}")

    def _fail(self, code: Status, message: str) -> None:
        if self._status is None:
            self._status = GrpcError(code, message)

    def _on_event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.ResponseReceived):
            self._on_headers(dict(ev.headers or ()), trailers=False)
        elif isinstance(ev, h2.events.TrailersReceived):
            self._on_headers(dict(ev.headers or ()), trailers=True)
        elif isinstance(ev, h2.events.DataReceived):
            self._owed += ev.flow_controlled_length
            self._buffer += ev.data
            self._cut_messages()
        elif isinstance(ev, h2.events.StreamEnded):
            self._ended = True
            if self._buffer:
                self._fail(Status.INTERNAL, f"{self.peer} ended the stream inside a message")
            self._fail(Status.INTERNAL, f"{self.peer} ended the stream without a grpc-status")
        elif isinstance(ev, h2.events.StreamReset):
            code = _RESET_TO_GRPC.get(ev.error_code, Status.INTERNAL)
            name = getattr(ev.error_code, "name", ev.error_code)
            self._fail(code, f"{self.peer} reset the stream ({name})")
        elif isinstance(ev, h2.events.ConnectionTerminated):
            # Graceful and covering this stream: it may still finish; the server closes the
            # connection after it, which `_read` reports. Else the stream is lost now.
            last = ev.last_stream_id or 0
            if ev.error_code != h2.errors.ErrorCodes.NO_ERROR or last < self._sid:
                name = getattr(ev.error_code, "name", ev.error_code)
                self._fail(Status.UNAVAILABLE, f"{self.peer} closed the connection (GOAWAY {name})")

    def _on_headers(self, headers: dict[bytes, bytes], *, trailers: bool) -> None:
        if not trailers:
            self._headers_seen = True
            status = headers.get(b":status", b"")
            if status != b"200":
                code = _HTTP_TO_GRPC.get(int(status or 0), Status.UNKNOWN)
                self._fail(code, f"{self.peer} answered HTTP {status.decode('latin-1')}")
                return
            ctype = headers.get(b"content-type", b"")
            if not ctype.startswith(b"application/grpc"):
                self._fail(
                    Status.UNKNOWN,
                    f"{self.peer} answered content-type {ctype.decode('latin-1')!r}, not gRPC",
                )
                return
        raw = headers.get(b"grpc-status")
        if raw is None:
            if trailers:
                self._fail(Status.INTERNAL, f"{self.peer} sent trailers without grpc-status")
            return  # the response head; messages and trailers follow
        try:
            code = Status(int(raw))
        except ValueError:
            code = Status.UNKNOWN
        message = unquote(headers.get(b"grpc-message", b"").decode("latin-1"))
        if code == Status.OK and self._buffer:
            self._fail(Status.INTERNAL, f"{self.peer} ended the call inside a message")
        self._fail(code, message or code.name)

    def _cut_messages(self) -> None:
        buf = self._buffer
        while len(buf) >= _PREFIX.size:
            compressed, length = _PREFIX.unpack_from(buf)
            if length > self.max_message:
                self._fail(
                    Status.RESOURCE_EXHAUSTED,
                    f"{self.peer} sent a {length}-byte message (limit {self.max_message})",
                )
                buf.clear()
                return
            if compressed:
                self._fail(Status.INTERNAL, f"{self.peer} sent a compressed message unasked")
                buf.clear()
                return
            if len(buf) < _PREFIX.size + length:
                return
            self._messages.append(bytes(buf[_PREFIX.size : _PREFIX.size + length]))
            del buf[: _PREFIX.size + length]


async def _connect(kind: str, address: str | tuple[str, int]) -> trio.abc.Stream:
    if kind == "unix":
        assert isinstance(address, str)
        return await trio.open_unix_socket(address)
    assert isinstance(address, tuple)
    return await trio.open_tcp_stream(*address)


@asynccontextmanager
async def open_call(
    kind: str,
    address: str | tuple[str, int],
    path: str,
    request: bytes,
    *,
    peer: str,
    metadata: dict[str, str],
    connect_timeout: float = 5.0,
    max_message: int = MAX_MESSAGE,
) -> AsyncIterator[GrpcCall]:
    """Connect to `address` (a unix socket path when `kind` is ``"unix"``, else an (ip, port)
    pair), start the call to `path` with `request`, and yield it. The connection is closed on
    exit, on every path. Raises GrpcError UNAVAILABLE when the connection cannot be opened
    within `connect_timeout` seconds (the message names `peer` and the OS error)."""
    stream: trio.abc.Stream | None = None
    with trio.move_on_after(connect_timeout if connect_timeout > 0 else math.inf) as cs:
        try:
            stream = await _connect(kind, address)
        except OSError as e:
            raise GrpcError(
                Status.UNAVAILABLE, f"cannot connect to {peer}: {e.strerror or e}"
            ) from None
    if stream is None:
        assert cs.cancelled_caught
        raise GrpcError(
            Status.UNAVAILABLE, f"cannot connect to {peer}: no answer in {connect_timeout:g}s"
        )
    try:
        call = GrpcCall(stream, peer, max_message=max_message)
        await call.start(path, request, metadata)
        yield call
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()
