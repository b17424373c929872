"""Demo upstream servers: small HTTP/1.1 backends to put behind weft and watch it work.

`weft demo` (and `python -m weft.demo`) starts one server per port, named "demo-1", "demo-2", ...
in port order, so a reader of a response can tell which endpoint the balancer picked. They exist
for people trying weft by hand (`scripts/demo`, `examples/demo.toml`) and for tests that need a
real upstream; they are not a benchmark target and not hardened against hostile clients.

Every server answers the same routes:

    GET  /                   one line of text naming the server
    GET  /json               JSON echo of the request: server name, method, path, query, client
                             address and every header received (X-Forwarded-For, Via and
                             X-Request-Id added by the proxy show up here)
    POST /echo               the request body back, with its Content-Type
    GET  /slow?ms=N          the text answer after N milliseconds (capped at MAX_SLOW_MS)
    GET  /stream?chunks=N    N lines sent as separate chunks (Transfer-Encoding: chunked),
                             STREAM_PAUSE_S apart (N capped at MAX_STREAM_CHUNKS)

Anything else is 404 (unknown path) or 405 (known path, wrong method).

Theory of operation: the stdlib's `ThreadingHTTPServer`, one per port, each `serve_forever` in a
daemon thread, each request on its own daemon thread. The handler speaks HTTP/1.1 so keep-alive
works: every response carries Content-Length or is chunked, and a request body is always read
(Content-Length or chunked) before answering, so the next request on the connection starts at the
right byte. A request body the handler cannot frame, or one larger than MAX_BODY_BYTES, is
answered with `Connection: close`. Request logging is off: a proxy benchmark or demo session
would otherwise print a line per request to stderr.

Resources: `start_demo_upstreams` binds every port before it returns (or closes the ones it bound
and raises `OSError`); `DemoUpstreams.close` stops the accept loops and closes the listening
sockets. Requests still running at that point (a long /slow or /stream) are abandoned with their
daemon threads, which end with the process.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from urllib.parse import parse_qs, urlsplit

DEFAULT_PORTS = (9001, 9002, 9003)

# Caps keep one careless URL from pinning a thread for an hour or filling memory.
MAX_SLOW_MS = 60_000
MAX_STREAM_CHUNKS = 1_000
MAX_BODY_BYTES = 16 * 1024 * 1024
# Long enough that a reader of `curl -N` sees the lines arrive one by one.
STREAM_PAUSE_S = 0.1
# How often serve_forever checks for shutdown(); also the longest close() waits per server.
POLL_INTERVAL_S = 0.2


class _Handler(BaseHTTPRequestHandler):
    """One request of one demo server; `server.name` says which."""

    protocol_version = "HTTP/1.1"
    server_version = "weft-demo"
    # Head and body go out in separate writes: without TCP_NODELAY, Nagle plus the peer's delayed
    # ACK adds ~40 ms to every keep-alive response.
    disable_nagle_algorithm = True

    server: _DemoServer

    # -- routing ---------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def _dispatch(self, method: str) -> None:
        body = self._read_body()
        if body is None:
            return  # already answered
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        routes = {
            "/": (("GET", "HEAD"), self._hello),
            "/json": (("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"), self._json),
            "/echo": (("POST", "PUT"), self._echo),
            "/slow": (("GET", "HEAD"), self._slow),
            "/stream": (("GET",), self._stream),
        }
        route = routes.get(url.path)
        if route is None:
            self._send(404, f"{self.server.name}: no route for {url.path}\n")
            return
        allowed, handler = route
        if method not in allowed:
            self._send(
                405,
                f"{self.server.name}: {method} not allowed on {url.path}\n",
                extra={"Allow": ", ".join(allowed)},
            )
            return
        handler(method, url.path, query, body)

    # -- routes ----------------------------------------------------------------------------

    def _hello(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> None:
        self._send(200, f"hello from {self.server.name} ({self._where()})\n")

    def _json(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> None:
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        document = {
            "server": self.server.name,
            "listen": self._where(),
            "client": f"{self.client_address[0]}:{self.client_address[1]}",
            "http_version": self.request_version,
            "method": method,
            "path": path,
            "query": {k: v[0] if len(v) == 1 else v for k, v in query.items()},
            "headers": headers,
            "body_bytes": len(body),
        }
        text = json.dumps(document, indent=2) + "\n"
        self._send(200, text, content_type="application/json")

    def _echo(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> None:
        content_type = self.headers.get("Content-Type", "application/octet-stream")
        self._send(200, body, content_type=content_type)

    def _slow(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> None:
        ms = _int_param(query, "ms", default=1000, low=0, high=MAX_SLOW_MS)
        if ms is None:
            self._send(400, f"ms must be an integer from 0 to {MAX_SLOW_MS}\n")
            return
        time.sleep(ms / 1000)
        self._send(200, f"{self.server.name} answered after {ms} ms\n")

    def _stream(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> None:
        chunks = _int_param(query, "chunks", default=5, low=0, high=MAX_STREAM_CHUNKS)
        if chunks is None:
            self._send(400, f"chunks must be an integer from 0 to {MAX_STREAM_CHUNKS}\n")
            return
        lines = [f"{self.server.name} chunk {i + 1}/{chunks}\n".encode() for i in range(chunks)]
        if self.request_version == "HTTP/1.0":
            # No chunked coding in HTTP/1.0: send the lines in one body.
            self._send(200, b"".join(lines))
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Demo-Server", self.server.name)
        self.end_headers()
        for i, line in enumerate(lines):
            if i:
                time.sleep(STREAM_PAUSE_S)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
        self.wfile.write(b"0\r\n\r\n")

    # -- plumbing --------------------------------------------------------------------------

    def version_string(self) -> str:
        return self.server_version

    def _where(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{host}:{port}"

    def _read_body(self) -> bytes | None:
        """Read the whole request body; None if the request was answered (and closed) instead."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            return b""
        try:
            length = int(length_text)
        except ValueError:
            length = -1
        if length < 0:
            self._send(400, "bad Content-Length\n", close=True)
            return None
        if length > MAX_BODY_BYTES:
            self._send(413, f"body over {MAX_BODY_BYTES} bytes\n", close=True)
            return None
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes | None:
        parts: list[bytes] = []
        total = 0
        while True:
            size_line = self.rfile.readline(1024)
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self._send(400, "bad chunk size\n", close=True)
                return None
            if size == 0:
                break
            total += size
            if total > MAX_BODY_BYTES:
                self._send(413, f"body over {MAX_BODY_BYTES} bytes\n", close=True)
                return None
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)  # the CRLF after the chunk data
        while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
            pass  # trailer fields: read and dropped
        return b"".join(parts)

    def _send(
        self,
        status: int,
        body: str | bytes,
        *,
        content_type: str = "text/plain; charset=utf-8",
        close: bool = False,
        extra: dict[str, str] | None = None,
    ) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Demo-Server", self.server.name)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: no line per request (see the module docstring)


