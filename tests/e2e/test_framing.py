"""Message framing through weft: every way HTTP/1.x delimits a body, on both sides.

Requests and responses go through real sockets; the upstream reports what it received (length
and SHA-256 of the body), and raw-socket reads show the framing the client got.
"""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest
from support.config import simple_config
from support.procs import wait_for
from support.rawhttp import RawConnection, exchange
from support.upstream import pattern

pytestmark = pytest.mark.e2e


@pytest.fixture
def proxied(upstream, weft, free_port):
    """One upstream behind one weft; returns (weft, upstream)."""
    up = upstream("frame")
    return weft(simple_config(free_port(), [up.address])), up


def _json(body: bytes) -> dict:
    return json.loads(body)


def test_content_length_response_body_arrives_whole(proxied):
    proxy, _ = proxied
    with httpx.Client(base_url=proxy.url, timeout=10.0) as client:
        resp = client.get("/fixed", params={"size": 300_001})
    assert resp.status_code == 200
    assert resp.headers["content-length"] == "300001"
    assert resp.content == pattern(300_001)


def test_chunked_response_is_streamed_chunked_to_an_http11_client(proxied):
    proxy, _ = proxied
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /chunked?size=100000&chunk=999 HTTP/1.1\r\nHost: t\r\n\r\n")
        resp = conn.read_response()
    assert resp.status == 200
    # The length is unknown when the head is sent: a streaming proxy must not invent one.
    assert resp.header("transfer-encoding") == "chunked"
    assert resp.header("content-length") is None
    assert resp.body == pattern(100_000)


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
def test_content_length_request_body_reaches_the_upstream(proxied, method):
    proxy, _ = proxied
    body = pattern(200_000)
    with httpx.Client(base_url=proxy.url, timeout=10.0) as client:
        resp = client.request(method, "/echo", content=body)
    info = resp.json()
    assert info["method"] == method
    assert info["body_len"] == len(body)
    assert info["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_chunked_request_body_reaches_the_upstream(proxied):
    proxy, _ = proxied
    # 1. httpx sends a generator body chunked
    parts = [pattern(10_000, i * 10_000) for i in range(7)]
    with httpx.Client(base_url=proxy.url, timeout=10.0) as client:
        resp = client.post("/echo", content=iter(parts))
    info = resp.json()
    whole = b"".join(parts)
    assert info["body_len"] == len(whole)
    assert info["body_sha256"] == hashlib.sha256(whole).hexdigest()
    # 2. and a hand-made chunked body with a chunk extension and a trailer
    raw = (b"PUT /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: yes\r\n\r\n")
    result = exchange(proxy.port, raw, close_wait=0.2)
    assert result.statuses == [200]
    info = _json(result.responses[0].body)
    assert info["body_len"] == 11
    assert info["body_sha256"] == hashlib.sha256(b"hello world").hexdigest()


def test_head_response_has_headers_but_no_body_and_the_connection_stays_usable(proxied):
    proxy, _ = proxied
    with RawConnection(proxy.port) as conn:
        conn.send(b"HEAD /fixed?size=5000 HTTP/1.1\r\nHost: t\r\n\r\n")
        head = conn.read_response(head_request=True)
        # 2. were a body sent after the HEAD response, it would be parsed as the next response
        conn.send(b"GET /fixed?size=10 HTTP/1.1\r\nHost: t\r\n\r\n")
        after = conn.read_response()
    assert head.status == 200
    assert head.header("content-length") == "5000"
    assert head.body == b""
    assert after.status == 200 and after.body == pattern(10)


def test_204_and_304_carry_no_body(proxied):
    proxy, _ = proxied
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /status?code=204 HTTP/1.1\r\nHost: t\r\n\r\n"
                  b"GET /status?code=304 HTTP/1.1\r\nHost: t\r\n\r\n"
                  b"GET /fixed?size=3 HTTP/1.1\r\nHost: t\r\n\r\n")
        r204, r304, after = conn.read_responses(3)
    assert (r204.status, r304.status, after.status) == (204, 304, 200)
    assert r204.header("transfer-encoding") is None
    assert after.body == pattern(3)


