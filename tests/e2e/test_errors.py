"""The statuses weft itself produces when the exchange cannot go as asked.

502: the upstream broke the exchange (refused, closed, answered garbage or ambiguous framing).
503: nothing available (pool queue full or waited too long), with Retry-After.
504: the upstream was too slow. 408: the client was too slow.
"""

from __future__ import annotations

import time

import httpx
import pytest
from support.clients import run_concurrently
from support.config import simple_config
from support.procs import free_port as pick_port
from support.procs import wait_for
from support.rawhttp import RawConnection, exchange

pytestmark = pytest.mark.e2e


def test_upstream_down_gets_502(weft, free_port):
    dead = f"127.0.0.1:{pick_port()}"  # nothing listens there
    proxy = weft(simple_config(free_port(), [dead]))
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        resp = client.get("/echo")
    assert resp.status_code == 502


@pytest.mark.parametrize("path", ["/bad-framing", "/bad-response", "/close-before"])
def test_upstream_breaking_the_exchange_gets_502_and_the_client_connection_survives(
        upstream, weft, free_port, path):
    up = upstream("broken")
    proxy = weft(simple_config(free_port(), [up.address]))
    with RawConnection(proxy.port) as conn:
        conn.send(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        resp = conn.read_response()
        assert resp.status == 502
        # The client did nothing wrong: its connection stays usable.
        conn.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
        assert conn.read_response().status == 200


def test_upstream_closing_mid_body_truncates_and_closes_the_client_connection(
        upstream, weft, free_port):
    up = upstream("midclose")
    proxy = weft(simple_config(free_port(), [up.address]))
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /close-mid HTTP/1.1\r\nHost: t\r\n\r\n")
        # The head (Content-Length: 1000) is already forwarded when the upstream gives up after
        # 100 bytes: the only honest signal left is closing the client connection early.
        data = conn.read_until_close(timeout=5.0)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert len(body) < 1000


def test_slow_upstream_head_gets_504_after_upstream_header(upstream, weft, free_port):
    up = upstream("slow")
    proxy = weft(simple_config(free_port(), [up.address],
                               timeouts={"upstream_header": "300ms"}))
    with httpx.Client(base_url=proxy.url, timeout=10.0) as client:
        start = time.monotonic()
        resp = client.get("/slow", params={"delay": 3})
        elapsed = time.monotonic() - start
    assert resp.status_code == 504
    assert 0.25 <= elapsed < 2.0, f"504 after {elapsed:.2f}s, upstream_header is 300ms"


def test_client_stalling_inside_its_head_gets_408_after_client_header(
        upstream, weft, free_port):
    up = upstream("stall")
    proxy = weft(simple_config(free_port(), [up.address], timeouts={"client_header": "500ms"}))
    with RawConnection(proxy.port) as conn:
        start = time.monotonic()
        conn.send(b"GET /echo HTTP/1.1\r\nHost: t\r\nX-Half: ")
        resp = conn.read_response(timeout=5.0)
        elapsed = time.monotonic() - start
        assert resp.status == 408
        assert conn.peer_closed(timeout=3.0)
    assert 0.4 <= elapsed < 3.0, f"408 after {elapsed:.2f}s, client_header is 500ms"
    assert up.stats()["requests"] == 0


def _slow_get(url: str, delay: float) -> httpx.Response:
    with httpx.Client(timeout=15.0) as client:
        return client.get(f"{url}/slow", params={"delay": delay})


def test_full_pool_queue_gets_503_with_retry_after(upstream, weft, free_port):
    # Several client connections: assumes one weft worker (pools are per worker).
    # 1. one connection per endpoint, one request may wait for it
    up = upstream("capped")
    proxy = weft(simple_config(free_port(), [up.address],
                               pool={"max_per_endpoint": 1, "queue_size": 1,
                                     "queue_timeout": "10s"}))
    # 2. the first slow request holds the only connection...
    def after_first_is_in_flight() -> list[httpx.Response]:
        wait_for(lambda: up.stats()["in_flight"] == 1, 5.0, "the first request at the upstream")
        # 3. ...then two more arrive: one waits in the queue, the other finds it full
        return run_concurrently([lambda: _slow_get(proxy.url, 0.1)] * 2, timeout=20.0)

    first, rest = run_concurrently([lambda: _slow_get(proxy.url, 1.5), after_first_is_in_flight],
                                   timeout=30.0)
    statuses = sorted([first.status_code, *(r.status_code for r in rest)])
    assert statuses == [200, 200, 503]
    refused = next(r for r in rest if r.status_code == 503)
    assert refused.headers.get("retry-after", "").isdigit()
    assert up.stats()["max_in_flight"] == 1, "max_per_endpoint = 1 was exceeded"


def test_pool_queue_timeout_gets_503(upstream, weft, free_port):
    # Several client connections: assumes one weft worker (pools are per worker).
    up = upstream("qtimeout")
    proxy = weft(simple_config(free_port(), [up.address],
                               pool={"max_per_endpoint": 1, "queue_size": 10,
                                     "queue_timeout": "300ms"}))

    def second() -> tuple[httpx.Response, float]:
        wait_for(lambda: up.stats()["in_flight"] == 1, 5.0, "the first request at the upstream")
        start = time.monotonic()
        resp = _slow_get(proxy.url, 0.1)
        return resp, time.monotonic() - start

    first, (waited, elapsed) = run_concurrently([lambda: _slow_get(proxy.url, 2.0), second],
                                                timeout=30.0)
    assert first.status_code == 200
    assert waited.status_code == 503
    assert "retry-after" in waited.headers
    assert elapsed < 1.5, f"503 after {elapsed:.2f}s, queue_timeout is 300ms"


def test_no_route_gets_404(upstream, weft, free_port):
    up = upstream("routed")
    proxy = weft(simple_config(free_port(), [up.address], route_keys={"path_prefix": "/api/"}))
    result = exchange(proxy.port, b"GET /other HTTP/1.1\r\nHost: t\r\n\r\n", close_wait=0.2)
    assert result.statuses == [404]
    assert up.stats()["requests"] == 0


def test_method_not_allowed_on_a_route_gets_405_with_allow(upstream, weft, free_port):
    up = upstream("methods")
    proxy = weft(simple_config(free_port(), [up.address],
                               route_keys={"methods": ["GET", "HEAD"]}))
    result = exchange(proxy.port, b"DELETE /echo HTTP/1.1\r\nHost: t\r\n\r\n", close_wait=0.2)
    assert result.statuses == [405]
    allow = result.responses[0].header("allow") or ""
    assert "GET" in allow
    assert up.stats()["requests"] == 0
