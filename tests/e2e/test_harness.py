"""The test upstream server and the raw client, checked directly (no weft involved).

If one of these fails, every e2e result is suspect: the harness itself is broken.
"""

from __future__ import annotations

import hashlib
import socket

import httpx
import pytest
from support.procs import pid_alive, wait_for
from support.rawhttp import RawConnection, exchange
from support.upstream import pattern, pattern_sha256
from support.wsclient import WsClient


def test_echo_describes_the_request_and_keeps_the_connection(upstream):
    up = upstream("alpha")
    with httpx.Client(base_url=up.url, timeout=5.0) as client:
        first = client.post("/echo?x=1", content=b"hello", headers={"X-Trace": "t1"})
        second = client.get("/echo")
    assert first.status_code == 200
    assert first.headers["x-upstream"] == "alpha"
    info = first.json()
    assert info["method"] == "POST"
    assert info["target"] == "/echo?x=1"
    assert info["http_version"] == "1.1"
    assert ["X-Trace", "t1"] in info["headers"]
    assert info["body_len"] == 5
    assert info["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    # 2. the second request reused the same TCP connection
    assert second.json()["connection_id"] == info["connection_id"]
    assert second.json()["request_index_on_connection"] == 1
    stats = up.stats()
    assert stats["connections_accepted"] == 1
    assert stats["requests"] == 2


def test_bodies_fixed_chunked_trailers(upstream):
    up = upstream()
    with RawConnection(up.port) as conn:
        conn.send(b"GET /fixed?size=70000 HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /chunked?size=1000&chunk=7 HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /trailers HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"HEAD /fixed?size=10 HTTP/1.1\r\nHost: x\r\n\r\n")
        fixed, chunked, trailers = conn.read_responses(3)
        head = conn.read_response(head_request=True)
    assert fixed.body == pattern(70000)
    assert chunked.header("transfer-encoding") == "chunked"
    assert chunked.body == pattern(1000)
    assert trailers.trailers[0][0].lower() == "x-checksum"
    assert trailers.trailers[0][1] == hashlib.sha256(trailers.body).hexdigest()
    assert head.status == 200 and head.header("content-length") == "10" and head.body == b""


def test_statuses_without_body_and_connection_close(upstream):
    up = upstream()
    result = exchange(up.port, b"GET /status?code=204 HTTP/1.1\r\nHost: x\r\n\r\n"
                               b"GET /status?code=304 HTTP/1.1\r\nHost: x\r\n\r\n"
                               b"GET /status?code=418 HTTP/1.1\r\nHost: x\r\n"
                               b"Connection: close\r\n\r\n", expect=3)
    assert result.statuses == [204, 304, 418]
    assert result.closed


def test_misbehaviours(upstream):
    up = upstream()
    mid = exchange(up.port, b"GET /close-mid HTTP/1.1\r\nHost: x\r\n\r\n")
    assert mid.responses == [] and mid.closed and len(mid.leftover) > 100
    before = exchange(up.port, b"GET /close-before HTTP/1.1\r\nHost: x\r\n\r\n")
    assert before.responses == [] and before.closed and before.leftover == b""
    framing = exchange(up.port, b"GET /bad-framing HTTP/1.1\r\nHost: x\r\n\r\n")
    assert framing.responses[0].header("content-length") == "5"
    assert framing.responses[0].header("transfer-encoding") == "chunked"
    bad = exchange(up.port, b"GET /bad-response HTTP/1.1\r\nHost: x\r\n\r\n")
    assert bad.responses == [] and bad.leftover.startswith(b"THIS IS NOT HTTP")


def test_expect_continue(upstream):
    up = upstream()
    with RawConnection(up.port) as conn:
        conn.send(b"POST /expect HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        interim = conn.read_response(skip_interim=False)
        assert interim.status == 100
        conn.send(b"abc")
        final = conn.read_response()
    assert final.status == 200
    assert final.body and b'"continue_sent": true' in final.body
    rejected = exchange(up.port, b"POST /expect?reject=1 HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    assert rejected.statuses == [417] and rejected.closed


def test_large_streams_hash(upstream):
    up = upstream()
    size = 20 * 1024 * 1024
    with httpx.Client(base_url=up.url, timeout=30.0) as client:
        h = hashlib.sha256()
        with client.stream("GET", f"/source?size={size}") as resp:
            for chunk in resp.iter_raw():
                h.update(chunk)
        assert h.hexdigest() == pattern_sha256(size)
        sink = client.post("/sink", content=iter([pattern(1 << 20)] * 20)).json()
    assert sink == {"body_len": size, "body_sha256": pattern_sha256(size)}


def test_websocket_echo(upstream):
    up = upstream("wsup")
    with WsClient(up.port, "/ws") as ws:
        assert ws.accepted
        ws.send_text("hello")
        assert ws.receive() == "hello"
        ws.send_bytes(b"\x00\x01")
        assert ws.receive() == b"\x00\x01"
        assert ws.ping(b"p1") == b"p1"


def test_sigterm_stops_the_upstream(upstream):
    up = upstream()
    up.stop()
    assert not pid_alive(up.proc.pid)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", up.port), timeout=1):
        pass


def test_idle_close_and_connection_close(upstream):
    up = upstream()
    with RawConnection(up.port) as conn:
        conn.send(b"GET /echo?idle_close=0.2 HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = conn.read_response()
        assert resp.status == 200 and not resp.connection_close
        assert conn.peer_closed(timeout=3.0)
    with RawConnection(up.port) as conn:
        conn.send(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert conn.read_response().connection_close
        assert conn.peer_closed(timeout=3.0)
    wait_for(lambda: up.stats()["open_connections"] == 0, 5.0, "both connections to end")
    assert up.stats()["connections_accepted"] == 2


def test_options_asterisk(upstream):
    up = upstream()
    result = exchange(up.port, b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", close_wait=0.1)
    assert result.statuses == [200]
    assert "OPTIONS" in (result.responses[0].header("allow") or "")
