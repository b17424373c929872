"""A blocking HTTP/2 client on the `h2` library for the e2e tests: well-behaved by default, and
able to misbehave on purpose (raw frames, a window never opened, floods).

Every wait has a deadline (`H2Client.timeout`) and raises TimeoutError, so a test that expects
an answer never hangs. The client speaks h2c with prior knowledge, as ``curl
--http2-prior-knowledge`` does.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings


@dataclass
class H2Response:
    stream_id: int
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    ended: bool = False
    reset: int | None = None  # the RST_STREAM error code, when the server reset the stream

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class Closed(Exception):
    """The server closed the connection; `goaway` holds its GOAWAY (error code, last id)."""


class H2Client:
    """One h2c connection. `request` sends a whole request and waits for its response; the
    lower-level methods (`start`, `pump`, `send_raw`) let a test interleave streams."""

    def __init__(self, port: int, host: str = "127.0.0.1", *, timeout: float = 10.0,
                 settings: dict[int, int] | None = None, auto_ack: bool = True) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config)
        if settings:
            self.conn.local_settings = h2.settings.Settings(client=True, initial_values=settings)
        self.conn.initiate_connection()
        self.auto_ack = auto_ack  # give received DATA's credit back at once
        self.responses: dict[int, H2Response] = {}
        self.goaway: tuple[int, int] | None = None  # (error code, last stream id)
        self.pings_acked = 0
        self.closed = False
        self.authority = f"{host}:{port}".encode()
        self._frames = bytearray()  # received bytes not yet a whole frame (_take_goaway)
        self.flush()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        """Bytes past h2's state machine (a flood, a frame h2 would not send)."""
        self.sock.sendall(data)

    def start(self, method: str, path: str, *, headers: list[tuple[bytes, bytes]] = (),
              body: bytes | None = None, trailers: list[tuple[bytes, bytes]] | None = None,
              end: bool = True) -> int:
        """Open a stream; `end` False leaves the request body open (`send_body` goes on)."""
        sid = self.conn.get_next_available_stream_id()
        head = [(b":method", method.encode()), (b":scheme", b"http"),
                (b":authority", self.authority), (b":path", path.encode()), *headers]
        no_body = not body and not trailers
        self.conn.send_headers(sid, head, end_stream=no_body and end)
        self.responses[sid] = H2Response(sid)
        if body:
            self.send_body(sid, body, end=end and not trailers)
        if trailers:
            self.conn.send_headers(sid, trailers, end_stream=True)
        self.flush()
        return sid

    def send_body(self, sid: int, data: bytes, *, end: bool = False) -> None:
        """Send `data`, waiting for window as the server gives it."""
        view = memoryview(data)
        while view:
            window = self.conn.local_flow_control_window(sid)
            if window <= 0:
                self.pump(until=lambda: self.conn.local_flow_control_window(sid) > 0)
                continue
            n = min(window, len(view), self.conn.max_outbound_frame_size)
            self.conn.send_data(sid, view[:n].tobytes())
            view = view[n:]
            self.flush()
        if end:
            self.conn.end_stream(sid)
            self.flush()

    def pump(self, until=None, timeout: float | None = None) -> None:  # type: ignore[no-untyped-def]
        """Read and handle frames until `until()` holds; TimeoutError past the deadline,
        Closed when the server closes first."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while until is None or not until():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer in time")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError("no answer in time") from None
            except ConnectionError:
                data = b""
            if not data:
                self.closed = True
                raise Closed(f"server closed the connection (goaway={self.goaway})")
            self.handle(self.conn.receive_data(self._take_goaway(data)))
            try:
                self.flush()
            except OSError:
                pass  # the server is closing: what it sent is still read, up to its EOF
            if until is None:
                return

    def _take_goaway(self, data: bytes) -> bytes:
        """`data` without its GOAWAY frames, which are recorded in `goaway`.

        The h2 library moves a client to CLOSED at a GOAWAY, after which it refuses the frames
        of streams still in flight (which RFC 9113 §6.8 says are answered). Real clients
        (nghttp2's curl and h2load) do read them; so does this one, by keeping GOAWAY from h2.
        """
        self._frames += data
        out = bytearray()
        buf = self._frames
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            frame, buf = bytes(buf[: 9 + length]), buf[9 + length :]
            if frame[3] == 0x7:
                self.goaway = (int.from_bytes(frame[13:17], "big"),
                               int.from_bytes(frame[9:13], "big") & 0x7FFFFFFF)
            else:
                out += frame
        self._frames = bytearray(buf)
        return bytes(out)

    def handle(self, events: list[h2.events.Event]) -> None:
        for ev in events:
            r = self.responses.get(getattr(ev, "stream_id", 0) or 0)
            if isinstance(ev, h2.events.ResponseReceived):
                assert r is not None
                r.headers = [(k, v) for k, v in ev.headers]
                r.status = int(r.header(b":status") or 0)
            elif isinstance(ev, h2.events.DataReceived):
                if r is not None:
                    r.body += ev.data
                if self.auto_ack:
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived):
                assert r is not None
                r.trailers = [(k, v) for k, v in ev.headers]
            elif isinstance(ev, h2.events.StreamEnded):
                if r is not None:
                    r.ended = True
            elif isinstance(ev, h2.events.StreamReset):
                if r is not None:
                    r.reset = ev.error_code
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = (ev.error_code, ev.last_stream_id)
            elif isinstance(ev, h2.events.PingAckReceived):
                self.pings_acked += 1

    def wait(self, sid: int, timeout: float | None = None) -> H2Response:
        r = self.responses[sid]
        self.pump(until=lambda: r.ended or r.reset is not None, timeout=timeout)
        return r

    def request(self, method: str, path: str, **kwargs) -> H2Response:  # type: ignore[no-untyped-def]
        return self.wait(self.start(method, path, **kwargs))

    def wait_closed(self, timeout: float | None = None) -> tuple[int, int] | None:
        """Read until the server closes; its GOAWAY (error code, last id), if it sent one."""
        try:
            self.pump(until=lambda: False, timeout=timeout)
        except Closed:
            pass
        return self.goaway
