"""Keep-alive on both sides: one client connection carries many requests, and weft reuses its
upstream connections instead of opening one per request.

The upstream numbers its TCP connections (``connection_id``) and counts them (``/stats``), so
reuse is observed where it happens, not inferred from timing.
"""

from __future__ import annotations

import json

import httpx
import pytest
from support.clients import run_concurrently
from support.config import simple_config
from support.procs import wait_for
from support.rawhttp import RawConnection

pytestmark = pytest.mark.e2e


def _get(base_url: str, path: str) -> httpx.Response:
    with httpx.Client(base_url=base_url, timeout=10.0) as client:
        return client.get(path)


@pytest.fixture
def proxied(upstream, weft, free_port):
    up = upstream("ka")
    return weft(simple_config(free_port(), [up.address])), up


def test_sequential_requests_on_one_client_connection_use_one_upstream_connection(proxied):
    proxy, up = proxied
    # 1. twenty requests over one client connection
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        infos = [client.get("/echo", params={"i": i}).json() for i in range(20)]
    # 2. the upstream saw all of them on a single connection, in order
    assert {info["connection_id"] for info in infos} == {infos[0]["connection_id"]}
    assert [info["request_index_on_connection"] for info in infos] == list(range(20))
    stats = up.stats()
    assert stats["requests"] == 20
    assert stats["connections_accepted"] == 1


def test_client_connection_is_kept_open_between_requests(proxied):
    proxy, _ = proxied
    with RawConnection(proxy.port) as conn:
        for i in range(5):
            conn.send(b"GET /echo?i=%d HTTP/1.1\r\nHost: t\r\n\r\n" % i)
            resp = conn.read_response()
            assert resp.status == 200
            assert not resp.connection_close
            assert json.loads(resp.body)["target"] == f"/echo?i={i}"
        assert not conn.peer_closed(timeout=0.3)


def test_bodies_of_every_framing_leave_the_connections_reusable(proxied):
    proxy, up = proxied
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        client.post("/echo", content=b"x" * 10_000)
        client.post("/echo", content=iter([b"a" * 1000] * 10))
        client.get("/chunked", params={"size": 10_000, "chunk": 333})
        client.get("/fixed", params={"size": 10_000})
        client.head("/fixed", params={"size": 10_000})
        client.get("/status", params={"code": 204})
        client.get("/status", params={"code": 404})
        last = client.get("/echo").json()
    assert last["request_index_on_connection"] == 7
    assert up.stats()["connections_accepted"] == 1


def test_client_connection_close_is_honoured_after_the_response(proxied):
    # Several client connections: assumes one weft worker (pools are per worker).
    proxy, up = proxied
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.connection_close
        assert conn.peer_closed(timeout=2.0)
    # The client's Connection: close is hop-by-hop: the upstream connection stays reusable.
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        client.get("/echo")
    assert up.stats()["connections_accepted"] == 1


def test_upstream_closing_its_connection_does_not_affect_the_client(proxied):
    proxy, up = proxied
    with RawConnection(proxy.port) as conn:
        # 1. the upstream answers with Connection: close and closes
        conn.send(b"GET /echo?close=1 HTTP/1.1\r\nHost: t\r\n\r\n")
        first = conn.read_response()
        assert first.status == 200
        assert not first.connection_close, "the upstream's Connection: close is hop-by-hop"
        # 2. the same client connection goes on; weft opens a new upstream connection
        conn.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
        second = conn.read_response()
    assert second.status == 200
    assert json.loads(second.body)["connection_id"] != json.loads(first.body)["connection_id"]
    assert up.stats()["connections_accepted"] == 2


# -- pool settings ------------------------------------------------------------------------------


def test_pool_max_requests_retires_a_connection(upstream, weft, free_port):
    up = upstream("retire")
    proxy = weft(simple_config(free_port(), [up.address], pool={"max_requests": 3}))
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        infos = [client.get("/echo").json() for _ in range(7)]
    # 3 + 3 + 1 requests on three successive upstream connections
    per_connection = [info["request_index_on_connection"] for info in infos]
    assert per_connection == [0, 1, 2, 0, 1, 2, 0]
    assert len({info["connection_id"] for info in infos}) == 3


def test_pool_idle_timeout_closes_an_idle_upstream_connection(upstream, weft, free_port):
    up = upstream("idleup")
    proxy = weft(simple_config(free_port(), [up.address], pool={"idle_timeout": "300ms"}))
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        first = client.get("/echo").json()
        # weft closes its idle upstream connection (the sweep may add up to a second)
        wait_for(lambda: up.stats()["open_connections"] == 0, 5.0,
                 "the idle upstream connection to be closed")
        second = client.get("/echo").json()
    assert second["connection_id"] != first["connection_id"]


