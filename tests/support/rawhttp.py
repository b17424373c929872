"""A raw-socket HTTP/1.1 client for input no well-behaved client would send.

httpx and curl refuse to send a request with both Content-Length and Transfer-Encoding, a
``#`` in the target, or ``HTTP/1.2``; these tests need exactly that. ``RawConnection`` sends
bytes verbatim (in one ``send()`` unless told otherwise), parses whatever responses come back
with a small tolerant parser, and tells whether the server closed the connection.

Every read has a deadline: nothing here can hang a test. A reset (ECONNRESET/EPIPE) counts as
the server having closed the connection.
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass, field

DEFAULT_TIMEOUT = 5.0


@dataclass
class RawResponse:
    http_version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` (case-insensitive), or None."""
        found = None
        for k, v in self.headers:
            if k.lower() == name.lower():
                found = v
        return found

    def header_values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def connection_close(self) -> bool:
        return any("close" in v.lower() for v in self.header_values("connection"))


class Incomplete(Exception):
    """More bytes are needed to finish the current response."""


class Malformed(Exception):
    """The bytes are not an HTTP/1.x response."""


def _parse_head(buf: bytes) -> tuple[RawResponse, int]:
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > 64 * 1024:
            raise Malformed(f"no end of head in {buf[:200]!r}")
        raise Incomplete
    lines = buf[:end].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise Malformed(f"bad status line {lines[0]!r}")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise Malformed(f"bad header line {line!r}")
        headers.append((name.strip(), value.strip()))
    resp = RawResponse(parts[0][5:], int(parts[1]), parts[2] if len(parts) > 2 else "", headers)
    return resp, end + 4


def _parse_chunked(buf: bytes, pos: int, resp: RawResponse) -> int:
    body = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            raise Incomplete
        size_text = buf[pos:eol].split(b";")[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise Malformed(f"bad chunk size {size_text!r}") from None
        pos = eol + 2
        if size == 0:
            break
        if len(buf) < pos + size + 2:
            raise Incomplete
        body += buf[pos : pos + size]
        pos += size + 2
    trailers = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            raise Incomplete
        line = buf[pos:eol].decode("latin-1")
        pos = eol + 2
        if not line:
            break
        name, _, value = line.partition(":")
        trailers.append((name.strip(), value.strip()))
    resp.body = bytes(body)
    resp.trailers = trailers
    return pos


def parse_response(buf: bytes, *, head_request: bool = False, eof: bool = False
                   ) -> tuple[RawResponse, int]:
    """Parse one response from the start of ``buf``: (response, bytes consumed).

    Raises Incomplete if more bytes are needed (with ``eof`` a close-delimited body ends at the
    end of ``buf``), Malformed if this is not HTTP.
    """
    resp, pos = _parse_head(buf)
    no_body = (head_request or 100 <= resp.status < 200 or resp.status in (204, 304))
    if no_body:
        return resp, pos
    te = ",".join(resp.header_values("transfer-encoding")).lower()
    if "chunked" in te:
        return resp, _parse_chunked(buf, pos, resp)
    cl = resp.header("content-length")
    if cl is not None:
        n = int(cl)
        if len(buf) < pos + n:
            if eof:
                raise Malformed(f"connection closed after {len(buf) - pos} of {n} body bytes")
            raise Incomplete
        resp.body = buf[pos : pos + n]
        return resp, pos + n
    if not eof:
        raise Incomplete
    resp.body = buf[pos:]
    return resp, len(buf)


class RawConnection:
    """One TCP connection to ``host:port`` speaking bytes.

    Args:
        port: the server's port.
        host: the server's address.
        timeout: default deadline, in seconds, for each read operation.

    The socket is closed by ``close()`` or leaving the ``with`` block.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = DEFAULT_TIMEOUT):
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.eof = False
        self.reset = False  # the server's close was a reset (RST), not a FIN

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> bool:
        """Send ``data`` in one ``sendall``. False if the server had already closed/reset."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            self.eof = True
            return False

    def send_pieces(self, pieces: list[bytes], pause: float = 0.05) -> bool:
        """Send each piece separately with a pause between (one TCP segment each, NODELAY)."""
        for piece in pieces:
            if not self.send(piece):
                return False
            time.sleep(pause)
        return True

    def _recv_some(self, deadline: float) -> bool:
        """Read once before ``deadline``. False on timeout; sets ``eof`` on close or reset."""
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except (ConnectionResetError, BrokenPipeError):
            self.reset = True
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_response(self, *, head_request: bool = False, timeout: float | None = None,
                      skip_interim: bool = True) -> RawResponse:
        """The next response, waiting at most ``timeout`` seconds.

        1xx responses are skipped unless ``skip_interim`` is False. Raises TimeoutError if no
        complete response arrived in time, ConnectionError if the server closed first.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                resp, used = parse_response(self.buf, head_request=head_request, eof=self.eof)
            except Incomplete:
                if self.eof:
                    raise ConnectionError(
                        f"server closed the connection; unparsed bytes: {self.buf[:300]!r}"
                    ) from None
                if not self._recv_some(deadline) and not self.eof:
                    raise TimeoutError(
                        f"no complete response within the deadline; got {self.buf[:300]!r}"
                    ) from None
                continue
            self.buf = self.buf[used:]
            if skip_interim and 100 <= resp.status < 200 and resp.status != 101:
                continue
            return resp

    def read_responses(self, n: int, *, timeout: float | None = None) -> list[RawResponse]:
        return [self.read_response(timeout=timeout) for _ in range(n)]

    def peer_closed(self, timeout: float = 2.0) -> bool:
        """True if the server closes (or resets) the connection within ``timeout`` seconds.

        Bytes that arrive meanwhile are kept in the buffer (a later read_response sees them).
        """
        deadline = time.monotonic() + timeout
        while not self.eof:
            if time.monotonic() >= deadline:
                return False
            self._recv_some(deadline)
        return True

    def how_closed(self, timeout: float = 2.0) -> str | None:
        """"fin" or "reset" once the server ended the connection within `timeout` seconds,
        None while it is open."""
        if not self.peer_closed(timeout):
            return None
        return "reset" if self.reset else "fin"

    def read_until_close(self, timeout: float | None = None) -> bytes:
        """All bytes until the server closes; raises TimeoutError past the deadline."""
        if not self.peer_closed(self.timeout if timeout is None else timeout):
            raise TimeoutError(f"server kept the connection open; got {self.buf[:300]!r}")
        return self.buf


@dataclass
class Exchange:
    responses: list[RawResponse]
    closed: bool
    leftover: bytes

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]


def exchange(port: int, data: bytes, *, host: str = "127.0.0.1", expect: int = 1,
             timeout: float = DEFAULT_TIMEOUT, close_wait: float = 2.0) -> Exchange:
    """Send ``data`` on a fresh connection in ONE send(), read up to ``expect`` responses, then
    report whether the server closed the connection within ``close_wait`` seconds.

    Reading stops early when the server closes, so ``responses`` may be shorter than
    ``expect``; the test asserts on what it needs.
    """
    with RawConnection(port, host, timeout) as conn:
        conn.send(data)
        responses: list[RawResponse] = []
        for _ in range(expect):
            try:
                responses.append(conn.read_response(timeout=timeout))
            except (ConnectionError, TimeoutError, Malformed):
                break
        closed = conn.peer_closed(close_wait)
        return Exchange(responses, closed, conn.buf)