def test_http10_client_gets_an_http10_compatible_response_and_a_close(proxied):
    proxy, _ = proxied
    # 1. a fixed-length body
    fixed = exchange(proxy.port, b"GET /fixed?size=1000 HTTP/1.0\r\nHost: t\r\n\r\n")
    assert fixed.statuses == [200]
    assert fixed.responses[0].body == pattern(1000)
    assert fixed.closed, "HTTP/1.0 without keep-alive: the server closes after the response"
    # 2. an upstream chunked body: an HTTP/1.0 client does not understand chunked
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /chunked?size=5000&chunk=100 HTTP/1.0\r\nHost: t\r\n\r\n")
        data = conn.read_until_close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.")
    assert b"transfer-encoding" not in head.lower()
    assert body == pattern(5000)


def test_pipelined_requests_are_answered_in_order(proxied):
    proxy, _ = proxied
    requests = b"".join(
        b"GET /echo?n=%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(6)
    ) + b"POST /echo?n=6 HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
    with RawConnection(proxy.port) as conn:
        conn.send(requests)
        responses = conn.read_responses(7, timeout=10.0)
    targets = [_json(r.body)["target"] for r in responses]
    assert targets == [f"/echo?n={i}" for i in range(7)]
    assert _json(responses[6].body)["body_len"] == 3


def test_response_trailers_reach_a_client_that_accepts_them(proxied):
    proxy, _ = proxied
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /trailers HTTP/1.1\r\nHost: t\r\nTE: trailers\r\n\r\n")
        resp = conn.read_response()
    assert resp.status == 200
    assert resp.body == pattern(1000)
    trailers = {k.lower(): v for k, v in resp.trailers}
    assert trailers.get("x-checksum") == hashlib.sha256(resp.body).hexdigest()


def test_expect_100_continue_gets_an_interim_response_before_the_body(proxied):
    proxy, _ = proxied
    with RawConnection(proxy.port) as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        interim = conn.read_response(skip_interim=False, timeout=5.0)
        assert interim.status == 100
        conn.send(b"hello")
        final = conn.read_response()
    assert final.status == 200
    assert _json(final.body)["body_len"] == 5


@pytest.mark.parametrize("bad_chunk", [
    b"10000000000000000\r\n" + b"x" * 100,  # 2**64: past any length (RFC 9112 section 7.1)
    b"zz\r\nhello\r\n",  # not a chunk size
    b"5;a=\x00\r\nhello\r\n",  # not a chunk-ext
], ids=["size-overflow", "size-not-hex", "bad-ext"])
def test_a_bad_chunk_after_the_head_went_upstream_closes_both_connections(proxied, bad_chunk):
    """1. A GET opens one upstream connection, which goes back to the pool. 2. A chunked POST
    takes it: its head and first chunk go upstream. 3. The next chunk is malformed: the client
    gets 400 and a close (no response had started). 4. The upstream connection, left in the
    middle of a body, is closed, never reused: the next request opens a new one."""
    proxy, up = proxied
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
        first_id = conn.read_response().header("x-connection-id")
    assert up.stats()["connections_accepted"] == 1
    with RawConnection(proxy.port) as conn:
        conn.send(b"POST /sink HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"5\r\nhello\r\n")
        wait_for(lambda: up.stats()["requests"] == 2, 5.0, "the POST to reach the upstream")
        assert up.stats()["connections_accepted"] == 1, "the POST reused the pooled connection"
        conn.send(bad_chunk)
        resp = conn.read_response()
        assert resp.status == 400
        assert conn.peer_closed(timeout=3.0), "the client connection must be closed"
    wait_for(lambda: up.stats()["open_connections"] == 0, 5.0,
             "weft to close the upstream connection the POST left mid-body")
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
        after = conn.read_response()
    assert after.status == 200
    assert after.header("x-connection-id") != first_id
    assert up.stats()["connections_accepted"] == 2