def _int_param(
    query: dict[str, list[str]], name: str, *, default: int, low: int, high: int
) -> int | None:
    """The integer query parameter `name` within [low, high]; None if present but invalid."""
    values = query.get(name)
    if not values:
        return default
    try:
        value = int(values[0])
    except ValueError:
        return None
    return value if low <= value <= high else None


class _DemoServer(ThreadingHTTPServer):
    daemon_threads = True
    # listen(2) backlog; socketserver's default of 5 drops connections under a test's burst.
    request_queue_size = 128
    # The connection errors of clients that go away mid-response are normal here (curl ^C,
    # a proxy dropping a pooled connection); anything else is still printed.
    _quiet_errors = (ConnectionError, TimeoutError)

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name = name
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], self._quiet_errors):
            super().handle_error(request, client_address)


class DemoUpstreams:
    """Running demo servers; use as a context manager or call `close()`.

    Attributes:
        addresses: `(name, host, port)` of each server in start order; the port is the bound one,
            so port 0 in `start_demo_upstreams` gives a free port.
    """

    def __init__(self, servers: list[_DemoServer]) -> None:
        self._servers = servers
        self._threads: list[threading.Thread] = []
        self.addresses = [(s.name, *s.server_address[:2]) for s in servers]
        for server in servers:
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": POLL_INTERVAL_S},
                name=server.name,
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Stop accepting and close the listening sockets; in-flight requests are abandoned."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=2 * POLL_INTERVAL_S)

    def __enter__(self) -> DemoUpstreams:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def start_demo_upstreams(ports: Sequence[int], host: str = "127.0.0.1") -> DemoUpstreams:
    """Bind and start one demo server per port, named "demo-1", "demo-2", ... in `ports` order.

    Returns once every server is listening. Raises `OSError` (naming the address) if a port
    cannot be bound; the servers bound before it are closed first, so nothing is left listening.
    """
    servers: list[_DemoServer] = []
    try:
        for index, port in enumerate(ports, start=1):
            try:
                servers.append(_DemoServer(f"demo-{index}", host, port))
            except OSError as exc:
                raise OSError(
                    exc.errno, f"demo-{index} cannot listen on {host}:{port}: {exc.strerror or exc}"
                ) from exc
    except BaseException:
        for server in servers:
            server.server_close()
        raise
    return DemoUpstreams(servers)


def run_demo_upstreams(ports: Sequence[int], host: str = "127.0.0.1") -> None:
    """Run the demo servers in the foreground until SIGINT or SIGTERM, then close them.

    Prints one line per server once it listens. Must be called from the main thread (it installs
    SIGINT and SIGTERM handlers, and puts the previous ones back before returning). Raises
    `OSError` if a port cannot be bound, with nothing left listening.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with start_demo_upstreams(ports, host) as upstreams:
            for name, bound_host, port in upstreams.addresses:
                shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
                print(f"{name} listening on http://{shown}:{port}", flush=True)
            # A bounded wait in a loop: the handler runs between waits even where a blocking
            # wait would not be interrupted.
            while not stop.wait(0.5):
                pass
            print("demo upstreams stopping", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _parse_ports(text: str) -> list[int]:
    try:
        ports = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ports like 9001,9002: {text!r}") from None
    if not ports or any(not 0 <= p <= 65535 for p in ports):
        raise argparse.ArgumentTypeError(f"expected ports from 0 to 65535: {text!r}")
    return ports


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weft.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--ports",
        type=_parse_ports,
        default=list(DEFAULT_PORTS),
        help="comma-separated (default 9001,9002,9003)",
    )
    args = parser.parse_args(argv)
    try:
        run_demo_upstreams(args.ports, args.host)
    except OSError as exc:
        parser.exit(1, f"error: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
