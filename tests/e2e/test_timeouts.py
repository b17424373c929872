"""Every timeout of ``[timeouts]`` (and a per-route override), each provoked for real.

Timeouts are set to a few hundred milliseconds; each test asserts the outcome (status, or the
connection closing) and that it came in a window around the configured value: not much
before (the timer is the right one) and not seconds later (it is a timer, not a side effect).
``drain`` is covered by test_shutdown.py.
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from support.config import base_config, destination, route, simple_config
from support.procs import blackhole, wait_for
from support.rawhttp import RawConnection
from support.wsclient import WsClient

pytestmark = pytest.mark.e2e


def _proxy(upstream, weft, free_port, name: str, **timeouts: str):
    up = upstream(name)
    return weft(simple_config(free_port(), [up.address], timeouts=timeouts)), up


def test_client_header_does_not_apply_to_an_idle_keepalive_connection(upstream, weft, free_port):
    proxy, _ = _proxy(upstream, weft, free_port, "hdr", client_header="300ms",
                      client_keepalive="10s")
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
        assert conn.read_response().status == 200
        # idle for more than client_header: the connection is kept (client_keepalive rules)
        assert not conn.peer_closed(timeout=1.0)
        conn.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
        assert conn.read_response().status == 200


def test_client_body_idle_gets_408_when_the_body_stalls(upstream, weft, free_port):
    proxy, _ = _proxy(upstream, weft, free_port, "bodyidle", client_body_idle="500ms")
    with RawConnection(proxy.port) as conn:
        conn.send(b"POST /sink HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789")
        start = time.monotonic()
        resp = conn.read_response(timeout=5.0)
        elapsed = time.monotonic() - start
        assert resp.status == 408
        assert resp.body == b"408 Request Timeout: the request body stopped arriving\n"
        assert conn.peer_closed(timeout=3.0)
    assert 0.4 <= elapsed < 3.0, f"408 after {elapsed:.2f}s, client_body_idle is 500ms"


def test_client_body_idle_allows_a_slow_but_steady_body(upstream, weft, free_port):
    proxy, _ = _proxy(upstream, weft, free_port, "steady", client_body_idle="500ms")
    with RawConnection(proxy.port) as conn:
        conn.send(b"POST /sink HTTP/1.1\r\nHost: t\r\nContent-Length: 8\r\n\r\n")
        # 8 bytes, 0.2 s apart: 1.6 s in total, never 0.5 s without a byte
        conn.send_pieces([b"x"] * 8, pause=0.2)
        resp = conn.read_response()
    assert resp.status == 200


def test_client_keepalive_closes_an_idle_connection_silently(upstream, weft, free_port):
    proxy, _ = _proxy(upstream, weft, free_port, "kaidle", client_keepalive="500ms")
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
        assert conn.read_response().status == 200
        start = time.monotonic()
        assert conn.peer_closed(timeout=5.0)
        elapsed = time.monotonic() - start
        assert conn.buf == b"", "an idle close sends nothing (no 408 to a client that sent nothing)"
    assert 0.3 <= elapsed < 3.0, f"closed after {elapsed:.2f}s, client_keepalive is 500ms"


def test_client_header_bounds_a_new_connection_that_never_sends(upstream, weft, free_port):
    # A connection that sends nothing is waiting for its first request head (as nginx's
    # client_header_timeout): it is closed, silently, after client_header.
    proxy, up = _proxy(upstream, weft, free_port, "silent", client_header="500ms",
                       client_keepalive="30s")
    with RawConnection(proxy.port) as conn:
        start = time.monotonic()
        assert conn.peer_closed(timeout=5.0)
        elapsed = time.monotonic() - start
        assert conn.buf == b""
    assert 0.3 <= elapsed < 3.0, f"closed after {elapsed:.2f}s, client_header is 500ms"
    assert up.stats()["requests"] == 0


def test_client_send_idle_drops_a_client_that_stops_reading(upstream, weft, free_port):
    proxy, up = _proxy(upstream, weft, free_port, "sendidle", client_send_idle="500ms")
    size = 256 * 1024 * 1024  # far more than every socket buffer on the way can hold
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # before connect
        sock.settimeout(5.0)
        sock.connect(("127.0.0.1", proxy.port))
        sock.sendall(f"GET /source?size={size} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        # 1. the client reads nothing; weft must give up on it and abort the upstream exchange
        wait_for(lambda: up.stats()["by_path"].get("/source") == 1, 5.0, "the upstream request")
        wait_for(lambda: up.stats()["in_flight"] == 0, 10.0,
                 "weft to drop the stalled exchange (upstream no longer sending)")
        # 2. what the client can still read ends early
        received = 0
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            try:
                data = sock.recv(1 << 20)
            except ConnectionResetError:
                break
            if not data:
                break
            received += len(data)
        assert received < size
    finally:
        sock.close()


def test_upstream_connect_timeout_gets_504(weft, free_port):
    with blackhole() as unreachable:
        proxy = weft(simple_config(free_port(), [unreachable],
                                   timeouts={"upstream_connect": "300ms"}))
        with httpx.Client(base_url=proxy.url, timeout=10.0) as client:
            start = time.monotonic()
            resp = client.get("/echo")
            elapsed = time.monotonic() - start
    assert resp.status_code == 504
    assert 0.25 <= elapsed < 2.5, f"504 after {elapsed:.2f}s, upstream_connect is 300ms"


def test_upstream_header_per_route_override(upstream, weft, free_port):
    up = upstream("perroute")
    config = (base_config(free_port(), timeouts={"upstream_header": "10s"})
              + destination("app", [up.address])
              + route("app", name="impatient", path_prefix="/impatient/", strip_prefix=True,
                      timeouts={"upstream_header": "300ms"})
              + route("app", name="patient", path_prefix="/"))
    proxy = weft(config)
    with httpx.Client(base_url=proxy.url, timeout=10.0) as client:
        start = time.monotonic()
        impatient = client.get("/impatient/slow", params={"delay": 1.5})
        elapsed = time.monotonic() - start
        patient = client.get("/slow", params={"delay": 1.0})
    assert impatient.status_code == 504
    assert elapsed < 1.4
    assert patient.status_code == 200
    assert patient.json()["target"] == "/slow?delay=1.0"


def test_upstream_body_idle_aborts_a_stalled_response_body(upstream, weft, free_port):
    proxy, _ = _proxy(upstream, weft, free_port, "bodystall", upstream_body_idle="300ms")
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /slowbody?delay=5&size=100 HTTP/1.1\r\nHost: t\r\n\r\n")
        start = time.monotonic()
        data = conn.read_until_close(timeout=5.0)
        elapsed = time.monotonic() - start
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), "the head was already on its way"
    assert len(body) < 100, "the body never came; the client must see an incomplete response"
    assert elapsed < 3.0, f"aborted after {elapsed:.2f}s, upstream_body_idle is 300ms"


def test_upstream_body_idle_allows_a_dribbling_body(upstream, weft, free_port):
    proxy, _ = _proxy(upstream, weft, free_port, "dribble", upstream_body_idle="500ms")
    with httpx.Client(base_url=proxy.url, timeout=10.0) as client:
        resp = client.get("/dribble", params={"n": 6, "interval": 0.15})
    assert resp.status_code == 200
    assert resp.text == "".join(f"chunk {i}\n" for i in range(6))


def test_request_total_gets_504_before_the_head(upstream, weft, free_port):
    proxy, _ = _proxy(upstream, weft, free_port, "total", request_total="500ms",
                      upstream_header="10s")
    with httpx.Client(base_url=proxy.url, timeout=10.0) as client:
        start = time.monotonic()
        resp = client.get("/slow", params={"delay": 3})
        elapsed = time.monotonic() - start
    assert resp.status_code == 504
    assert 0.4 <= elapsed < 2.5, f"504 after {elapsed:.2f}s, request_total is 500ms"


def test_request_total_cuts_a_long_body(upstream, weft, free_port):
    proxy, _ = _proxy(upstream, weft, free_port, "totalbody", request_total="700ms",
                      upstream_body_idle="10s")
    with RawConnection(proxy.port) as conn:
        # 30 chunks 0.1 s apart: 3 s in all, never idle for long
        conn.send(b"GET /dribble?n=30&interval=0.1 HTTP/1.1\r\nHost: t\r\n\r\n")
        start = time.monotonic()
        data = conn.read_until_close(timeout=6.0)
        elapsed = time.monotonic() - start
    assert data.startswith(b"HTTP/1.1 200")
    assert data.count(b"chunk ") < 30
    assert not data.endswith(b"0\r\n\r\n"), "a cut body must not look complete"
    assert elapsed < 2.5, f"cut after {elapsed:.2f}s, request_total is 700ms"


def test_request_total_zero_means_no_limit(upstream, weft, free_port):
    proxy, _ = _proxy(upstream, weft, free_port, "nolimit", request_total="0")
    with httpx.Client(base_url=proxy.url, timeout=10.0) as client:
        assert client.get("/slow", params={"delay": 0.5}).status_code == 200


def test_websocket_idle_closes_a_silent_tunnel(upstream, weft, free_port):
    proxy, _ = _proxy(upstream, weft, free_port, "wsidle", websocket_idle="500ms")
    with WsClient(proxy.port, "/ws") as ws:
        assert ws.accepted
        ws.send_text("one")
        assert ws.receive() == "one"
        start = time.monotonic()
        with pytest.raises(ConnectionError):
            ws.receive(timeout=5.0)
        elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 3.0, f"tunnel closed after {elapsed:.2f}s, websocket_idle is 500ms"


def test_websocket_idle_spares_a_busy_tunnel(upstream, weft, free_port):
    proxy, _ = _proxy(upstream, weft, free_port, "wsbusy", websocket_idle="500ms")
    with WsClient(proxy.port, "/ws") as ws:
        assert ws.accepted
        for i in range(8):  # 8 round trips 0.2 s apart: 1.6 s, never 0.5 s silent
            ws.send_text(f"m{i}")
            assert ws.receive() == f"m{i}"
            time.sleep(0.2)  # the pacing under test, not a wait for an event