def test_pool_keeps_at_most_max_idle_per_endpoint(upstream, weft, free_port):
    # Several client connections: assumes one weft worker (pools are per worker).
    up = upstream("maxidle")
    proxy = weft(simple_config(free_port(), [up.address], pool={"max_idle_per_endpoint": 1}))
    # 1. three concurrent requests need three upstream connections
    results = run_concurrently([lambda: _get(proxy.url, "/slow?delay=0.5")] * 3, timeout=15.0)
    assert all(r.status_code == 200 for r in results)
    assert up.stats()["connections_accepted"] == 3
    # 2. once they are idle, only one is kept
    wait_for(lambda: up.stats()["open_connections"] == 1, 5.0,
             "idle upstream connections beyond max_idle_per_endpoint to be closed")


def test_upstream_max_connections_caps_the_worker_across_endpoints(upstream, weft, free_port):
    a, b = upstream("capA"), upstream("capB")
    proxy = weft(simple_config(free_port(), [a.address, b.address], strategy="round_robin",
                               upstream={"max_connections": 1}))
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        for _ in range(4):
            assert client.get("/echo").status_code == 200
            # never more than one upstream connection open, all endpoints together
            assert a.stats()["open_connections"] + b.stats()["open_connections"] <= 1
    # alternating endpoints: each request had to close the other endpoint's idle connection
    assert a.stats()["connections_accepted"] == 2
    assert b.stats()["connections_accepted"] == 2


def test_limits_max_connections_makes_extra_clients_wait(upstream, weft, free_port):
    # Several client connections: assumes one weft worker (pools are per worker).
    up = upstream("maxconn")
    proxy = weft(simple_config(free_port(), [up.address], limits={"max_connections": 2}))
    first, second = RawConnection(proxy.port), RawConnection(proxy.port)
    try:
        for conn in (first, second):
            conn.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
            assert conn.read_response().status == 200
        with RawConnection(proxy.port) as third:
            # 1. the third connection is not served while two are open...
            third.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
            with pytest.raises(TimeoutError):
                third.read_response(timeout=0.7)
            # 2. ...and is served as soon as one closes
            first.close()
            assert third.read_response(timeout=5.0).status == 200
    finally:
        first.close()
        second.close()


def test_upstream_closing_an_idle_pooled_connection_is_not_an_error(upstream, weft, free_port):
    """The classic stale keep-alive race: the upstream closes a connection weft holds idle
    (its own keep-alive timeout, unannounced). The next request must not fail with 502."""
    up = upstream("stale")
    proxy = weft(simple_config(free_port(), [up.address]))
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        first = client.get("/echo", params={"idle_close": 0.2})
        wait_for(lambda: up.stats()["open_connections"] == 0, 5.0,
                 "the upstream to close its idle connection")
        second = client.get("/echo")
    assert first.status_code == 200
    assert second.status_code == 200
    assert second.json()["connection_id"] != first.json()["connection_id"]


def test_a_post_after_the_upstream_closed_an_idle_connection_is_not_an_error(
    upstream, weft, free_port
):
    """A request with a body is never retried, so the pool checks an idle connection before
    reusing it for one (a GET skips that check and is retried instead; see the test above)."""
    up = upstream("stale")
    proxy = weft(simple_config(free_port(), [up.address]))
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        first = client.get("/echo", params={"idle_close": 0.2})
        wait_for(lambda: up.stats()["open_connections"] == 0, 5.0,
                 "the upstream to close its idle connection")
        second = client.post("/echo", content=b"x" * 1000)
    assert first.status_code == 200
    assert second.status_code == 200
    assert second.json()["connection_id"] != first.json()["connection_id"]
    assert up.stats()["connections_accepted"] == 2


def test_an_unsolicited_408_on_a_long_idle_connection_is_never_taken_for_a_response(
    upstream, weft, free_port
):
    """Some servers answer their idle timeout with a 408 before closing. An idle upstream
    connection is always checked before reuse: the 408 waiting on it marks it dead (a stray
    response), and the request goes out on a new connection."""
    up = upstream("stale408")
    proxy = weft(simple_config(free_port(), [up.address]))
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        first = client.get("/echo", params={"idle_408": 0.6})
        wait_for(lambda: up.stats()["open_connections"] == 0, 5.0,
                 "the upstream to send its 408 and close the idle connection")
        second = client.get("/echo")
    assert first.status_code == 200
    assert second.status_code == 200, second.text
    assert second.json()["connection_id"] != first.json()["connection_id"]
