"""A real HTTP/1.1 upstream server for weft's end-to-end tests, which misbehaves on request.

Run it as a subprocess::

    python tests/support/upstream.py --port 0 --name NAME

It binds 127.0.0.1 (``--host`` to change), prints ``LISTENING <port>`` on stdout once it
accepts connections, and exits on SIGTERM (or when its parent dies: PR_SET_PDEATHSIG, so a
killed test run leaves no server behind).

Theory of operation: plain blocking sockets, h11 for the protocol, one daemon thread per
accepted TCP connection. Blocking code is the point: a handler can ``time.sleep`` to be slow,
write raw bytes to break framing, or close the socket mid-body, with nothing in between that
could "fix" the misbehaviour. Threads are cheap at test scale (tens of connections).

Counters (``/stats``) are kept under one lock. A connection whose first request is ``/stats``
is a *control* connection: it does not count in ``connections_accepted`` and its requests do
not count in ``requests``, so a test can read the counters without disturbing them.

Behaviour by path (query parameters in brackets; every response carries ``x-upstream: NAME``
and ``x-connection-id``, the number of the TCP connection it was sent on):

==================================  ==============================================================
``/echo`` [close=1]                 200 JSON describing the request (see ``_describe``)
``/fixed`` [size=N]                 N pattern bytes with Content-Length (HEAD: head only)
``/chunked`` [size=N, chunk=K]      N pattern bytes, chunked, K bytes per chunk
``/trailers``                       chunked body with a trailer field ``x-checksum``
``/sink``                           streams the request body; JSON {body_len, body_sha256}
``/source`` [size=N]                N pattern bytes with Content-Length, written 64 KiB at a time
``/slow`` [delay=S]                 sleeps S seconds, then answers like /echo
``/slowbody`` [delay=S, size=N]     head (Content-Length N), S seconds pause, then the body
``/dribble`` [n=N, interval=S]      chunked: N chunks, S seconds before each
``/close-mid``                      head with Content-Length 1000, 100 bytes, then close
``/close-before``                   reads the request, then closes without answering
``/bad-framing``                    raw response with both Content-Length and Transfer-Encoding
``/bad-response``                   garbage instead of a status line, then close
``/status`` [code=N]                status N (no body for 1xx-less 204/304; HEAD as usual)
``/ws``                             WebSocket echo after a 101 handshake (wsproto)
``/expect`` [reject=1]              100 Continue then JSON, or 417 without reading the body
``/stats``                          JSON counters (see module docstring)
``*`` (OPTIONS)                     200 with an Allow header
anything else                       404 with the JSON of /echo
==================================  ==============================================================

``?idle_close=S`` on any keep-alive request: the server closes the connection if no next request
arrives within S seconds (a keep-alive timeout, not announced in the response).
``?idle_408=S`` does the same, but first writes an unsolicited ``408 Request Timeout`` response
(as some servers do on their idle timeout).

A request that carries ``Expect: 100-continue`` gets ``100 Continue`` before its body is read,
on every path. ``Connection: close`` from the client (or ``?close=1``) closes after the
response; otherwise the connection is kept alive.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import h11

# 64 KiB: the write size of /source and of the pattern block (a typical socket buffer order).
BLOCK = 64 * 1024
_PATTERN = bytes(range(256)) * (BLOCK // 256)

# A head larger than h11's 16 KiB default must still reach the handlers: the proxy's limits are
# under test, not ours.
MAX_HEAD = 1024 * 1024

# RFC 6455 section 1.3.
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def pattern(size: int, offset: int = 0) -> bytes:
    """The bytes ``offset .. offset+size`` of the endless pattern /fixed, /chunked, /source serve.

    Tests import this to know what a body must be.
    """
    out = bytearray()
    pos = offset
    end = offset + size
    while pos < end:
        start = pos % BLOCK
        take = min(BLOCK - start, end - pos)
        out += _PATTERN[start : start + take]
        pos += take
    return bytes(out)


def pattern_sha256(size: int) -> str:
    h = hashlib.sha256()
    done = 0
    while done < size:
        take = min(BLOCK, size - done)
        h.update(_PATTERN[:take])
        done += take
    return h.hexdigest()


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.raw_accepted = 0
        self.control_connections = 0
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.open_connections = 0
        self.by_path: dict[str, int] = {}

    def snapshot(self) -> dict[str, object]:
        with self.lock:
            return {
                "connections_accepted": self.raw_accepted - self.control_connections,
                "requests": self.requests,
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "open_connections": self.open_connections,
                "by_path": dict(self.by_path),
            }


class Closed(Exception):
    """The peer closed, or a handler decided the connection is over."""


class Conn:
    """One accepted TCP connection: its socket, its h11 state machine, and helpers."""

    def __init__(self, server: Server, sock: socket.socket, connection_id: int) -> None:
        self.server = server
        self.sock = sock
        self.connection_id = connection_id
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.request_index = 0
        self.request: h11.Request | None = None
        self.control = False  # first request was /stats: not counted as a connection
        # ?idle_close=S on a request: after its response, close if no next request within S s
        # (a server-side keep-alive timeout, without announcing it in Connection: close).
        self.idle_close: float | None = None
        self.idle_408 = False  # ... and then send an unsolicited 408 before closing

    # -- plumbing ---------------------------------------------------------------------------

    def next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                between_requests = self.h11.their_state is h11.IDLE
                if self.idle_close is not None and between_requests:
                    self.sock.settimeout(self.idle_close)
                try:
                    data = self.sock.recv(BLOCK)
                except TimeoutError:
                    if self.idle_408:
                        with contextlib.suppress(OSError):
                            self.sock.sendall(
                                b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\n"
                                b"content-length: 0\r\n\r\n"
                            )
                    raise Closed("idle_close: no next request in time") from None
                except OSError:
                    data = b""
                finally:
                    if self.idle_close is not None and between_requests:
                        self.sock.settimeout(None)
                self.h11.receive_data(data)
                continue
            return event

    def send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    @property
    def is_head(self) -> bool:
        assert self.request is not None
        return self.request.method == b"HEAD"

    def body_chunks(self) -> Iterator[bytes]:
        """Yield the request body as it arrives (100 Continue first if the client waits)."""
        if self.h11.they_are_waiting_for_100_continue:
            self.send(h11.InformationalResponse(status_code=100, headers=[]))
        while True:
            event = self.next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            elif isinstance(event, h11.ConnectionClosed):
                raise Closed("client closed inside the request body")
            else:
                raise Closed(f"unexpected event in request body: {event!r}")

    def read_body(self) -> bytes:
        return b"".join(self.body_chunks())

    def respond(
        self,
        status: int,
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
        content_type: str = "text/plain",
    ) -> None:
        """A whole response with Content-Length (none for HEAD-less 204/304)."""
        hdrs = self.base_headers(headers)
        no_body = status in (204, 304) or 100 <= status < 200
        if not no_body:
            hdrs.append(("content-type", content_type))
            hdrs.append(("content-length", str(len(body))))
        self.send(h11.Response(status_code=status, headers=hdrs, reason=_reason(status)))
        if body and not no_body and not self.is_head:
            self.send(h11.Data(data=body))
        self.send(h11.EndOfMessage())

    def respond_json(self, obj: object, status: int = 200) -> None:
        body = json.dumps(obj).encode()
        self.respond(status, body, content_type="application/json")

    def base_headers(self, extra: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
        hdrs = [("x-upstream", self.server.name), ("server", "weft-test-upstream"),
                ("x-connection-id", str(self.connection_id))]
        if self.want_close:
            hdrs.append(("connection", "close"))
        if extra:
            hdrs.extend(extra)
        return hdrs

    @property
    def query(self) -> dict[str, str]:
        assert self.request is not None
        q = parse_qs(urlsplit(self.request.target.decode("latin-1")).query)
        return {k: v[-1] for k, v in q.items()}

    def qint(self, key: str, default: int) -> int:
        return int(self.query.get(key, default))

    def qfloat(self, key: str, default: float) -> float:
        return float(self.query.get(key, default))

    @property
    def want_close(self) -> bool:
        return self.query.get("close") == "1"

    # -- the connection loop ----------------------------------------------------------------

    def serve(self) -> None:
        try:
            while True:
                event = self.next_event()
                if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
                if not isinstance(event, h11.Request):
                    return
                self.request = event
                self.idle_close = None
                if not self.handle(event):
                    return  # the handler took the connection over or closed it
                # Discard whatever body the handler did not read, so the next request parses.
                if self.h11.their_state is h11.SEND_BODY:
                    for _ in self.body_chunks():
                        pass
                if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                    if "idle_close" in self.query:
                        self.idle_close = self.qfloat("idle_close", 1.0)
                    elif "idle_408" in self.query:
                        self.idle_close = self.qfloat("idle_408", 1.0)
                        self.idle_408 = True
                    self.h11.start_next_cycle()
                    self.request_index += 1
                else:
                    self.close_gracefully()
                    return
        except (Closed, OSError, h11.ProtocolError):
            return
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()
            if not self.control:
                with self.server.stats.lock:
                    self.server.stats.open_connections -= 1

    def close_gracefully(self) -> None:
        """FIN after the response, then read until the peer closes (bounded), so no RST
        destroys a response the peer has not read yet."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(2.0)
            while self.sock.recv(BLOCK):
                pass

    def handle(self, request: h11.Request) -> bool:
        """Dispatch one request. Returns False when the connection must not be reused."""
        path = urlsplit(request.target.decode("latin-1")).path
        stats = self.server.stats
        with stats.lock:
            control = path == "/stats"
            if control and self.request_index == 0:
                stats.control_connections += 1
                stats.open_connections -= 1
                self.control = True
            if not control:
                stats.requests += 1
                stats.by_path[path] = stats.by_path.get(path, 0) + 1
                stats.in_flight += 1
                stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        handler = ROUTES.get(path, Conn.h_not_found)
        try:
            result = handler(self)
        finally:
            if not control:
                with stats.lock:
                    stats.in_flight -= 1
        return result is not False

    # -- handlers: each returns None to keep the connection, False to end it ----------------

    def _describe(self, body_len: int, body_sha: str) -> dict[str, object]:
        assert self.request is not None
        return {
            "name": self.server.name,
            "method": self.request.method.decode(),
            "target": self.request.target.decode("latin-1"),
            "http_version": self.request.http_version.decode(),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in
                        self.request.headers.raw_items()],
            "body_len": body_len,
            "body_sha256": body_sha,
            "connection_id": self.connection_id,
            "request_index_on_connection": self.request_index,
        }

    def _hash_body(self) -> tuple[int, str]:
        h = hashlib.sha256()
        n = 0
        for chunk in self.body_chunks():
            h.update(chunk)
            n += len(chunk)
        return n, h.hexdigest()

    def h_echo(self) -> None:
        n, sha = self._hash_body()
        self.respond_json(self._describe(n, sha))

    def h_fixed(self) -> None:
        self.respond(200, pattern(self.qint("size", 1024)), content_type="application/octet-stream")

    def h_chunked(self) -> None:
        size = self.qint("size", 1024)
        chunk = max(1, self.qint("chunk", 100))
        self.send(h11.Response(status_code=200, reason=b"OK", headers=self.base_headers(
            [("content-type", "application/octet-stream"), ("transfer-encoding", "chunked")])))
        if not self.is_head:
            body = pattern(size)
            for i in range(0, size, chunk):
                self.send(h11.Data(data=body[i : i + chunk]))
        self.send(h11.EndOfMessage())

    def h_trailers(self) -> None:
        body = pattern(self.qint("size", 1000))
        self.send(h11.Response(status_code=200, reason=b"OK", headers=self.base_headers(
            [("content-type", "application/octet-stream"), ("transfer-encoding", "chunked"),
             ("trailer", "x-checksum")])))
        if not self.is_head:
            self.send(h11.Data(data=body[:500]))
            self.send(h11.Data(data=body[500:]))
        self.send(h11.EndOfMessage(headers=[("x-checksum", hashlib.sha256(body).hexdigest())]))

    def h_sink(self) -> None:
        n, sha = self._hash_body()
        self.respond_json({"body_len": n, "body_sha256": sha})

    def h_source(self) -> None:
        size = self.qint("size", BLOCK)
        self.send(h11.Response(status_code=200, reason=b"OK", headers=self.base_headers(
            [("content-type", "application/octet-stream"), ("content-length", str(size))])))
        if not self.is_head:
            sent = 0
            while sent < size:
                take = min(BLOCK, size - sent)
                self.send(h11.Data(data=_PATTERN[:take]))
                sent += take
        self.send(h11.EndOfMessage())

    def h_slow(self) -> None:
        n, sha = self._hash_body()
        time.sleep(self.qfloat("delay", 1.0))
        self.respond_json(self._describe(n, sha))

    def h_slowbody(self) -> None:
        body = pattern(self.qint("size", 100))
        self.send(h11.Response(status_code=200, reason=b"OK", headers=self.base_headers(
            [("content-type", "application/octet-stream"), ("content-length", str(len(body)))])))
        time.sleep(self.qfloat("delay", 1.0))
        if not self.is_head:
            self.send(h11.Data(data=body))
        self.send(h11.EndOfMessage())

    def h_dribble(self) -> None:
        n = self.qint("n", 5)
        interval = self.qfloat("interval", 0.1)
        self.send(h11.Response(status_code=200, reason=b"OK", headers=self.base_headers(
            [("content-type", "text/plain"), ("transfer-encoding", "chunked")])))
        for i in range(n):
            time.sleep(interval)
            if not self.is_head:
                self.send(h11.Data(data=f"chunk {i}\n".encode()))
        self.send(h11.EndOfMessage())

    def h_close_mid(self) -> bool:
        self.read_body()
        self.send_raw(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\nx-upstream: "
                      + self.server.name.encode() + b"\r\n\r\n" + pattern(100))
        return False

    def h_close_before(self) -> bool:
        self.read_body()
        return False

    def h_bad_framing(self) -> bool:
        self.read_body()
        self.send_raw(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n"
                      b"x-upstream: " + self.server.name.encode() + b"\r\n\r\n"
                      b"5\r\nhello\r\n0\r\n\r\n")
        self.close_gracefully()
        return False

    def h_bad_response(self) -> bool:
        self.read_body()
        self.send_raw(b"THIS IS NOT HTTP\x00\x01\r\n\r\n")
        self.close_gracefully()
        return False

    def h_status(self) -> None:
        code = self.qint("code", 200)
        self.read_body()
        self.respond(code, f"status {code}\n".encode())

    def h_expect(self) -> bool | None:
        assert self.request is not None
        expect_seen = any(k == b"expect" for k, _ in self.request.headers)
        if self.query.get("reject") == "1":
            # Refuse without reading the body: RFC 9110 section 10.1.1. The unread body
            # makes the connection unusable, so it closes.
            hdrs = self.base_headers([("connection", "close"), ("content-length", "0")])
            self.send(h11.Response(status_code=417, headers=hdrs))
            self.send(h11.EndOfMessage())
            self.close_gracefully()
            return False
        waiting = self.h11.they_are_waiting_for_100_continue
        n, sha = self._hash_body()
        self.respond_json({"expect_seen": expect_seen, "continue_sent": waiting,
                           "body_len": n, "body_sha256": sha})
        return None

    def h_stats(self) -> None:
        self.read_body()
        self.respond_json(self.server.stats.snapshot())

    def h_asterisk(self) -> None:
        """``OPTIONS *``: the server-wide options request (RFC 9110 section 9.3.7)."""
        self.read_body()
        assert self.request is not None
        if self.request.method == b"OPTIONS":
            self.respond(200, b"", headers=[("allow", "GET, HEAD, POST, PUT, DELETE, OPTIONS")])
        else:
            self.respond(400, b"asterisk-form is only for OPTIONS\n")

    def h_not_found(self) -> None:
        """404, but describing the request like /echo: tests of path rewriting read it."""
        n, sha = self._hash_body()
        self.respond_json(self._describe(n, sha), status=404)

    def h_ws(self) -> bool:
        """WebSocket echo: an h11 handshake, then wsproto on the raw socket."""
        from wsproto.connection import Connection, ConnectionType
        from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

        assert self.request is not None
        headers = {k.lower(): v for k, v in self.request.headers}
        key = headers.get(b"sec-websocket-key")
        upgrade = headers.get(b"upgrade", b"").lower()
        if key is None or upgrade != b"websocket":
            self.respond(400, b"not a websocket handshake\n")
            return True
        # With Upgrade in the request h11 pauses after EndOfMessage: read up to that point.
        while True:
            event = self.next_event()
            if isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                break
            if isinstance(event, h11.ConnectionClosed):
                return False
        accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
        self.send(h11.InformationalResponse(status_code=101, headers=[
            ("upgrade", "websocket"), ("connection", "Upgrade"),
            ("sec-websocket-accept", accept), ("x-upstream", self.server.name),
            ("x-connection-id", str(self.connection_id))]))
        trailing, _ = self.h11.trailing_data
        ws = Connection(ConnectionType.SERVER)
        if trailing:
            ws.receive_data(bytes(trailing))
        closing = False
        while True:
            for event in ws.events():
                if isinstance(event, TextMessage | BytesMessage):
                    self.send_raw(ws.send(type(event)(data=event.data,
                                                      message_finished=event.message_finished)))
                elif isinstance(event, Ping):
                    self.send_raw(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    with contextlib.suppress(Exception):
                        self.send_raw(ws.send(event.response()))
                    closing = True
            if closing:
                self.close_gracefully()
                return False
            try:
                data = self.sock.recv(BLOCK)
            except OSError:
                data = b""
            if not data:
                return False
            ws.receive_data(data)


ROUTES: dict[str, Callable[[Conn], bool | None]] = {
    "/echo": Conn.h_echo,
    "/fixed": Conn.h_fixed,
    "/chunked": Conn.h_chunked,
    "/trailers": Conn.h_trailers,
    "/sink": Conn.h_sink,
    "/source": Conn.h_source,
    "/slow": Conn.h_slow,
    "/slowbody": Conn.h_slowbody,
    "/dribble": Conn.h_dribble,
    "/close-mid": Conn.h_close_mid,
    "/close-before": Conn.h_close_before,
    "/bad-framing": Conn.h_bad_framing,
    "/bad-response": Conn.h_bad_response,
    "/status": Conn.h_status,
    "/expect": Conn.h_expect,
    "/stats": Conn.h_stats,
    "/ws": Conn.h_ws,
    "*": Conn.h_asterisk,
}


class Server:
    def __init__(self, name: str, host: str, port: int) -> None:
        self.name = name
        self.stats = Stats()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(512)
        self.port = self.listener.getsockname()[1]

    def serve_forever(self) -> None:
        next_id = 0
        while True:
            sock, _ = self.listener.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            next_id += 1
            with self.stats.lock:
                self.stats.raw_accepted += 1
                self.stats.open_connections += 1
            conn = Conn(self, sock, next_id)
            threading.Thread(target=conn.serve, name=f"conn-{next_id}", daemon=True).start()


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG(SIGTERM): a test run killed hard must not leave this server behind."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="upstream")
    args = parser.parse_args(argv)

    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)

    def on_term(signum: int, frame: object) -> None:
        # Exit at once: daemon connection threads may sit in recv(); os._exit skips joining.
        sys.stdout.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    server = Server(args.name, args.host, args.port)
    print(f"LISTENING {server.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
