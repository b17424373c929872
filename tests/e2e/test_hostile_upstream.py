"""Upstreams that misbehave on purpose, and what weft must do about each.

Each upstream here is a raw-socket server written for one misbehaviour (a second response
after the first, a request body it never reads, a reset in the middle of an upload), run in
threads of the test process so that nothing between it and weft can tidy the bytes up. The
clients are raw sockets too: they send what a real client sends and read what weft answers.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from support.config import simple_config, table
from support.procs import wait_for
from support.prometheus import scrape, total
from support.rawhttp import RawConnection

pytestmark = pytest.mark.e2e


class RawUpstream:
    """A loopback server that runs `handler(sock, n)` in a thread per accepted connection (n
    counts from 0); records when each connection was closed by its peer (weft)."""

    def __init__(self, handler: Callable[[socket.socket, int], None]) -> None:
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.peer_closed: list[float] = []  # monotonic times weft closed a connection
        self.socks: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop:
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            n = self.accepted
            self.accepted += 1
            self.socks.append(sock)
            threading.Thread(target=self._run, args=(sock, n), daemon=True).start()

    def _run(self, sock: socket.socket, n: int) -> None:
        with contextlib.suppress(OSError):
            self.handler(sock, n)

    def wait_closed_by_peer(self, sock: socket.socket, timeout: float) -> None:
        """Read (and drop) what `sock` still receives until weft closes it; record when."""
        sock.settimeout(timeout)
        try:
            while sock.recv(1 << 20):
                pass
        except TimeoutError:
            return
        except OSError:
            pass
        self.peer_closed.append(time.monotonic())

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()
        self._thread.join(2.0)


@pytest.fixture
def raw_upstream() -> Iterator[Callable[[Callable[[socket.socket, int], None]], RawUpstream]]:
    made: list[RawUpstream] = []

    def make(handler: Callable[[socket.socket, int], None]) -> RawUpstream:
        up = RawUpstream(handler)
        made.append(up)
        return up

    yield make
    for up in made:
        up.close()


def read_head(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Read up to the end of a request head (what follows stays in the kernel or is lost)."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(1)  # one byte at a time: leave the body unread
        if not data:
            raise ConnectionError("closed before a whole head")
        buf += data
    return buf


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


def get(port: int, path: str = "/") -> tuple[int, bytes]:
    with RawConnection(port) as conn:
        conn.send(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        resp = conn.read_response()
        return resp.status, resp.body


# -- a response desync must never cross clients --------------------------------------------------


@pytest.mark.parametrize("late", [False, True], ids=["same-write", "late-write"])
def test_bytes_past_the_end_of_a_response_close_the_connection_and_reach_no_other_client(
    raw_upstream, weft, free_port, late
):
    """1. The upstream answers the first request with a complete response and, in the same
    write (or 50 ms later, while the connection is idle in the pool), a second one.
    2. The first client gets its `hello`. 3. A second client, on another client connection,
    must get an answer to its own request, never the extra response: the pooled connection
    that carried it is closed, the event counted and logged."""

    def handler(sock: socket.socket, n: int) -> None:
        read_head(sock)
        if n == 0:
            extra = ok(b"SMUGGLED")
            if late:
                sock.sendall(ok(b"hello"))
                time.sleep(0.05)
                sock.sendall(extra)
            else:
                sock.sendall(ok(b"hello") + extra)
        else:
            sock.sendall(ok(b"fresh"))
        while True:  # answer whatever else comes on this connection
            read_head(sock, timeout=10.0)
            sock.sendall(ok(b"fresh"))

    up = raw_upstream(handler)
    admin_port = free_port()
    proxy = weft(simple_config(free_port(), [up.address]) + table("[admin]", {"port": admin_port}))
    assert get(proxy.port) == (200, b"hello")
    time.sleep(0.2)  # the late bytes are in by now
    for _ in range(3):
        assert get(proxy.port) == (200, b"fresh")
    assert up.accepted == 2  # the poisoned connection was dropped, one fresh one serves
    when = "while it was idle" if late else "past the end of a response"
    wait_for(lambda: f"bytes {when}: connection closed" in proxy.stderr_text(), 5.0,
             "the stray response to be logged")
    wait_for(lambda: total(scrape(admin_port), "weft_upstream_stray_responses_total") == 1, 5.0,
             "the stray response to be counted")


# -- an upload to an upstream that stops reading --------------------------------------------------


class Uploader:
    """A client streaming a chunked body as fast as weft takes it, while reading the answer."""

    def __init__(self, port: int, path: str = "/upload") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30.0)
        self.sent = 0
        self.response = b""
        self.head = f"POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        self._sender = threading.Thread(target=self._send, daemon=True)

    def _send(self) -> None:
        chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
        with contextlib.suppress(OSError):
            self.sock.sendall(self.head.encode())
            while self.sent < 1 << 31:
                self.sock.sendall(chunk)
                self.sent += len(chunk)

    def start(self) -> Uploader:
        self._sender.start()
        return self

    def read_answer(self, timeout: float) -> bytes:
        self.sock.settimeout(timeout)
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in self.response:
                data = self.sock.recv(65536)
                if not data:
                    break
                self.response += data
        return self.response

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def test_an_upload_the_upstream_stops_reading_ends_in_504_after_upstream_send_idle(
    raw_upstream, weft, free_port, tmp_path
):
    """The upstream reads the head and never the body. With upstream_send_idle = 1 s, the
    client gets a 504 (reason upstream_send_timeout) within a few seconds, not after
    request_total, and weft closes the upstream connection."""
    heads: list[socket.socket] = []

    def handler(sock: socket.socket, n: int) -> None:
        read_head(sock)
        heads.append(sock)
        time.sleep(30)  # never read the body, never answer

    up = raw_upstream(handler)
    log = tmp_path / "access.log"
    proxy = weft(simple_config(free_port(), [up.address], access_log=log,
                               timeouts={"upstream_send_idle": "1s"}))
    client = Uploader(proxy.port).start()
    started = time.monotonic()
    try:
        answer = client.read_answer(timeout=10.0)
    finally:
        client.close()
    assert answer.startswith(b"HTTP/1.1 504"), answer[:200]
    assert time.monotonic() - started < 6.0
    wait_for(lambda: heads, 2.0, "the upstream to have read the head")
    up.wait_closed_by_peer(heads[0], timeout=5.0)
    assert up.peer_closed, "weft kept the stalled upstream connection open"
    wait_for(lambda: "upstream_send_timeout" in log.read_text(), 5.0, "the access log line")
    assert "middleware_error" not in log.read_text()


def test_an_upstream_reset_during_an_upload_is_a_502_never_a_500(
    raw_upstream, weft, free_port, tmp_path
):
    """The upstream reads the head, stalls, then resets the connection (SO_LINGER 0) while
    weft is blocked writing the body: the client gets 502 (upstream_reset). Before, the error
    escaped the forwarder's nursery as an ExceptionGroup and became a 500 middleware_error."""

    def handler(sock: socket.socket, n: int) -> None:
        read_head(sock)
        time.sleep(1.0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()

    up = raw_upstream(handler)
    log = tmp_path / "access.log"
    proxy = weft(simple_config(free_port(), [up.address], access_log=log))
    client = Uploader(proxy.port).start()
    try:
        answer = client.read_answer(timeout=10.0)
    finally:
        client.close()
    assert answer.startswith(b"HTTP/1.1 502"), answer[:200]
    assert b"bytearray" not in answer and b"b'" not in answer
    wait_for(lambda: '"status": 502' in log.read_text() or '"status":502' in log.read_text(),
             5.0, "the access log line")
    text = log.read_text()
    assert "middleware_error" not in text and "upstream_reset" in text, text


@pytest.mark.parametrize(
    ("pieces", "body_end"),
    [
        pytest.param([b"POST /think HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"5\r\nhello\r\n", b"5\r\nworld\r\n0\r\n\r\n"],
                     b"0\r\n\r\n", id="streamed-body"),
        pytest.param([b"GET /think HTTP/1.1\r\nHost: t\r\n\r\n"], b"", id="no-body"),
        pytest.param([b"POST /think HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"],
                     b"hello", id="body-with-the-head"),
    ],
)
def test_a_client_that_leaves_while_its_response_is_awaited_cancels_the_upstream_exchange(
    raw_upstream, weft, free_port, tmp_path, pieces, body_end
):
    """The upstream takes the whole request and then thinks for a minute (a long poll). The
    client gives up and closes: weft closes the upstream connection at once instead of holding
    it until upstream_header (60 s), and counts the request as abandoned (499)."""
    upstream_socks: list[socket.socket] = []

    def handler(sock: socket.socket, n: int) -> None:
        read_head(sock)
        body = b""
        while not body.endswith(body_end):
            body += sock.recv(65536)
        upstream_socks.append(sock)
        time.sleep(30)

    up = raw_upstream(handler)
    admin_port = free_port()
    proxy = weft(simple_config(free_port(), [up.address]) + table("[admin]", {"port": admin_port}))
    with RawConnection(proxy.port) as conn:
        conn.send_pieces(pieces, pause=0.2)
        wait_for(lambda: upstream_socks, 5.0, "the upstream to have the whole request")
        time.sleep(0.3)  # the exchange is waiting for the response head
    gone = time.monotonic()  # the client closed its connection here
    up.wait_closed_by_peer(upstream_socks[0], timeout=5.0)
    assert up.peer_closed, "weft kept the upstream exchange of a client that left"
    assert up.peer_closed[0] - gone < 3.0
    wait_for(lambda: total(scrape(admin_port), "weft_requests_total", code="499") == 1, 5.0,
             "the abandoned request counted as 499")


def test_a_502_body_names_the_failure_in_plain_words(upstream, weft, free_port):
    up = upstream("garbage")
    proxy = weft(simple_config(free_port(), [up.address]))
    status, body = get(proxy.port, "/bad-response")
    assert status == 502
    assert body == b"502 Bad Gateway: the upstream sent an invalid response\n"
